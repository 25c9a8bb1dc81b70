"""Fault suite, part 5 (issue 14): the stage-level faults a red-team pass found after parts 1-3
(docs/FAULTS.md section 18).

Same rules as tests/test_faults.py, whose chain, helpers and assertions this file reuses: every case runs a
command through the CLI and asserts (a) one clean ``error: ...`` paragraph and exit code 1, no traceback; (b) the
message names the culprit (the file, key or dataset) and the command that fixes it; (c) every file under data/
and metrics/ of the earlier good run is byte-identical afterwards, and no temporary file is left.

1. JSON artefacts a stage reads (evaluate.json, extract_crops.json, dataset.json, the HDF5 provenance) that are
   not JSON, not an object, or hold NaN, negative or non-numeric joint weights;
2. a damaged artefact is named with the stage that writes it (an empty crops.h5 is extract-crops', not
   train-refine's), and an output in the way (a file where a folder goes) is refused before the training;
3. prepare: a dataset root that is a file, a symlink loop among the images, a single-class dataset,
   ``--download`` for a dataset without an archive; a moved project finds its images;
4. ``fgpipe show --out`` never writes over an artefact or a file that is not a PNG;
5. params changed since a stage ran, and a later stage run by hand: refused, naming the key and the command,
   while a command-line override, a key that only says how fast a stage runs, and the stages rerun in order
   (as ``dvc repro`` runs them) pass;
6. ``fgpipe predict`` on a FIFO or a device: reported before it is opened, never blocks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import pytest
import yaml
from PIL import Image
from test_faults import (  # noqa: F401  (chain and project are fixtures)
    NAME,
    assert_refused,
    chain,
    edit_params,
    flat,
    invoke,
    project,
    snapshot,
    temp_files,
    write_dataset,
)

from fgpipe.commands.show import show
from fgpipe.config import load_params
from fgpipe.errors import OutputError
from fgpipe.loader import check_image_files
from fgpipe.manifest import read_dataset_json, read_manifest
from fgpipe.store import read_json

D = f"data/{NAME}"
M = f"metrics/{NAME}"
IMAGE = "raw/test/class0/000.png"
IMAGE_ID = "test/class0/000"


def run_on(project: Path, command: str, options: list[str] | tuple[str, ...] = ()) -> Any:
    """``fgpipe COMMAND -d toy -p params.yaml OPTIONS`` (predict: OPTIONS are image paths, relative to ``project``)."""
    if command == "predict":
        return invoke(command, *(project / o for o in options), "-d", NAME, "-p", project / "params.yaml")
    return invoke(command, "-d", NAME, "-p", project / "params.yaml", *options)


def refused_untouched(project: Path, result: Any, before: dict[str, str], *culprits: str) -> str:
    """:func:`assert_refused`, and data/ and metrics/ as they were, no temporary file."""
    out = assert_refused(result, *culprits)
    assert snapshot(project) == before
    assert temp_files(project) == []
    return out


@pytest.fixture
def alarm() -> Iterator[None]:
    """Fail (SIGALRM) instead of hanging for ever if a command blocks: 120 s."""
    previous = signal.signal(signal.SIGALRM, lambda *a: (_ for _ in ()).throw(TimeoutError("the command blocked")))
    signal.alarm(120)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


# =========================================================================== 1. JSON artefacts
def evaluation_weights(**weights: Any) -> Callable[[Path], None]:
    """evaluate.json with its `weights` replaced (its provenance record kept: the hashes still match)."""

    def damage(project: Path) -> None:
        path = project / M / "evaluate.json"
        doc = json.loads(path.read_text())
        doc["weights"] = weights
        path.write_text(json.dumps(doc, indent=2))  # NaN is written as the bare NaN Python's json accepts

    return damage


def evaluation_temperatures(**temperatures: Any) -> Callable[[Path], None]:
    """evaluate.json with its `temperatures` replaced, or (none given) removed: an evaluate.json from before them."""

    def damage(project: Path) -> None:
        path = project / M / "evaluate.json"
        doc = json.loads(path.read_text())
        if temperatures:
            doc["temperatures"] = temperatures
        else:
            del doc["temperatures"]
        path.write_text(json.dumps(doc, indent=2))

    return damage


def text_of(rel: str, text: str) -> Callable[[Path], None]:
    def damage(project: Path) -> None:
        (project / rel).write_text(text)

    return damage


def folder_at(rel: str) -> Callable[[Path], None]:
    def damage(project: Path) -> None:
        (project / rel).unlink()
        (project / rel).mkdir()

    return damage


def crops_localization(value: Any) -> Callable[[Path], None]:
    def damage(project: Path) -> None:
        path = project / M / "extract_crops.json"
        doc = json.loads(path.read_text())
        doc["localization"] = value
        path.write_text(json.dumps(doc))

    return damage


def provenance_list(project: Path) -> None:
    with h5py.File(project / D / "attention.h5", "r+") as h5:
        h5.attrs["provenance"] = "[1, 2]"


def removed(rel: str) -> Callable[[Path], None]:
    def damage(project: Path) -> None:
        (project / rel).unlink()

    return damage


EVALUATE_JSON = f"{M}/evaluate.json"
EXTRACT_CROPS_JSON = f"{M}/extract_crops.json"
EVALUATE_PROVENANCE = f"{M}/evaluate.provenance.json"
EXTRACT_CROPS_PROVENANCE = f"{M}/extract_crops.provenance.json"
RERUN_EVALUATE = "rerun `fgpipe evaluate --dataset toy`"
RERUN_CROPS = "rerun `fgpipe extract-crops --dataset toy`"
# (id, damage, the command that reads the file, its options, what the message must name)
JSON_CASES = [
    ("evaluate.json-weights-nan", evaluation_weights(raw=float("nan"), object=0.5, parts=0.5), "predict", [IMAGE],
     [EVALUATE_JSON, "not valid JSON (NaN is not a JSON number)", RERUN_EVALUATE]),
    ("evaluate.json-weights-negative", evaluation_weights(raw=3.0, object=-5.0, parts=3.0), "predict", [IMAGE],
     [EVALUATE_JSON, "`weights.object` must be a finite number >= 0, got -5.0", RERUN_EVALUATE]),
    ("evaluate.json-weights-string", evaluation_weights(raw="0", object="1", parts="0"), "predict", [IMAGE],
     [EVALUATE_JSON, "`weights.raw` must be a finite number >= 0, got '0'", RERUN_EVALUATE]),
    ("evaluate.json-weights-not-summing-to-1", evaluation_weights(raw=0.5, object=0.5, parts=0.5), "predict", [IMAGE],
     [EVALUATE_JSON, "`weights` must sum to 1", "got 1.5", RERUN_EVALUATE]),
    ("evaluate.json-weights-missing-a-branch", evaluation_weights(raw=0.5, object=0.5), "predict", [IMAGE],
     [EVALUATE_JSON, "`weights` must give raw, object and parts, got ['object', 'raw']", RERUN_EVALUATE]),
    ("evaluate.json-without-temperatures", evaluation_temperatures(), "predict", [IMAGE],
     [EVALUATE_JSON, "`temperatures` must give raw, object and parts, got NoneType", RERUN_EVALUATE]),
    ("evaluate.json-temperature-zero", evaluation_temperatures(raw=1.0, object=0.0, parts=1.0), "predict", [IMAGE],
     [EVALUATE_JSON, "`temperatures.object` must be a finite number > 0, got 0.0", RERUN_EVALUATE]),
    ("evaluate.json-temperature-bool", evaluation_temperatures(raw=True, object=1.0, parts=1.0), "predict", [IMAGE],
     [EVALUATE_JSON, "`temperatures.raw` must be a finite number > 0, got True", RERUN_EVALUATE]),
    ("evaluate.json-truncated", text_of(EVALUATE_JSON, "{\n"), "predict", [IMAGE],
     [f"{EVALUATE_JSON}:2: not valid JSON", RERUN_EVALUATE]),
    ("evaluate.json-a-list", text_of(EVALUATE_JSON, "[]"), "predict", [IMAGE],
     [EVALUATE_JSON, "expected a JSON object, got list", RERUN_EVALUATE]),
    ("evaluate.json-a-folder", folder_at(EVALUATE_JSON), "predict", [IMAGE],
     [EVALUATE_JSON, "not a regular file (a folder)", RERUN_EVALUATE]),
    ("extract_crops.json-truncated", text_of(EXTRACT_CROPS_JSON, "{\n"), "evaluate", [],
     [f"{EXTRACT_CROPS_JSON}:2: not valid JSON", RERUN_CROPS]),
    ("extract_crops.json-a-list", text_of(EXTRACT_CROPS_JSON, "[]"), "evaluate", [],
     [EXTRACT_CROPS_JSON, "expected a JSON object, got list", RERUN_CROPS]),
    ("extract_crops.json-infinity", text_of(EXTRACT_CROPS_JSON, '{"localization": Infinity}'), "evaluate", [],
     [EXTRACT_CROPS_JSON, "Infinity is not a JSON number", RERUN_CROPS]),
    ("evaluate.provenance.json-truncated", text_of(EVALUATE_PROVENANCE, "{\n"), "predict", [IMAGE],
     [f"{EVALUATE_PROVENANCE}:2: not valid JSON", RERUN_EVALUATE]),
    ("evaluate.provenance.json-missing", removed(EVALUATE_PROVENANCE), "predict", [IMAGE],
     [f"{EVALUATE_PROVENANCE} not found: it names the checkpoints the joint weights were chosen for", "`fgpipe evaluate --dataset toy`"]),
    ("extract_crops.provenance.json-a-list", text_of(EXTRACT_CROPS_PROVENANCE, "[]"), "evaluate", [],
     [EXTRACT_CROPS_PROVENANCE, "expected a JSON object, got list", RERUN_CROPS]),
    ("extract_crops.provenance.json-missing", removed(EXTRACT_CROPS_PROVENANCE), "evaluate", [],
     [f"{EXTRACT_CROPS_PROVENANCE} not found", "`fgpipe extract-crops --dataset toy`"]),
    ("dataset.json-nan", text_of(f"{D}/dataset.json", '{"root": NaN}'), "extract-crops", [],
     [f"{D}/dataset.json", "NaN is not a JSON number", "fgpipe prepare --dataset toy"]),
    ("attention.h5-provenance-a-list", provenance_list, "extract-crops", [],
     [f"{D}/attention.h5", "attr `provenance` must be a JSON object, got list", "rerun `fgpipe extract-attention --dataset toy`"]),
]


@pytest.mark.parametrize("case", JSON_CASES, ids=lambda c: c[0])
def test_a_json_artefact_that_is_not_what_its_stage_writes_is_refused(project: Path, case: tuple[Any, ...]) -> None:
    _, damage, command, options, culprits = case
    damage(project)
    before = snapshot(project)
    result = run_on(project, command, options)
    refused_untouched(project, result, before, *[f"{project}/{c}" if c.startswith(("data/", "metrics/")) else c for c in culprits])


def test_the_localization_evaluate_carries_must_be_figures(project: Path) -> None:
    """extract_crops.json's `localization` (hashes still matching) that is a list or holds a string: refused."""
    for value, said in (([0.5], "`localization` must be an object or null, got list"),
                        ({"accuracy": "1", "mean_iou": 0.5, "fallback_rate": 0.0}, "`localization.accuracy` must be a number in [0, 1], got '1'")):
        crops_localization(value)(project)
        before = snapshot(project)
        refused_untouched(project, run_on(project, "evaluate"), before, f"{project}/{EXTRACT_CROPS_JSON}", said, RERUN_CROPS)


