"""Fault and bad-input suite (issue 7, item 3): every case in one file, each listed in docs/FAULTS.md.

Every case asserts (a) the outcome: refused with exit code 1, skipped and counted, clipped, or converted;
(b) that the message names the culprit: the file and annotation line, the image id, the class or the
params key; (c) that nothing already written is lost: the outputs of an earlier good run are byte-identical
after a refused one. Commands go through the CLI (Typer's CliRunner on ``fgpipe.cli.app``), as a user runs them.

1. bad inputs to ``fgpipe prepare``: one table, on a fake CUB-200-2011 or ImageFolder in its real layout;
2. odd image modes (CMYK, 16-bit, alpha, palette, 1x1) carried through the whole chain;
3. params: a typo'd key or an out-of-range value, for every stage command;
4. a NaN loss in either trainer;
5. a manifest, checkpoint, attention or crops file from another run, or truncated;
6. a process SIGKILLed during each stage: no output path holds a partial file, the previous version (or a
   complete new one) is all DVC or the next stage can find, and the rerun completes.

The chain fixture runs the six stages once on a tiny ImageFolder dataset with the ``tiny`` backbone; each
test works on its own copy. The killed runs are real processes running ``fgpipe.cli.app``, forked from a
multiprocessing fork server that has imported fgpipe once (a fresh interpreter per kill would cost ~8 s of
torch imports each).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import multiprocessing
import os
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch
import yaml
from conftest import write_fake_cub, write_image
from PIL import Image
from typer.testing import CliRunner

from fgpipe import h5schema
from fgpipe.checkpoints import load_checkpoint
from fgpipe.cli import app
from fgpipe.h5schema import AttentionReader, CropsReader
from fgpipe.images import open_rgb
from fgpipe.loader import decode_region
from fgpipe.manifest import read_manifest
from fgpipe.stages import train_backbone, train_refine
from fgpipe.store import read_json

REPO = Path(__file__).resolve().parents[1]
NAME = "toy"
STAGES = ("prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate")


# =========================================================================== helpers
def invoke(*args: object) -> Any:
    """``fgpipe ARGS`` in this process; returns Click's Result."""
    return CliRunner().invoke(app, [str(a) for a in args])


def flat(text: str) -> str:
    """Output with every run of whitespace made one space (rich wraps long messages)."""
    return " ".join(text.split())


def assert_refused(result: Any, *culprits: str) -> str:
    """Exit code 1, fgpipe's `error:` line (no traceback) and every culprit named; returns the flat output."""
    out = flat(result.output)
    assert result.exit_code == 1, result.output
    assert "error:" in out and "Traceback" not in out, result.output
    for culprit in culprits:
        assert flat(culprit) in out, f"{culprit!r} not named in: {out}"
    return out


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def snapshot(project: Path) -> dict[str, str]:
    """SHA-256 of every file under data/ and metrics/ (the dataset itself lies elsewhere), by relative path."""
    return {
        p.relative_to(project).as_posix(): sha(p)
        for top in ("data", "metrics")
        for p in sorted((project / top).rglob("*"))
        if p.is_file()
    }


def temp_files(project: Path) -> list[str]:
    """Temporary files of fgpipe's atomic writes (``.NAME.PID.XXXX.tmp``) under data/ and metrics/."""
    return sorted(
        p.relative_to(project).as_posix()
        for top in ("data", "metrics")
        for p in (project / top).rglob(".*.tmp")
    )


