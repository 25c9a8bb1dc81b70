"""Fault suite, part 2 (issue 14): damaged artefacts, non-finite params, malformed environment, failed writes.

Same rules as tests/test_faults.py, whose chain, helpers and assertions this file reuses: every case runs a
command through the CLI and asserts (a) one clean ``error: ...`` line and exit code 1, no traceback; (b) the
message names the culprit (file, dataset and row, params key or environment variable) and what to do; (c) every
file under data/ and metrics/ of the earlier good run is byte-identical afterwards, and no temporary file is left.

1. checkpoints that are not fgpipe checkpoints (random bytes, truncated, empty, another program's, incomplete,
   a malicious pickle), at every place one is loaded: stage-1, refine, predict, ``--resume``;
2. attention.h5 and crops.h5 holding NaN, infinities or out-of-range values (a valid HDF5 file, edited);
3. NaN and infinities in every float param, from params.yaml, a preset, per_dataset or an override;
4. malformed environment variables (FGPIPE_THREADS, FGPIPE_MALLOC_TUNING, torchrun's WORLD_SIZE / RANK / LOCAL_RANK);
5. a full disk or a read-only output folder during each stage's write.
"""

from __future__ import annotations

import copy
import dataclasses
import errno
import os
import re
import shutil
import subprocess
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml
from test_faults import (  # noqa: F401  (chain and project are fixtures)
    NAME,
    STAGES,
    TOY_PARAMS,
    assert_refused,
    chain,
    edit_params,
    flat,
    invoke,
    project,
    snapshot,
    stage_outputs,
    temp_files,
)

from fgpipe import branch_inference, h5schema, stage1_network
from fgpipe.checkpoints import RESUME_KEYS, load_checkpoint, save_checkpoint
from fgpipe.config import Params, validate
from fgpipe.errors import ArtifactError, ConfigError
import fgpipe.store

D = f"data/{NAME}"
WRITERS = {"stage1": f"fgpipe train-backbone --dataset {NAME}", "refine": f"fgpipe train-refine --dataset {NAME}"}


def checkpoint_of(rel: str) -> str:
    """stage1 or refine: the kind of checkpoint at ``rel``."""
    return "stage1" if "/stage1/" in rel else "refine"