# =========================================================================== 2. damaged sources, outputs in the way
def empty(rel: str) -> Callable[[Path], None]:
    def damage(project: Path) -> None:
        (project / rel).write_bytes(b"")

    return damage


# (id, damage, command, options, what the message must name, what it must not)
SOURCE_CASES = [
    ("evaluate:crops.h5-empty", empty(f"{D}/crops.h5"), "evaluate", [],
     [f"{D}/crops.h5: not a readable HDF5 file", RERUN_CROPS], ["train-refine"]),
    ("predict:crops.h5-empty", empty(f"{D}/crops.h5"), "predict", [IMAGE],
     [f"{D}/crops.h5: not a readable HDF5 file", RERUN_CROPS], ["train-refine"]),
    ("evaluate:attention.h5-empty", empty(f"{D}/attention.h5"), "evaluate", [],
     [f"{D}/attention.h5: not a readable HDF5 file", "rerun `fgpipe extract-attention --dataset toy`"], [RERUN_CROPS]),
    ("show:stage1-checkpoint-empty", empty(f"{D}/stage1/best.pt"), "show", ["--image", IMAGE_ID],
     [f"{D}/stage1/best.pt: not a readable checkpoint", "rerun `fgpipe train-backbone --dataset toy`"], ["extract-attention"]),
]


