"""The built-in synthetic dataset on disk: the files :func:`fgpipe.datasets.synthetic.generate` writes, and the reader
prepare lists them with (``read``; ``read_parts`` for the part boxes). No image is decoded here.

Layout under ``root``::

    images/<class>/<image_id>.jpg   RGB JPEG, quality 92, no chroma subsampling
    annotations.csv                 image_id,path,class_name,split,x0,y0,x1,y1   (one row per image)
    parts.csv                       image_id,part,x0,y0,x1,y1                   (one row per image and part)
    classes.csv                     class_name,head,wing,tail,body              (label order, markings)
    synthetic.json                  the options and the generator version; written last

Boxes are pixel edges (x1, y1 exclusive). ``split`` is train or test (the prepare stage carves val from train).
"""

from __future__ import annotations

import csv
from pathlib import Path

from fgpipe.config import SYNTHETIC_PARTS as PARTS
from fgpipe.config import DatasetConfig
from fgpipe.datasets.base import SourceListing, SourceRecord, require_files, safe_relpath
from fgpipe.errors import DatasetError
from fgpipe.manifest import Box

HOW_TO_GET = (
    "synthetic: nothing to download; `fgpipe prepare --dataset NAME` generates it under "
    "datasets.NAME.root from the options in datasets.NAME.synthetic (params.yaml)."
)
SPLIT_NAMES = ("train", "test")
ANNOTATION_COLUMNS = ("image_id", "path", "class_name", "split", "x0", "y0", "x1", "y1")
PART_COLUMNS = ("image_id", "part", "x0", "y0", "x1", "y1")
FILES = ["annotations.csv", "classes.csv", "images"]


def _rows(path: Path, header: tuple[str, ...]) -> list[tuple[dict[str, str], str]]:
    """Rows of a CSV file as (field -> value, "file:line"), checking the header and the field count."""
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        got = next(reader, None)
        if got is None or tuple(got) != header:
            raise DatasetError(f"{path}:1: header must be {','.join(header)}, got {','.join(got or [])}")
        out = []
        for lineno, rec in enumerate(reader, start=2):
            if not rec:
                continue
            if len(rec) != len(header):
                raise DatasetError(f"{path}:{lineno}: expected {len(header)} fields, got {len(rec)}")
            out.append((dict(zip(header, rec)), f"{path}:{lineno}"))
    return out


def read(root: Path, cfg: DatasetConfig) -> SourceListing:
    """List the generated images with their classes, splits and object boxes (no image is decoded)."""
    require_files(root, FILES, HOW_TO_GET)
    class_rows = _rows(root / "classes.csv", ("class_name", *PARTS))
    classes = [row["class_name"] for row, _ in class_rows]
    known = set(classes)
    records = []
    for row, origin in _rows(root / "annotations.csv", ANNOTATION_COLUMNS):
        if row["class_name"] not in known:
            raise DatasetError(f"{origin}: class {row['class_name']!r} is not in {root / 'classes.csv'}")
        if row["split"] not in SPLIT_NAMES:
            raise DatasetError(f"{origin}: split must be one of {', '.join(SPLIT_NAMES)}, got {row['split']!r}")
        box = _box(row, origin)
        if not (box[0] < box[2] and box[1] < box[3]):
            raise DatasetError(f"{origin}: box must have x0 < x1 and y0 < y1, got {box}")
        records.append(
            SourceRecord(
                image_id=row["image_id"],
                path=safe_relpath(root, row["path"], origin),
                class_name=row["class_name"],
                split=row["split"],
                box=box,  # type: ignore[arg-type]
                origin=origin,
            )
        )
    return SourceListing(records=records, classes=classes, class_origins=[origin for _, origin in class_rows])


def _box(row: dict[str, str], origin: str) -> Box:
    """A row's x0, y0, x1, y1 as numbers."""
    try:
        return tuple(float(row[c]) for c in ("x0", "y0", "x1", "y1"))  # type: ignore[return-value]
    except ValueError:
        raise DatasetError(f"{origin}: box values must be numbers") from None


def read_parts(root: Path) -> dict[str, dict[str, Box]]:
    """image_id -> part -> ground-truth part box, from parts.csv."""
    out: dict[str, dict[str, Box]] = {}
    for row, origin in _rows(root / "parts.csv", PART_COLUMNS):
        if row["part"] not in PARTS:
            raise DatasetError(f"{origin}: part must be one of {', '.join(PARTS)}, got {row['part']!r}")
        box = _box(row, origin)
        out.setdefault(row["image_id"], {})[row["part"]] = box  # type: ignore[assignment]
    return out
