"""Shared fixtures: tiny fake datasets written in each dataset's real on-disk layout, and params files.

The writers are plain functions (import them: ``from conftest import write_fake_cub``, or use
the ``make_settings`` fixture) so any test can build a dataset in its own tmp_path.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from fgpipe.config import Settings, load_params

IMAGE_SIZE = (8, 6)  # (width, height) of every fake image unless a test asks otherwise


# --------------------------------------------------------------------------- images
def write_image(path: Path, size: tuple[int, int] = IMAGE_SIZE, mode: str = "RGB", seed: int = 0) -> Path:
    """A small noise image in ``mode``; the format follows the suffix (.jpg, .png, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), mode="RGB")
    img = rgb if mode == "RGB" else rgb.convert(mode)
    img.save(path)
    return path


# --------------------------------------------------------------------------- CUB-200-2011
def write_fake_cub(
    root: Path,
    classes: tuple[str, ...] = ("001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"),
    train_per_class: int = 4,
    test_per_class: int = 2,
    extra_classes: tuple[str, ...] = ("004.Groove_billed_Ani",),
    size: tuple[int, int] = IMAGE_SIZE,
) -> dict[str, Any]:
    """CUB_200_2011/ with images.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt,
    classes.txt (also listing ``extra_classes``, which have no images, like a subset) and images/.

    Returns {"ids": {id: (rel_path, class, is_train)}, "boxes": {id: (x, y, w, h)}}.
    """
    root.mkdir(parents=True, exist_ok=True)
    all_classes = list(classes) + list(extra_classes)
    images, labels, split, boxes_txt = [], [], [], []
    ids: dict[str, tuple[str, str, bool]] = {}
    boxes: dict[str, tuple[float, float, float, float]] = {}
    n = 0
    for ci, cname in enumerate(classes, start=1):
        for k in range(train_per_class + test_per_class):
            n += 1
            is_train = k < train_per_class
            rel = f"{cname}/{cname.split('.', 1)[-1]}_{k:04d}_{n}.jpg"
            write_image(root / "images" / rel, size=size, seed=n)
            box = (1.0, 0.5, 5.0, 4.0)
            images.append(f"{n} {rel}")
            labels.append(f"{n} {ci}")
            split.append(f"{n} {int(is_train)}")
            boxes_txt.append(f"{n} " + " ".join(str(v) for v in box))
            ids[str(n)] = (rel, cname, is_train)
            boxes[str(n)] = box
    (root / "images.txt").write_text("\n".join(images) + "\n")
    (root / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    (root / "train_test_split.txt").write_text("\n".join(split) + "\n")
    (root / "bounding_boxes.txt").write_text("\n".join(boxes_txt) + "\n")
    (root / "classes.txt").write_text("".join(f"{i} {c}\n" for i, c in enumerate(all_classes, start=1)))
    return {"ids": ids, "boxes": boxes}


# --------------------------------------------------------------------------- FGVC-Aircraft 2013b
# variant -> (family, manufacturer), in the official variants.txt order
AIRCRAFT_VARIANTS = {
    "707-320": ("Boeing 707", "Boeing"),
    "727-200": ("Boeing 727", "Boeing"),
    "A300B4": ("A300", "Airbus"),
    "F/A-18": ("F/A-18", "McDonnell Douglas"),
    "Cessna 172": ("Cessna 172", "Cessna"),
}


def write_fake_aircraft(
    root: Path,
    variants: tuple[str, ...] = ("707-320", "727-200", "A300B4", "F/A-18"),
    train_per_class: int = 3,
    val_per_class: int = 2,
    test_per_class: int = 2,
    size: tuple[int, int] = (8, 30),
) -> dict[str, Any]:
    """fgvc-aircraft-2013b/data/ with every images_{level}_{split}.txt, the three class lists (all of
    AIRCRAFT_VARIANTS, so the last variant has no images), images_box.txt and images/<id>.jpg.

    Images are ``size`` (tall enough for the 20-pixel banner). Boxes in images_box.txt are 1-based
    inclusive ``2 3 6 9``, i.e. (1, 2, 6, 9) as 0-based pixel edges. Returns
    {"split": {id: train|val|test}, "variant": {id: variant}, "family": ..., "manufacturer": ...}.
    """
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    families = list(dict.fromkeys(f for f, _ in AIRCRAFT_VARIANTS.values()))
    makers = list(dict.fromkeys(m for _, m in AIRCRAFT_VARIANTS.values()))
    (data / "variants.txt").write_text("".join(f"{v}\n" for v in AIRCRAFT_VARIANTS))
    (data / "families.txt").write_text("".join(f"{f}\n" for f in families))
    (data / "manufacturers.txt").write_text("".join(f"{m}\n" for m in makers))
    info: dict[str, dict[str, str]] = {"split": {}, "variant": {}, "family": {}, "manufacturer": {}}
    lines: dict[tuple[str, str], list[str]] = {}
    boxes = []
    n = 0
    for variant in variants:
        family, maker = AIRCRAFT_VARIANTS[variant]
        for split, count in (("train", train_per_class), ("val", val_per_class), ("test", test_per_class)):
            for _ in range(count):
                n += 1
                image_id = f"{1000000 + n * 37:07d}"
                write_image(data / "images" / f"{image_id}.jpg", size=size, seed=n)
                boxes.append(f"{image_id} 2 3 6 9")
                info["split"][image_id] = split
                names = {"variant": variant, "family": family, "manufacturer": maker}
                for level, name in names.items():
                    info[level][image_id] = name
                    files = [split, "trainval"] if split in ("train", "val") else [split]
                    for f in files:
                        lines.setdefault((level, f), []).append(f"{image_id} {name}")
    for level in ("variant", "family", "manufacturer"):
        for f in ("train", "val", "trainval", "test"):
            (data / f"images_{level}_{f}.txt").write_text("".join(f"{s}\n" for s in lines.get((level, f), [])))
    (data / "images_box.txt").write_text("".join(f"{b}\n" for b in boxes))
    return info


# --------------------------------------------------------------------------- Stanford Cars
CARS_CLASSES = ("AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Acura TL Sedan 2012", "Audi R8 Coupe 2012")


def write_cars_annotations(path: Path, rows: list[tuple[int, int, int, int, int, str]]) -> None:
    """A cars_*_annos.mat: a 1 x N struct array `annotations` (bbox_x1, bbox_y1, bbox_x2, bbox_y2, class, fname)."""
    import scipy.io

    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
    ann = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])
    for i, (x1, y1, x2, y2, cls, fname) in enumerate(rows):
        nums = [np.array([[v]], dtype=np.uint16) for v in (x1, y1, x2, y2, cls)]
        ann[0, i] = (*nums, np.array([fname]))
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"annotations": ann})