@pytest.mark.parametrize("case", SOURCE_CASES, ids=lambda c: c[0])
def test_a_damaged_source_is_named_with_the_stage_that_writes_it(project: Path, case: tuple[Any, ...]) -> None:
    """An artefact whose recorded hash of a source no longer matches is not blamed while the source itself is
    damaged: the source is named, with its own writer."""
    _, damage, command, options, culprits, not_named = case
    damage(project)
    before = snapshot(project)
    out = refused_untouched(project, run_on(project, command, options), before, *[f"{project}/{c}" if c.startswith("data/") else c for c in culprits])
    assert not any(n in out for n in not_named), out


def file_instead_of_folder(rel: str) -> Callable[[Path], Path]:
    def damage(project: Path) -> Path:
        shutil.rmtree(project / rel)
        (project / rel).write_text("not a folder")
        return project / rel

    return damage


def folder_instead_of_file(rel: str) -> Callable[[Path], Path]:
    def damage(project: Path) -> Path:
        (project / rel).unlink()
        (project / rel / "x").mkdir(parents=True)
        return project / rel

    return damage


# (id, command, damage, what the message must name)
IN_THE_WAY_CASES = [
    ("train-backbone:stage1-is-a-file", "train-backbone", file_instead_of_folder(f"{D}/stage1"), "is a file (or a broken link), not a folder"),
    ("train-backbone:last.pt-is-a-folder", "train-backbone", folder_instead_of_file(f"{D}/stage1/last.pt"), "it is a folder where this stage writes a file"),
    ("train-refine:refine-is-a-file", "train-refine", file_instead_of_folder(f"{D}/refine"), "is a file (or a broken link), not a folder"),
    ("train-refine:curves-folder-is-a-file", "train-refine", file_instead_of_folder(f"{M}/train_refine"), "it is a file where this stage writes a folder"),
    ("extract-attention:attention.h5-is-a-folder", "extract-attention", folder_instead_of_file(f"{D}/attention.h5"), "it is a folder"),
    ("evaluate:confusion.png-is-a-folder", "evaluate", folder_instead_of_file(f"{D}/confusion.png"), "it is a folder"),
    ("prepare:metrics-folder-is-a-file", "prepare", file_instead_of_folder(M), "is a file (or a broken link), not a folder"),
]


