"""Fault and bad-input suite, part 2 (issue 14): bad annotations, bad images and edited artefacts.

The same three assertions as tests/test_faults.py, whose helpers and chain fixture this file reuses: (a) the
outcome: refused (``error: ...``, exit code 1, no traceback), reported and counted, skipped and counted, or
accepted; (b) the culprit named: the file and line, the image id and file, the params key, the artefact and
the command that rebuilds it; (c) nothing already written lost: data/ and metrics/ byte-identical after a
refused run. Every case is a row of docs/FAULTS.md.

1. annotation files and images that ``fgpipe prepare`` must refuse (two class ids with one name, class
   folders differing in case, boxes that are not four finite numbers with a positive size, bytes that are
   not UTF-8, a decompression bomb) or report with the image ids (one file under two ids, byte-identical
   images in two splits or classes, images without a box, annotation lines without an image);
2. ``prepare.max_pixels``: where PIL's limits stop and fgpipe's begins, in prepare and in predict;
3. a later stage after data/NAME/dataset.json or manifest.csv was edited by hand, or an image file deleted,
   replaced or swapped for a bomb after prepare: refused before any output is written.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import threading
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import write_fake_aircraft, write_fake_cub, write_fake_imagefolder, write_image
from PIL import Image
from test_faults import D, NAME, assert_refused, chain, edit_params, flat, invoke, project, snapshot  # noqa: F401 (fixtures)

from fgpipe import images, loader
from fgpipe.config import PrepareConfig, load_params
from fgpipe.datasets.base import SourceListing, SourceRecord
from fgpipe.errors import ConfigError, DatasetError
from fgpipe.imagecache import open_image_cache
from fgpipe.images import DEFAULT_MAX_PIXELS, PIXEL_CEILING, ImageTooLargeError, image_size, open_image
from fgpipe.loader import LoadRequest, check_image_files, load_regions
from fgpipe.manifest import read_dataset_json, read_manifest
from fgpipe.preview import preview_indices
from fgpipe.stages import prepare
from fgpipe.store import file_sha256, read_json

REPO = Path(__file__).resolve().parents[1]


def write_bomb(path: Path, width: int = 20_000, height: int = 10_000) -> Path:
    """A PNG of a few dozen bytes whose header declares ``width`` x ``height`` RGB pixels (no pixel data)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))
    return path


def write_broken_png(path: Path) -> Path:
    """A PNG whose header is fine and whose second IDAT chunk has a garbage type: PIL opens it, and its decoding
    raises SyntaxError (``broken PNG file``), as Pillow's PngImagePlugin does for a damaged chunk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 8, 6, 8, 2, 0, 0, 0)  # 8 x 6, 8-bit RGB, as the fake datasets' images
    data = zlib.compress(b"".join(b"\0" + bytes(range(24)) for _ in range(6)))
    half = len(data) // 2
    broken = struct.pack(">I", len(data) - half) + b"\x00\x01\x02\x03" + data[half:] + b"\0\0\0\0"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data[:half]) + broken + chunk(b"IEND", b""))
    return path


# =========================================================================== 1. prepare
@dataclass(frozen=True)
class PrepareCase:
    """A dataset in its real layout, damaged after a good ``prepare``: ``damage(root, info)`` returns what the
    message (refused) or the console (reported, skipped) must name."""

    id: str
    layout: str  # cub | aircraft | folder
    damage: Callable[[Path, dict[str, Any]], list[str]]
    outcome: str  # refused | reported | skipped | accepted
    options: dict[str, Any] = field(default_factory=dict)  # datasets.ds options for both runs
    prepare: dict[str, Any] = field(default_factory=dict)  # the prepare section, for both runs
    metrics: dict[str, Any] = field(default_factory=dict)  # expected prepare.json figures (accepted outcomes)


def make_dataset(tmp_path: Path, case: PrepareCase) -> tuple[Path, dict[str, Any], Path]:
    """(dataset root, writer info, params file) of a fake dataset ``ds`` in ``case.layout``, outputs under tmp_path."""
    if case.layout == "cub":
        root, kind = tmp_path / "CUB_200_2011", "cub"
        info = write_fake_cub(root)
    elif case.layout == "aircraft":
        root, kind = tmp_path / "fgvc-aircraft-2013b", "aircraft"
        info = write_fake_aircraft(root)
    else:
        root, kind = tmp_path / "folder", "imagefolder"
        info = write_fake_imagefolder(root)  # train: sparrow 4, finch 4; test: sparrow 2, finch 1; distinct images
    params = {
        "run": {},
        "datasets": {"ds": {"kind": kind, "root": str(root), **case.options}},
        "prepare": {"data_dir": str(tmp_path / "data"), "metrics_dir": str(tmp_path / "metrics"), **case.prepare},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return root, info, tmp_path / "params.yaml"


def cub_file(root: Path, info: dict[str, Any], image_id: str) -> tuple[Path, str]:
    """(file, path as the manifest writes it) of a fake CUB image."""
    rel = "images/" + info["ids"][image_id][0]
    return root / rel, rel


def edit_line(path: Path, lineno: int, text: str) -> None:
    """Replace line ``lineno`` (1-based; one past the end appends) of a text file."""
    lines = path.read_text().splitlines()
    lines[lineno - 1 : lineno] = [text]
    path.write_text("\n".join(lines) + "\n")


def latin1_in(path: Path, lineno: int) -> None:
    """End line ``lineno`` of a UTF-8 file with a Latin-1 byte (0xe9, é), as an editor saving in Latin-1 would."""
    lines = path.read_bytes().split(b"\n")
    lines[lineno - 1] += b"\xe9"
    path.write_bytes(b"\n".join(lines))


# --- 1a. two classes that would become one
def two_class_ids_one_name(root: Path, info: dict[str, Any]) -> list[str]:
    with open(root / "classes.txt", "a") as fh:
        fh.write("5 002.Laysan_Albatross\n")  # a second id with class 2's name
    edit_line(root / "image_class_labels.txt", 7, "7 5")  # and an image of it
    classes = root / "classes.txt"
    return [f"{classes}:5", "class id 5 has the name '002.Laysan_Albatross' of class id 2", f"{classes}:2", "would become one class"]


def class_folders_differ_in_case(root: Path, info: dict[str, Any]) -> list[str]:
    (root / "test/finch").rename(root / "test/Finch")
    return [str(root / "test/Finch"), str(root / "train/finch"), "differ only in case"]


# --- 1b. boxes
def cub_box(line: str, *culprits: str) -> Callable[[Path, dict[str, Any]], list[str]]:
    """bounding_boxes.txt's line for the image id ``line`` starts with replaced by ``line``."""

    def damage(root: Path, info: dict[str, Any]) -> list[str]:
        lineno = int(line.split()[0])
        edit_line(root / "bounding_boxes.txt", lineno, line)
        return [f"{root / 'bounding_boxes.txt'}:{lineno}", *culprits]

    return damage


