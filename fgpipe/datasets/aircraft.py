"""FGVC-Aircraft 2013b in its official layout.

root (the fgvc-aircraft-2013b folder)/data/
  images_{variant,family,manufacturer}_{train,val,trainval,test}.txt   `<image_id> <class name>` per line
  variants.txt, families.txt, manufacturers.txt                         class names in official order
  images_box.txt                                                        `<image_id> xmin ymin xmax ymax`
  images/<image_id>.jpg

Boxes are 1-based inclusive pixel coordinates; the manifest's are 0-based pixel edges, so
(xmin, ymin, xmax, ymax) becomes (xmin - 1, ymin - 1, xmax, ymax). Every image carries a 20-pixel
copyright banner at the bottom; with ``drop_banner`` the manifest's height excludes it.
"""

from __future__ import annotations

from pathlib import Path

from fgpipe.config import AircraftOptions, DatasetConfig
from fgpipe.datasets.base import SourceListing, SourceRecord, parse_box, read_lines, require_files, safe_relpath, text_lines
from fgpipe.errors import DatasetError
from fgpipe.manifest import Box

URL = "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/archives/fgvc-aircraft-2013b.tar.gz"
# SHA-256 of the archive Oxford serves today (2,753,340,328 bytes), as recorded by several independent
# download scripts; the MD5 on the project page is reported to be that of an older upload.
SHA256 = "e4e323d410e29f0370c81eabdcbb0e2b813acea1de22891b70b58ff41bfc9834"
BANNER_PIXELS = 20
CLASS_FILES = {"variant": "variants.txt", "family": "families.txt", "manufacturer": "manufacturers.txt"}
HOW_TO_GET = (
    "FGVC-Aircraft 2013b: download fgvc-aircraft-2013b.tar.gz from "
    "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and extract it so that root points at the "
    "fgvc-aircraft-2013b folder (it holds data/images_box.txt), "
    "or set `download: true` for this dataset (or pass --download)."
)


def split_files(opts: AircraftOptions) -> list[tuple[str, str]]:
    """(manifest split, annotation file relative to root) pairs for these options."""
    level = opts.annotation_level
    if opts.official_val:
        parts = [("train", "train"), ("val", "val"), ("test", "test")]
    else:  # val is carved from trainval by the prepare stage
        parts = [("train", "trainval"), ("test", "test")]
    return [(split, f"data/images_{level}_{name}.txt") for split, name in parts]


def read(root: Path, cfg: DatasetConfig) -> SourceListing:
    """Parse the split files of the configured annotation level (no image is opened)."""
    opts: AircraftOptions = cfg.options()
    class_file = f"data/{CLASS_FILES[opts.annotation_level]}"
    files = split_files(opts)
    require_files(root, [class_file, *(name for _, name in files), "data/images"], HOW_TO_GET)
    classes = _classes(root / class_file)
    known = set(classes)
    boxes = _boxes(root / "data/images_box.txt") if (root / "data/images_box.txt").exists() else {}

    records = []
    for split, name in files:
        path = root / name
        for lineno, line in text_lines(path):
            text = line.strip()
            if not text:
                continue
            origin = f"{path}:{lineno}"
            fields = text.split(None, 1)
            if len(fields) != 2:
                raise DatasetError(f"{origin}: expected `<image_id> <class name>`, got {text!r}")
            image_id, class_name = fields
            if class_name not in known:
                raise DatasetError(f"{origin}: class {class_name!r} is not listed in {root / class_file}")
            records.append(
                SourceRecord(
                    image_id=image_id,
                    path=safe_relpath(root, f"data/images/{image_id}.jpg", origin),
                    class_name=class_name,
                    split=split,
                    box=boxes.get(image_id),
                    origin=origin,
                )
            )
    listed = {r.image_id for r in records}
    return SourceListing(
        records=records,
        classes=classes,
        crop_bottom=BANNER_PIXELS if opts.drop_banner else 0,
        # boxes of images no split file read here lists: an image left out, or an id mistyped
        issues={"annotation_lines_without_image": sorted(i for i in boxes if i not in listed)},
    )


def _classes(path: Path) -> list[str]:
    """Class names, one per line, in official order; a repeated name is an error."""
    seen: dict[str, int] = {}
    for lineno, line in text_lines(path):
        name = line.strip()
        if not name:
            continue
        if name in seen:
            raise DatasetError(f"{path}:{lineno}: class {name!r} is listed twice (first at line {seen[name]})")
        seen[name] = lineno
    if not seen:
        raise DatasetError(f"{path}: lists no classes")
    return list(seen)


def _boxes(path: Path) -> dict[str, Box]:
    """image_id -> 0-based pixel-edge box from the 1-based inclusive `id xmin ymin xmax ymax` lines."""
    out: dict[str, Box] = {}
    first: dict[str, int] = {}
    for lineno, parts in read_lines(path):
        if len(parts) != 5:
            raise DatasetError(f"{path}:{lineno}: expected `<image_id> xmin ymin xmax ymax`, got {len(parts)} fields")
        image_id = parts[0]
        if image_id in out:
            raise DatasetError(
                f"{path}:{lineno}: image id {image_id} has a second box (first at line {first[image_id]})"
            )
        xmin, ymin, xmax, ymax = parse_box(parts[1:], f"{path}:{lineno}", corners=True)
        out[image_id] = (xmin - 1.0, ymin - 1.0, xmax, ymax)
        first[image_id] = lineno
    return out


def download(root: Path, setting: str = "datasets.NAME.root") -> None:
    """Fetch the official archive, verify its SHA-256 and extract it so that ``root`` is fgvc-aircraft-2013b/."""
    from fgpipe.datasets.download import fetch_and_extract

    fetch_and_extract(URL, sha256=SHA256, dest=root, member="fgvc-aircraft-2013b", setting=setting)
