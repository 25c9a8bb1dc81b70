"""data/NAME/manifest.csv: one row per image, the contract every later stage reads.

Columns: image_id,path,label,class_name,split,width,height,x0,y0,x1,y1
- path is relative to the dataset root (POSIX separators);
- split is train, val or test (val is carved from train: nothing is ever selected on test);
- the box is the ground-truth object box in pixels, all four empty where the dataset has none.

Beside it, data/NAME/dataset.json records the dataset root those paths are relative to (:func:`read_dataset_json`).
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fgpipe.errors import ArtifactError
from fgpipe.store import read_json_artifact, write_text

COLUMNS = ("image_id", "path", "label", "class_name", "split", "width", "height", "x0", "y0", "x1", "y1")
SPLITS = ("train", "val", "test")
Box = tuple[float, float, float, float]


@dataclass(frozen=True)
class ManifestRow:
    image_id: str
    path: str
    label: int
    class_name: str
    split: str
    width: int
    height: int
    box: Box | None


def _fmt(v: float) -> str:
    return f"{v:.2f}".rstrip("0").rstrip(".")


def write_manifest(path: str | os.PathLike[str], rows: Iterable[ManifestRow]) -> None:
    """Atomically write the manifest."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(COLUMNS)
    for r in rows:
        box = [_fmt(v) for v in r.box] if r.box is not None else ["", "", "", ""]
        w.writerow([r.image_id, r.path, r.label, r.class_name, r.split, r.width, r.height, *box])
    write_text(path, buf.getvalue())