def aircraft_box_corners_swapped(root: Path, info: dict[str, Any]) -> list[str]:
    first = next(iter(info["split"]))
    path = root / "data/images_box.txt"
    edit_line(path, 1, f"{first} 6 3 2 9")  # xmax left of xmin
    return [f"{path}:1", "the second corner is left of or above the first", "'6 3 2 9'"]


# --- 1c. reported: leaks and biases
def same_file_under_two_ids(root: Path, info: dict[str, Any]) -> list[str]:
    rel = info["ids"]["3"][0]  # a train image of class 1
    for name, line in (("images.txt", f"19 {rel}"), ("image_class_labels.txt", "19 1"), ("train_test_split.txt", "19 0"),
                       ("bounding_boxes.txt", "19 1 1 2 2")):
        with open(root / name, "a") as fh:
            fh.write(line + "\n")
    return ["image id(s) list one file", "3 = 19", "byte-identical to one in another split"]


def copy_image(src: str, dst: str) -> Callable[[Path, dict[str, Any]], list[str]]:
    """The file of CUB image ``dst`` becomes a byte copy of image ``src``'s (both ids keep their own labels)."""

    def damage(root: Path, info: dict[str, Any]) -> list[str]:
        cub_file(root, info, dst)[0].write_bytes(cub_file(root, info, src)[0].read_bytes())
        return [f"{src} = {dst}"]

    return damage


def image_without_box(root: Path, info: dict[str, Any]) -> list[str]:
    lines = (root / "bounding_boxes.txt").read_text().splitlines()
    (root / "bounding_boxes.txt").write_text("".join(f"{line}\n" for line in lines if line.split()[0] != "4"))
    return ["1 image(s) have no box while others have one", "4"]


def annotation_lines_without_image(root: Path, info: dict[str, Any]) -> list[str]:
    for name, line in (("image_class_labels.txt", "99 1"), ("train_test_split.txt", "99 0")):
        with open(root / name, "a") as fh:
            fh.write(line + "\n")
    return ["1 id(s) have annotation lines but are in no image list", "99"]


def folder_train_image_in_test(root: Path, info: dict[str, Any]) -> list[str]:
    (root / "test/sparrow/img_01.png").write_bytes((root / "train/sparrow/img_01.png").read_bytes())
    return ["byte-identical to one in another split", "train/sparrow/img_01 = test/sparrow/img_01"]