def write_fake_cars(
    base: Path,
    classes: tuple[str, ...] = CARS_CLASSES,
    used: int = 3,
    train_per_class: int = 3,
    test_per_class: int = 2,
    size: tuple[int, int] = IMAGE_SIZE,
) -> dict[str, Any]:
    """stanford_cars/ (``base``) as torchvision reads it: devkit/cars_meta.mat, devkit/cars_train_annos.mat,
    cars_test_annos_withlabels.mat, cars_train/, cars_test/. Only the first ``used`` classes get images.

    Train and test both number their files 00001.jpg, ... (as the real release does). Boxes are the
    1-based inclusive (2, 2, 7, 5). Returns {"train": [(fname, class_name)], "test": [...]}.
    """
    import scipy.io

    (base / "devkit").mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(base / "devkit/cars_meta.mat", {"class_names": np.array([list(classes)], dtype=object)})
    out: dict[str, list[tuple[str, str]]] = {"train": [], "test": []}
    seed = 0
    for split, per_class, ann_file in (
        ("train", train_per_class, "devkit/cars_train_annos.mat"),
        ("test", test_per_class, "cars_test_annos_withlabels.mat"),
    ):
        rows = []
        n = 0
        for ci in range(used):
            for _ in range(per_class):
                n += 1
                seed += 1
                fname = f"{n:05d}.jpg"
                write_image(base / f"cars_{split}" / fname, size=size, seed=seed)
                rows.append((2, 2, 7, 5, ci + 1, fname))
                out[split].append((fname, classes[ci]))
        write_cars_annotations(base / ann_file, rows)
    return out


# --------------------------------------------------------------------------- ImageFolder
def write_fake_imagefolder(
    root: Path,
    splits: dict[str, dict[str, int]] | None = None,
    suffixes: tuple[str, ...] = (".jpg", ".png"),
) -> dict[str, list[str]]:
    """root/<split>/<class>/img_XX<suffix>; ``splits`` maps split folder -> {class: count}.

    Suffixes alternate per image. Returns {split folder: [relative paths]}.
    """
    splits = splits or {"train": {"sparrow": 4, "finch": 4}, "test": {"sparrow": 2, "finch": 1}}
    out: dict[str, list[str]] = {}
    seed = 0
    for split, counts in splits.items():
        out[split] = []
        for cname, count in counts.items():
            for k in range(count):
                seed += 1
                rel = f"{split}/{cname}/img_{k:02d}{suffixes[k % len(suffixes)]}"
                write_image(root / rel, seed=seed)
                out[split].append(rel)
    return out


# --------------------------------------------------------------------------- params
def write_params(tmp_path: Path, datasets: dict[str, dict[str, Any]], run: dict[str, str] | None = None) -> Path:
    """tmp_path/params.yaml with these datasets, data/ and metrics/ under tmp_path, and `run: {}`."""
    params = {
        "run": run or {},
        "datasets": datasets,
        "prepare": {"data_dir": str(tmp_path / "data"), "metrics_dir": str(tmp_path / "metrics")},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def make_settings(tmp_path: Path):
    """make_settings(name, kind, root, **options) -> Settings for one dataset in tmp_path/params.yaml."""

    def make(name: str, kind: str, root: Path | str, overrides: dict[str, Any] | None = None, **options: Any) -> Settings:
        path = write_params(tmp_path, {name: {"kind": kind, "root": str(root), **options}})
        return load_params(path, overrides)

    return make


# --------------------------------------------------------------------------- hygiene
@pytest.fixture(autouse=True)
def _restore_rng_state() -> Iterator[None]:
    """Tests may seed or draw from the global RNGs; restore them so test order never matters."""
    py_state = random.getstate()
    np_state = np.random.get_state()
    torch = sys.modules.get("torch")
    torch_state = torch.random.get_rng_state() if torch is not None else None
    yield
    random.setstate(py_state)
    np.random.set_state(np_state)
    if torch is not None and torch_state is not None:
        torch.random.set_rng_state(torch_state)


@pytest.fixture
def one_torch_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One torch thread (and FGPIPE_THREADS=1 for stages that set their own): tiny models gain nothing from
    more, and lose a lot when other jobs share the cores. Use with ``pytestmark = pytest.mark.usefixtures(...)``."""
    import torch

    monkeypatch.setenv("FGPIPE_THREADS", "1")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)



@pytest.fixture(scope="module")
def one_thread_module() -> Iterator[None]:
    """Run a module's stages with one torch thread (FGPIPE_THREADS=1): on tiny tensors thread start-up and
    spinning cost more than they save, several times more on a busy 2-core machine. Restored afterwards."""
    import torch

    before = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FGPIPE_THREADS", "1")
        yield
    torch.set_num_threads(before)