# =========================================================================== 1. checkpoints
class Evil:
    """A pickle whose loading would run a shell command (``torch.load(weights_only=False)`` would run it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def _random_bytes(path: Path) -> None:
    path.write_bytes(np.random.default_rng(0).integers(0, 256, size=4096, dtype=np.uint8).tobytes())


def _truncated(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _plain_state_dict(path: Path) -> None:
    torch.save({"weight": torch.zeros(2, 2)}, path)  # what torch.save(model.state_dict()) gives


def _not_a_dict(path: Path) -> None:
    torch.save([torch.zeros(2)], path)


def _missing_keys(path: Path) -> None:
    torch.save({"format": "fgpipe-checkpoint-1", "kind": checkpoint_of(path.as_posix()), "epoch": 1}, path)


def _malicious(path: Path) -> None:
    torch.save({"format": "fgpipe-checkpoint-1", "payload": Evil(path.parent / "PWNED")}, path)


def _edited(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    """A real checkpoint with its contents edited: still an fgpipe checkpoint, but one its network cannot be rebuilt from."""

    def damage(path: Path) -> None:
        state = load_checkpoint(path)
        state.pop("format")
        edit(state)
        save_checkpoint(path, state)

    return damage


def _drop_a_tensor(state: dict[str, Any]) -> None:
    state["model"].pop(next(iter(state["model"])))


def _unknown_model_key(state: dict[str, Any]) -> None:
    state["config"]["model"]["bogus"] = 1


# (id, damage, what the message says besides the path and the command)
UNREADABLE = [
    ("random-bytes", _random_bytes, ": not a readable checkpoint ("),
    ("truncated", _truncated, ": not a readable checkpoint (truncated or damaged"),
    ("empty-file", _empty, ": not a readable checkpoint (truncated or damaged: the file is empty)"),
    ("plain-state-dict", _plain_state_dict, "is not an fgpipe checkpoint (a dict without fgpipe's `format` key"),
    ("not-a-dict", _not_a_dict, "is not an fgpipe checkpoint (it holds a list, not a dict)"),
    ("missing-keys", _missing_keys, "is not a complete fgpipe"),
    ("malicious-pickle", _malicious, "which fgpipe never unpickles"),
]
# (id, checkpoint, command, options): every place a checkpoint is loaded
IMAGE = "raw/test/class0/000.png"
LOADS = [
    ("stage1:extract-attention", f"{D}/stage1/best.pt", "extract-attention", []),
    ("stage1:train-refine", f"{D}/stage1/best.pt", "train-refine", []),
    ("stage1:predict", f"{D}/stage1/best.pt", "predict", [IMAGE]),
    ("refine:evaluate", f"{D}/refine/best.pt", "evaluate", []),
    ("refine:predict", f"{D}/refine/best.pt", "predict", [IMAGE]),
    ("resume:train-backbone", f"{D}/stage1/unfinished/last.pt", "train-backbone", ["--resume"]),  # an interrupted run's
    ("resume:train-refine", f"{D}/refine/unfinished/last.pt", "train-refine", ["--resume"]),
]


def interrupted_run(path: Path) -> None:
    """For ``unfinished/last.pt``: the folder an interrupted run leaves (a copy of the finished run's last.pt)."""
    if path.parent.name == "unfinished" and not path.exists():
        path.parent.mkdir()
        shutil.copyfile(path.parent.parent / path.name, path)


def run_on(project: Path, command: str, options: list[str]) -> Any:
    """``fgpipe COMMAND -d toy -p params.yaml OPTIONS`` (predict: OPTIONS are image paths, relative to ``project``)."""
    if command == "predict":
        return invoke(command, *(project / o for o in options), "-d", NAME, "-p", project / "params.yaml")
    return invoke(command, "-d", NAME, "-p", project / "params.yaml", *options)


@pytest.mark.parametrize("damage_id, damage, says", UNREADABLE, ids=[c[0] for c in UNREADABLE])
@pytest.mark.parametrize("rel, keys", [(f"{D}/stage1/best.pt", None), (f"{D}/refine/last.pt", RESUME_KEYS)], ids=["stage1", "resume-refine"])
def test_the_checkpoint_loader_refuses_every_damage(
    chain: Path, tmp_path: Path, damage_id: str, damage: Callable[[Path], None], says: str, rel: str, keys: Any
) -> None:
    """Every load site goes through ``load_checkpoint`` (and it through ``fgpipe.store.safe_torch_load``): each damage
    is refused there, naming the file and the command that rewrites it, without ever running the file's code."""
    path = tmp_path / rel
    path.parent.mkdir(parents=True)
    path.write_bytes((chain / rel).read_bytes())
    damage(path)
    kind = checkpoint_of(rel)
    with pytest.raises(ArtifactError) as err:
        load_checkpoint(path, kind=kind, dataset=NAME, keys=keys)
    said = flat(str(err.value))
    assert str(path) in said and says in said and f"rerun `{WRITERS[kind]}`" in said, said
    assert "weights_only" not in said  # never the advice to load it unsafely
    assert not (path.parent / "PWNED").exists()  # the malicious pickle's command never ran
    if damage_id == "missing-keys":  # every missing key named; --resume's own ones only where they are needed
        assert "no `model`; no `config`; no `class_names`" in said and ("no `rng`" in said) == (keys is not None)


# each load site through the CLI, with one of the damages above each (every damage is at one site)
SITES = [(*load, *damage) for load, damage in zip(LOADS, UNREADABLE, strict=True)]


@pytest.mark.parametrize(
    "load_id, rel, command, options, damage_id, damage, says", SITES, ids=[f"{c[0]}-{c[4]}" for c in SITES]
)
def test_a_file_that_is_not_an_fgpipe_checkpoint_is_refused_everywhere_one_is_loaded(
    project: Path, load_id: str, rel: str, command: str, options: list[str], damage_id: str,
    damage: Callable[[Path], None], says: str,
) -> None:
    path = project / rel
    interrupted_run(path)
    damage(path)
    before = snapshot(project)
    out = assert_refused(run_on(project, command, options), str(path), says, f"rerun `{WRITERS[checkpoint_of(rel)]}`")
    assert "weights_only" not in out  # never the advice to load it unsafely
    assert not (path.parent / "PWNED").exists()  # the malicious pickle's command never ran
    assert snapshot(project) == before and not temp_files(project)


# A real checkpoint edited so that its network cannot be rebuilt: where a command rebuilds one from it
EDITED = [
    ("missing-tensor", _edited(_drop_a_tensor), "Missing key(s)"),
    ("unknown-config-key", _edited(_unknown_model_key), "ModelConfig: bogus: Unexpected keyword argument"),
]
REBUILDS = [c for c in LOADS if c[0] in ("stage1:extract-attention", "stage1:predict", "refine:evaluate", "refine:predict")]


@pytest.mark.parametrize("load_id, rel, command, options", REBUILDS, ids=[c[0] for c in REBUILDS])
@pytest.mark.parametrize("damage_id, damage, says", EDITED, ids=[c[0] for c in EDITED])
def test_a_checkpoint_whose_network_cannot_be_rebuilt_is_refused(
    project: Path, damage_id: str, damage: Callable[[Path], None], says: str, load_id: str, rel: str, command: str,
    options: list[str],
) -> None:
    path = project / rel
    damage(path)
    before = snapshot(project)
    assert_refused(
        run_on(project, command, options), str(path), "is not a complete fgpipe", "its contents do not rebuild the network",
        says, f"rerun `{WRITERS[checkpoint_of(rel)]}`",
    )
    assert snapshot(project) == before


@pytest.mark.parametrize(
    "rel, command", [(f"{D}/stage1/unfinished/last.pt", "train-backbone"), (f"{D}/refine/unfinished/last.pt", "train-refine")],
    ids=["train-backbone", "train-refine"],
)
@pytest.mark.parametrize("edit", [_drop_a_tensor, lambda state: state.update(rng={})], ids=["missing-tensor", "broken-rng-state"])
def test_resume_from_a_checkpoint_that_cannot_be_restored_is_refused(
    project: Path, rel: str, command: str, edit: Callable[[dict[str, Any]], None]
) -> None:
    path = project / rel
    interrupted_run(path)
    _edited(edit)(path)
    before = snapshot(project)
    assert_refused(
        run_on(project, command, ["--resume"]), str(path), "is not a complete fgpipe", f"rerun `{WRITERS[checkpoint_of(rel)]}`"
    )
    assert snapshot(project) == before and not temp_files(project)


def test_a_bug_while_building_the_network_is_not_reported_as_a_damaged_checkpoint(
    chain: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the calls that take the checkpoint's contents (configs, load_state_dict, RNG state) are guarded: an error
    while building the network (a bug, or the machine out of memory) surfaces as itself."""

    def fail(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(stage1_network, "build_stage1", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        stage1_network.load_stage1(chain / D / "stage1/best.pt", dataset=NAME)
    monkeypatch.setattr(branch_inference, "build_refine_net", fail)
    with pytest.raises(RuntimeError, match="out of memory"):
        branch_inference.load_refine(chain / D / "refine/best.pt", dataset=NAME)


def test_a_malicious_weights_file_is_refused_without_running_it(project: Path) -> None:
    """``--weights FILE`` loads a state_dict with weights_only too: never executed, never the unsafe advice."""
    weights = project / "weights.pt"
    torch.save({"model": Evil(project / "PWNED")}, weights)
    before = snapshot(project)
    out = assert_refused(
        run_on(project, "train-backbone", ["--weights", str(weights)]), f"model.weights: {weights}: not a readable PyTorch "
        "state_dict file", "never unpickles", f"save the weights alone with `torch.save(model.state_dict(), {weights})`, "
        "or set `model.weights: imagenet` or `none`",
    )
    assert "weights_only" not in out and not (project / "PWNED").exists()
    assert snapshot(project) == before


# =========================================================================== 2. values inside the HDF5 artefacts
def set_value(index: tuple[Any, ...], value: float) -> Callable[[np.ndarray], None]:
    def edit(a: np.ndarray) -> None:
        a[index] = value

    return edit


def swap_x(boxes: np.ndarray) -> None:
    boxes[:] = boxes[:, [2, 1, 0, 3]]  # x0 <-> x1: x1 < x0


BAD_ROW, LATER_ROW = 3, 7  # two bad rows: the message names the first
# (id, file, dataset, edit of rows BAD_ROW and LATER_ROW, the command that reads it, what the message says)
VALUE_CASES = [
    ("heatmap-nan", "attention.h5", "heatmap", (np.s_[:, 0, 0, 0], float("nan")), "extract-crops", "holds NaN or infinite values"),
    ("heatmap-inf", "attention.h5", "heatmap", (np.s_[:, 1, 0, 0], float("inf")), "extract-crops", "holds NaN or infinite values"),
    ("heatmap-negative", "attention.h5", "heatmap", (np.s_[:, 0, 1, 1], -0.5), "extract-crops", "holds values outside [0, 1]"),
    ("heatmap-above-1", "attention.h5", "heatmap", (np.s_[:, 0, 0, 0], 3.0), "extract-crops", "holds values outside [0, 1]"),
    ("logits-nan", "attention.h5", "logits", (np.s_[:, 1], float("nan")), "extract-crops", "holds NaN or infinite values"),
    ("label-out-of-range", "attention.h5", "label", (np.s_[:], 9), "extract-crops", "is not a class index in [0, 1]"),
    ("prediction-negative", "attention.h5", "prediction", (np.s_[:], -1), "extract-crops", "is not a class index in [0, 1]"),
    ("box-nan", "crops.h5", "box", (np.s_[:, 0], float("nan")), "train-refine", "holds NaN or infinite values"),
    ("box-inf", "crops.h5", "box", (np.s_[:, 2], float("inf")), "train-refine", "holds NaN or infinite values"),
    ("box-x1-before-x0", "crops.h5", "box", swap_x, "train-refine", "is not a box (x0, y0, x1, y1) with 0 <= x0 < x1"),
    ("box-negative", "crops.h5", "box", (np.s_[:, 1], -4.0), "train-refine", "is not a box"),
    ("box-outside-image", "crops.h5", "box", (np.s_[:, 2], 5000.0), "train-refine", "reaches outside its 32 x 32 image"),
    ("parts-nan", "crops.h5", "parts", (np.s_[:, 0, 3], float("nan")), "train-refine", "holds NaN or infinite values"),
    ("part-outside-image", "crops.h5", "parts", (np.s_[:, 1, 3], 500.0), "train-refine", "reaches outside its 32 x 32 image"),
    ("part-count-out-of-range", "crops.h5", "part_count", (np.s_[:], 99), "train-refine", "is outside [0, 6]"),
    ("score-nan", "crops.h5", "score", (np.s_[:], float("nan")), "train-refine", "holds NaN or infinite values"),
    ("part-scores-inf", "crops.h5", "part_scores", (np.s_[:, 0], float("-inf")), "train-refine", "holds NaN or infinite values"),
]
PRODUCERS = {"attention.h5": f"fgpipe extract-attention --dataset {NAME}", "crops.h5": f"fgpipe extract-crops --dataset {NAME}"}


def edit_rows(path: Path, name: str, edit: Any, rows: list[int]) -> None:
    """Edit ``rows`` of dataset ``name`` in place: ``edit`` is (index into those rows' array, value), or a function
    that edits that (n, ...) array; the file stays a valid HDF5 file of its schema."""
    with h5py.File(path, "r+") as h5:
        data = h5[name][...]
        picked = data[rows]
        if callable(edit):
            edit(picked)
        else:
            index, value = edit
            picked[index] = value
        data[rows] = picked
        h5[name][...] = data


@pytest.mark.parametrize(
    "case_id, file, name, edit, command, says", VALUE_CASES, ids=[c[0] for c in VALUE_CASES]
)
def test_bad_values_in_an_hdf5_artefact_are_refused_naming_the_first_bad_row(
    project: Path, case_id: str, file: str, name: str, edit: Any, command: str, says: str
) -> None:
    path = project / D / file
    edit_rows(path, name, edit, [BAD_ROW, LATER_ROW])
    with h5py.File(path, "r") as h5:
        image_id = h5["image_id"].asstr()[BAD_ROW]
    before = snapshot(project)
    assert_refused(
        run_on(project, command, []), f"{path}: dataset `{name}`, row {BAD_ROW} (image {image_id!r})", says,
        f"rerun `{PRODUCERS[file]}`",
    )
    assert snapshot(project) == before and not temp_files(project)


def test_a_nan_crops_threshold_attr_is_refused(project: Path) -> None:
    path = project / D / "crops.h5"
    with h5py.File(path, "r+") as h5:
        h5.attrs["threshold"] = float("nan")
    before = snapshot(project)
    assert_refused(
        run_on(project, "train-refine", []), str(path), "attr `threshold` = nan is not in (0, 1]", f"rerun `fgpipe extract-crops --dataset {NAME}`"
    )
    assert snapshot(project) == before


def test_one_methods_heatmaps_are_checked_when_read_alone(project: Path) -> None:
    """``method_heatmaps`` (the localisation sweep's read) checks the rows it returns, naming the method."""
    path = project / D / "attention.h5"
    edit_rows(path, "heatmap", (np.s_[:, 2, 0, 0], float("nan")), [BAD_ROW])  # the third method, aolm
    with h5schema.AttentionReader(path) as reader:
        assert np.isfinite(reader.method_heatmaps("oaam")).all()
        name = reader.methods[2]
        with pytest.raises(ArtifactError, match=rf"dataset `heatmap`, row {BAD_ROW} .* NaN or infinite `{name}` values"):
            reader.method_heatmaps(name)


# =========================================================================== 3. non-finite params
def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    node = out
    *parents, last = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return out


def float_fields(cls: Any = Params, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, a valid shape of value) of every float-valued field of the params, nested ones too
    (``datasets.NAME`` stands for any dataset)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        yield from _float_paths(hints[f.name], f"{prefix}{f.name}")


def _float_paths(tp: Any, path: str) -> Iterator[tuple[str, Any]]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is float:
        yield path, "scalar"
    elif origin is typing.Annotated:
        yield from _float_paths(args[0], path)
    elif origin in (typing.Union, types.UnionType):
        seen = set()
        for arg in args:
            for found in _float_paths(arg, path):
                if found not in seen:
                    seen.add(found)
                    yield found
    elif origin is tuple and float in args:
        yield path, ("tuple", 1 if args[-1] is Ellipsis else len(args))
    elif dataclasses.is_dataclass(tp):
        yield from float_fields(tp, f"{path}.")
    elif origin is dict and dataclasses.is_dataclass(args[1]):
        yield from float_fields(args[1], f"{path}.{NAME}.")


FLOAT_FIELDS = list(float_fields())


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
def test_every_float_param_refuses_nan_and_infinities(bad: float) -> None:
    assert len(FLOAT_FIELDS) > 30 and "train_backbone.warmup_epochs" in dict(FLOAT_FIELDS)
    for key, shape in FLOAT_FIELDS:
        value: Any = bad if shape == "scalar" else [bad, *[0.5] * (shape[1] - 1)]
        with pytest.raises(ConfigError) as err:
            validate(set_dotted(TOY_PARAMS, key, value))
        where = key if shape == "scalar" else f"{key}.0"
        lines = [line.strip() for line in str(err.value).splitlines()]
        assert any(line.startswith(where) and "Input should be a finite number" in line for line in lines), (key, str(err.value))


def write_preset(project: Path, body: dict[str, Any]) -> Path:
    path = project / "my-preset.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


# (id, params edits, stage, extra options, what the message names); the YAML files hold `.inf` / `.nan`
INF, NAN = float("inf"), float("nan")
NONFINITE_CASES = [
    ("params:train_backbone.warmup_epochs=.inf", {"train_backbone__warmup_epochs": INF}, "train-backbone", [],
     ["train_backbone.warmup_epochs: Input should be a finite number (got inf)"]),
    ("params:model.bn_momentum=.nan", {"model__bn_momentum": NAN}, "train-backbone", [], ["model.bn_momentum: Input should be a finite number"]),
    ("params:train_backbone.crop_threshold=[.nan,0.5]", {"train_backbone__crop_threshold": [NAN, 0.5]}, "train-backbone", [],
     ["train_backbone.crop_threshold.0: Input should be a finite number"]),
    ("params:datasets.toy.val_fraction=.nan", {f"datasets__{NAME}__val_fraction": NAN}, "prepare", [],
     [f"datasets.{NAME}.val_fraction: Input should be a finite number"]),
    ("params:crops.thresholds=[0.1,.inf]", {"crops__thresholds": [0.1, INF]}, "extract-crops", [],
     ["crops.thresholds.1: Input should be a finite number"]),
    ("params:evaluate.weights.raw=.inf", {"evaluate__weights": {"raw": INF}}, "evaluate", [], ["evaluate.weights.raw: Input should be a finite number"]),
    ("per_dataset:train_refine.lr=.inf", {f"per_dataset__{NAME}__train_refine": {"lr": INF}}, "train-refine", [],
     [f"per_dataset.{NAME}.train_refine.lr: Input should be a finite number"]),
    ("preset:train_backbone.warmup_epochs=.nan", {"preset": "my-preset.yaml"}, "train-backbone", [],
     ["train_backbone.warmup_epochs: Input should be a finite number"]),
    ("cli:--threshold nan", {}, "extract-crops", ["--threshold", "nan"], ["crops.threshold", "Input should be a finite number"]),
]


@pytest.mark.parametrize("case_id, edits, stage, options, culprits", NONFINITE_CASES, ids=[c[0] for c in NONFINITE_CASES])
def test_nonfinite_params_stop_the_stage_before_any_work(
    project: Path, case_id: str, edits: dict[str, Any], stage: str, options: list[str], culprits: list[str]
) -> None:
    preset = write_preset(project, {"train_backbone": {"warmup_epochs": NAN}})
    params = edit_params(project, **edits)
    assert ".nan" in preset.read_text()  # YAML's own spelling, as a user writes it
    if edits and "preset" not in edits:
        assert re.search(r"\.(inf|nan)\b", params.read_text())
    before = snapshot(project)
    assert_refused(invoke(stage, "-d", NAME, "-p", params, *options), *culprits)
    assert snapshot(project) == before


def test_nonfinite_override_is_refused_naming_the_key(project: Path) -> None:
    """The ``overrides`` dict every CLI option goes through (as ``dvc exp run -S`` values reach params.yaml)."""
    from fgpipe.config import load_params

    for key in ("train_backbone.warmup_epochs", "train_refine.label_smoothing", "evaluate.weights.object"):
        with pytest.raises(ConfigError, match=re.escape(f"{key}: Input should be a finite number (got inf)")):
            load_params(project / "params.yaml", {key: INF}, dataset=NAME)


# =========================================================================== 4. environment variables
# (id, variables, command, what the message names)
ENV_CASES = [
    ("FGPIPE_THREADS=two", {"FGPIPE_THREADS": "two"}, "extract-attention", ["FGPIPE_THREADS='two'", "an integer >= 0"]),
    ("FGPIPE_THREADS=-1", {"FGPIPE_THREADS": "-1"}, "extract-crops", ["FGPIPE_THREADS='-1'", "an integer >= 0"]),
    ("FGPIPE_THREADS=1.5", {"FGPIPE_THREADS": "1.5"}, "evaluate", ["FGPIPE_THREADS='1.5'", "an integer >= 0"]),
    ("WORLD_SIZE=0", {"WORLD_SIZE": "0"}, "train-backbone", ["WORLD_SIZE='0'", "an integer >= 1", "torchrun"]),
    ("WORLD_SIZE=four", {"WORLD_SIZE": "four"}, "train-refine", ["WORLD_SIZE='four'", "an integer >= 1"]),
    ("RANK=-1", {"RANK": "-1"}, "train-backbone", ["RANK='-1'", "from 0 to WORLD_SIZE - 1 = 0"]),
    ("RANK=5,WORLD_SIZE=2", {"WORLD_SIZE": "2", "RANK": "5"}, "train-backbone", ["RANK=5", "from 0 to WORLD_SIZE - 1 = 1"]),
    ("LOCAL_RANK=x", {"LOCAL_RANK": "x"}, "train-refine", ["LOCAL_RANK='x'", "an integer >= 0"]),
]


@pytest.mark.parametrize("case_id, env, command, culprits", ENV_CASES, ids=[c[0] for c in ENV_CASES])
def test_a_malformed_environment_variable_is_refused(
    project: Path, monkeypatch: pytest.MonkeyPatch, case_id: str, env: dict[str, str], command: str, culprits: list[str]
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = snapshot(project)
    assert_refused(run_on(project, command, []), "environment variable", *culprits)
    assert snapshot(project) == before


def test_a_malformed_malloc_tuning_variable_stops_the_console_script(tmp_path: Path) -> None:
    """FGPIPE_MALLOC_TUNING is read before any command runs (by the CLI's root callback, which tunes the allocator):
    the variable is refused, not the missing params file the command would have read next."""
    env = {**os.environ, "FGPIPE_MALLOC_TUNING": "yes"}
    done = subprocess.run([sys.executable, "-m", "fgpipe", "prepare", "--params", "missing.yaml"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    out = flat(done.stdout + done.stderr)
    assert done.returncode == 1 and "Traceback" not in out, out
    assert "error: environment variable FGPIPE_MALLOC_TUNING='yes' is invalid" in out and "1 (tune" in out and "0 (leave" in out
    assert "missing.yaml" not in out and len((done.stdout + done.stderr).strip().splitlines()) == 1, out


# =========================================================================== 5. a full disk, a read-only folder
def failing(code: int) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    return fail


# where the write fails: fsync of every atomic write (a full disk reports ENOSPC there), or creating its temp file
WRITE_FAULTS = [("fsync", errno.ENOSPC), ("mkstemp", errno.EROFS), ("mkstemp", errno.EACCES)]
# every stage with every fault; the default run keeps one per stage (the faults in turn), the rest are `slow`
WRITE_CASES = [
    pytest.param(
        stage, where, code, id=f"{stage}-{where}-{errno.errorcode[code]}",
        marks=() if (i - j) % len(WRITE_FAULTS) == 0 else pytest.mark.slow,
    )
    for i, stage in enumerate(STAGES)
    for j, (where, code) in enumerate(WRITE_FAULTS)
]


def refused_write(result: Any, project: Path, stage: str, code: int) -> None:
    """The stage stopped with `cannot write PATH: <errno meaning> (<ERRNO>)`, PATH one of its dvc.yaml outputs (or,
    for a training stage, in the unfinished/ folder its run writes until its end)."""
    hint = {errno.ENOSPC: "free some disk space", errno.EROFS: "make it writable, or point prepare.data_dir / "
            "prepare.metrics_dir at a writable folder", errno.EACCES: "give this user write permission on that folder"}
    out = assert_refused(result, "cannot write", f"{os.strerror(code)} ({errno.errorcode[code]})", hint[code], "unchanged")
    written = re.search(r"cannot write (\S+):", out)
    assert written is not None, out
    outputs = [str(project / rel) for rel in stage_outputs(stage)]
    outputs += [str(project / D / folder / "unfinished") for folder, trainer in (("stage1", "train-backbone"), ("refine", "train-refine")) if stage == trainer]
    assert any(written[1] == o or written[1].startswith(o.rstrip("/") + "/") for o in outputs), (written[1], outputs)


@pytest.mark.parametrize("stage, where, code", WRITE_CASES)
def test_a_failed_write_stops_the_stage_and_keeps_the_previous_outputs(
    project: Path, monkeypatch: pytest.MonkeyPatch, stage: str, where: str, code: int
) -> None:
    params = edit_params(project, **({f"datasets__{NAME}__split_seed": 1} if stage == "prepare" else {}))  # new content
    before = snapshot(project)
    if where == "fsync":
        monkeypatch.setattr(fgpipe.store.os, "fsync", failing(code))
    else:
        monkeypatch.setattr(fgpipe.store.tempfile, "mkstemp", failing(code))
    result = invoke(stage, "-d", NAME, "-p", params)
    monkeypatch.undo()
    refused_write(result, project, stage, code)
    assert snapshot(project) == before and not temp_files(project)


def test_disk_full_while_a_checkpoint_is_written(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.save fills the disk halfway: no partial best.pt, the temp file is gone, the old checkpoints stay."""
    real_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        real_save(obj, f, *args, **kwargs)
        f.truncate(f.tell() // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    before = snapshot(project)
    monkeypatch.setattr(torch, "save", save)
    result = invoke("train-backbone", "-d", NAME, "-p", edit_params(project, train_backbone__seed=1))
    monkeypatch.undo()
    assert_refused(result, f"cannot write {project / D / 'stage1/unfinished/best.pt'}: No space left on device (ENOSPC)", "free some disk space")
    assert snapshot(project) == before and not temp_files(project)


def test_disk_full_while_an_hdf5_file_is_written(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """h5py reports a full disk as OSError(ENOSPC) from a dataset write: the half-written attention.h5 never appears."""
    real_append = h5schema._Writer._append

    def append(self: Any, columns: dict[str, Any]) -> None:
        real_append(self, columns)
        raise OSError(errno.ENOSPC, "Can't write data (file write failed: errno = 28, No space left on device)")

    before = snapshot(project)
    monkeypatch.setattr(h5schema._Writer, "_append", append)
    result = invoke("extract-attention", "-d", NAME, "-p", project / "params.yaml", "--method", "bap")
    monkeypatch.undo()
    assert_refused(result, f"cannot write {project / D / 'attention.h5'}: No space left on device (ENOSPC)")
    assert snapshot(project) == before and not temp_files(project)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only folder anyway: the EACCES variants above simulate it")
def test_a_read_only_output_folder(project: Path) -> None:
    folder = project / D
    before = snapshot(project)
    mode = folder.stat().st_mode
    folder.chmod(0o555)
    try:
        result = invoke("extract-attention", "-d", NAME, "-p", project / "params.yaml", "--method", "bap")
    finally:
        folder.chmod(mode)
    assert_refused(result, f"cannot write {folder / 'attention.h5'}: Permission denied (EACCES)")
    assert snapshot(project) == before and not temp_files(project)


def test_the_value_checks_accept_the_chains_files_and_empty_slices(project: Path) -> None:
    """What the stages write passes the checks, and a slice of no rows reads as empty (no reshape of nothing)."""
    with h5schema.AttentionReader(project / D / "attention.h5") as att, h5schema.CropsReader(project / D / "crops.h5") as crops:
        n = len(att)
        assert len(att.read().image_ids) == n and len(att.read(n, n).image_ids) == 0
        assert att.method_heatmaps(att.methods[0], n, n).shape == (0, *att.heatmap_hw)
        assert len(crops.read().image_ids) == n and crops.read(n, n).boxes.shape == (0, 4)


def test_disk_full_while_the_training_curves_are_logged(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """dvclive appends the per-epoch curves in place (not an atomic write): a full disk there is one clean error,
    and the checkpoints written before it are complete (their run did not finish: only --resume takes them)."""
    from dvclive import Live

    monkeypatch.setattr(Live, "log_metric", failing(errno.ENOSPC))
    result = invoke("train-backbone", "-d", NAME, "-p", edit_params(project, train_backbone__seed=1))
    monkeypatch.undo()
    out = assert_refused(result, f"cannot write {project / D / 'stage1' / 'unfinished' / 'curves'}: No space left on device (ENOSPC)")
    assert "Nothing was written in its place" not in out  # not claimed for a write that is not atomic
    assert load_checkpoint(project / D / "stage1/unfinished/last.pt")["finished"] is False and not temp_files(project)
    assert load_checkpoint(project / D / "stage1/last.pt")["finished"] is True  # the previous run's, untouched