@pytest.mark.parametrize("case", IN_THE_WAY_CASES, ids=lambda c: c[0])
def test_an_output_in_the_way_is_refused_before_the_work(project: Path, case: tuple[Any, ...]) -> None:
    """A file where a stage's output folder goes (or a folder where a file goes) used to fail only at the end, after
    the whole training: it is refused first, naming the path."""
    _, command, damage, said = case
    culprit = damage(project)
    before = snapshot(project)
    out = refused_untouched(project, run_on(project, command), before, f"cannot write {culprit}" if said.startswith("it is") else str(culprit), said)
    assert "epoch 1/" not in out and "decoding images" not in out and "heatmaps" not in out  # no work was done


# =========================================================================== 3. prepare
def test_a_dataset_root_that_is_a_file_is_not_reported_missing(tmp_path: Path) -> None:
    for layout in ("cub", "folder"):
        base = tmp_path / layout
        root, _, params = write_dataset(base, layout, {})
        shutil.rmtree(root)
        root.write_text("a file")
        out = assert_refused(invoke("prepare", "-d", "ds", "-p", params), f"dataset root is not a folder: {root}", "datasets.ds.root")
        assert "not found" not in out
        assert not (base / "data").exists()
    # --root naming a file (here the params file itself)
    out = assert_refused(invoke("prepare", "-d", "ds", "-p", params, "--root", str(params)), f"dataset root is not a folder: {params}")
    assert "not found" not in out


def loop_in_place_of(path: Path) -> None:
    path.unlink()
    path.symlink_to(path.name)  # a link to itself: resolving it never ends


