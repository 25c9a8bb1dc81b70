"""Stanford Cars in the layout torchvision.datasets.StanfordCars reads.

stanford_cars/ devkit/cars_meta.mat (class_names), devkit/cars_train_annos.mat,
cars_test_annos_withlabels.mat, cars_train/*.jpg, cars_test/*.jpg. Each annotation record has
bbox_x1, bbox_y1, bbox_x2, bbox_y2, class (1-based) and fname. Root may be the stanford_cars folder
or its parent (torchvision's root). Boxes follow the devkit's MATLAB convention (1-based inclusive),
so (x1, y1, x2, y2) becomes the 0-based pixel-edge box (x1 - 1, y1 - 1, x2, y2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from scipy.io.matlab import MatReadError

from fgpipe.config import DatasetConfig
from fgpipe.datasets.base import SourceListing, SourceRecord, parse_box, require_files, safe_relpath
from fgpipe.errors import DatasetError

FOLDER = "stanford_cars"
META = "devkit/cars_meta.mat"
# manifest split -> (annotation file, image folder), relative to the stanford_cars folder
SPLITS = {
    "train": ("devkit/cars_train_annos.mat", "cars_train"),
    "test": ("cars_test_annos_withlabels.mat", "cars_test"),
}
FIELDS = ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")
HOW_TO_GET = (
    "Stanford Cars: the original download (ai.stanford.edu/~jkrause/cars) is gone and there is no official "
    "archive to fetch. Get a copy of the original release (e.g. a Kaggle mirror of 'stanford-cars-dataset' "
    "plus cars_test_annos_withlabels.mat) and arrange it as torchvision.datasets.StanfordCars expects: "
    "stanford_cars/{devkit/cars_meta.mat, devkit/cars_train_annos.mat, cars_test_annos_withlabels.mat, "
    "cars_train/, cars_test/}; root may point at the stanford_cars folder or at its parent."
)


def base_folder(root: Path) -> Path:
    """The stanford_cars folder: root itself, or root/stanford_cars when root is its parent."""
    if not (root / "devkit").is_dir() and (root / FOLDER / "devkit").is_dir():
        return root / FOLDER
    return root


def read(root: Path, cfg: DatasetConfig) -> SourceListing:
    """Parse cars_meta.mat and the train/test annotation .mat files (no image is opened)."""
    base = base_folder(root)
    prefix = "" if base == root else f"{FOLDER}/"
    require_files(base, [META, *(f for pair in SPLITS.values() for f in pair)], HOW_TO_GET)
    classes = _class_names(base / META)

    records = []
    for split, (ann_name, image_dir) in SPLITS.items():
        path = base / ann_name
        for i, ann in enumerate(_annotations(path)):
            origin = f"{path}: annotations[{i}]"
            fname = str(ann["fname"]).strip()
            try:
                cls = int(ann["class"])
                x1, y1, x2, y2 = parse_box([str(float(ann[k])) for k in FIELDS[:4]], origin, corners=True)
            except (TypeError, ValueError):
                raise DatasetError(f"{origin}: class and bbox_* must be numbers") from None
            if not 1 <= cls <= len(classes):
                raise DatasetError(f"{origin}: class {cls} is outside 1..{len(classes)} (the classes of {base / META})")
            if not fname:
                raise DatasetError(f"{origin}: fname is empty")
            records.append(
                SourceRecord(
                    image_id=f"{split}/{Path(fname).stem}",
                    path=safe_relpath(root, f"{prefix}{image_dir}/{fname}", origin),
                    class_name=classes[cls - 1],
                    split=split,
                    box=(x1 - 1.0, y1 - 1.0, x2, y2),
                    origin=origin,
                )
            )
    return SourceListing(records=records, classes=classes)


def _loadmat(path: Path, key: str) -> Any:
    """``key`` of a .mat file (squeezed as torchvision reads it); errors name the file."""
    try:
        mat = scipy.io.loadmat(path, squeeze_me=True)
    except (MatReadError, ValueError, OSError) as exc:
        raise DatasetError(f"{path}: not a readable MATLAB file ({exc})") from None
    if key not in mat:
        found = ", ".join(k for k in mat if not k.startswith("__")) or "(none)"
        raise DatasetError(f"{path}: expected a variable `{key}`, found {found}")
    return mat[key]


def _class_names(path: Path) -> list[str]:
    names = [str(n).strip() for n in np.atleast_1d(_loadmat(path, "class_names")).tolist()]
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if name in seen:
            raise DatasetError(f"{path}: class_names[{i}] {name!r} repeats class_names[{seen[name]}]")
        seen[name] = i
    if not names:
        raise DatasetError(f"{path}: class_names is empty")
    return names


def _annotations(path: Path) -> np.ndarray:
    """The annotation records of a cars_*_annos.mat file, as a 1-d structured array."""
    ann = np.atleast_1d(_loadmat(path, "annotations"))
    missing = [f for f in FIELDS if f not in (ann.dtype.names or ())]
    if missing:
        hint = " (cars_test_annos.mat has no labels: use cars_test_annos_withlabels.mat)" if "class" in missing else ""
        raise DatasetError(f"{path}: annotations lack the field(s) {', '.join(missing)}{hint}")
    return ann