def read_manifest(path: str | os.PathLike[str]) -> list[ManifestRow]:
    """Read and check a manifest; errors name the file, the line and the command that rebuilds it.

    Besides the format of every field, the rows must agree with each other as `fgpipe prepare` writes them:
    unique image ids, one class name per label and one label per class name, labels 0..K-1 for K classes,
    positive sizes and finite box coordinates (a hand-edited label would otherwise train a wrong class or
    fail deep inside a later stage).
    """
    path = Path(path)
    rebuild = f"`fgpipe prepare --dataset {path.parent.name}`"
    if not path.is_file():
        raise ArtifactError(f"manifest not found: {path} (run {rebuild} first)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ArtifactError(f"{path}:{line}: not valid UTF-8 (byte {data[exc.start:exc.start + 1]!r}); rebuild it with {rebuild}") from None
    rows: list[ManifestRow] = []
    first_line: dict[str, int] = {}  # image id -> line
    class_of: dict[int, tuple[str, int]] = {}  # label -> (class name, first line)
    label_of: dict[str, tuple[int, int]] = {}  # class name -> (label, first line)
    reader = csv.reader(io.StringIO(text, newline=""))
    header = next(reader, None)
    if header is None or tuple(header) != COLUMNS:
        raise ArtifactError(f"{path}:1: header must be {','.join(COLUMNS)}, got {','.join(header or [])} (rebuild it with {rebuild})")
    for rec in reader:
        lineno = reader.line_num
        try:
            row = _parse_row(rec)
            if row.image_id in first_line:
                raise ValueError(f"image id {row.image_id!r} is also at line {first_line[row.image_id]}")
            name, line = class_of.setdefault(row.label, (row.class_name, lineno))
            if name != row.class_name:
                raise ValueError(f"label {row.label} is class {row.class_name!r} here but {name!r} at line {line}")
            label, line = label_of.setdefault(row.class_name, (row.label, lineno))
            if label != row.label:
                raise ValueError(f"class {row.class_name!r} has label {row.label} here but {label} at line {line}")
        except ValueError as exc:
            raise ArtifactError(f"{path}:{lineno}: {exc} (rebuild it with {rebuild})") from None
        first_line[row.image_id] = lineno
        rows.append(row)
    for label in sorted(class_of):
        if label >= len(class_of):
            name, line = class_of[label]
            raise ArtifactError(
                f"{path}:{line}: label {label} ({name!r}) is out of range: the {len(class_of)} classes of the manifest "
                f"must have the labels 0..{len(class_of) - 1} (rebuild it with {rebuild})"
            )
    return rows


def _parse_row(rec: list[str]) -> ManifestRow:
    """One manifest record; ValueError saying what is wrong with it."""
    if len(rec) != len(COLUMNS):
        raise ValueError(f"expected {len(COLUMNS)} fields, got {len(rec)}")
    image_id, rel, label, cname, split, w, h, *box = rec
    for name, value in (("image_id", image_id), ("path", rel), ("class_name", cname)):
        if not value:
            raise ValueError(f"{name} is empty")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    numbers = {}
    for name, value in (("label", label), ("width", w), ("height", h)):
        try:
            numbers[name] = int(value)
        except ValueError:
            raise ValueError(f"{name} must be an integer, got {value!r}") from None
    if numbers["label"] < 0:
        raise ValueError(f"label must be >= 0, got {label}")
    if numbers["width"] < 1 or numbers["height"] < 1:
        raise ValueError(f"width and height must be at least 1, got {w} x {h}")
    if any(box) and not all(box):
        raise ValueError("box must have all four coordinates or none")
    coords = None
    if all(box):
        try:
            coords = tuple(float(v) for v in box)
        except ValueError:
            raise ValueError(f"box coordinates must be numbers, got {','.join(box)}") from None
        if not all(math.isfinite(v) for v in coords):
            raise ValueError(f"box coordinates must be finite, got {','.join(box)}")
    return ManifestRow(image_id, rel, numbers["label"], cname, split, numbers["width"], numbers["height"], coords)  # type: ignore[arg-type]


@dataclass(frozen=True)
class DatasetInfo:
    """data/NAME/dataset.json, which `fgpipe prepare` writes beside the manifest: where the images are."""

    root: Path  # the dataset root the manifest's paths are relative to
    classes: list[str]  # class names by label
    crop_bottom: int  # pixels below the manifest's height in every image file (FGVC-Aircraft's banner)
    params: dict[str, Any] | None = None  # the params prepare ran with (fgpipe.lineage.params_record); None: not recorded


def read_dataset_json(path: str | os.PathLike[str], dataset: str) -> DatasetInfo:
    """Read and check data/NAME/dataset.json; errors name the file (and line) and `fgpipe prepare --dataset NAME`.

    The root is ``root_relative`` (relative to dataset.json's folder) where prepare recorded it, so a project moved
    or copied as a whole (params file, data/ and a dataset root given relative to it) finds its images where they
    now are; else ``root`` (absolute: the root was given as an absolute path, or outside the project).
    """
    path = Path(path)
    rebuild = f"`fgpipe prepare --dataset {dataset}`"
    if not os.path.lexists(path):
        raise ArtifactError(f"{path} not found (run {rebuild} first)")
    doc = read_json_artifact(path, f"rebuild it with {rebuild}")
    checks = {
        "root": lambda v: isinstance(v, str) and bool(v),
        "classes": lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v),
        "crop_bottom": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0,
    }
    wants = {"root": "a non-empty string", "classes": "a list of class names", "crop_bottom": "an integer >= 0"}
    for key, ok in checks.items():
        if key not in doc:
            raise ArtifactError(f"{path}: the key `{key}` is missing (found: {', '.join(sorted(doc)) or 'none'}); rebuild it with {rebuild}")
        if not ok(doc[key]):
            raise ArtifactError(f"{path}: `{key}` must be {wants[key]}, got {doc[key]!r}; rebuild it with {rebuild}")
    optional = {"root_relative": (lambda v: isinstance(v, str) and bool(v) and not os.path.isabs(v), "a relative path"),
                "params": (lambda v: isinstance(v, dict), "an object")}
    for key, (ok, want) in optional.items():
        if key in doc and not ok(doc[key]):
            raise ArtifactError(f"{path}: `{key}` must be {want}, got {doc[key]!r}; rebuild it with {rebuild}")
    root = Path(doc["root"])
    if "root_relative" in doc:  # lexically, as prepare computed it (a `..` through a linked data/ stays in the project)
        root = Path(os.path.normpath(os.path.abspath(path.parent) + os.sep + doc["root_relative"]))
    return DatasetInfo(root=root, classes=list(doc["classes"]), crop_bottom=doc["crop_bottom"], params=doc.get("params"))


def class_names(rows: Iterable[ManifestRow]) -> list[str]:
    """Class names indexed by label."""
    names: dict[int, str] = {}
    for r in rows:
        names.setdefault(r.label, r.class_name)
    return [names[i] for i in range(len(names))]
