"""A generic root/<split>/<class>/<image> layout (torchvision's ImageFolder, one folder per split).

Classes are the class folder names, sorted; two folder names that differ only in case or Unicode form
(``train/Sparrow``, ``test/sparrow``) are refused rather than made two classes, and so is a file or folder
name that is not valid UTF-8. An image's id is its path relative to root without the
extension (``train/sparrow/img_01``). Images may sit in subfolders of a class folder. There are no
boxes. Files with other extensions, hidden files and files directly under a split folder are
ignored and counted (metrics ``reader_ignored_files``). A symbolic link with an image extension that leads
nowhere is listed all the same, never dropped silently: prepare refuses it as missing (a dangling link) or
as an unreadable image (a link loop: listed, or skipped with ``skip_bad``).
"""

from __future__ import annotations

import unicodedata
from pathlib import Path

from fgpipe.config import DatasetConfig, ImageFolderOptions
from fgpipe.datasets.base import SourceListing, SourceRecord, require_files, safe_relpath, utf8_name
from fgpipe.errors import DatasetError

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
HOW_TO_GET = (
    "ImageFolder: arrange the images as root/<split>/<class name>/<image>.jpg (also .jpeg .png .bmp .webp "
    ".tif .gif .ppm .pgm), with the split folders named by `imagefolder.train_dir` / `test_dir` (default "
    "train and test) and optionally `val_dir`; root points at the folder holding the split folders."
)


def read(root: Path, cfg: DatasetConfig) -> SourceListing:
    """List the image files under each split folder (no image is opened)."""
    opts: ImageFolderOptions = cfg.options()
    dirs = {"train": opts.train_dir, "test": opts.test_dir}
    if opts.val_dir is not None:
        dirs["val"] = opts.val_dir
    dirs = {split: safe_relpath(root, d, f"imagefolder.{split}_dir") for split, d in dirs.items()}
    if len(set(dirs.values())) != len(dirs):
        raise DatasetError(f"imagefolder: train_dir, test_dir and val_dir must be different folders, got {dirs}")
    require_files(root, list(dirs.values()), HOW_TO_GET)

    records: list[SourceRecord] = []
    classes: set[str] = set()
    folder_of: dict[str, Path] = {}  # class name folded (case, Unicode form) -> the first folder of that name
    ignored = 0
    for split, rel_dir in dirs.items():
        split_dir = root / rel_dir
        if not split_dir.is_dir():
            raise DatasetError(f"{split_dir} is not a folder (imagefolder.{split}_dir)\n{HOW_TO_GET}")
        class_dirs = sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise DatasetError(
                f"{split_dir} has no class folders: expected {split_dir}/<class name>/<image>\n{HOW_TO_GET}"
            )
        ignored += sum(1 for p in split_dir.iterdir() if not p.is_dir())
        for class_dir in class_dirs:
            utf8_name(class_dir, root)
            key = unicodedata.normalize("NFC", class_dir.name).casefold()
            first = folder_of.setdefault(key, class_dir)
            if first.name != class_dir.name:
                raise DatasetError(
                    f"class folders {first} and {class_dir} differ only in case or Unicode form, so they would "
                    "become two classes: rename one so that both have the same name (one class) or clearly different names"
                )
            classes.add(class_dir.name)
            for path in sorted(class_dir.rglob("*")):
                if not path.is_file() and not (path.is_symlink() and not path.exists()):
                    continue  # a folder; a link to nothing (missing, or a loop) is listed: prepare reports it
                hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
                if hidden or path.suffix.lower() not in EXTENSIONS:
                    ignored += 1
                    continue
                rel = utf8_name(path, root)
                records.append(
                    SourceRecord(
                        image_id=rel[: -len(path.suffix)],
                        path=rel,
                        class_name=class_dir.name,
                        split=split,
                        origin=str(path),
                    )
                )
    if not records:
        raise DatasetError(f"no image files under {', '.join(str(root / d) for d in dirs.values())}\n{HOW_TO_GET}")
    return SourceListing(records=records, classes=sorted(classes), notes={"ignored_files": ignored})