# --- 1d. images over the pixel limit
def bomb(root: Path, info: dict[str, Any]) -> list[str]:
    path, rel = cub_file(root, info, "2")
    write_bomb(path)  # a PNG in a .jpg: PIL goes by the content
    return [rel, "cannot be read", "image declares 200000000 pixels, over the limit of 89478485 pixels", "prepare.max_pixels"]


def broken_chunk(root: Path, info: dict[str, Any]) -> list[str]:
    path, rel = cub_file(root, info, "3")
    write_broken_png(path)
    return [rel, "cannot be read", "SyntaxError: broken PNG file"]


def bomb_skipped(root: Path, info: dict[str, Any]) -> list[str]:
    return [bomb(root, info)[0], "skipping 1 unreadable image(s) (skip_bad: true)"]


def over_max_pixels(root: Path, info: dict[str, Any]) -> list[str]:
    path, rel = cub_file(root, info, "6")
    write_image(path, size=(40, 30))  # 1,200 pixels; prepare.max_pixels is 1,000, the others have 48
    return [rel, "image declares 40 x 30 = 1200 pixels, over the limit of 1000 pixels"]


# --- 1e. text that is not UTF-8
def not_utf8(name: str, lineno: int) -> Callable[[Path, dict[str, Any]], list[str]]:
    def damage(root: Path, info: dict[str, Any]) -> list[str]:
        latin1_in(root / name, lineno)
        return [f"{root / name}:{lineno}", "not valid UTF-8", "b'\\xe9'"]

    return damage


def bom_at_start(root: Path, info: dict[str, Any]) -> list[str]:
    (root / "images.txt").write_bytes(b"\xef\xbb\xbf" + (root / "images.txt").read_bytes())  # Windows Notepad's UTF-8
    return []


def file_name_not_utf8(root: Path, info: dict[str, Any]) -> list[str]:
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes on disk, kept by Python as a lone surrogate
    write_image(root / "train/sparrow" / name)
    return ["train/sparrow/caf\\xe9.jpg", "the file name is not valid UTF-8", "rename it"]


PREPARE_CASES = [
    # 1a: two classes would become one label
    PrepareCase("cub:two-class-ids-one-name", "cub", two_class_ids_one_name, "refused"),
    PrepareCase("folder:class-folders-differ-in-case", "folder", class_folders_differ_in_case, "refused"),
    # 1b: boxes
    PrepareCase("cub:box-nan", "cub", cub_box("1 nan 1 2 3", "box values must be finite numbers", "'nan 1 2 3'"), "refused"),
    PrepareCase("cub:box-inf", "cub", cub_box("2 1 1 inf 3", "finite", "'1 1 inf 3'"), "refused"),
    PrepareCase("cub:box-not-a-number", "cub", cub_box("3 1 one 2 3", "box values must be numbers", "'1 one 2 3'"), "refused"),
    PrepareCase("cub:box-4-fields", "cub", cub_box("4 1 1 2", "expected 5 fields, got 4", "'4 1 1 2'"), "refused"),
    PrepareCase("cub:box-6-fields", "cub", cub_box("4 1 1 2 3 9", "expected 5 fields, got 6"), "refused"),
    PrepareCase("cub:box-negative-width", "cub", cub_box("5 1 1 -2 3", "width and height must be positive", "'1 1 -2 3'"), "refused"),
    PrepareCase("cub:box-zero-height", "cub", cub_box("5 1 1 2 0", "width and height must be positive"), "refused"),
    PrepareCase("aircraft:box-corners-swapped", "aircraft", aircraft_box_corners_swapped, "refused"),
    # 1c: reported and counted, with the ids
    PrepareCase("cub:same-file-under-two-ids", "cub", same_file_under_two_ids, "reported",
                metrics={"same_file_under_several_ids": {"count": 2, "ids": ["3", "19"]},
                         "identical_images_across_splits": {"count": 2, "ids": ["3", "19"]}}),
    PrepareCase("cub:train-image-copied-into-test", "cub", copy_image("1", "5"), "reported",
                metrics={"identical_images_across_splits": {"count": 2, "ids": ["1", "5"]},
                         "same_file_under_several_ids": {"count": 0, "ids": []}}),
    PrepareCase("cub:one-image-under-two-classes", "cub", copy_image("2", "8"), "reported",
                metrics={"identical_images_with_different_classes": {"count": 2, "ids": ["2", "8"]}}),
    PrepareCase("cub:image-without-box", "cub", image_without_box, "reported",
                metrics={"images_without_box": {"count": 1, "ids": ["4"]}}),
    PrepareCase("cub:annotation-lines-without-image", "cub", annotation_lines_without_image, "reported",
                metrics={"annotation_lines_without_image": {"count": 1, "ids": ["99"]}}),
    PrepareCase("folder:train-image-copied-into-test", "folder", folder_train_image_in_test, "reported",
                metrics={"identical_images_across_splits": {"count": 2, "ids": ["train/sparrow/img_01", "test/sparrow/img_01"]}}),
    # 1d: pixel limit
    PrepareCase("cub:decompression-bomb", "cub", bomb, "refused"),
    PrepareCase("cub:decompression-bomb-skipped", "cub", bomb_skipped, "skipped", {"skip_bad": True}),
    PrepareCase("cub:over-prepare.max_pixels", "cub", over_max_pixels, "refused", prepare={"max_pixels": 1000}),
    # a file PIL opens but cannot decode: its SyntaxError is one of PIL's errors, listed like the others
    PrepareCase("cub:png-chunk-broken", "cub", broken_chunk, "refused"),
    # 1e: encodings
    PrepareCase("cub:images.txt-not-utf8", "cub", not_utf8("images.txt", 7), "refused"),
    PrepareCase("cub:classes.txt-not-utf8", "cub", not_utf8("classes.txt", 2), "refused"),
    PrepareCase("cub:images.txt-utf8-bom", "cub", bom_at_start, "accepted"),
    PrepareCase("aircraft:variants.txt-not-utf8", "aircraft", not_utf8("data/variants.txt", 3), "refused"),
    PrepareCase("aircraft:split-file-not-utf8", "aircraft", not_utf8("data/images_variant_test.txt", 1), "refused"),
    PrepareCase("folder:file-name-not-utf8", "folder", file_name_not_utf8, "refused"),
]


