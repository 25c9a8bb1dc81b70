"""What a dataset reader returns, and checks shared by every reader.

A reader is a module in ``fgpipe.datasets`` with
``read(root: Path, cfg: DatasetConfig) -> SourceListing`` (parsing only: it never decodes images)
and a ``HOW_TO_GET`` string telling the user how to obtain the dataset. The prepare stage does the
rest for every dataset alike: path safety, missing files, decoding, box clipping, val carving.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from fgpipe.errors import DatasetError
from fgpipe.manifest import Box


@dataclass(frozen=True)
class SourceRecord:
    """One image as the dataset's own annotation files describe it."""

    image_id: str
    path: str  # relative to the dataset root, POSIX separators
    class_name: str
    split: str  # train, val (only where the dataset ships an official val split) or test
    box: Box | None = None  # (x0, y0, x1, y1) in pixels
    origin: str = ""  # where it was read from, for messages: "images.txt:12"


@dataclass
class SourceListing:
    records: list[SourceRecord]
    classes: list[str]  # every class in the dataset's official order (labels follow this order)
    notes: dict[str, int] = field(default_factory=dict)  # reader-specific counts for the metrics
    # pixels to drop from the bottom of every image (FGVC-Aircraft's 20-pixel banner): the manifest's
    # height excludes them and every image loader crops images to the manifest's width x height
    crop_bottom: int = 0


def require_files(root: Path, names: list[str], how_to_get: str) -> None:
    """Fail naming every expected file that is missing under ``root``."""
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}\n{how_to_get}")
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise DatasetError(
            f"dataset under {root} is incomplete: missing {', '.join(missing)}\n{how_to_get}"
        )


def read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """Non-empty lines of a whitespace-separated annotation file as (line number, fields)."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.split()
            if parts:
                out.append((lineno, parts))
    return out


def safe_relpath(root: Path, rel: str, origin: str) -> str:
    """Normalise ``rel`` and refuse a path that escapes the dataset root (absolute, ``..``, symlink tricks)."""
    rel_posix = rel.replace("\\", "/")
    if os.path.isabs(rel_posix) or rel_posix.startswith("/"):
        raise DatasetError(f"{origin}: path {rel!r} is absolute; annotation paths must stay inside {root}")
    norm = os.path.normpath(rel_posix)
    if norm == ".." or norm.startswith("../"):
        raise DatasetError(f"{origin}: path {rel!r} escapes the dataset root {root}")
    return norm.replace(os.sep, "/")


def xywh_to_xyxy(x: float, y: float, w: float, h: float) -> Box:
    return (x, y, x + w, y + h)
