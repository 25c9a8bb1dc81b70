"""Every reader, end to end through the prepare stage, on tiny fake datasets in their real layouts."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import pytest
from conftest import (
    AIRCRAFT_VARIANTS,
    CARS_CLASSES,
    write_cars_annotations,
    write_fake_aircraft,
    write_fake_cars,
    write_fake_cub,
    write_fake_imagefolder,
)

from fgpipe.datasets import aircraft, cars, imagefolder
from fgpipe.errors import DatasetError
from fgpipe.manifest import read_manifest
from fgpipe.stages import prepare
from fgpipe.store import read_json


def _prepare(settings, name: str):
    metrics = prepare.run(settings, name).metrics
    rows = read_manifest(settings.data_dir(name) / "manifest.csv")
    return metrics, rows, read_json(settings.metrics_file(name, "prepare")), read_json(settings.data_dir(name) / "dataset.json")


# --------------------------------------------------------------------------- CUB
def test_cub_manifest(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "CUB_200_2011"
    info = write_fake_cub(root)
    settings = make_settings("cub", "cub", root, val_fraction=0.25)
    metrics, rows, on_disk, ds = _prepare(settings, "cub")

    assert {r.image_id for r in rows} == set(info["ids"])
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]  # 004 has no images
    for r in rows:
        rel, cname, is_train = info["ids"][r.image_id]
        assert r.path == f"images/{rel}"
        assert r.class_name == cname and r.label == classes.index(cname)
        assert r.split in (("train", "val") if is_train else ("test",))
        assert (r.width, r.height) == (8, 6)
        x, y, w, h = info["boxes"][r.image_id]
        assert r.box == (x, y, x + w, y + h)
    # 4 train images per class, val_fraction 0.25 -> exactly one val image per class
    assert Counter(r.class_name for r in rows if r.split == "val") == Counter({c: 1 for c in classes})
    assert ds["classes"] == classes and ds["crop_bottom"] == 0
    assert metrics["images"] == {"train": 9, "val": 3, "test": 6, "total": 18}
    assert on_disk["images"] == metrics["images"]
    assert (on_disk["classes"], on_disk["with_box"], on_disk["skipped"], on_disk["boxes_clipped"]) == (3, 18, 0, 0)


# --------------------------------------------------------------------------- FGVC-Aircraft
@pytest.mark.parametrize("level", ["variant", "family", "manufacturer"])
@pytest.mark.parametrize("official_val", [False, True])
@pytest.mark.parametrize("drop_banner", [True, False])
def test_aircraft_manifest(tmp_path: Path, make_settings, level: str, official_val: bool, drop_banner: bool) -> None:
    root = tmp_path / "fgvc-aircraft-2013b"
    info = write_fake_aircraft(root)  # 4 of 5 variants used; 3 train + 2 val + 2 test each; 8x30 images
    opts = {"annotation_level": level, "official_val": official_val, "drop_banner": drop_banner}
    settings = make_settings("air", "aircraft", root, val_fraction=0.2, aircraft=opts)
    metrics, rows, _, ds = _prepare(settings, "air")

    official = {
        "variant": list(AIRCRAFT_VARIANTS),
        "family": list(dict.fromkeys(f for f, _ in AIRCRAFT_VARIANTS.values())),
        "manufacturer": list(dict.fromkeys(m for _, m in AIRCRAFT_VARIANTS.values())),
    }[level]
    used = [c for c in official if c in set(info[level].values())]
    assert "Cessna 172" not in used and len(used) == {"variant": 4, "family": 4, "manufacturer": 3}[level]
    assert ds["classes"] == used
    assert {r.image_id for r in rows} == set(info["split"])
    height = 10 if drop_banner else 30
    for r in rows:
        assert r.path == f"data/images/{r.image_id}.jpg"
        assert r.class_name == info[level][r.image_id] and r.label == used.index(r.class_name)
        assert (r.width, r.height) == (8, height)
        assert r.box == (1.0, 2.0, 6.0, 9.0)  # `2 3 6 9` 1-based inclusive
        if info["split"][r.image_id] == "test":
            assert r.split == "test"
        elif official_val:
            assert r.split == info["split"][r.image_id]
        else:
            assert r.split in ("train", "val")
    n_val = sum(r.split == "val" for r in rows)
    if official_val:
        assert n_val == 8
    else:  # carved from trainval: round(0.2 * n) per class (at least 1)
        per_class = Counter(r.class_name for r in rows if r.split != "test")
        assert n_val == sum(max(1, round(0.2 * n)) for n in per_class.values())
    assert metrics["images"]["total"] == 28 and metrics["images"]["test"] == 8
    assert ds["crop_bottom"] == (20 if drop_banner else 0)


def test_aircraft_box_clipped_by_banner(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "fgvc-aircraft-2013b"
    info = write_fake_aircraft(root)
    first = next(iter(info["split"]))
    box_file = root / "data/images_box.txt"
    box_file.write_text(box_file.read_text().replace(f"{first} 2 3 6 9", f"{first} 2 3 6 25"))
    for drop, want_box, clipped in ((True, (1.0, 2.0, 6.0, 10.0), 1), (False, (1.0, 2.0, 6.0, 25.0), 0)):
        settings = make_settings("air", "aircraft", root, aircraft={"drop_banner": drop})
        metrics, rows, _, _ = _prepare(settings, "air")
        assert {r.image_id: r.box for r in rows}[first] == want_box
        assert metrics["boxes_clipped"] == clipped


def test_aircraft_unknown_class_and_bad_box_lines(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "fgvc-aircraft-2013b"
    write_fake_aircraft(root)
    settings = make_settings("air", "aircraft", root)
    test_file = root / "data/images_variant_test.txt"
    good = test_file.read_text()
    test_file.write_text(good + "1234567 Spitfire\n")
    with pytest.raises(DatasetError, match=r"images_variant_test\.txt:9: class 'Spitfire' is not listed in .*variants\.txt"):
        prepare.run(settings, "air")
    test_file.write_text(good)
    box_file = root / "data/images_box.txt"
    box_file.write_text(box_file.read_text() + "1234567 1 2 x 4\n")
    with pytest.raises(DatasetError, match=r"images_box\.txt:29: box values must be numbers"):
        prepare.run(settings, "air")


def test_aircraft_missing_split_file(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "fgvc-aircraft-2013b"
    write_fake_aircraft(root)
    (root / "data/images_family_val.txt").unlink()
    ok = make_settings("air", "aircraft", root, aircraft={"annotation_level": "family"})
    assert prepare.run(ok, "air").metrics["images"]["total"] == 28  # the val file is only read with official_val
    settings = make_settings("air", "aircraft", root, aircraft={"annotation_level": "family", "official_val": True})
    with pytest.raises(DatasetError, match=r"missing data/images_family_val\.txt") as exc:
        prepare.run(settings, "air")
    assert aircraft.HOW_TO_GET in str(exc.value)


# --------------------------------------------------------------------------- Stanford Cars
@pytest.mark.parametrize("at_parent", [False, True])
def test_cars_manifest(tmp_path: Path, make_settings, at_parent: bool) -> None:
    base = tmp_path / "stanford_cars"
    info = write_fake_cars(base)  # 4 classes, 3 used; 3 train + 2 test each, both numbered from 00001
    root = tmp_path if at_parent else base
    prefix = "stanford_cars/" if at_parent else ""
    settings = make_settings("cars", "cars", root, val_fraction=0.34)
    metrics, rows, _, ds = _prepare(settings, "cars")

    assert ds["classes"] == list(CARS_CLASSES[:3])
    by_id = {r.image_id: r for r in rows}
    assert set(by_id) == {f"{s}/{f[:-4]}" for s in ("train", "test") for f, _ in info[s]}
    for split in ("train", "test"):
        for fname, cname in info[split]:
            r = by_id[f"{split}/{fname[:-4]}"]
            assert r.path == f"{prefix}cars_{split}/{fname}"
            assert r.class_name == cname and r.label == CARS_CLASSES.index(cname)
            assert (split == "test") == (r.split == "test")
            assert r.box == (1.0, 1.0, 7.0, 5.0)
            assert (r.width, r.height) == (8, 6)
    assert metrics["images"] == {"train": 6, "val": 3, "test": 6, "total": 15}


def test_cars_test_annotations_without_labels(tmp_path: Path, make_settings) -> None:
    import numpy as np
    import scipy.io

    base = tmp_path / "stanford_cars"
    write_fake_cars(base)
    fields = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "fname")
    ann = np.zeros((1, 1), dtype=[(f, "O") for f in fields])
    ann[0, 0] = (1, 1, 5, 5, np.array(["00001.jpg"]))
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": ann})
    with pytest.raises(DatasetError, match=r"cars_test_annos_withlabels\.mat: annotations lack the field\(s\) class"):
        prepare.run(make_settings("cars", "cars", base), "cars")


def test_cars_class_out_of_range_and_bad_mat(tmp_path: Path, make_settings) -> None:
    base = tmp_path / "stanford_cars"
    write_fake_cars(base)
    settings = make_settings("cars", "cars", base)
    write_cars_annotations(base / "devkit/cars_train_annos.mat", [(1, 1, 5, 5, 1, "00001.jpg"), (1, 1, 5, 5, 9, "00002.jpg")])
    with pytest.raises(DatasetError, match=r"cars_train_annos\.mat: annotations\[1\]: class 9 is outside 1\.\.4"):
        prepare.run(settings, "cars")
    (base / "devkit/cars_meta.mat").write_bytes(b"not a mat file" * 10)
    with pytest.raises(DatasetError, match=r"cars_meta\.mat: not a readable MATLAB file"):
        prepare.run(settings, "cars")


def test_cars_missing_files_named(tmp_path: Path, make_settings) -> None:
    base = tmp_path / "stanford_cars"
    write_fake_cars(base)
    (base / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(DatasetError, match=r"missing cars_test_annos_withlabels\.mat") as exc:
        prepare.run(make_settings("cars", "cars", base), "cars")
    assert cars.HOW_TO_GET in str(exc.value)


# --------------------------------------------------------------------------- ImageFolder
def test_imagefolder_carved_val(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "folder"
    files = write_fake_imagefolder(root)  # train: sparrow 4, finch 4; test: sparrow 2, finch 1
    (root / "train/finch/notes.txt").write_text("not an image")
    (root / "train/README").write_text("stray file directly under a split folder")
    settings = make_settings("f", "imagefolder", root, val_fraction=0.25)
    metrics, rows, _, ds = _prepare(settings, "f")

    assert ds["classes"] == ["finch", "sparrow"]  # sorted by name
    assert sorted(r.path for r in rows) == sorted(files["train"] + files["test"])
    for r in rows:
        assert r.image_id == os.path.splitext(r.path)[0]
        assert r.class_name == r.path.split("/")[1] and r.label == ds["classes"].index(r.class_name)
        assert r.box is None
        assert (r.split == "test") == r.path.startswith("test/")
    assert metrics["images"] == {"train": 6, "val": 2, "test": 3, "total": 11}
    assert metrics["reader_ignored_files"] == 2 and metrics["with_box"] == 0


def test_imagefolder_val_dir(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "folder"
    splits = {"tr": {"a": 3, "b": 3}, "va": {"a": 1, "b": 2}, "te": {"a": 1, "c": 1}}
    write_fake_imagefolder(root, splits)
    opts = {"train_dir": "tr", "val_dir": "va", "test_dir": "te"}
    _, rows, _, ds = _prepare(make_settings("f", "imagefolder", root, imagefolder=opts), "f")
    assert ds["classes"] == ["a", "b", "c"]
    assert Counter(r.split for r in rows) == {"train": 6, "val": 3, "test": 2}  # nothing carved
    assert all(r.path.startswith({"train": "tr/", "val": "va/", "test": "te/"}[r.split]) for r in rows)


def test_imagefolder_errors(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "folder"
    write_fake_imagefolder(root)
    with pytest.raises(DatasetError, match=r"missing valid") as exc:
        prepare.run(make_settings("f", "imagefolder", root, imagefolder={"val_dir": "valid"}), "f")
    assert imagefolder.HOW_TO_GET in str(exc.value)
    with pytest.raises(DatasetError, match=r"imagefolder\.test_dir: path '\.\./elsewhere' escapes the dataset root"):
        prepare.run(make_settings("f", "imagefolder", root, imagefolder={"test_dir": "../elsewhere"}), "f")
    (root / "test/finch/img_00.png").write_bytes((root / "test/finch/img_00.jpg").read_bytes())
    with pytest.raises(DatasetError, match=r"image id 'test/finch/img_00' is listed twice"):
        prepare.run(make_settings("f", "imagefolder", root), "f")
    empty = tmp_path / "empty"
    (empty / "train").mkdir(parents=True)
    (empty / "test").mkdir()
    with pytest.raises(DatasetError, match=r"train has no class folders"):
        prepare.run(make_settings("f", "imagefolder", empty), "f")