def test_a_symlink_loop_among_the_images_is_an_unreadable_image(tmp_path: Path) -> None:
    """A CUB image (or an ImageFolder one) that is a symbolic link loop: listed with the other unreadable images
    (refused, or skipped and counted with skip_bad), never a traceback nor dropped silently."""
    root, info, params = write_dataset(tmp_path, "cub", {})
    assert invoke("prepare", "-d", "ds", "-p", params).exit_code == 0
    before = snapshot(tmp_path)
    rel = "images/" + info["ids"]["1"][0]
    loop_in_place_of(root / rel)
    result = invoke("prepare", "-d", "ds", "-p", params)
    refused_untouched(tmp_path, result, before, "1 image(s) under", rel, "Too many levels of symbolic links", "skip_bad: true")

    edit = yaml.safe_load(params.read_text())
    edit["datasets"]["ds"]["skip_bad"] = True
    params.write_text(yaml.safe_dump(edit))
    result = invoke("prepare", "-d", "ds", "-p", params)
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "metrics/ds/prepare.json")["skipped"] == 1
    assert rel not in {r.path for r in read_manifest(tmp_path / "data/ds/manifest.csv")}

    folder = tmp_path / "folder_case"
    froot, _, fparams = write_dataset(folder, "folder", {})
    loop_in_place_of(froot / "train/a/0.png")
    assert_refused(invoke("prepare", "-d", "ds", "-p", fparams), "train/a/0.png", "Too many levels of symbolic links")


def test_a_listed_image_that_is_a_folder_is_named_so(tmp_path: Path) -> None:
    root, info, params = write_dataset(tmp_path, "cub", {})
    path = root / "images" / info["ids"]["2"][0]
    path.unlink()
    path.mkdir()
    assert_refused(invoke("prepare", "-d", "ds", "-p", params), f"{path} (a folder, not an image file)")


def test_a_single_class_dataset_is_refused(tmp_path: Path) -> None:
    """Every prediction of a one-class dataset is right: it trained and reported 100%. prepare refuses it, naming the
    dataset, and also when skipping unreadable images leaves one class."""
    root, _, params = write_dataset(tmp_path, "folder", {})
    for split in ("train", "test"):
        shutil.rmtree(root / split / "b")
    out = assert_refused(invoke("prepare", "-d", "ds", "-p", params), f"dataset `ds` ({root}) has images of 1 class only (a)",
                         "at least 2 classes")
    assert "decoding images" not in out  # refused before decoding the dataset
    assert not (tmp_path / "data").exists() and not (tmp_path / "metrics").exists()

    root2, _, params2 = write_dataset(tmp_path / "two", "folder", {"skip_bad": True})
    for path in (root2 / "train" / "b").iterdir():
        path.write_bytes(b"not an image")
    (root2 / "test" / "b" / "0.png").write_bytes(b"not an image")
    assert_refused(invoke("prepare", "-d", "ds", "-p", params2), "has images of 1 class only once the 4 unreadable image(s) are skipped")


def test_download_is_refused_for_a_dataset_without_an_archive(tmp_path: Path) -> None:
    """`prepare --download` on an ImageFolder dataset used to be ignored silently."""
    root, _, params = write_dataset(tmp_path, "folder", {})
    assert_refused(invoke("prepare", "-d", "ds", "-p", params, "--download"),
                   "--download: imagefolder has no official archive to download", "Leave --download out")
    assert not (tmp_path / "data").exists()
    edit = yaml.safe_load(params.read_text())
    edit["datasets"]["ds"]["download"] = True
    params.write_text(yaml.safe_dump(edit))
    assert_refused(invoke("prepare", "-d", "ds", "-p", params), "datasets.ds.download: true: imagefolder has no official archive",
                   "Leave datasets.ds.download out (or false)")


def test_a_moved_project_finds_its_images(tmp_path: Path) -> None:
    """dataset.json records the root relative to itself when params.yaml gives root and data_dir relative to it: the
    project moved as a whole (the old place gone) still finds its images."""
    old = tmp_path / "old"
    root, _, params = write_dataset(old, "folder", {})
    raw = yaml.safe_load(params.read_text())
    raw["datasets"]["ds"]["root"] = "folder"
    raw["prepare"] = {"data_dir": "data", "metrics_dir": "metrics"}
    params.write_text(yaml.safe_dump(raw))
    assert invoke("prepare", "-d", "ds", "-p", params).exit_code == 0
    doc = read_json(old / "data/ds/dataset.json")
    assert doc["root_relative"] == "../../folder" and doc["root"] == str(root)
    new = tmp_path / "moved"
    old.rename(new)
    info = read_dataset_json(new / "data/ds/dataset.json", "ds")
    assert info.root == new / "folder"
    rows = read_manifest(new / "data/ds/manifest.csv")
    check_image_files(info, rows, None, "ds", new / "data/ds/manifest.csv")  # what each stage checks before decoding
    # an absolute root stays absolute
    abs_root, _, abs_params = write_dataset(tmp_path / "abs", "folder", {})
    assert invoke("prepare", "-d", "ds", "-p", abs_params).exit_code == 0
    assert "root_relative" not in read_json(tmp_path / "abs/data/ds/dataset.json")


