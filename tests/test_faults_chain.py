"""Fault suite, part 3 (issue 14): stale chains, outputs replaced together, Ctrl-C, diverged networks, full disks.

Same rules as tests/test_faults.py, whose chain, helpers and assertions this file reuses: every case runs a
command through the CLI and asserts (a) one clean line and the exit code (``error: ...`` and 1, or 130 for
Ctrl-C), no traceback; (b) the message names the culprit (both files of a stale pairing, the images, the
checkpoint) and the command that fixes it; (c) every file under data/ and metrics/ of the earlier good run is
byte-identical afterwards (training runs: all but the checkpoints and curves they replace by design), and no
temporary file is left.

1. a stage run by hand after an upstream one was redone: every reader refuses the stale artefact, naming both
   files and the command that rebuilds it (train-refine, evaluate, predict, show, localize);
2. a stage that fails while writing its last output leaves every previous output as it was;
3. Ctrl-C: one line saying what was kept and how to go on (``--resume`` for training), exit code 130;
4. a network giving NaN (a diverged checkpoint), a full disk while the synthetic dataset is generated or an
   archive extracted, a failing dvclive summary.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import io
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
from conftest import write_fake_cub
from PIL import Image
from test_faults import (  # noqa: F401  (chain and project are fixtures)
    NAME,
    SYNTHETIC,
    assert_refused,
    chain,
    edit_params,
    flat,
    invoke,
    project,
    recrop,
    reextract_attention,
    retrain_stage1,
    snapshot,
    temp_files,
)

from fgpipe import h5schema
from fgpipe.checkpoints import load_checkpoint
from fgpipe.commands import predict
from fgpipe.manifest import read_manifest
from fgpipe.stages import evaluate, extract_crops, train_backbone, train_refine
import fgpipe.store

D = f"data/{NAME}"
M = f"metrics/{NAME}"
IMAGE = "raw/test/class0/000.png"


def run_on(project: Path, command: str, options: list[str] | tuple[str, ...] = ()) -> Any:
    """``fgpipe COMMAND -d toy -p params.yaml OPTIONS`` (predict: OPTIONS are image paths, relative to ``project``)."""
    if command == "predict":
        return invoke(command, *(project / o for o in options), "-d", NAME, "-p", project / "params.yaml")
    return invoke(command, "-d", NAME, "-p", project / "params.yaml", *options)


def absolute(project: Path, culprits: list[str]) -> list[str]:
    """Paths under data/ or metrics/ (at the start of a culprit, or after `than `) made absolute in the project."""
    out = []
    for c in culprits:
        for top in ("data/", "metrics/"):
            if c.startswith(top):
                c = f"{project}/{c}"
            c = c.replace(f" than {top}", f" than {project}/{top}")
        out.append(c)
    return out


# =========================================================================== 1. stale chains
def reextract_default(project: Path) -> None:
    """extract-attention again with the chain's own params (after stage 1 was retrained: attention.h5 is current)."""
    assert invoke("extract-attention", "-d", NAME, "-p", project / "params.yaml").exit_code == 0


def refine_without_the_crops_check(project: Path) -> None:
    """train-refine as an older fgpipe ran it: crops.h5 not checked against the stage-1 checkpoint."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(train_refine, "check_crops", lambda *args, **kwargs: None)
        assert invoke("train-refine", "-d", NAME, "-p", project / "params.yaml").exit_code == 0


def recrop_keeping_the_old_crops_file(project: Path) -> None:
    """extract-crops again (--threshold 0.3), then the previous crops.h5 put back: extract_crops.json describes
    another crops.h5 than the one on disk (which refine/best.pt was trained on)."""
    crops = project / D / "crops.h5"
    old = crops.read_bytes()
    recrop(project)
    crops.write_bytes(old)


def retrain_refine(project: Path) -> None:
    assert invoke("train-refine", "-d", NAME, "-p", edit_params(project, train_refine__seed=1)).exit_code == 0


def drop_evaluate_sources(project: Path) -> None:
    """evaluate.json's record without the hashes of the checkpoints its weights were chosen for."""
    path = project / M / "evaluate.provenance.json"
    made = json.loads(path.read_text())
    made.pop("sources")
    path.write_text(json.dumps(made))


