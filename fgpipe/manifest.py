"""data/NAME/manifest.csv: one row per image, the contract every later stage reads.

Columns: image_id,path,label,class_name,split,width,height,x0,y0,x1,y1
- path is relative to the dataset root (POSIX separators);
- split is train, val or test (val is carved from train: nothing is ever selected on test);
- the box is the ground-truth object box in pixels, all four empty where the dataset has none.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fgpipe.errors import ArtifactError
from fgpipe.store import write_text

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
    """Read and check a manifest; errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"manifest not found: {path} (run `fgpipe prepare --dataset NAME` first)")
    rows: list[ManifestRow] = []
    with open(path, newline="", encoding="utf-8") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            raise ArtifactError(f"{path}:1: header must be {','.join(COLUMNS)}, got {','.join(header or [])}")
        for lineno, rec in enumerate(reader, start=2):
            try:
                if len(rec) != len(COLUMNS):
                    raise ValueError(f"expected {len(COLUMNS)} fields, got {len(rec)}")
                image_id, rel, label, cname, split, w, h, *box = rec
                if split not in SPLITS:
                    raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
                if any(box) and not all(box):
                    raise ValueError("box must have all four coordinates or none")
                rows.append(
                    ManifestRow(
                        image_id=image_id,
                        path=rel,
                        label=int(label),
                        class_name=cname,
                        split=split,
                        width=int(w),
                        height=int(h),
                        box=tuple(float(v) for v in box) if all(box) else None,  # type: ignore[arg-type]
                    )
                )
            except ValueError as exc:
                raise ArtifactError(f"{path}:{lineno}: {exc}") from None
    return rows


def class_names(rows: Iterable[ManifestRow]) -> list[str]:
    """Class names indexed by label."""
    names: dict[int, str] = {}
    for r in rows:
        names.setdefault(r.label, r.class_name)
    return [names[i] for i in range(len(names))]