# =========================================================================== 4. show --out
def show_out(project: Path, out: Path | str) -> Any:
    return run_on(project, "show", ["--image", IMAGE_ID, "--out", str(out)])


@pytest.mark.parametrize("rel, said", [
    (f"{D}/crops.h5", "where the stages keep their outputs"),
    (f"{M}/evaluate.json", "where the stages keep their outputs"),
    (f"{D}/crops_preview.png", "where the stages keep their outputs"),  # a PNG, but extract-crops'
    (f"{D}/refine/new.png", "where the stages keep their outputs"),  # not directly in data/NAME
    (f"{D}/manifest.png", None),  # new and in data/NAME: allowed
], ids=["crops.h5", "evaluate.json", "crops_preview.png", "a-new-png-in-a-stage-folder", "a-new-png-in-data-NAME-is-written"])
def test_show_never_writes_over_an_artefact(project: Path, rel: str, said: str | None) -> None:
    before = snapshot(project)
    result = show_out(project, project / rel)
    if said is None:
        assert result.exit_code == 0, result.output
        with Image.open(project / rel) as img:
            assert img.format == "PNG"
        return
    refused_untouched(project, result, before, f"--out {project / rel}", said, "choose another --out path")


def test_show_out_elsewhere(project: Path, tmp_path: Path) -> None:
    """Outside data/ and metrics/: an existing file that is not a PNG is refused, a folder or a missing parent too
    (nothing created); a PNG is replaced."""
    before = snapshot(project)
    text = tmp_path / "notes.txt"
    text.write_text("keep me")
    refused_untouched(project, show_out(project, text), before, f"--out {text}", "exists and is not a PNG image")
    assert text.read_text() == "keep me"
    missing = tmp_path / "nodir" / "sub" / "x.png"
    refused_untouched(project, show_out(project, missing), before, f"--out {missing}", f"the folder {missing.parent} does not exist")
    assert not (tmp_path / "nodir").exists()
    png = tmp_path / "picture.png"
    for _ in range(2):  # written, then replaced
        assert show_out(project, png).exit_code == 0
    with Image.open(png) as img:
        assert img.format == "PNG"
    # --out a folder: the CLI refuses it before the command runs (a usage error); the function refuses it too
    settings = load_params(project / "params.yaml", dataset=NAME)
    with pytest.raises(OutputError, match="is a folder; give the path of the PNG file to write"):
        show(settings, NAME, IMAGE_ID, tmp_path)


# =========================================================================== 5. params changed since a stage ran
def set_params(**dotted: Any) -> Callable[[Path], None]:
    def change(project: Path) -> None:
        edit_params(project, **dotted)

    return change