def crops_schema_version_1(project: Path) -> None:
    with h5py.File(project / D / "crops.h5", "r+") as h5:
        h5.attrs["schema_version"] = 1


NEW_CHECKPOINT = f"was made from another checkpoint than {D}/stage1/best.pt"
# (id, what happened since the chain ran, the command that must refuse, its options, what it must name, what it must not)
STALE_CASES = [
    ("train-refine:crops-from-another-stage1-checkpoint", [retrain_stage1], "train-refine", [],
     [f"{D}/crops.h5 {NEW_CHECKPOINT}", "rerun `fgpipe extract-attention --dataset toy`, then `fgpipe extract-crops --dataset toy`"], []),
    ("train-refine:crops-older-than-the-reextracted-attention", [retrain_stage1, reextract_default], "train-refine", [],
     [f"{D}/crops.h5 {NEW_CHECKPOINT}", "rerun `fgpipe extract-crops --dataset toy` (or `dvc repro`)"], ["extract-attention"]),
    ("train-refine:crops-from-another-attention-file", [reextract_attention], "train-refine", [],
     [f"{D}/crops.h5 was made from another attention file than {D}/attention.h5", "rerun `fgpipe extract-crops --dataset toy`"], []),
    ("train-refine:crops-schema-version-1", [crops_schema_version_1], "train-refine", [],
     [f"{D}/crops.h5: schema version 1, this fgpipe reads version 2", "rerun `fgpipe extract-crops --dataset toy`"], []),
    ("evaluate:crops-from-another-stage1-checkpoint", [retrain_stage1, refine_without_the_crops_check], "evaluate", [],
     [f"{D}/crops.h5 {NEW_CHECKPOINT}", "`fgpipe extract-crops --dataset toy`"], []),
    ("evaluate:localisation-of-another-crops-file", [recrop_keeping_the_old_crops_file], "evaluate", [],
     [f"{M}/extract_crops.json was computed from another crops.h5 than {D}/crops.h5", "rerun `fgpipe extract-crops --dataset toy`"], []),
    ("predict:weights-chosen-for-another-refine-checkpoint", [retrain_refine], "predict", [IMAGE],
     [f"{M}/evaluate.json was computed from another refine checkpoint than {D}/refine/best.pt", "rerun `fgpipe evaluate --dataset toy`"], []),
    ("predict:weights-without-checkpoint-hashes", [drop_evaluate_sources], "predict", [IMAGE],
     [f"{M}/evaluate.json does not record which stage-1 checkpoint", "rerun `fgpipe evaluate --dataset toy`"], []),
    ("predict:attention-from-another-stage1-checkpoint", [retrain_stage1], "predict", [IMAGE],
     [f"{D}/attention.h5 {NEW_CHECKPOINT}", "rerun `fgpipe extract-attention --dataset toy`"], []),
    ("show:attention-from-another-stage1-checkpoint", [retrain_stage1], "show", ["--image", "test/class0/000"],
     [f"{D}/attention.h5 {NEW_CHECKPOINT}", "rerun `fgpipe extract-attention --dataset toy`"], []),
    ("show:crops-older-than-the-reextracted-attention", [retrain_stage1, reextract_default], "show", ["--image", "test/class0/000"],
     [f"{D}/crops.h5 {NEW_CHECKPOINT}", "rerun `fgpipe extract-crops --dataset toy`"], []),
    ("localize:attention-from-another-stage1-checkpoint", [retrain_stage1], "localize", [],
     [f"{D}/attention.h5 {NEW_CHECKPOINT}", "rerun `fgpipe extract-attention --dataset toy`"], []),
]


@pytest.mark.parametrize("case_id, since, command, options, culprits, unsaid", STALE_CASES, ids=[c[0] for c in STALE_CASES])
def test_a_stale_artefact_is_refused_naming_both_files_and_the_fix(
    project: Path, case_id: str, since: list[Callable[[Path], None]], command: str, options: list[str],
    culprits: list[str], unsaid: list[str],
) -> None:
    for step in since:
        step(project)
    before = snapshot(project)
    out = assert_refused(run_on(project, command, options), *absolute(project, culprits))
    for text in unsaid:
        assert text not in out, out
    assert snapshot(project) == before and not temp_files(project)