@pytest.mark.parametrize("case", PREPARE_CASES, ids=lambda c: c.id)
def test_bad_annotations_and_images_in_prepare(tmp_path: Path, case: PrepareCase) -> None:
    root, info, params = make_dataset(tmp_path, case)
    first = invoke("prepare", "-d", "ds", "-p", params)
    assert first.exit_code == 0, first.output  # an earlier good run
    before = snapshot(tmp_path)
    culprits = case.damage(root, info)
    result = invoke("prepare", "-d", "ds", "-p", params)

    if case.outcome == "refused":
        assert_refused(result, *culprits)
        assert snapshot(tmp_path) == before  # manifest.csv, dataset.json, images.h5, prepare.json: as they were
        return
    out = flat(result.output)
    assert result.exit_code == 0 and "Traceback" not in out, result.output
    assert all(flat(c) in out for c in culprits), out
    metrics = read_json(tmp_path / "metrics/ds/prepare.json")
    issues, ids = metrics["annotation_issues"], read_json(tmp_path / "metrics/ds/prepare.provenance.json")["annotation_issues"]
    for kind, want in case.metrics.items():  # the count among the figures, the ids in the provenance record
        assert {"count": issues[kind], "ids": ids[kind]} == want, kind
    if case.outcome == "skipped":
        assert metrics["skipped"] == 1 and culprits[0] not in {r.path for r in read_manifest(tmp_path / "data/ds/manifest.csv")}
    if case.outcome == "accepted":
        assert metrics["images"]["total"] == len(info["ids"]) and not any(issues.values()) and not any(ids.values())


def test_a_class_list_repeating_a_name_is_refused_whatever_the_reader(tmp_path: Path, make_settings) -> None:
    """Most readers refuse a repeated class name themselves; prepare refuses any reader's, naming both places where
    the reader says where each class is listed (the synthetic reader: classes.csv), and the fix."""
    root = tmp_path / "root"
    write_image(root / "a.jpg", seed=1)
    write_image(root / "b.jpg", seed=2)
    records = [SourceRecord("a", "a.jpg", "wren", "train"), SourceRecord("b", "b.jpg", "wren", "test")]
    cfg = make_settings("ds", "cub", root).dataset("ds")
    origins = [f"{root}/classes.csv:{n}" for n in (2, 3, 4)]
    listing = SourceListing(records=records, classes=["wren", "finch", "wren"], class_origins=origins)
    with pytest.raises(DatasetError) as err:
        prepare.build_rows(root, cfg, listing)
    said = flat(str(err.value))
    assert f"{root}/classes.csv:4: class 'wren' is listed again (first at {root}/classes.csv:2)" in said
    assert "two classes would become one label" in said and "Give each class its own name, or list it once" in said
    with pytest.raises(DatasetError, match=rf"the class list read from {root} holds 'wren' twice \(entries 1 and 3\)"):
        prepare.build_rows(root, cfg, SourceListing(records=records, classes=["wren", "finch", "wren"]))  # places unknown