THRESHOLD = "crops.threshold = 0.2, but"
# (id, params change, the command run by hand, its options, what the message must name)
PARAMS_CASES = [
    ("train-refine:crops.threshold", set_params(crops__threshold=0.3), "train-refine", [],
     [f"{D}/crops.h5 was made with {THRESHOLD}", "now gives 0.3", RERUN_CROPS]),
    ("evaluate:crops.threshold", set_params(crops__threshold=0.3), "evaluate", [], [f"{D}/crops.h5 was made with {THRESHOLD}", RERUN_CROPS]),
    ("predict:crops.threshold", set_params(crops__threshold=0.3), "predict", [IMAGE], [f"{D}/crops.h5 was made with {THRESHOLD}", RERUN_CROPS]),
    ("show:crops.part_top_k", set_params(crops__part_top_k=2), "show", ["--image", IMAGE_ID],
     [f"{D}/crops.h5 was made with crops.part_top_k = 4", "now gives 2", RERUN_CROPS]),
    ("train-refine:per_dataset.crops.threshold", set_params(per_dataset__toy__crops={"threshold": 0.4}), "train-refine", [],
     [f"{D}/crops.h5 was made with {THRESHOLD}", "now gives 0.4", RERUN_CROPS]),
    ("extract-crops:attention.method", set_params(attention__method="gradcam"), "extract-crops", [],
     [f"{D}/attention.h5 was made with attention.method = \"oaam\"", "\"gradcam\"", "rerun `fgpipe extract-attention --dataset toy`"]),
    ("extract-attention:train_backbone.lr", set_params(train_backbone__lr=0.01), "extract-attention", [],
     [f"{D}/stage1/best.pt was made with train_backbone.lr = 0.05", "rerun `fgpipe train-backbone --dataset toy`"]),
    ("train-refine:model.num_attentions", set_params(model__num_attentions=4), "train-refine", [],
     [f"{D}/stage1/best.pt was made with model.num_attentions = 2", "rerun `fgpipe train-backbone --dataset toy`"]),
    ("train-backbone:datasets.toy.val_fraction", set_params(datasets__toy__val_fraction=0.5), "train-backbone", [],
     [f"{D}/dataset.json was made with datasets.toy.val_fraction = 0.25", "rerun `fgpipe prepare --dataset toy`"]),
    ("evaluate:train_refine.epochs", set_params(train_refine__epochs=3), "evaluate", [],
     [f"{D}/refine/best.pt was made with train_refine.epochs = 2", "rerun `fgpipe train-refine --dataset toy`"]),
    ("predict:evaluate.weight_step", set_params(evaluate__weight_step=0.25), "predict", [IMAGE],
     [f"{M}/evaluate.json was made with evaluate.weight_step = 0.5", RERUN_EVALUATE]),
]


@pytest.mark.parametrize("case", PARAMS_CASES, ids=lambda c: c[0])
def test_a_stage_run_by_hand_after_its_inputs_params_changed_is_refused(project: Path, case: tuple[Any, ...]) -> None:
    """Lineage covers the params as well as the files: the artefact a stage reads records the params it was made
    with; a difference with the params now names the key, both values and the command that remakes it."""
    _, change, command, options, culprits = case
    change(project)
    before = snapshot(project)
    result = run_on(project, command, options)
    refused_untouched(project, result, before, *[f"{project}/{c}" if c.startswith(("data/", "metrics/")) else c for c in culprits])


def test_params_that_do_not_change_an_artefact_and_overrides_are_not_compared(project: Path) -> None:
    """A batch size or the preview count (how fast, or a file no stage reads) changed, and an artefact made with a
    command-line override: show, which reads attention.h5 and crops.h5, goes on."""
    edit_params(project, crops__batch_size=3, crops__preview_images=1, attention__batch_size=5, evaluate__batch_size=2)
    assert run_on(project, "show", ["--image", IMAGE_ID]).exit_code == 0
    assert run_on(project, "extract-crops", ["--threshold", "0.3"]).exit_code == 0  # crops.threshold set for this file
    result = run_on(project, "show", ["--image", IMAGE_ID])
    assert result.exit_code == 0, result.output


def test_the_stages_rerun_in_order_after_a_params_change_pass(project: Path) -> None:
    """What `dvc repro` does after crops.threshold changed: extract-crops, train-refine, evaluate, then predict."""
    edit_params(project, crops__threshold=0.3)
    for command in ("extract-crops", "train-refine", "evaluate"):
        result = run_on(project, command)
        assert result.exit_code == 0, f"{command}: {result.output}"
    result = run_on(project, "predict", [IMAGE])
    assert result.exit_code == 0, result.output
    made = read_json(project / M / "evaluate.provenance.json")
    assert made["sources"]["params"]["values"]["evaluate.weight_step"] == 0.5


# =========================================================================== 6. predict on what is not a file
def test_predict_reports_a_fifo_or_a_device_without_opening_it(project: Path, tmp_path: Path, alarm: None) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = invoke("predict", fifo, "/dev/zero", tmp_path, project / IMAGE, "-d", NAME, "-p", project / "params.yaml")
    out = flat(result.output)
    assert result.exit_code == 1 and "Traceback" not in out, result.output
    for path, what in ((fifo, "a FIFO (named pipe)"), ("/dev/zero", "a character device"), (tmp_path, "a folder")):
        assert f"{path}: cannot read image: not a regular file ({what})" in out, out
    assert "000.png" in out  # the readable image is still predicted