def test_the_current_chain_is_accepted_by_every_reader(project: Path) -> None:
    """The checks refuse only what is stale: the chain as the stages wrote it passes every reader."""
    for command, options in (("predict", [IMAGE]), ("show", ["--image", "test/class0/000"]), ("localize", [])):
        result = run_on(project, command, options)
        assert result.exit_code == 0, result.output
    evaluation = json.loads((project / M / "evaluate.provenance.json").read_text())
    digest = {rel: hashlib.sha256((project / D / rel).read_bytes()).hexdigest() for rel in ("stage1/best.pt", "refine/best.pt", "crops.h5")}
    assert evaluation["sources"]["stage1_sha256"] == digest["stage1/best.pt"]
    assert evaluation["sources"]["refine_sha256"] == digest["refine/best.pt"]
    assert json.loads((project / M / "extract_crops.provenance.json").read_text())["sources"]["crops_sha256"] == digest["crops.h5"]
    with h5schema.CropsReader(project / D / "crops.h5") as crops:
        assert crops.meta.checkpoint_sha256 == digest["stage1/best.pt"]


# =========================================================================== 2. outputs replaced together
def disk_full_at(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """The disk fills up while the temporary file of output ``name`` is synced (the last output a stage writes)."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")).name.startswith(f".{name}."):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(fgpipe.store.os, "fsync", fsync)


# (stage, params edits, options, an output whose content they change): a run whose outputs differ from the chain's.
# prepare's metrics are counts, which another split seed leaves as they are (only its `seconds` could differ, and
# may not): its manifest is what the seed changes.
NEW_CONTENT = [
    ("prepare", {f"datasets__{NAME}__split_seed": 1}, [], f"{D}/manifest.csv"),
    ("extract-attention", {}, ["--method", "bap"], f"{M}/extract_attention.json"),
    ("extract-crops", {}, ["--threshold", "0.3"], f"{M}/extract_crops.json"),
    ("evaluate", {}, ["--combine", "fixed"], f"{M}/evaluate.json"),
]


@pytest.mark.parametrize("stage, edits, options, changed", NEW_CONTENT, ids=[c[0] for c in NEW_CONTENT])
def test_a_stage_failing_at_its_last_output_leaves_every_previous_output(
    project: Path, monkeypatch: pytest.MonkeyPatch, stage: str, edits: dict[str, Any], options: list[str], changed: str
) -> None:
    params = edit_params(project, **edits)
    before = snapshot(project)
    made = f"{stage.replace('-', '_')}.provenance.json"
    disk_full_at(monkeypatch, made)  # the last output: the metrics file beside it is written already
    result = invoke(stage, "-d", NAME, "-p", params, *options)
    monkeypatch.undo()
    assert_refused(result, f"cannot write {project / M / made}: No space left on device (ENOSPC)")
    assert snapshot(project) == before and not temp_files(project)
    rerun = invoke(stage, "-d", NAME, "-p", params, *options)  # the same run, with room on the disk, completes
    assert rerun.exit_code == 0, rerun.output
    assert snapshot(project)[changed] != before[changed] and not temp_files(project)


@pytest.mark.parametrize("stage, folder", [("train-backbone", "stage1"), ("train-refine", "refine")], ids=["train-backbone", "train-refine"])
def test_a_training_run_failing_at_its_metrics_leaves_checkpoints_only_resume_takes(
    project: Path, monkeypatch: pytest.MonkeyPatch, stage: str, folder: str
) -> None:
    """Checkpoints are written every epoch by design (for --resume), into the run's ``unfinished`` folder; they,
    the curves, the metrics file and its provenance record replace the previous run's together at the end, so a run
    failing there (at the record, the last file written) leaves every previous output as it was and its own
    checkpoints for --resume."""
    key = stage.replace("-", "_")
    params = edit_params(project, **{f"{key}__seed": 1})
    before = snapshot(project)
    disk_full_at(monkeypatch, f"{key}.provenance.json")
    result = invoke(stage, "-d", NAME, "-p", params)
    monkeypatch.undo()
    assert_refused(result, f"cannot write {project / M / key}.provenance.json: No space left on device (ENOSPC)")
    after = snapshot(project)
    assert {rel: after.get(rel) for rel in before} == before  # checkpoints, curves, metrics: all the previous run's
    assert {rel for rel in after if rel not in before} <= {rel for rel in after if rel.startswith(f"{D}/{folder}/unfinished/")}
    assert load_checkpoint(project / D / folder / "unfinished" / "best.pt")["finished"] is False and not temp_files(project)
    resumed = invoke(stage, "-d", NAME, "-p", params, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(project / D / folder / "best.pt")["finished"] is True
    assert snapshot(project)[f"{M}/{key}.json"] != before[f"{M}/{key}.json"]
    assert not (project / D / folder / "unfinished").exists()


# =========================================================================== 3. Ctrl-C
def ctrl_c(*args: Any, **kwargs: Any) -> Any:
    raise KeyboardInterrupt


def assert_interrupted(result: Any, *said: str) -> str:
    """Exit code 130, one clean line (no traceback, no click `Aborted!`) saying each of ``said``."""
    out = flat(result.output)
    assert result.exit_code == 130, result.output
    assert "Traceback" not in out and "Aborted" not in out, result.output
    lines = [line for line in result.output.splitlines() if "interrupted (Ctrl-C)" in line]
    assert len(lines) == 1, result.output
    for text in said:
        assert flat(text) in out, f"{text!r} not said in: {out}"
    return out


@pytest.mark.parametrize("stage, module", [("train-backbone", train_backbone), ("train-refine", train_refine)], ids=["train-backbone", "train-refine"])
def test_ctrl_c_during_training_says_how_to_resume(project: Path, monkeypatch: pytest.MonkeyPatch, stage: str, module: Any) -> None:
    key = stage.replace("-", "_")
    folder = "stage1" if stage == "train-backbone" else "refine"
    params = edit_params(project, **{f"{key}__seed": 1})
    before = snapshot(project)

    def hook(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 0):
            raise KeyboardInterrupt

    monkeypatch.setattr(module, "run", functools.partial(module.run, on_step=hook))
    result = invoke(stage, "-d", NAME, "-p", params)
    monkeypatch.undo()
    assert_interrupted(
        result, "interrupted (Ctrl-C) after epoch 1 of 2", f"kept in {project / D / folder / 'unfinished'}",
        "the previous outputs are unchanged", f"continue with `fgpipe {stage} --dataset {NAME} --resume`",
    )
    assert load_checkpoint(project / D / folder / "unfinished" / "last.pt")["epoch"] == 1
    after = snapshot(project)
    assert {rel: after.get(rel) for rel in before} == before and not temp_files(project)  # curves and checkpoints too
    resumed = invoke(stage, "-d", NAME, "-p", params, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(project / D / folder / "best.pt")["finished"] is True


def test_ctrl_c_before_the_first_checkpoint_replaces_nothing(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = edit_params(project, train_backbone__seed=1)
    before = snapshot(project)

    def hook(epoch: int, step: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(train_backbone, "run", functools.partial(train_backbone.run, on_step=hook))
    result = invoke("train-backbone", "-d", NAME, "-p", params)
    monkeypatch.undo()
    assert_interrupted(result, "before the first checkpoint", "the previous outputs are unchanged",
                       f"rerun `fgpipe train-backbone --dataset {NAME}`")
    assert snapshot(project) == before and not temp_files(project)


# (stage, params edits, options, (object, attribute) that Ctrl-C interrupts: after some of the outputs were written)
CTRL_C_CASES = [
    ("prepare", {f"datasets__{NAME}__split_seed": 1}, [], (h5schema._Writer, "_append")),  # images.h5, after the manifest
    ("extract-attention", {}, ["--method", "bap"], (h5schema._Writer, "_append")),
    ("extract-crops", {}, ["--threshold", "0.3"], (extract_crops, "write_preview")),  # after crops.h5 and the curves
    ("evaluate", {}, ["--combine", "fixed"], (evaluate, "confusion_image")),  # after three of the reports
]


@pytest.mark.parametrize("stage, edits, options, where", CTRL_C_CASES, ids=[c[0] for c in CTRL_C_CASES])
def test_ctrl_c_in_a_stage_leaves_the_previous_outputs(
    project: Path, monkeypatch: pytest.MonkeyPatch, stage: str, edits: dict[str, Any], options: list[str], where: tuple[Any, str]
) -> None:
    params = edit_params(project, **edits)
    before = snapshot(project)
    monkeypatch.setattr(*where, ctrl_c)
    result = invoke(stage, "-d", NAME, "-p", params, *options)
    monkeypatch.undo()
    assert_interrupted(result, "nothing was replaced, the previous outputs are unchanged", f"rerun `fgpipe {stage} --dataset {NAME}`")
    assert snapshot(project) == before and not temp_files(project)


# =========================================================================== 4. diverged networks, full disks, dvclive
def poisoned(real: Callable[..., tuple[Any, dict[str, Any]]]) -> Callable[..., tuple[Any, dict[str, Any]]]:
    """``load_checked_stage1`` whose network has diverged: every floating-point parameter NaN."""

    def load(*args: Any, **kwargs: Any) -> tuple[Any, dict[str, Any]]:
        model, state = real(*args, **kwargs)
        with torch.no_grad():
            for p in model.parameters():
                p.fill_(float("nan"))
        return model, state

    return load


def first_image_ids(project: Path, split: str | None = None) -> str:
    rows = read_manifest(project / D / "manifest.csv")
    return next(r.image_id for r in rows if split is None or r.split == split)


def test_a_diverged_stage1_checkpoint_is_refused_by_extract_attention(project: Path) -> None:
    path = project / D / "stage1/best.pt"
    state = load_checkpoint(path)
    state.pop("format")
    state["model"] = {k: v.fill_(float("nan")) if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save({"format": "fgpipe-checkpoint-1", **state}, path)
    before = snapshot(project)
    assert_refused(
        run_on(project, "extract-attention"), f"the stage-1 network of {path} gives NaN or infinite",
        first_image_ids(project), "has probably diverged", f"rerun `fgpipe train-backbone --dataset {NAME}`", "train_backbone.lr",
    )
    assert snapshot(project) == before and not temp_files(project)


# (command, module whose load_checked_stage1 gives the diverged network, options, what is NaN, the image named)
DIVERGED = [
    ("extract-crops", extract_crops, ["--threshold", "0.3"], "features of the object crops", None),
    ("predict", predict, [IMAGE], "heatmaps", IMAGE),
    ("evaluate", evaluate, [], "logits", "val"),
]


@pytest.mark.parametrize("command, module, options, what, image", DIVERGED, ids=[c[0] for c in DIVERGED])
def test_a_network_giving_nan_is_refused_naming_the_images_and_the_checkpoint(
    project: Path, monkeypatch: pytest.MonkeyPatch, command: str, module: Any, options: list[str], what: str, image: str | None
) -> None:
    before = snapshot(project)
    monkeypatch.setattr(module, "load_checked_stage1", poisoned(module.load_checked_stage1))
    result = run_on(project, command, options)
    monkeypatch.undo()
    named = str(project / image) if image and image.startswith("raw/") else first_image_ids(project, image)
    assert_refused(
        result, f"the stage-1 network of {project / D / 'stage1/best.pt'} gives NaN or infinite", what, named,
        "has probably diverged", f"rerun `fgpipe train-backbone --dataset {NAME}`",
    )
    assert snapshot(project) == before and not temp_files(project)


# a failed write of a dataset root (generated or downloaded): the errno, and for a read-only or forbidden folder the
# params key that chooses that folder, datasets.NAME.root (not prepare.data_dir, which holds the stages' outputs)
ROOT_WRITE_FAULTS = [
    (errno.ENOSPC, "free some disk space"),
    (errno.EROFS, "make it writable, or point datasets.{name}.root at a writable folder"),
    (errno.EACCES, "give this user write permission on that folder, or point datasets.{name}.root at a writable folder"),
]


@pytest.mark.parametrize("code, hint", ROOT_WRITE_FAULTS[:2], ids=[errno.errorcode[c] for c, _ in ROOT_WRITE_FAULTS[:2]])
def test_a_full_disk_while_the_synthetic_dataset_is_generated(
    project: Path, monkeypatch: pytest.MonkeyPatch, code: int, hint: str
) -> None:
    params = edit_params(project, **{f"datasets__{NAME}": SYNTHETIC})
    before = snapshot(project)
    real = Image.Image.save

    def save(self: Image.Image, fp: Any, *args: Any, **kwargs: Any) -> None:
        if ".synth.tmp-" in str(fp):
            raise OSError(code, os.strerror(code))
        real(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", save)
    result = invoke("prepare", "-d", NAME, "-p", params)
    monkeypatch.undo()
    out = assert_refused(result, f"cannot write {project / 'synth'}: {os.strerror(code)} ({errno.errorcode[code]})", hint.format(name=NAME))
    assert "prepare.data_dir" not in out
    assert not (project / "synth").exists() and not list(project.glob(".synth.tmp-*"))
    assert snapshot(project) == before and not temp_files(project)


@pytest.fixture
def cub_archive(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """(file:// url, md5) of a fake CUB_200_2011.tgz."""
    root = tmp_path / "src" / "CUB_200_2011"
    write_fake_cub(root)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        tf.add(root, arcname="CUB_200_2011")
    archive = tmp_path / "CUB_200_2011.tgz"
    archive.write_bytes(buf.getvalue())
    yield archive.as_uri(), hashlib.md5(buf.getvalue()).hexdigest()


@pytest.mark.parametrize("code, hint", ROOT_WRITE_FAULTS[::2], ids=[errno.errorcode[c] for c, _ in ROOT_WRITE_FAULTS[::2]])
def test_a_full_disk_while_an_archive_is_extracted(
    project: Path, monkeypatch: pytest.MonkeyPatch, cub_archive: tuple[str, str], code: int, hint: str
) -> None:
    from fgpipe.datasets import cub

    def fail(*args: Any, **kwargs: Any) -> None:
        raise OSError(code, os.strerror(code))

    params = edit_params(project, datasets__birds={"kind": "cub", "root": "birds"})
    before = snapshot(project)
    monkeypatch.setattr(cub, "URL", cub_archive[0])
    monkeypatch.setattr(cub, "MD5", cub_archive[1])
    monkeypatch.setattr(tarfile.TarFile, "extract", fail)
    result = invoke("prepare", "-d", "birds", "-p", params, "--download")
    monkeypatch.undo()
    out = assert_refused(result, f"cannot write {project / 'birds'}: {os.strerror(code)} ({errno.errorcode[code]})", hint.format(name="birds"))
    assert "prepare.data_dir" not in out
    assert not (project / "birds").exists() and not list(project.glob(".birds.download-*"))
    assert snapshot(project) == before


def failing(*args: Any, **kwargs: Any) -> None:
    """A write that finds the disk full."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_a_failing_dvclive_summary_is_a_clean_error(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dvclive writes its summary in live.end(): a full disk there stops the run cleanly, before best.pt is marked
    finished and the metrics written (the previous metrics stay; --resume finishes the run)."""
    from dvclive import Live

    params = edit_params(project, train_backbone__seed=1)
    before = snapshot(project)
    monkeypatch.setattr(Live, "end", failing)
    result = invoke("train-backbone", "-d", NAME, "-p", params)
    monkeypatch.undo()
    assert_refused(result, f"cannot write {project / D / 'stage1' / 'unfinished' / 'curves'}: No space left on device (ENOSPC)")
    after = snapshot(project)
    assert {rel: after.get(rel) for rel in before} == before  # the previous metrics, curves and checkpoints
    assert load_checkpoint(project / D / "stage1/unfinished/best.pt")["finished"] is False and not temp_files(project)


def test_a_failing_dvclive_summary_does_not_hide_the_error_that_stopped_training(
    project: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dvclive import Live

    models: list[torch.nn.Module] = []
    real_build = train_backbone.build_stage1

    def build(*args: Any, **kwargs: Any) -> Any:
        models.append(real_build(*args, **kwargs))
        return models[-1]

    def poison(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 0):
            with torch.no_grad():
                for p in models[-1].parameters():
                    p.fill_(float("nan"))

    monkeypatch.setattr(train_backbone, "build_stage1", build)
    monkeypatch.setattr(train_backbone, "run", functools.partial(train_backbone.run, on_step=poison))
    monkeypatch.setattr(Live, "end", failing)
    result = invoke("train-backbone", "-d", NAME, "-p", edit_params(project, train_backbone__seed=1))
    monkeypatch.undo()
    assert_refused(result, "the loss became nan at epoch 2, step 2")
