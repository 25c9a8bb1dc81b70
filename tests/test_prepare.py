"""The prepare stage's shared checks: missing inputs, bad images, image modes, boxes, path safety, val carving."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    write_cars_annotations,
    write_fake_aircraft,
    write_fake_cars,
    write_fake_cub,
    write_fake_imagefolder,
    write_image,
)
from PIL import Image

from fgpipe.datasets import aircraft, cars, cub, imagefolder
from fgpipe.datasets.base import SourceListing, SourceRecord
from fgpipe.errors import BadImagesError, DatasetError
from fgpipe.images import open_rgb
from fgpipe.manifest import read_manifest
from fgpipe.stages import prepare


def _cub(tmp_path: Path, make_settings, **options):
    root = tmp_path / "CUB_200_2011"
    info = write_fake_cub(root)
    return root, info, make_settings("cub", "cub", root, **options)


def _rows(settings, name: str = "cub"):
    return read_manifest(settings.data_dir(name) / "manifest.csv")


# --------------------------------------------------------------------------- missing inputs
@pytest.mark.parametrize("kind, module", [("cub", cub), ("aircraft", aircraft), ("cars", cars), ("imagefolder", imagefolder)])
def test_missing_root_names_root_and_how_to_get(tmp_path: Path, make_settings, kind: str, module) -> None:
    root = tmp_path / "nowhere" / kind
    with pytest.raises(DatasetError) as exc:
        prepare.run(make_settings("ds", kind, root), "ds")
    msg = str(exc.value)
    assert f"dataset root not found: {root}" in msg and "datasets.ds.root" in msg
    assert module.HOW_TO_GET in msg
    assert not (tmp_path / "data").exists()  # nothing written


def test_missing_annotation_file(tmp_path: Path, make_settings) -> None:
    root, _, settings = _cub(tmp_path, make_settings)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(DatasetError, match=r"is incomplete: missing image_class_labels\.txt") as exc:
        prepare.run(settings, "cub")
    assert str(root) in str(exc.value) and cub.HOW_TO_GET in str(exc.value)


def test_listed_image_missing(tmp_path: Path, make_settings) -> None:
    root, info, settings = _cub(tmp_path, make_settings)
    rel = info["ids"]["3"][0]
    (root / "images" / rel).unlink()
    with pytest.raises(DatasetError, match=r"1 listed image file\(s\) do not exist") as exc:
        prepare.run(settings, "cub")
    assert f"{root / 'images' / rel} (listed at {root / 'images.txt'}:3)" in str(exc.value)


# --------------------------------------------------------------------------- undecodable images
def _break_images(root: Path, info: dict) -> list[str]:
    """Corrupt, truncate and empty three images; return their manifest paths."""
    rels = [f"images/{info['ids'][i][0]}" for i in ("2", "5", "8")]
    (root / rels[0]).write_bytes(b"this is not a jpeg" * 4)
    big = root / rels[1]
    write_image(big, size=(64, 48), seed=7)
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])
    (root / rels[2]).write_bytes(b"")
    return rels


def test_bad_images_listed(tmp_path: Path, make_settings) -> None:
    root, info, settings = _cub(tmp_path, make_settings)
    rels = _break_images(root, info)
    with pytest.raises(BadImagesError) as exc:
        prepare.run(settings, "cub")
    assert sorted(p for p, _ in exc.value.bad) == sorted(rels)
    msg = str(exc.value)
    assert "3 image(s)" in msg and all(r in msg for r in rels) and "skip_bad: true" in msg
    assert "truncated" in msg


def test_bad_images_skipped_and_counted(tmp_path: Path, make_settings) -> None:
    root, info, settings = _cub(tmp_path, make_settings, skip_bad=True)
    rels = _break_images(root, info)
    metrics = prepare.run(settings, "cub").metrics
    assert metrics["skipped"] == 3 and metrics["images"]["total"] == 15
    assert not {r.path for r in _rows(settings)} & set(rels)


def test_unverified_sizes_do_not_decode(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "CUB_200_2011"
    info = write_fake_cub(root)
    settings = make_settings("cub", "cub", root, {"prepare.cache_side": 0}, verify_images=False)  # a cache decodes
    big = root / "images" / info["ids"]["5"][0]
    write_image(big, size=(64, 48), seed=7)
    data = big.read_bytes()
    big.write_bytes(data[: len(data) // 2])  # header intact: the size is still readable
    prepare.run(settings, "cub")
    assert {r.image_id: (r.width, r.height) for r in _rows(settings)}["5"] == (64, 48)


# --------------------------------------------------------------------------- image modes
def test_image_modes_accepted(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "folder"
    write_fake_imagefolder(root, {"train": {"a": 2}, "test": {"a": 1, "b": 1}})  # two classes: prepare refuses one
    modes = {"gray.jpg": "L", "cmyk.jpg": "CMYK", "rgba.png": "RGBA", "pal.png": "P", "la.png": "LA"}
    for name, mode in modes.items():
        write_image(root / "train/a" / name, size=(5, 7), mode=mode)
    Image.fromarray(np.full((7, 5), 40000, dtype=np.uint16)).save(root / "train/a/deep.png")
    assert Image.open(root / "train/a/deep.png").mode == "I;16"
    metrics = prepare.run(make_settings("f", "imagefolder", root), "f").metrics
    assert metrics["skipped"] == 0 and metrics["images"]["total"] == 10
    sizes = {r.path.split("/")[-1]: (r.width, r.height) for r in _rows(make_settings("f", "imagefolder", root), "f")}
    assert all(sizes[n] == (5, 7) for n in [*modes, "deep.png"])


def test_open_rgb_values(tmp_path: Path) -> None:
    deep = tmp_path / "deep.png"
    Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.uint16)).save(deep)
    assert Image.open(deep).mode == "I;16"
    img = open_rgb(deep)
    arr = np.asarray(img)
    assert img.mode == "RGB" and arr.dtype == np.uint8 and arr.shape == (1, 4, 3)
    assert arr[0, :, 0].tolist() == [0, 1, 128, 255] and (arr == arr[..., :1]).all()  # v / 65535 * 255, grey

    Image.fromarray(np.array([[0, 90, 255]], dtype=np.uint8), mode="L").save(tmp_path / "g.png")
    assert np.asarray(open_rgb(tmp_path / "g.png"))[0].tolist() == [[0, 0, 0], [90, 90, 90], [255, 255, 255]]

    rgba = np.array([[[10, 20, 30, 255], [10, 20, 30, 0]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    assert np.asarray(open_rgb(tmp_path / "a.png"))[0].tolist() == [[10, 20, 30], [255, 255, 255]]  # over white

    pal = Image.new("P", (2, 1))
    pal.putpalette([200, 10, 20, 5, 6, 7] + [0] * 762)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png")
    assert np.asarray(open_rgb(tmp_path / "p.png"))[0].tolist() == [[200, 10, 20], [5, 6, 7]]

    Image.new("CMYK", (3, 2), (0, 0, 0, 0)).save(tmp_path / "c.jpg", quality=100)
    white = np.asarray(open_rgb(tmp_path / "c.jpg")).astype(int)
    assert np.abs(white - 255).max() <= 2  # no ink is white
    Image.new("CMYK", (3, 2), (0, 255, 255, 0)).save(tmp_path / "r.jpg", quality=100)
    red = np.asarray(open_rgb(tmp_path / "r.jpg")).astype(int)
    assert (red[..., 0] >= 250).all() and (red[..., 1:] <= 5).all()  # magenta + yellow ink is red


# --------------------------------------------------------------------------- boxes
def test_box_outside_image_clipped_or_dropped(tmp_path: Path, make_settings) -> None:
    root, _, settings = _cub(tmp_path, make_settings)
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    lines[0] = "1 -2 1 100 3"  # x y w h: sticks out left and right of the 8x6 image
    lines[1] = "2 50 50 5 5"  # entirely outside
    (root / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")
    metrics = prepare.run(settings, "cub").metrics
    boxes = {r.image_id: r.box for r in _rows(settings)}
    assert boxes["1"] == (0.0, 1.0, 8.0, 4.0)
    assert boxes["2"] is None and boxes["3"] == (1.0, 0.5, 6.0, 4.5)
    assert (metrics["boxes_clipped"], metrics["boxes_dropped"], metrics["with_box"]) == (2, 1, 17)


# --------------------------------------------------------------------------- path safety and ids
def test_annotation_path_escaping_root_refused(tmp_path: Path, make_settings) -> None:
    root, _, settings = _cub(tmp_path, make_settings)
    write_image(tmp_path / "x.jpg")  # exists, so only the path check can refuse it
    lines = (root / "images.txt").read_text().splitlines()
    lines[3] = "4 ../../x.jpg"
    (root / "images.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"images\.txt:4: path 'images/\.\./\.\./x\.jpg' escapes the dataset root"):
        prepare.run(settings, "cub")


def test_cars_fname_escaping_root_refused(tmp_path: Path, make_settings) -> None:
    base = tmp_path / "stanford_cars"
    write_fake_cars(base)
    write_image(tmp_path / "x.jpg")
    write_cars_annotations(base / "devkit/cars_train_annos.mat", [(1, 1, 5, 5, 1, "00001.jpg"), (1, 1, 5, 5, 1, "../../x.jpg")])
    with pytest.raises(DatasetError, match=r"annotations\[1\]: path 'cars_train/\.\./\.\./x\.jpg' escapes"):
        prepare.run(make_settings("cars", "cars", base), "cars")


@pytest.mark.parametrize("bad", ["../x.jpg", "sub/../../x.jpg", "/abs/x.jpg"])
def test_build_rows_refuses_escaping_paths(tmp_path: Path, make_settings, bad: str) -> None:
    root = tmp_path / "root"
    write_image(root / "ok.jpg")
    write_image(tmp_path / "x.jpg")
    listing = SourceListing(
        records=[SourceRecord("a", "ok.jpg", "c", "train", origin="list.txt:1"), SourceRecord("b", bad, "c", "test", origin="list.txt:2")],
        classes=["c"],
    )
    cfg = make_settings("cub", "cub", root).dataset("cub")
    with pytest.raises(DatasetError, match=r"list\.txt:2: path .*(escapes the dataset root|is absolute)"):
        prepare.build_rows(root, cfg, listing)


def test_symlink_escaping_root_refused(tmp_path: Path, make_settings) -> None:
    root, info, settings = _cub(tmp_path, make_settings)
    outside = write_image(tmp_path / "outside.jpg")
    target = root / "images" / info["ids"]["1"][0]
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(DatasetError, match=r"images\.txt:1: path .* resolves outside the dataset root"):
        prepare.run(settings, "cub")


def test_duplicated_id_refused(tmp_path: Path, make_settings) -> None:
    root, _, settings = _cub(tmp_path, make_settings)
    with open(root / "images.txt", "a") as fh:
        fh.write("3 001.Black_footed_Albatross/again.jpg\n")
    with pytest.raises(DatasetError, match=r"images\.txt:19: image id 3 is listed twice \(first at .*images\.txt:3\)"):
        prepare.run(settings, "cub")


def test_duplicated_id_across_split_files_refused(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "fgvc-aircraft-2013b"
    info = write_fake_aircraft(root)
    train_id = next(i for i, s in info["split"].items() if s == "train")
    with open(root / "data/images_variant_test.txt", "a") as fh:
        fh.write(f"{train_id} {info['variant'][train_id]}\n")
    pattern = rf"images_variant_test\.txt:9: image id '{train_id}' is listed twice \(first at .*_trainval\.txt:1\)"
    with pytest.raises(DatasetError, match=pattern):
        prepare.run(make_settings("air", "aircraft", root), "air")


# --------------------------------------------------------------------------- val carving
def _carve(tmp_path: Path, make_settings, seed: int) -> tuple[set[str], list, dict]:
    """Prepare a fake CUB (3 classes x 7 train + 2 test) with val_fraction 0.3; return (val ids, rows, info)."""
    root = tmp_path / "CUB_200_2011"
    info = write_fake_cub(root, train_per_class=7, test_per_class=2)
    settings = make_settings("cub", "cub", root, val_fraction=0.3, split_seed=seed)
    prepare.run(settings, "cub")
    rows = _rows(settings)
    return {r.image_id for r in rows if r.split == "val"}, rows, info


def test_val_carving_stratified_and_deterministic(tmp_path: Path, make_settings) -> None:
    val, rows, info = _carve(tmp_path, make_settings, seed=0)
    train = {i for i, (_, _, is_train) in info["ids"].items() if is_train}
    assert val <= train  # val only ever comes from train; test is untouched
    assert {r.image_id for r in rows if r.split == "test"} == set(info["ids"]) - train
    classes = {r.class_name for r in rows}
    assert Counter(r.class_name for r in rows if r.split == "val") == Counter({c: 2 for c in classes})  # round(0.3 * 7)
    assert _carve(tmp_path, make_settings, seed=0)[0] == val  # same seed, same split
    others = [_carve(tmp_path, make_settings, seed=s)[0] for s in (1, 2, 3)]
    assert all(len(o) == 6 for o in others)
    assert any(o != val for o in others)  # the seed matters


def test_val_carving_keeps_one_train_image(tmp_path: Path, make_settings) -> None:
    root = tmp_path / "folder"
    write_fake_imagefolder(root, {"train": {"one": 1, "two": 2, "many": 10}, "test": {"one": 1}})
    settings = make_settings("f", "imagefolder", root, val_fraction=0.9)
    prepare.run(settings, "f")
    per = Counter((r.class_name, r.split) for r in _rows(settings, "f"))
    assert per[("one", "train")] == 1 and per[("one", "val")] == 0  # a single image stays in train
    assert per[("two", "train")] == 1 and per[("two", "val")] == 1
    assert per[("many", "train")] == 1 and per[("many", "val")] == 9