def test_prepare_hashes_only_files_whose_byte_size_another_file_shares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Byte-identical files have equal sizes, so only files sharing a size are read whole (SHA-256): BMPs of one
    size (equal byte sizes, other bytes), a byte copy among them, and a PNG of its own size."""
    root = tmp_path / "root"
    for name, seed in (("a.bmp", 1), ("b.bmp", 2)):
        write_image(root / name, seed=seed)
    (root / "c.bmp").write_bytes((root / "a.bmp").read_bytes())
    write_image(root / "d.png", size=(9, 7), seed=3)
    records = [SourceRecord(n[0], n, "wren", "train") for n in ("a.bmp", "b.bmp", "c.bmp", "d.png")]
    hashed: list[str] = []
    monkeypatch.setattr(prepare, "file_sha256", lambda path: hashed.append(Path(path).name) or file_sha256(path))
    checked, files = prepare._checked_records(root, records)
    sizes, digests, bad = prepare._decode_all(root, checked, files, verify=False)
    assert sorted(hashed) == ["a.bmp", "b.bmp", "c.bmp"] and not bad and sizes["d.png"] == (9, 7)
    assert digests["a.bmp"] == digests["c.bmp"] != digests["b.bmp"]
    assert digests["d.png"] == f"{(root / 'd.png').stat().st_size} bytes"
    issues = prepare.annotation_issues(checked, files, {r.image_id: "train" for r in checked}, digests, {})
    assert issues["identical_images_with_different_classes"] == [] and issues["same_file_under_several_ids"] == []


def test_a_bug_while_decoding_is_not_reported_as_a_bad_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only PIL's errors mean an unreadable image (images.DECODE_ERRORS); any other exception is a bug and stops
    the run as one, in prepare and in the loaders' threads."""
    root = tmp_path / "root"
    write_image(root / "a.jpg")
    records, files = prepare._checked_records(root, [SourceRecord("a", "a.jpg", "wren", "train")])

    def bug(*args: Any, **kwargs: Any) -> Any:
        raise ValueError("a bug")

    monkeypatch.setattr(prepare, "image_size", bug)
    with pytest.raises(ValueError, match="a bug"):
        prepare._decode_all(root, records, files, verify=True)
    monkeypatch.setattr(loader, "decode_region", bug)
    with pytest.raises(ValueError, match="a bug"):
        load_regions([LoadRequest(root / "a.jpg", (0.0, 0.0, 8.0, 6.0))], (4, 4))
    monkeypatch.undo()
    with pytest.raises(DatasetError, match="cannot read image .*broken PNG file"):  # PIL's SyntaxError is one of them
        load_regions([LoadRequest(write_broken_png(root / "b.png"), (0.0, 0.0, 8.0, 6.0))], (4, 4))


# =========================================================================== 2. the pixel limit itself
def test_pixel_limit_defaults_and_bounds_agree_with_pil(tmp_path: Path) -> None:
    pil_default = 1024 * 1024 * 1024 // 4 // 3  # PIL's MAX_IMAGE_PIXELS as PIL defines it
    assert DEFAULT_MAX_PIXELS == pil_default == PrepareConfig().max_pixels and PIXEL_CEILING == 2 * pil_default
    assert yaml.safe_load((REPO / "params.yaml").read_text())["prepare"]["max_pixels"] == DEFAULT_MAX_PIXELS
    assert any("prepare.max_pixels" in str(p) for p in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["prepare"]["do"]["params"])
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"run": {}, "datasets": {}, "prepare": {"max_pixels": PIXEL_CEILING}}))
    assert load_params(params).params.prepare.max_pixels == PIXEL_CEILING
    for bad in (0, PIXEL_CEILING + 1):
        params.write_text(yaml.safe_dump({"run": {}, "datasets": {}, "prepare": {"max_pixels": bad}}))
        with pytest.raises(ConfigError, match=r"prepare\.max_pixels"):
            load_params(params)


def test_open_image_applies_its_limit_before_decoding_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header between PIL's warning and error thresholds: fgpipe's limit decides from the header alone (no pixel
    is decoded), PIL's global limit is left as it was, and the message says what to do where the caller is."""
    monkeypatch.setattr(images.ImageFile.ImageFile, "load", lambda self: pytest.fail("a pixel was decoded"))
    path = write_bomb(tmp_path / "big.png", 10_000, 10_000)  # 1e8 pixels: over PIL's 89,478,485, under twice it
    pil_limit = Image.MAX_IMAGE_PIXELS
    with open_image(path) as img:  # a file prepare accepted: the ceiling applies, and the header opens
        assert img.size == (10_000, 10_000)
    for check in (lambda: open_image(path, DEFAULT_MAX_PIXELS), lambda: image_size(path, True, DEFAULT_MAX_PIXELS)):
        with pytest.raises(ImageTooLargeError, match=r"10000 x 10000 = 100000000 pixels, over the limit of 89478485 "
                           r"pixels \(a decompression bomb; if the image is genuine, raise prepare\.max_pixels, at most 178956970\)"):
            check()
    bomb_file = write_bomb(tmp_path / "bomb.png")  # over PIL's own error threshold
    with pytest.raises(ImageTooLargeError, match=r"200000000 pixels, over the limit of 178956970 pixels .*`fgpipe prepare` "
                       r"accepted no such file, so it was replaced since: restore it, or rerun `fgpipe prepare`"):
        open_image(bomb_file)  # a later stage: raising prepare.max_pixels is no fix there
    with pytest.raises(ImageTooLargeError, match=r"178956970, twice PIL's own limit, is the most fgpipe reads") as err:
        open_image(bomb_file, PIXEL_CEILING)  # prepare or predict with prepare.max_pixels at its ceiling
    assert "raise prepare.max_pixels" not in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == pil_limit
    assert isinstance(ImageTooLargeError("x"), OSError)  # every caller's handling of unreadable images covers it


