"""CUB-200-2011 in its official layout.

root/ images.txt (id path), image_class_labels.txt (id class_id), train_test_split.txt (id is_train),
bounding_boxes.txt (id x y w h, pixels), classes.txt (class_id name), images/<class>/<file>.jpg.
Only classes that have images become labels (a subset keeps the full 200-line classes.txt).
"""

from __future__ import annotations

from pathlib import Path

from fgpipe.config import DatasetConfig
from fgpipe.datasets.base import SourceListing, SourceRecord, parse_box, read_lines, require_files, safe_relpath, xywh_to_xyxy
from fgpipe.errors import DatasetError

FILES = ["images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt", "images"]
URL = "https://data.caltech.edu/records/65de6-vp158/files/CUB_200_2011.tgz"
MD5 = "97eceeb196236b17998738112f37df78"
HOW_TO_GET = (
    "CUB-200-2011: download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ "
    "and extract it so that root points at the CUB_200_2011 folder (it holds images.txt), "
    "or set `download: true` for this dataset (or pass --download)."
)


def _table(root: Path, name: str, ncols: int, exact: bool = True, what: str = "image id") -> dict[str, tuple[list[str], str]]:
    """id -> (remaining fields, origin) of an id-keyed annotation file; errors name file:line.

    Each line has ``ncols`` fields (at least ``ncols`` where not ``exact``: a path or a name may hold spaces).
    """
    out: dict[str, tuple[list[str], str]] = {}
    for lineno, parts in read_lines(root / name):
        origin = f"{root / name}:{lineno}"
        if len(parts) < ncols or (exact and len(parts) > ncols):
            raise DatasetError(f"{origin}: expected {ncols} fields, got {len(parts)}: {' '.join(parts)!r}")
        if parts[0] in out:
            raise DatasetError(f"{origin}: {what} {parts[0]} is listed twice (first at {out[parts[0]][1]})")
        out[parts[0]] = (parts[1:], origin)
    return out


def _class_names(root: Path) -> dict[str, str]:
    """class id -> name from classes.txt; two ids with one name (which would merge two classes) are refused."""
    table = _table(root, "classes.txt", 2, exact=False, what="class id")
    first: dict[str, tuple[str, str]] = {}  # name -> (class id, origin) of its first line
    names = {}
    for cid, (fields, origin) in table.items():
        name = " ".join(fields)
        if name in first:
            other, where = first[name]
            raise DatasetError(
                f"{origin}: class id {cid} has the name {name!r} of class id {other} ({where}); "
                "two class ids with one name would become one class: give each its own name"
            )
        first[name] = (cid, origin)
        names[cid] = name
    return names


def read(root: Path, cfg: DatasetConfig) -> SourceListing:
    require_files(root, FILES, HOW_TO_GET)
    images = _table(root, "images.txt", 2, exact=False)
    labels = _table(root, "image_class_labels.txt", 2)
    split = _table(root, "train_test_split.txt", 2)
    boxes = _table(root, "bounding_boxes.txt", 5) if (root / "bounding_boxes.txt").exists() else {}
    classes = _class_names(root)

    records = []
    for image_id, (fields, origin) in images.items():
        rel = safe_relpath(root, "images/" + " ".join(fields), origin)
        if image_id not in labels:
            raise DatasetError(f"{origin}: image id {image_id} has no line in {root / 'image_class_labels.txt'}")
        if image_id not in split:
            raise DatasetError(f"{origin}: image id {image_id} has no line in {root / 'train_test_split.txt'}")
        cid = labels[image_id][0][0]
        if cid not in classes:
            raise DatasetError(f"{labels[image_id][1]}: class id {cid} is not in {root / 'classes.txt'}")
        flag = split[image_id][0][0]
        if flag not in ("0", "1"):
            raise DatasetError(f"{split[image_id][1]}: is_training_image must be 0 or 1, got {flag}")
        box = None
        if image_id in boxes:
            box = xywh_to_xyxy(*parse_box(*boxes[image_id]))
        records.append(
            SourceRecord(
                image_id=image_id,
                path=rel,
                class_name=classes[cid],
                split="train" if flag == "1" else "test",
                box=box,
                origin=origin,
            )
        )
    # lines of the other files for ids images.txt does not list: an image left out, or an id mistyped
    orphans = sorted({i for table in (labels, split, boxes) for i in table if i not in images}, key=_id_order)
    return SourceListing(records=records, classes=list(classes.values()), issues={"annotation_lines_without_image": orphans})


def _id_order(image_id: str) -> tuple[int, str]:
    """Numeric ids in numeric order, any others after them."""
    return (int(image_id), "") if image_id.isdigit() else (1 << 62, image_id)


def download(root: Path, setting: str = "datasets.NAME.root") -> None:
    """Fetch the official archive, verify its MD5 and extract it so that ``root`` is CUB_200_2011/."""
    from fgpipe.datasets.download import fetch_and_extract

    fetch_and_extract(URL, md5=MD5, dest=root, member="CUB_200_2011", setting=setting)
