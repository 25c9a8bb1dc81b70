"""What a dataset reader returns, and checks shared by every reader.

A reader is a module in ``fgpipe.datasets`` with
``read(root: Path, cfg: DatasetConfig) -> SourceListing`` (parsing only: it never decodes images)
and a ``HOW_TO_GET`` string telling the user how to obtain the dataset. The prepare stage does the
rest for every dataset alike: path safety, missing files, decoding, box clipping, val carving.
"""

from __future__ import annotations

import math
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
    # where each class is listed, for messages ("classes.csv:3"), in the order of ``classes``; empty where unknown
    # (prepare names both places of a class listed twice; readers that refuse a repeat themselves leave it empty)
    class_origins: list[str] = field(default_factory=list)
    notes: dict[str, int] = field(default_factory=dict)  # reader-specific counts for the metrics
    # annotation problems the reader found but that do not stop prepare: kind -> the image ids concerned
    # (reported on the console and in the prepare metrics, with prepare's own, under `annotation_issues`)
    issues: dict[str, list[str]] = field(default_factory=dict)
    # pixels to drop from the bottom of every image (FGVC-Aircraft's 20-pixel banner): the manifest's
    # height excludes them and every image loader crops images to the manifest's width x height
    crop_bottom: int = 0


def require_files(root: Path, names: list[str], how_to_get: str) -> None:
    """Fail naming every expected file that is missing under ``root``."""
    if os.path.lexists(root) and not root.is_dir():
        kind = "a broken link" if not root.exists() else "a file"
        raise DatasetError(f"dataset root is not a folder: {root} is {kind}; point the root at the dataset's folder\n{how_to_get}")
    if not root.is_dir():
        raise DatasetError(f"dataset root not found: {root}\n{how_to_get}")
    missing = [n for n in names if not (root / n).exists()]
    if missing:
        raise DatasetError(
            f"dataset under {root} is incomplete: missing {', '.join(missing)}\n{how_to_get}"
        )


def text_lines(path: Path) -> list[tuple[int, str]]:
    """Every line of a UTF-8 annotation file as (line number, text without the line break).

    A byte-order mark at the start is dropped; bytes that are not UTF-8 stop with the file, line and column.
    """
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    out = []
    for lineno, raw in enumerate(data.splitlines(), start=1):  # \n, \r\n or \r, as text mode reads them
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DatasetError(
                f"{path}:{lineno}: not valid UTF-8 (byte {raw[exc.start:exc.start + 1]!r} at column {exc.start + 1}): "
                f"{raw!r}; save the file as UTF-8"
            ) from None
        out.append((lineno, text))
    return out


def read_lines(path: Path) -> list[tuple[int, list[str]]]:
    """Non-empty lines of a whitespace-separated annotation file as (line number, fields)."""
    return [(lineno, parts) for lineno, text in text_lines(path) if (parts := text.split())]


def parse_box(values: list[str], origin: str, corners: bool = False) -> Box:
    """Four annotation numbers as ``(x, y, w, h)`` (``corners``: ``(x0, y0, x1, y1)``), returned as given.

    Refuses, naming ``origin``, a value that is not a finite number, and an empty box: width or height not
    positive (``corners``, 1-based inclusive: x1 < x0 or y1 < y0); a box partly outside its image is for
    prepare to clip.
    """
    shown = " ".join(values)
    if len(values) != 4:
        raise DatasetError(f"{origin}: a box needs 4 numbers, got {len(values)} ({shown!r})")
    try:
        nums = tuple(float(v) for v in values)
    except ValueError:
        raise DatasetError(f"{origin}: box values must be numbers, got {shown!r}") from None
    if not all(math.isfinite(v) for v in nums):
        raise DatasetError(f"{origin}: box values must be finite numbers, got {shown!r}")
    a, b, c, d = nums
    if (c < a or d < b) if corners else (c <= 0 or d <= 0):
        what = "the second corner is left of or above the first" if corners else "width and height must be positive"
        raise DatasetError(f"{origin}: {what}, got {shown!r}")
    return (a, b, c, d)


def shown_path(path: Path) -> str:
    """``path`` for a message: a name that is not valid UTF-8 shows its bytes escaped (``caf\\xe9.jpg``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_name(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` as POSIX text; refuses a name whose bytes are not UTF-8 (naming them)."""
    rel = path.relative_to(root).as_posix()
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:  # undecodable bytes, which Python keeps as lone surrogates
        raise DatasetError(
            f"{shown_path(path)}: the file name is not valid UTF-8, so it cannot be written to the manifest; "
            "rename it (e.g. `convmv -f latin1 -t utf8 -r --notest FOLDER`)"
        ) from None
    return rel


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