def edit_params(project: Path, **dotted: Any) -> Path:
    """Set dotted keys (``train_backbone.seed=1``, with ``__`` for ``.``) in project/params.yaml."""
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text())
    for key, value in dotted.items():
        node = raw
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def stage_outputs(stage: str, dataset: str = NAME) -> list[str]:
    """Every path the real dvc.yaml declares for ``stage`` (outs, metrics, plots), for ``dataset``."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["do"]
    paths = []
    for key in ("outs", "metrics", "plots"):
        for entry in spec.get(key, []):
            path = entry if isinstance(entry, str) else next(iter(entry))
            paths.append(path.replace("${key}", dataset))
    return paths


def is_complete(path: Path) -> bool:
    """Whether ``path`` opens as the complete artefact its name says (raises on a partial one)."""
    name = path.name
    if name == "manifest.csv":
        read_manifest(path)
    elif path.suffix == ".csv":
        with open(path, newline="") as fh:
            assert len(list(csv.reader(fh))) >= 2
    elif path.suffix == ".json":
        json.loads(path.read_text())
    elif name == "attention.h5":
        AttentionReader(path).close()
    elif name == "crops.h5":
        CropsReader(path).close()
    elif path.suffix == ".h5":
        h5py.File(path, "r").close()
    elif path.suffix == ".pt":
        load_checkpoint(path)
    elif path.suffix == ".png":
        with Image.open(path) as img:
            img.load()
    else:
        raise AssertionError(f"no completeness check for {path}")
    return True


# =========================================================================== the chain
COLOURS = [(210, 40, 40), (40, 190, 60)]
SIDE = 32

# Odd images in the chain's dataset: each is converted to 8-bit RGB by prepare and every later stage.
ODD_IMAGES = {
    "train/class0/cmyk.jpg": "CMYK",
    "train/class0/deep.png": "I;16",
    "train/class0/alpha.png": "RGBA",
    "train/class1/palette_alpha.png": "P+transparency",
    "train/class1/gray.jpg": "L",
    "test/class0/one_pixel.png": "1x1",
    "test/class1/gray_alpha.png": "LA",
}


def write_odd_image(path: Path, kind: str, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "I;16":
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 65536, size=(SIDE, SIDE), dtype=np.uint16)).save(path)
    elif kind == "P+transparency":
        write_image(path, size=(SIDE, SIDE), mode="P", seed=seed)
        with Image.open(path) as img:
            img.load()
            img.info["transparency"] = 0
            img.save(path, transparency=0)
    elif kind == "1x1":
        write_image(path, size=(1, 1), seed=seed)
    else:
        write_image(path, size=(SIDE, SIDE), mode=kind, seed=seed)
    with Image.open(path) as img:
        assert kind in (img.mode, "1x1", "P+transparency") and (kind != "1x1" or img.size == (1, 1))


def write_toy_dataset(root: Path, train_per_class: int = 6, test_per_class: int = 2) -> None:
    """root/{train,test}/classC/*.png: a noisy square of class C's colour on grey, plus :data:`ODD_IMAGES`."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, colour in enumerate(COLOURS):
            for i in range(n):
                img = rng.integers(90, 150, size=(SIDE, SIDE, 3)).astype(np.uint8)
                x, y = (int(v) for v in rng.integers(0, SIDE // 2, size=2))
                img[y : y + SIDE // 2, x : x + SIDE // 2] = np.array(colour, dtype=np.uint8)
                path = root / split / f"class{c}" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
    for seed, (rel, kind) in enumerate(ODD_IMAGES.items()):
        write_odd_image(root / rel, kind, seed)


TOY_PARAMS: dict[str, Any] = {
    "run": {},
    "datasets": {NAME: {"kind": "imagefolder", "root": "raw", "val_fraction": 0.25}},
    "prepare": {"data_dir": "data", "metrics_dir": "metrics"},
    "model": {"backbone": "tiny", "weights": "none", "lcam": "block", "num_attentions": 2, "logit_scale": 10.0},
    "train_backbone": {"input_size": 32, "epochs": 2, "batch_size": 4, "lr": 0.05, "warmup_epochs": 0.0, "device": "cpu"},
    "attention": {"method": "oaam", "batch_size": 8},
    "crops": {"threshold": 0.2, "batch_size": 8, "preview_images": 2},
    "train_refine": {"input_size": 32, "epochs": 2, "batch_size": 4, "lr": 0.05, "warmup_epochs": 0.0, "device": "cpu"},
    "evaluate": {"combine": "val", "weight_step": 0.5, "batch_size": 8},
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory, one_thread_module: None) -> Path:
    """A project (params.yaml, raw/, data/, metrics/) after all six stages ran once; treat it as read-only."""
    base = tmp_path_factory.mktemp("chain")
    write_toy_dataset(base / "raw")
    (base / "params.yaml").write_text(yaml.safe_dump(TOY_PARAMS, sort_keys=False))
    for stage in STAGES:
        result = invoke(stage, "-d", NAME, "-p", base / "params.yaml")
        assert result.exit_code == 0, f"{stage}: {result.output}"
    return base


@pytest.fixture
def project(chain: Path, tmp_path: Path) -> Path:
    """A private copy of the chain project."""
    dest = tmp_path / "project"
    shutil.copytree(chain, dest, symlinks=True)
    return dest


# =========================================================================== 1. bad inputs to prepare
@dataclass(frozen=True)
class InputCase:
    """One damaged dataset: ``damage(root, info)`` breaks it and returns the strings the message must name."""

    id: str
    layout: str  # cub (write_fake_cub) | folder (an ImageFolder)
    damage: Callable[[Path, dict[str, Any]], list[str]]
    outcome: str  # refused | skipped | clipped | converted | dropped | warned
    options: dict[str, Any] = field(default_factory=dict)  # datasets.NAME options for both runs
    metrics: dict[str, Any] = field(default_factory=dict)  # expected prepare.json figures (accepted outcomes)


def cub_image(root: Path, info: dict[str, Any], image_id: str) -> tuple[Path, str]:
    """(file, path as the manifest and the bad-image list write it) of a fake CUB image."""
    rel = "images/" + info["ids"][image_id][0]
    return root / rel, rel


def corrupt(root: Path, info: dict[str, Any]) -> list[str]:
    path, rel = cub_image(root, info, "2")
    path.write_bytes(b"this is not a jpeg" * 4)
    return [rel, "cannot be read", "cannot identify image file"]


def truncate(root: Path, info: dict[str, Any]) -> list[str]:
    path, rel = cub_image(root, info, "5")
    write_image(path, size=(64, 48), seed=7)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return [rel, "cannot be read", "truncated"]


def zero_bytes(root: Path, info: dict[str, Any]) -> list[str]:
    path, rel = cub_image(root, info, "8")
    path.write_bytes(b"")
    return [rel, "cannot be read"]


def three_bad(root: Path, info: dict[str, Any]) -> list[str]:
    return [corrupt(root, info)[0], truncate(root, info)[0], zero_bytes(root, info)[0], "skipping 3 unreadable"]


def listed_file_missing(root: Path, info: dict[str, Any]) -> list[str]:
    path, _ = cub_image(root, info, "3")
    path.unlink()
    return [f"{path} (listed at {root / 'images.txt'}:3)", "do not exist"]


def duplicated_id(root: Path, info: dict[str, Any]) -> list[str]:
    with open(root / "images.txt", "a") as fh:
        fh.write("3 001.Black_footed_Albatross/again.jpg\n")
    return [f"{root / 'images.txt'}:19", "image id 3 is listed twice", f"{root / 'images.txt'}:3"]


def path_escaping_root(root: Path, info: dict[str, Any]) -> list[str]:
    write_image(root.parent / "outside.jpg")  # exists: only the path check can refuse it
    lines = (root / "images.txt").read_text().splitlines()
    lines[3] = "4 ../../outside.jpg"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    return [f"{root / 'images.txt'}:4", "'images/../../outside.jpg'", "escapes the dataset root"]


def symlink_escaping_root(root: Path, info: dict[str, Any]) -> list[str]:
    outside = write_image(root.parent / "outside.jpg")
    path, _ = cub_image(root, info, "1")
    path.unlink()
    path.symlink_to(outside)
    return [f"{root / 'images.txt'}:1", "resolves outside the dataset root"]


def box_outside_image(root: Path, info: dict[str, Any]) -> list[str]:
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = "1 -2 1 100 3"  # x y w h: sticks out left and right of the 8 x 6 image
    lines[1] = "2 50 50 5 5"  # entirely outside
    (root / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    return ["2 box(es) reach outside their image", "image ids: 1, 2 (dropped: nothing inside)"]


def class_listed_without_images(root: Path, info: dict[str, Any]) -> list[str]:
    with open(root / "classes.txt", "a") as fh:
        fh.write("5 005.Crested_Auklet\n")
    return ["2 class(es) without images left out of the labels", "004.Groove_billed_Ani", "005.Crested_Auklet"]


def class_without_train_images(root: Path, info: dict[str, Any]) -> list[str]:
    lines = (root / "train_test_split.txt").read_text().splitlines()
    third = {i for i, (_, cname, _) in info["ids"].items() if cname == "003.Sooty_Albatross"}
    lines = [f"{i} 0" if i in third else f"{i} {flag}" for i, flag in (line.split() for line in lines)]
    (root / "train_test_split.txt").write_text("\n".join(lines) + "\n")
    return ["1 class(es) have no train image", "003.Sooty_Albatross"]


def empty_class_folder(root: Path, info: dict[str, Any]) -> list[str]:
    (root / "train" / "heron").mkdir()
    return ["1 class(es) without images left out of the labels", "heron"]


def add_image(rel: str, kind: str) -> Callable[[Path, dict[str, Any]], list[str]]:
    def damage(root: Path, info: dict[str, Any]) -> list[str]:
        write_odd_image(root / rel, kind, seed=11)
        return []

    return damage


INPUT_CASES = [
    InputCase("corrupt-image", "cub", corrupt, "refused"),
    InputCase("truncated-image", "cub", truncate, "refused"),
    InputCase("zero-byte-image", "cub", zero_bytes, "refused"),
    InputCase("bad-images-skipped", "cub", three_bad, "skipped", {"skip_bad": True}, {"skipped": 3, "images": {"total": 15}}),
    InputCase("cmyk-image", "folder", add_image("train/a/cmyk.jpg", "CMYK"), "converted"),
    InputCase("16-bit-image", "folder", add_image("train/a/deep.png", "I;16"), "converted"),
    InputCase("alpha-image", "folder", add_image("train/a/alpha.png", "RGBA"), "converted"),
    InputCase("palette-alpha-image", "folder", add_image("train/a/pal.png", "P+transparency"), "converted"),
    InputCase("1x1-image", "folder", add_image("train/a/one.png", "1x1"), "converted"),
    InputCase("listed-file-missing", "cub", listed_file_missing, "refused"),
    InputCase("duplicated-id", "cub", duplicated_id, "refused"),
    InputCase("box-outside-image", "cub", box_outside_image, "clipped", metrics={"boxes_clipped": 2, "boxes_dropped": 1}),
    InputCase("class-listed-without-images", "cub", class_listed_without_images, "dropped",
              metrics={"classes": 3, "classes_without_images": 2}),
    InputCase("empty-class-folder", "folder", empty_class_folder, "dropped", metrics={"classes": 2, "classes_without_images": 1}),
    InputCase("class-without-train-images", "cub", class_without_train_images, "warned",
              metrics={"classes": 3, "classes_without_train_images": 1}),
    InputCase("annotation-path-escaping-root", "cub", path_escaping_root, "refused"),
    InputCase("symlink-escaping-root", "cub", symlink_escaping_root, "refused"),
]


def write_dataset(tmp_path: Path, layout: str, options: dict[str, Any]) -> tuple[Path, dict[str, Any], Path]:
    """(dataset root, writer info, params file) of a fake dataset named ``ds``, outputs under tmp_path."""
    if layout == "cub":
        root = tmp_path / "CUB_200_2011"
        info = write_fake_cub(root)
        kind = "cub"
    else:
        root = tmp_path / "folder"
        for split, classes in {"train": {"a": 3, "b": 3}, "test": {"a": 1, "b": 1}}.items():
            for cname, n in classes.items():
                for i in range(n):
                    write_image(root / split / cname / f"{i}.png", seed=i)
        info, kind = {}, "imagefolder"
    params = {
        "run": {},
        "datasets": {"ds": {"kind": kind, "root": str(root), **options}},
        "prepare": {"data_dir": str(tmp_path / "data"), "metrics_dir": str(tmp_path / "metrics")},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return root, info, tmp_path / "params.yaml"


@pytest.mark.parametrize("case", INPUT_CASES, ids=lambda c: c.id)
def test_bad_input_to_prepare(tmp_path: Path, case: InputCase) -> None:
    root, info, params = write_dataset(tmp_path, case.layout, case.options)
    assert invoke("prepare", "-d", "ds", "-p", params).exit_code == 0  # an earlier good run
    before = snapshot(tmp_path)
    paths_before = {r.path for r in read_manifest(tmp_path / "data/ds/manifest.csv")}
    culprits = case.damage(root, info)
    result = invoke("prepare", "-d", "ds", "-p", params)

    if case.outcome == "refused":
        assert_refused(result, *culprits)
        assert snapshot(tmp_path) == before  # manifest.csv, dataset.json, prepare.json: all as they were
        return
    out = flat(result.output)
    assert result.exit_code == 0, result.output
    assert all(flat(c) in out for c in culprits), out
    metrics = read_json(tmp_path / "metrics/ds/prepare.json")
    for key, want in case.metrics.items():
        got = {k: metrics[key][k] for k in want} if isinstance(want, dict) else metrics[key]
        assert got == want, key
    rows = {r.image_id: r for r in read_manifest(tmp_path / "data/ds/manifest.csv")}
    paths = {r.path: r for r in rows.values()}
    if case.outcome == "skipped":
        assert set(paths) == paths_before - set(culprits[:3])
    elif case.outcome == "clipped":
        assert rows["1"].box == (0.0, 1.0, 8.0, 4.0) and rows["2"].box is None  # clipped to the 8 x 6 image; dropped
    elif case.outcome == "converted":  # listed with its size; every loader decodes it as 8-bit RGB
        (new,) = set(paths) - paths_before
        img = open_rgb(root / new)
        assert img.mode == "RGB" and img.size == (paths[new].width, paths[new].height)
        assert decode_region(root / new, (0.0, 0.0, float(img.size[0]), float(img.size[1])), (4, 4)).shape == (4, 4, 3)
    elif case.outcome == "dropped":  # not a label: labels stay 0..K-1 over the classes that have images
        assert sorted({r.label for r in rows.values()}) == list(range(metrics["classes"]))
    elif case.outcome == "warned":  # kept as a label, with test images only
        assert {r.split for r in rows.values() if r.class_name == "003.Sooty_Albatross"} == {"test"}


# =========================================================================== 2. odd images through the chain
def test_odd_images_are_converted_and_carried_through_every_stage(chain: Path) -> None:
    rows = {r.path: r for r in read_manifest(chain / "data" / NAME / "manifest.csv")}
    assert set(ODD_IMAGES) <= set(rows)
    assert (rows["test/class0/one_pixel.png"].width, rows["test/class0/one_pixel.png"].height) == (1, 1)
    ids = {rows[p].image_id for p in ODD_IMAGES}
    with AttentionReader(chain / "data" / NAME / "attention.h5") as att:
        assert ids <= set(att.image_ids()) and np.isfinite(att.read().heatmaps).all()
    with CropsReader(chain / "data" / NAME / "crops.h5") as crops:
        rec = crops.read()
    index = {image_id: i for i, image_id in enumerate(rec.image_ids)}
    one = index[rows["test/class0/one_pixel.png"].image_id]
    assert (rec.boxes[one, :2] >= 0).all() and (rec.boxes[one, 2:] <= 1.0 + 1e-4).all()  # inside the 1 x 1 image
    with open(chain / "metrics" / NAME / "predictions.csv", newline="") as fh:
        predicted = {r["image_id"] for r in csv.DictReader(fh)}
    assert {rows[p].image_id for p in ODD_IMAGES if p.startswith("test/")} <= predicted


# =========================================================================== 3. params
# (id, stage command, its extra options, params edits (key path with __ for .), what the message must name)
PARAM_CASES = [
    ("typo:datasets.toy.val_fractoin", "prepare", [], {f"datasets__{NAME}__val_fractoin": 0.2},
     [f"datasets.{NAME}.val_fractoin: unknown key", "val_fraction"]),
    ("range:datasets.toy.val_fraction=1.5", "prepare", [], {f"datasets__{NAME}__val_fraction": 1.5},
     [f"datasets.{NAME}.val_fraction", "less than 1", "(got 1.5)"]),
    ("typo:trian_backbone", "train-backbone", [], {"trian_backbone": {"epochs": 1}}, ["trian_backbone: unknown key", "train_backbone"]),
    ("typo:train_backbone.epcohs", "train-backbone", [], {"train_backbone__epcohs": 3}, ["train_backbone.epcohs: unknown key", "epochs"]),
    ("range:train_backbone.lr=-0.1", "train-backbone", [], {"train_backbone__lr": -0.1}, ["train_backbone.lr", "greater than 0"]),
    ("range:train_backbone.crop_threshold=[0.7,0.2]", "train-backbone", [], {"train_backbone__crop_threshold": [0.7, 0.2]},
     ["train_backbone", "crop_threshold must satisfy 0 < low <= high < 1"]),
    ("range:--epochs 0", "train-backbone", ["--epochs", "0"], {}, ["train_backbone.epochs", "greater than or equal to 1"]),
    ("range:model.lcam_kernel=4", "train-backbone", [], {"model__lcam_kernel": 4},
     ["model", "lcam_kernel must be 0 (adaptive) or an odd number"]),
    ("typo:attention.methd", "extract-attention", [], {"attention__methd": "bap"}, ["attention.methd: unknown key", "method"]),
    ("range:--method cam", "extract-attention", ["--method", "cam"], {}, ["attention.method", "'oaam'"]),
    ("typo:crops.treshold", "extract-crops", [], {"crops__treshold": 0.3}, ["crops.treshold: unknown key", "threshold"]),
    ("range:--threshold 1.5", "extract-crops", ["--threshold", "1.5"], {}, ["crops.threshold", "less than or equal to 1", "(got 1.5)"]),
    ("range:train_refine.box_jitter=0.9", "train-refine", [], {"train_refine__box_jitter": 0.9},
     ["train_refine.box_jitter", "less than or equal to 0.5"]),
    ("type:train_refine.shared_backbone='yes'", "train-refine", [], {"train_refine__shared_backbone": "yes"},
     ["train_refine.shared_backbone", "bool"]),
    ("typo:evaluate.weigth_step", "evaluate", [], {"evaluate__weigth_step": 0.5}, ["evaluate.weigth_step: unknown key", "weight_step"]),
    ("range:evaluate.weight_step=0.3", "evaluate", [], {"evaluate__weight_step": 0.3}, ["evaluate.weight_step must divide 1", "0.3"]),
    ("range:evaluate.top_k=0", "evaluate", [], {"evaluate__top_k": 0}, ["evaluate.top_k", "greater than or equal to 1"]),
]


@pytest.mark.parametrize("case_id, stage, options, edits, culprits", PARAM_CASES, ids=[c[0] for c in PARAM_CASES])
def test_bad_params_stop_the_stage_before_any_work(
    project: Path, case_id: str, stage: str, options: list[str], edits: dict[str, Any], culprits: list[str]
) -> None:
    params = edit_params(project, **edits)
    before = snapshot(project)
    assert_refused(invoke(stage, "-d", NAME, "-p", params, *options), *culprits)
    assert snapshot(project) == before


# =========================================================================== 4. NaN loss
@pytest.mark.parametrize(
    "stage, module, builder, key",
    [
        ("train-backbone", train_backbone, "build_stage1", "train_backbone.lr"),
        ("train-refine", train_refine, "build_refine_net", "train_refine.lr"),
    ],
    ids=["train-backbone", "train-refine"],
)
def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(
    project: Path, monkeypatch: pytest.MonkeyPatch, stage: str, module: Any, builder: str, key: str
) -> None:
    """The weights become NaN after the first step of epoch 2: the second step's loss is NaN."""
    models: list[torch.nn.Module] = []
    real_build = getattr(module, builder)

    def build(*args: Any, **kwargs: Any) -> Any:
        out = real_build(*args, **kwargs)
        models.append(out[0] if isinstance(out, tuple) else out)
        return out

    def poison(epoch: int, step: int) -> None:
        if (epoch, step) == (1, 0):
            with torch.no_grad():
                for p in models[-1].parameters():
                    p.fill_(float("nan"))

    monkeypatch.setattr(module, builder, build)
    monkeypatch.setattr(module, "run", functools.partial(module.run, on_step=poison))
    folder = "stage1" if stage == "train-backbone" else "refine"
    metrics = project / "metrics" / NAME / f"{module.STAGE}.json"
    before = snapshot(project)

    assert_refused(invoke(stage, "-d", NAME, "-p", project / "params.yaml"), "the loss became nan at epoch 2, step 2", key)
    last = load_checkpoint(project / "data" / NAME / folder / "unfinished" / "last.pt")
    assert last["epoch"] == 1 and last["finished"] is False  # the last good checkpoint, kept for --resume
    for name in ("best.pt", "last.pt"):  # the previous finished run's checkpoints are untouched
        rel = f"data/{NAME}/{folder}/{name}"
        assert sha(project / rel) == before[rel], rel
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())
    assert sha(metrics) == before[metrics.relative_to(project).as_posix()]  # the good run's metrics stay
    assert not temp_files(project)


# =========================================================================== 5. artefacts from another run
def reprepare(project: Path) -> None:
    """Prepare again with another val split: a valid manifest with another hash (later artefacts now stale)."""
    assert invoke("prepare", "-d", NAME, "-p", edit_params(project, **{f"datasets__{NAME}__split_seed": 1})).exit_code == 0


def retrain_stage1(project: Path) -> None:
    """Train stage-1 again with another seed: another checkpoint (later artefacts now stale)."""
    assert invoke("train-backbone", "-d", NAME, "-p", edit_params(project, train_backbone__seed=1)).exit_code == 0


def reextract_attention(project: Path) -> None:
    assert invoke("extract-attention", "-d", NAME, "-p", project / "params.yaml", "--method", "bap").exit_code == 0


def recrop(project: Path) -> None:
    assert invoke("extract-crops", "-d", NAME, "-p", project / "params.yaml", "--threshold", "0.3").exit_code == 0


def truncate_file(rel: str) -> Callable[[Path], None]:
    """Cut a file in half, as a writer killed midway would leave it without the atomic rename (a CSV mid-line)."""

    def cut(project: Path) -> None:
        path = project / rel
        data = path.read_bytes()
        end = len(data) // 2
        if path.suffix == ".csv":  # three fields into a line: the cut can never pass for a shorter, complete file
            start = data.rindex(b"\n", 0, end) + 1
            end = start + len(b",".join(data[start:].split(b",")[:3]))
        path.write_bytes(data[:end])

    return cut


D = f"data/{NAME}"  # the project's outputs for the dataset
# (id, what happened since the chain ran, the command that must refuse, its extra options,
#  what it must name: paths under data/ are made absolute in the project)
STALE_CASES = [
    ("stage1-from-another-manifest", [reprepare], "extract-attention", [],
     [f"{D}/stage1/best.pt", "another manifest", "fgpipe train-backbone --dataset toy"]),
    ("stage1-from-another-manifest-refine", [reprepare], "train-refine", [],
     [f"{D}/stage1/best.pt", "another manifest", "fgpipe train-backbone"]),
    ("attention-from-another-manifest", [reprepare, retrain_stage1], "extract-crops", [],
     [f"{D}/attention.h5", "another manifest", "fgpipe extract-attention"]),
    ("attention-from-another-checkpoint", [retrain_stage1], "extract-crops", [],
     [f"{D}/attention.h5", "another checkpoint", "fgpipe extract-attention"]),
    ("crops-from-another-manifest", [reprepare, retrain_stage1], "train-refine", [],
     [f"{D}/crops.h5", "another manifest", "fgpipe extract-crops"]),
    ("crops-from-another-attention-file", [reextract_attention], "show", ["--image", "test/class0/000"],
     [f"{D}/crops.h5", "another attention file", "fgpipe extract-crops"]),
    ("refine-from-another-crops-file", [recrop], "evaluate", [],
     [f"{D}/refine/best.pt", "another crops.h5", "fgpipe train-refine --dataset toy"]),
    ("manifest-truncated", [truncate_file(f"{D}/manifest.csv")], "train-backbone", [],
     [f"{D}/manifest.csv:", "expected 11 fields"]),
    ("checkpoint-truncated", [truncate_file(f"{D}/stage1/best.pt")], "extract-attention", [],
     [f"{D}/stage1/best.pt", "not a readable checkpoint"]),
    ("attention-truncated", [truncate_file(f"{D}/attention.h5")], "extract-crops", [],
     [f"{D}/attention.h5", "not a readable HDF5 file", "fgpipe extract-attention"]),
    ("crops-truncated", [truncate_file(f"{D}/crops.h5")], "train-refine", [],
     [f"{D}/crops.h5", "not a readable HDF5 file", "fgpipe extract-crops"]),
]


@pytest.mark.parametrize("case_id, since, command, options, culprits", STALE_CASES, ids=[c[0] for c in STALE_CASES])
def test_artefact_from_another_run_is_refused(
    project: Path, case_id: str, since: list[Callable[[Path], None]], command: str, options: list[str], culprits: list[str]
) -> None:
    for step in since:
        step(project)
    before = snapshot(project)
    named = [str(project / c) if c.startswith("data/") else c for c in culprits]
    assert_refused(invoke(command, "-d", NAME, "-p", project / "params.yaml", *options), *named)
    assert snapshot(project) == before


# =========================================================================== 6. killed during each stage
def _arm(kill: tuple[Any, ...]) -> None:
    """In the child: SIGKILL this process at ``kill`` (see :class:`KillCase`)."""
    die = functools.partial(os.kill, os.getpid(), signal.SIGKILL)
    what = kill[0]
    if what == "rename":  # just before the n-th rename onto a file of this name: its temp file is complete
        _, name, n = kill
        real_replace, seen = os.replace, [0]

        def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            if Path(dst).name == name:
                seen[0] += 1
                if seen[0] == n:
                    die()
            real_replace(src, dst, *args, **kwargs)

        os.replace = replace  # fgpipe.store.atomic_path looks os.replace up at call time
    elif what == "append":  # after the n-th batch appended to an HDF5 artefact: its temp file is half written
        _, n = kill
        real_append, calls = h5schema._Writer._append, [0]

        def append(self: Any, columns: dict[str, Any]) -> None:
            real_append(self, columns)
            calls[0] += 1
            if calls[0] == n:
                self._h5.flush()
                die()

        h5schema._Writer._append = append  # type: ignore[method-assign]
    elif what == "step":  # during training, after optimisation step `step` of epoch `epoch` (0-based)
        _, epoch, step = kill

        def hook(e: int, s: int) -> None:
            if (e, s) == (epoch, step):
                die()

        for module in (train_backbone, train_refine):
            module.run = functools.partial(module.run, on_step=hook)  # the CLI calls stage.run at call time
    else:
        raise ValueError(kill)


def _killed_run(argv: list[str], cwd: str, kill: tuple[Any, ...], log: str) -> None:
    """Body of the child process: ``fgpipe ARGV`` in ``cwd``, output to ``log``, SIGKILLed at ``kill``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    os.environ["FGPIPE_THREADS"] = "1"
    _arm(kill)
    app(argv, prog_name="fgpipe")


@pytest.fixture(scope="module")
def fork_server() -> multiprocessing.context.BaseContext:
    """Processes forked from a server that imported fgpipe's stages (so torch) once.

    (The server cannot preload this test module: it does not see tests/ on sys.path. Each child imports it
    when it unpickles its target, which costs little once fgpipe is loaded.)
    """
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["fgpipe.cli", "pytest", *(f"fgpipe.stages.{s.replace('-', '_')}" for s in STAGES)])
    return ctx


@dataclass(frozen=True)
class KillCase:
    """``fgpipe STAGE OPTIONS`` (params edited by ``edits``) SIGKILLed at ``kill``:

    - ("rename", NAME, n): just before the n-th rename of a finished temp file onto a file called NAME;
    - ("append", n): after the n-th batch written to an HDF5 artefact's temp file;
    - ("step", epoch, step): during training, after that optimisation step (0-based), checkpoints of
      the earlier epochs on disk.

    ``finished_before``: outputs the run completed before the kill (each must then be a complete new
    version); ``unfinished``: the folder holding the interrupted run's checkpoints (complete, marked unfinished),
    which ``--resume`` completes. Every output must be byte-identical to the chain's, except those finished before.
    ``never_half``: a folder that must not exist after the kill (it appears whole or not at all), and
    whose hidden work folders the rerun must have removed.
    """

    id: str
    stage: str
    kill: tuple[Any, ...]
    options: tuple[str, ...] = ()
    edits: dict[str, Any] = field(default_factory=dict)
    finished_before: tuple[str, ...] = ()
    unfinished: str = ""
    next_stage: str = ""  # refuses an unfinished checkpoint copied into place by hand
    changed: str = ""  # an output the rerun must have rewritten
    never_half: str = ""


SYNTHETIC = {"kind": "synthetic", "root": "synth", "val_fraction": 0.25,
             "synthetic": {"num_classes": 2, "train_per_class": 4, "test_per_class": 2, "image_size": 64, "distractors": 1}}
KILL_CASES = [
    KillCase("prepare:generating-synthetic-images", "prepare", ("rename", "synth", 1),
             edits={f"datasets__{NAME}": SYNTHETIC}, changed=f"{D}/manifest.csv", never_half="synth"),
    KillCase("prepare:before-manifest", "prepare", ("rename", "manifest.csv", 1),
             edits={f"datasets__{NAME}__split_seed": 1}, changed=f"{D}/manifest.csv"),
    KillCase("prepare:between-manifest-and-dataset-json", "prepare", ("rename", "dataset.json", 1),
             edits={f"datasets__{NAME}__split_seed": 1}, finished_before=(f"{D}/manifest.csv",), changed=f"{D}/manifest.csv"),
    KillCase("train-backbone:first-checkpoint", "train-backbone", ("rename", "best.pt", 1),
             edits={"train_backbone__seed": 1}, changed=f"{D}/stage1/best.pt"),
    KillCase("train-backbone:mid-epoch-2", "train-backbone", ("step", 1, 0), edits={"train_backbone__seed": 1},
             unfinished=f"{D}/stage1/unfinished", next_stage="extract-attention", changed=f"{D}/stage1/best.pt"),
    KillCase("extract-attention:mid-file", "extract-attention", ("append", 1), ("--method", "bap"), changed=f"{D}/attention.h5"),
    KillCase("extract-crops:mid-file", "extract-crops", ("append", 1), ("--threshold", "0.3"), changed=f"{D}/crops.h5"),
    KillCase("extract-crops:before-preview", "extract-crops", ("rename", "crops_preview.png", 1), ("--threshold", "0.3"),
             finished_before=(f"{D}/crops.h5",), changed=f"{D}/crops.h5"),
    KillCase("train-refine:first-checkpoint", "train-refine", ("rename", "best.pt", 1),
             edits={"train_refine__seed": 1}, changed=f"{D}/refine/best.pt"),
    KillCase("train-refine:mid-epoch-2", "train-refine", ("step", 1, 0), edits={"train_refine__seed": 1},
             unfinished=f"{D}/refine/unfinished", next_stage="evaluate", changed=f"{D}/refine/best.pt"),
    KillCase("evaluate:before-evaluate-json", "evaluate", ("rename", "evaluate.json", 1), ("--combine", "fixed"),
             finished_before=(f"metrics/{NAME}/predictions.csv", f"metrics/{NAME}/per_class.csv",
                              f"metrics/{NAME}/confusion.csv", f"{D}/confusion.png"),
             changed=f"metrics/{NAME}/evaluate.json"),
]


@pytest.mark.parametrize("case", KILL_CASES, ids=lambda c: c.id)
def test_killed_stage_leaves_nothing_partial_and_the_rerun_completes(
    project: Path, fork_server: multiprocessing.context.BaseContext, case: KillCase
) -> None:
    params = edit_params(project, **case.edits)
    before = snapshot(project)
    argv = [case.stage, "-d", NAME, "-p", str(params), *case.options]
    log = project.parent / "killed.log"
    child = fork_server.Process(target=_killed_run, args=(argv, str(project), case.kill, str(log)))
    child.start()
    child.join(timeout=240)
    assert child.exitcode == -signal.SIGKILL, f"exit code {child.exitcode}, the kill point was not reached:\n{log.read_text()}"

    # 1. Every output path DVC declares holds the previous version or a complete new one, never a partial file.
    outputs = stage_outputs(case.stage)
    for rel in outputs:
        path = project / rel
        if rel not in before and path.is_dir():  # a plots folder (dvclive curves, cache: false)
            continue
        if rel in case.finished_before:
            assert is_complete(path), rel
        else:
            assert (sha(path) if path.exists() else None) == before.get(rel), f"{rel} changed though the kill came before it was written"
    # 2. What the kill left behind is only hidden temp files, none at or inside a path DVC tracks.
    for tmp in temp_files(project):
        assert not any(tmp == out or tmp.startswith(out.rstrip("/") + "/") for out in outputs), tmp
        assert Path(tmp).name.startswith(".") and Path(tmp).name.endswith(".tmp")
    if case.never_half:
        assert not (project / case.never_half).exists() and list(project.glob(f".{case.never_half}.tmp-*"))
    # 3. The interrupted run's checkpoints are complete, marked unfinished, in their own folder (none of DVC's outputs).
    if case.unfinished:
        assert not any(out.startswith(case.unfinished) for out in outputs)
        for name in ("best.pt", "last.pt"):
            state = load_checkpoint(project / case.unfinished / name)
            assert state["epoch"] == 1 and state["finished"] is False, name
        target = project / Path(case.unfinished).parent / "best.pt"
        kept = target.read_bytes()
        shutil.copyfile(project / case.unfinished / "best.pt", target)  # what a user might do by hand
        downstream_before = snapshot(project)
        assert_refused(
            invoke(case.next_stage, "-d", NAME, "-p", params),
            str(target), "did not finish", f"fgpipe {case.stage} --dataset {NAME} --resume",
        )
        assert snapshot(project) == downstream_before
        target.write_bytes(kept)

    # 4. The rerun (--resume for an interrupted training) completes, rewrites the outputs and sweeps the temp files.
    rerun = invoke(*argv, *(["--resume"] if case.unfinished else []))
    assert rerun.exit_code == 0, rerun.output
    for rel in outputs:
        path = project / rel
        assert path.is_dir() or is_complete(path), rel
    assert sha(project / case.changed) != before[case.changed]
    assert not temp_files(project)
    if case.never_half:
        assert (project / case.never_half / "synthetic.json").is_file() and not list(project.glob(f".{case.never_half}.tmp-*"))
    if case.unfinished:
        assert read_json(project / "metrics" / NAME / f"{case.stage.replace('-', '_')}.provenance.json")["resumed_from_epoch"] == 1
        folder = Path(case.unfinished).parent
        assert all(load_checkpoint(project / folder / name)["finished"] for name in ("best.pt", "last.pt"))
        assert not (project / case.unfinished).exists()