def test_images_open_in_parallel_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loaders open images from several threads at once: no lock serialises Image.open (each of 4 opens waits
    here until all 4 are inside it, which a lock around the open would never allow)."""
    paths = [write_image(tmp_path / f"{i}.png", size=(8 + i, 6), seed=i) for i in range(4)]
    inside = threading.Barrier(4, timeout=20)
    real_open = Image.open

    def open_together(fp: Any, *args: Any, **kwargs: Any) -> Any:
        inside.wait()  # BrokenBarrierError if the opens were serialised
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(images.Image, "open", open_together)

    def size(path: Path) -> tuple[int, int]:
        with open_image(path) as img:
            return img.size

    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(size, paths)) == [(8 + i, 6) for i in range(4)]


PIL_WARNING_SCRIPT = """
import sys, warnings
from concurrent.futures import ThreadPoolExecutor
from fgpipe.images import open_image
def size(path):
    with open_image(path) as img:
        return img.size
for _ in range(3):
    warnings.warn("said once", UserWarning)  # the default action: printed once for this line
    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(size, [sys.argv[1]] * 4)) == [(10000, 10000)] * 4
"""


def test_pils_bomb_warning_is_filtered_once_and_other_warnings_still_print_once(tmp_path: Path) -> None:
    """In a fresh interpreter with Python's default warning display: 12 opens of a header over PIL's warning threshold,
    from 4 threads, print no DecompressionBombWarning, and a warn-once warning between them prints once (a
    ``warnings.catch_warnings`` around each open reset Python's warning registry, and it printed 3 times)."""
    path = write_bomb(tmp_path / "big.png", 10_000, 10_000)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-W", "default", "-c", PIL_WARNING_SCRIPT, str(path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "DecompressionBombWarning" not in done.stderr and done.stderr.count("UserWarning: said once") == 1, done.stderr


def test_predict_reports_and_skips_a_decompression_bomb(project: Path) -> None:
    good = project / "raw/test/class1/000.png"
    bomb_file = write_bomb(project.parent / "bomb.png")
    result = invoke("predict", good, bomb_file, "-d", NAME, "-p", project / "params.yaml", "--json")
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    doc = json.loads(result.stdout)
    assert [p["image"] for p in doc["predictions"]] == [str(good)]  # the rest of the batch is predicted
    (error,) = doc["errors"]
    assert error["image"] == str(bomb_file) and "200000000 pixels, over the limit of 89478485" in error["error"]
    assert f"{bomb_file}: cannot read image" in flat(result.stderr)


def test_predict_reads_prepare_max_pixels_from_its_params_file(project: Path) -> None:
    params = edit_params(project, prepare__max_pixels=1000)
    big, small = project / "raw/test/class1/000.png", project / "raw/test/class0/one_pixel.png"  # 32 x 32, 1 x 1
    result = invoke("predict", big, small, "-d", NAME, "-p", params, "--json")
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert [p["image"] for p in doc["predictions"]] == [str(small)]
    assert [e["image"] for e in doc["errors"]] == [str(big)] and "32 x 32 = 1024 pixels, over the limit of 1000" in doc["errors"][0]["error"]


# =========================================================================== 3. later stages
def own_raw(project: Path) -> Path:
    """Point the copy's data/NAME/dataset.json at its own raw/ (the chain's is shared): its images can be damaged."""
    path = project / D / "dataset.json"
    doc = json.loads(path.read_text())
    doc["root"] = str(project / "raw")
    path.write_text(json.dumps(doc, indent=2))
    return project / "raw"


def without_cache(project: Path) -> None:
    """No data/NAME/images.h5 (prepare.cache_side 0, or deleted): every stage decodes the image files."""
    (project / D / "images.h5").unlink()


def edit_manifest(edit: Callable[[list[str]], list[str]], line: int = 3) -> Callable[[Path], list[str]]:
    """Rewrite the fields of manifest line ``line`` with ``edit``; the culprits are the file and line."""

    def damage(project: Path) -> list[str]:
        path = project / D / "manifest.csv"
        lines = path.read_text().splitlines()
        lines[line - 1] = ",".join(edit(lines[line - 1].split(",")))
        path.write_text("\n".join(lines) + "\n")
        return [f"{path}:{line}", "fgpipe prepare --dataset toy"]

    return damage


def label(value: str, class_name: str | None = None) -> Callable[[list[str]], list[str]]:
    return lambda f: [f[0], f[1], value, class_name or f[3], *f[4:]]


def manifest_not_utf8(project: Path) -> list[str]:
    path = project / D / "manifest.csv"
    latin1_in(path, 4)
    return [f"{path}:4", "not valid UTF-8", "fgpipe prepare --dataset toy"]


def dataset_json(text: Callable[[dict[str, Any]], str]) -> Callable[[Path], list[str]]:
    def damage(project: Path) -> list[str]:
        path = project / D / "dataset.json"
        path.write_text(text(json.loads(path.read_text())))
        return [str(path), "fgpipe prepare --dataset toy"]

    return damage


def renamed_root(doc: dict[str, Any]) -> str:
    doc["rot"] = doc.pop("root")
    return json.dumps(doc)


def image(rel: str, change: str, cache: bool = True) -> Callable[[Path], list[str]]:
    """Image ``rel`` (under raw/) deleted, replaced by a larger image, or by a bomb, after prepare."""

    def damage(project: Path) -> list[str]:
        path = own_raw(project) / rel
        if not cache:
            without_cache(project)
        if change == "deleted":
            path.unlink()
            why = "is missing"
        elif change == "replaced":
            write_image(path, size=(40, 30))
            why = "is 40 x 30 pixels, not the 32 x 32 prepare read"
        else:
            write_bomb(path)
            why = "cannot be read (ImageTooLargeError: image declares 200000000 pixels"
        image_id = rel.rsplit(".", 1)[0]
        return [f"image id {image_id}: {path} {why}", "missing or changed since `fgpipe prepare --dataset toy`",
                "rerun `fgpipe prepare --dataset toy`"]

    return damage


PREVIEWED = "test/class0/000.png"  # the first image of crops_preview.png (crops.preview_images: 2)
# (id, the damage (returns what the message must name), the command that must refuse it, its extra options)
STAGE_CASES = [
    # dataset.json edited by hand
    ("dataset.json-not-json", dataset_json(lambda doc: "{\n  \"root\": \"raw\",\n  oops\n}\n"), "train-backbone", [],
     [":3: not valid JSON"]),
    ("dataset.json-root-renamed", dataset_json(renamed_root), "extract-attention", [], ["the key `root` is missing", "rot"]),
    ("dataset.json-root-not-a-string", dataset_json(lambda doc: json.dumps({**doc, "root": 5})), "evaluate", [],
     ["`root` must be a non-empty string, got 5"]),
    ("dataset.json-not-an-object", dataset_json(lambda doc: "[]"), "show", ["--image", "test/class0/000"], ["expected a JSON object"]),
    # manifest.csv edited by hand
    ("manifest-label-out-of-range", edit_manifest(label("7", "class9")), "train-backbone", [],
     ["label 7 ('class9') is out of range", "must have the labels 0..2"]),
    ("manifest-label-of-another-class", edit_manifest(lambda f: label(str(1 - int(f[2])))(f)), "train-backbone", [],
     ["here but", "at line 2"]),
    ("manifest-label-not-an-integer", edit_manifest(label("one")), "extract-crops", [], ["label must be an integer, got 'one'"]),
    ("manifest-label-negative", edit_manifest(label("-1")), "extract-attention", [], ["label must be >= 0, got -1"]),
    ("manifest-duplicate-image-id", edit_manifest(lambda f: ["train/class0/000", *f[1:]]), "train-refine", [],  # line 2's id
     ["image id 'train/class0/000' is also at line 2"]),
    ("manifest-box-nan", edit_manifest(lambda f: [*f[:7], "nan", "1", "2", "3"]), "evaluate", [], ["box coordinates must be finite"]),
    ("manifest-not-utf8", manifest_not_utf8, "evaluate", [], []),
    # image files deleted, replaced or swapped for a bomb after prepare
    ("image-deleted:extract-crops-preview", image(PREVIEWED, "deleted"), "extract-crops", [], []),
    ("image-deleted:show", image(PREVIEWED, "deleted"), "show", ["--image", "test/class0/000"], []),
    ("image-deleted-no-cache:train-backbone", image("test/class1/001.png", "deleted", cache=False), "train-backbone", [], []),
    ("image-deleted-no-cache:extract-attention", image("test/class1/001.png", "deleted", cache=False), "extract-attention", [], []),
    ("image-deleted-no-cache:train-refine", image("train/class1/002.png", "deleted", cache=False), "train-refine", [], []),
    ("image-deleted-no-cache:evaluate", image("test/class1/001.png", "deleted", cache=False), "evaluate", [], []),
    ("image-replaced-no-cache:train-backbone", image("train/class0/003.png", "replaced", cache=False), "train-backbone", [], []),
    ("image-replaced:show", image(PREVIEWED, "replaced"), "show", ["--image", "test/class0/000"], []),
    ("image-replaced-by-bomb-no-cache:extract-attention", image("train/class0/003.png", "bomb", cache=False), "extract-attention", [], []),
]


@pytest.mark.parametrize("case_id, damage, command, options, culprits", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_edited_artefact_or_changed_image_is_refused_before_any_output(
    project: Path, case_id: str, damage: Callable[[Path], list[str]], command: str, options: list[str], culprits: list[str]
) -> None:
    named = damage(project)
    before = snapshot(project)
    assert_refused(invoke(command, "-d", NAME, "-p", project / "params.yaml", *options), *named, *culprits)
    assert snapshot(project) == before  # nothing rewritten: no checkpoint, no HDF5 file, no report, no metrics


def test_preview_image_check_leaves_the_stage_working_when_images_are_in_place(project: Path) -> None:
    """The checks read the files a stage decodes and pass when they are as prepare left them: with the cache
    the stage decodes only the preview's images, so the others may be gone."""
    raw = own_raw(project)
    rows = read_manifest(project / D / "manifest.csv")
    shown = {rows[i].path for i in preview_indices(rows, 2)}
    for rel in {r.path for r in rows} - shown:
        (raw / rel).unlink()
    result = invoke("extract-crops", "-d", NAME, "-p", project / "params.yaml", "--threshold", "0.3")
    assert result.exit_code == 0, result.output
    shutil.rmtree(raw)
    assert_refused(invoke("extract-crops", "-d", NAME, "-p", project / "params.yaml"), "is missing")


def test_the_image_check_allows_for_the_banner_prepare_dropped(tmp_path: Path) -> None:
    """FGVC-Aircraft without an image cache (cache_side: 0): every image file is 8 x 30 and the manifest says 8 x 10
    (the 20-pixel banner dropped); the check compares the file with the manifest's height plus dataset.json's
    crop_bottom, so the files as prepare read them pass and a file cut to the manifest's size does not."""
    case = PrepareCase("aircraft", "aircraft", lambda root, info: [], "accepted", prepare={"cache_side": 0})
    root, info, params = make_dataset(tmp_path, case)
    assert invoke("prepare", "-d", "ds", "-p", params).exit_code == 0
    d = tmp_path / "data/ds"
    manifest = d / "manifest.csv"
    rows, dataset = read_manifest(manifest), read_dataset_json(d / "dataset.json", "ds")
    assert dataset.crop_bottom == 20 and {(r.width, r.height) for r in rows} == {(8, 10)}
    cache = open_image_cache(d / "images.h5", dataset.root, file_sha256(manifest), "ds")
    assert cache is None  # caching off: every file is checked
    check_image_files(dataset, rows, cache, "ds", manifest)
    cut, gone = rows[2], rows[5]
    write_image(root / cut.path, size=(8, 10))  # the image without its banner: not what prepare read
    (root / gone.path).unlink()
    with pytest.raises(DatasetError) as err:
        check_image_files(dataset, rows, cache, "ds", manifest)
    said = flat(str(err.value))
    assert f"image id {cut.image_id}: {root / cut.path} is 8 x 10 pixels, not the 8 x 30 prepare read" in said
    assert f"image id {gone.image_id}: {root / gone.path} is missing" in said and f"listed them in {manifest}" in said
    check_image_files(dataset, [r for r in rows if r not in (cut, gone)], cache, "ds", manifest)  # only the rows given


def test_evaluate_checks_only_the_images_it_decodes(project: Path) -> None:
    """evaluate decodes val and test images, never train's: a deleted train image (no cache) does not stop it,
    a deleted test image does (image-deleted-no-cache:evaluate above)."""
    raw = own_raw(project)
    without_cache(project)
    trained = [r for r in read_manifest(project / D / "manifest.csv") if r.split == "train"]
    (raw / trained[0].path).unlink()
    result = invoke("evaluate", "-d", NAME, "-p", project / "params.yaml")
    assert result.exit_code == 0, result.output
    assert_refused(invoke("train-refine", "-d", NAME, "-p", project / "params.yaml"), trained[0].image_id, "is missing")
