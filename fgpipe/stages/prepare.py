"""Stage `prepare`: read a dataset in its official layout and write data/NAME/manifest.csv.

Reads:  datasets.NAME, prepare.cache_side and prepare.max_pixels (params), the dataset root (or generates the
        synthetic one).
Writes: data/NAME/manifest.csv, data/NAME/dataset.json, data/NAME/images.h5 (the decoded image cache the
        later stages cut their inputs from, see fgpipe/imagecache.py; empty with cache_side 0),
        metrics/NAME/prepare.json and prepare.provenance.json; all renamed into place together at the end
        (:func:`fgpipe.store.replaced_together`), so a failed run leaves the previous ones.

Annotation problems that would leak or bias results without stopping anything (the same file under two
ids, byte-identical images in two splits or under two classes, images without a box among boxed ones,
annotation lines for ids no image list holds) are reported on the console and counted under
``annotation_issues`` in the metrics (:data:`ISSUES`), their image ids under the same key in the provenance.
"""

from __future__ import annotations

import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from rich.markup import escape

from fgpipe import __version__
from fgpipe.config import DatasetConfig, Settings
from fgpipe.console import console, progress
from fgpipe.datasets import generator, reader
from fgpipe.datasets.base import SourceListing, SourceRecord, safe_relpath
from fgpipe.errors import BadImagesError, DatasetError
from fgpipe.imagecache import build_image_cache
from fgpipe.images import DECODE_ERRORS, DEFAULT_MAX_PIXELS, image_size
from fgpipe.lineage import params_record
from fgpipe.manifest import SPLITS, Box, ManifestRow, write_manifest
from fgpipe.store import StageRecord, check_output_paths, file_sha256, pending, replaced_together, write_json, write_record

STAGE = "prepare"
# annotation_issues in the metrics: kind -> what the console says of the image ids it lists
ISSUES = {
    "same_file_under_several_ids": "image id(s) list one file (one image counted twice; in two splits, a leak)",
    "identical_images_across_splits": "image(s) are byte-identical to one in another split (a leak: val and test figures are inflated)",
    "identical_images_with_different_classes": "image(s) are byte-identical to one of another class",
    "images_without_box": "image(s) have no box while others have one (localisation is measured on the others only)",
    "annotation_lines_without_image": "id(s) have annotation lines but are in no image list (left out of the dataset)",
}
ISSUE_IDS_KEPT = 50  # image ids listed per kind in the provenance (the count in the metrics covers all)


def run(settings: Settings, dataset: str) -> StageRecord:
    """Prepare one dataset; return its metrics and provenance (also written to metrics/NAME/prepare.json and
    prepare.provenance.json)."""
    with replaced_together():  # the manifest, dataset.json, images.h5 and the metrics change together, or not at all
        return _run(settings, dataset)


def _run(settings: Settings, dataset: str) -> StageRecord:
    t0 = time.perf_counter()
    cfg = settings.dataset(dataset)
    root = settings.dataset_root(dataset)
    mod = reader(cfg.kind)
    layout = settings.layout(dataset)
    data = layout.data
    check_output_paths([data.manifest, data.dataset_json, data.images, layout.metrics.stage(STAGE), layout.metrics.provenance(STAGE)])
    if cfg.download and not hasattr(mod, "download"):  # an option silently ignored would hide a wrong setup
        cli = bool(settings.overrides.get(f"datasets.{dataset}.download"))
        said = "--download" if cli else f"datasets.{dataset}.download: true"
        raise DatasetError(
            f"{said}: {cfg.kind} has no official archive to download: {mod.HOW_TO_GET}\n"
            f"Leave {'--download out' if cli else f'datasets.{dataset}.download out (or false)'} and put the dataset at {root}."
        )
    if os.path.lexists(root) and not root.is_dir():
        raise DatasetError(
            f"dataset root is not a folder: {root} (datasets.{dataset}.root) is a {'broken link' if not root.exists() else 'file'}; "
            f"point datasets.{dataset}.root (or --root) at the dataset's folder\n{mod.HOW_TO_GET}"
        )

    make = generator(cfg.kind)
    if make is not None:
        make.generate(root, cfg.options(), setting=f"datasets.{dataset}.root")
    elif not root.exists():
        if not cfg.download:
            raise DatasetError(f"dataset root not found: {root} (datasets.{dataset}.root)\n{mod.HOW_TO_GET}")
        console.print(f"downloading {cfg.kind} to {root}")
        mod.download(root, setting=f"datasets.{dataset}.root")

    listing: SourceListing = mod.read(root, cfg)
    rows, counts, issues = build_rows(root, cfg, listing, settings.params.prepare.max_pixels, dataset=dataset)

    write_manifest(data.manifest, rows)
    classes = sorted({(r.label, r.class_name) for r in rows})
    write_json(
        data.dataset_json,
        {
            "dataset": dataset,
            "kind": cfg.kind,
            "root": str(root),
            **root_relative(settings, dataset, root, data.path),
            "classes": [name for _, name in classes],
            "crop_bottom": listing.crop_bottom,
            "params": params_record(settings, "prepare", dataset),
            "fgpipe_version": __version__,
            **settings.provenance(),
        },
    )
    cache = build_image_cache(
        data.images, root, rows, settings.params.prepare.cache_side, file_sha256(pending(data.manifest)),
        {"dataset": dataset, "root": str(root), "resample": "bilinear (antialiased)", "fgpipe_version": __version__, **settings.provenance()},
    )
    per_split = Counter(r.split for r in rows)
    issue_counts, issue_ids = issue_metrics(issues)
    metrics = {
        "images": {**{s: per_split.get(s, 0) for s in SPLITS}, "total": len(rows)},
        "classes": len(classes),
        "with_box": sum(r.box is not None for r in rows),
        "skipped": counts["skipped"],
        "boxes_clipped": counts["boxes_clipped"],
        "boxes_dropped": counts["boxes_dropped"],
        "classes_without_images": counts["classes_without_images"],
        "classes_without_train_images": counts["classes_without_train_images"],
        "annotation_issues": issue_counts,
        "image_cache": cache,
        **{f"reader_{k}": v for k, v in listing.notes.items()},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    record = settings.record(dataset, metrics, {"kind": cfg.kind, "annotation_issues": issue_ids})
    write_record(layout.metrics, STAGE, record)
    return record


def root_relative(settings: Settings, dataset: str, root: Path, out_dir: Path) -> dict[str, str]:
    """``{"root_relative": ...}``: the dataset root relative to data/NAME (where dataset.json lies), when both the
    root (datasets.NAME.root or --root) and prepare.data_dir are given relative to the params file: the project
    then moves or is copied as one folder, and the later stages find the images where they now are. Computed
    lexically (as the params file's relative paths are joined), never through links. Else ``{}``: an absolute
    root, or one whose data folder lies elsewhere, stays where it is when the project moves, and dataset.json's
    absolute ``root`` is the one to use."""
    given = settings.dataset(dataset).root
    if os.path.isabs(os.path.expanduser(given)) or os.path.isabs(os.path.expanduser(settings.params.prepare.data_dir)):
        return {}
    return {"root_relative": Path(os.path.relpath(os.path.abspath(root), os.path.abspath(out_dir))).as_posix()}


def build_rows(
    root: Path, cfg: DatasetConfig, listing: SourceListing, max_pixels: int = DEFAULT_MAX_PIXELS, dataset: str = ""
) -> tuple[list[ManifestRow], Counter[str], dict[str, list[tuple[str, ...]]]]:
    """Checks shared by every dataset, then labels and the val split; also the annotation issues (reported).

    ``dataset``: the dataset's name, for messages."""
    counts: Counter[str] = Counter(
        skipped=0, boxes_clipped=0, boxes_dropped=0, classes_without_images=0, classes_without_train_images=0
    )
    _refuse_repeated_classes(root, listing)
    records, files = _checked_records(root, listing.records)
    _require_two_classes(root, records, dataset)  # before decoding a whole dataset for nothing
    sizes, digests, bad = _decode_all(root, records, files, verify=cfg.verify_images, max_pixels=max_pixels)
    if bad:
        if not cfg.skip_bad:
            raise BadImagesError(str(root), bad)
        console.print(f"[yellow]skipping {len(bad)} unreadable image(s) (skip_bad: true):[/] {_named(p for p, _ in bad)}")
        bad_paths = {p for p, _ in bad}
        records = [r for r in records if r.path not in bad_paths]
        counts["skipped"] = len(bad)
    if not records:
        raise DatasetError(f"no usable images under {root}")

    _require_two_classes(root, records, dataset, skipped=len(bad))
    present = {r.class_name for r in records}
    unknown = present - set(listing.classes)
    if unknown:
        raise DatasetError(f"images refer to classes not in the class list: {', '.join(sorted(unknown))}")
    names = [c for c in listing.classes if c in present]  # only classes that have images become labels
    empty = [c for c in listing.classes if c not in present]
    if empty:
        console.print(f"{len(empty)} class(es) without images left out of the labels: {_named(empty)}")
        counts["classes_without_images"] = len(empty)
    label_of = {c: i for i, c in enumerate(names)}
    splits = carve_val([r for r in records], label_of, cfg.val_fraction, cfg.split_seed)
    trained = {r.class_name for r in records if splits[r.image_id] == "train"}
    untrained = [c for c in names if c not in trained]
    if untrained:  # kept (a label the model will never predict well), but said and counted
        console.print(f"[yellow]{len(untrained)} class(es) have no train image, so no network can learn them:[/] {_named(untrained)}")
        counts["classes_without_train_images"] = len(untrained)

    rows = []
    clipped_ids: list[str] = []
    for r in records:
        w, h = sizes[r.path]
        h -= listing.crop_bottom
        if h <= 0:
            raise DatasetError(f"{root / r.path}: image is only {h + listing.crop_bottom} pixels high, "
                               f"nothing is left after dropping {listing.crop_bottom} banner pixels")
        box = r.box
        if box is not None:
            box, clipped = clip_annotation(box, w, h)
            counts["boxes_clipped"] += clipped
            counts["boxes_dropped"] += box is None
            if clipped:
                clipped_ids.append(r.image_id if box is not None else f"{r.image_id} (dropped: nothing inside)")
        rows.append(ManifestRow(r.image_id, r.path, label_of[r.class_name], r.class_name, splits[r.image_id], w, h, box))
    if clipped_ids:
        console.print(f"{len(clipped_ids)} box(es) reach outside their image and were clipped, image ids: {_named(clipped_ids)}")
    issues = annotation_issues(records, files, splits, digests, listing.issues)
    for kind, groups in issues.items():
        if groups:
            shown = _named(" = ".join(group) for group in groups)
            console.print(f"[yellow]{sum(map(len, groups))} {escape(ISSUES.get(kind, kind))}:[/] {shown}", highlight=False)
    return rows, counts, issues


def issue_metrics(issues: dict[str, list[tuple[str, ...]]]) -> tuple[dict[str, int], dict[str, list[str]]]:
    """``annotation_issues`` in the metrics (per kind, how many image ids) and in the provenance (per kind, the first
    ``ISSUE_IDS_KEPT`` of them)."""
    counts, kept = {}, {}
    for kind, groups in issues.items():
        ids = [i for group in groups for i in group]
        counts[kind], kept[kind] = len(ids), ids[:ISSUE_IDS_KEPT]
    return counts, kept


def annotation_issues(
    records: list[SourceRecord], files: dict[str, Path], splits: dict[str, str], digests: dict[str, str],
    from_reader: dict[str, list[str]],
) -> dict[str, list[tuple[str, ...]]]:
    """Every kind of :data:`ISSUES` -> the image ids concerned, in groups (ids showing one image) or alone.

    ``files``: each manifest path's file, symlinks resolved (:func:`_checked_records`); ``digests``: a key of each
    file's bytes, equal for byte-identical files only (:func:`_decode_all`); ``from_reader``: the reader's own issues.
    """
    by_file: dict[Path, list[SourceRecord]] = defaultdict(list)
    for r in records:
        by_file[files[r.path]].append(r)
    by_bytes: dict[str, list[SourceRecord]] = defaultdict(list)
    for group in by_file.values():
        by_bytes[digests[group[0].path]].extend(group)
    same_bytes = [g for g in by_bytes.values() if len(g) > 1]
    boxed = any(r.box is not None for r in records)
    issues: dict[str, list[tuple[str, ...]]] = {
        "same_file_under_several_ids": [tuple(r.image_id for r in g) for g in by_file.values() if len(g) > 1],
        "identical_images_across_splits": [tuple(r.image_id for r in g) for g in same_bytes if len({splits[r.image_id] for r in g}) > 1],
        "identical_images_with_different_classes": [tuple(r.image_id for r in g) for g in same_bytes if len({r.class_name for r in g}) > 1],
        "images_without_box": [(r.image_id,) for r in records if r.box is None] if boxed else [],
        "annotation_lines_without_image": [],
    }
    for kind, ids in from_reader.items():
        issues[kind] = issues.get(kind, []) + [(i,) for i in ids]
    return issues


def _named(items: Iterable[str], limit: int = 10) -> str:
    """The first ``limit`` items, comma-separated and markup-escaped, then how many more."""
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return escape(", ".join(items[:limit])) + more


def _refuse_repeated_classes(root: Path, listing: SourceListing) -> None:
    """Refuse a class list naming one class twice: the two classes would merge into one label. The readers that can
    refuse it themselves do; this guards every reader, naming both places (``listing.class_origins``) when known."""
    origins = listing.class_origins if len(listing.class_origins) == len(listing.classes) else []
    first: dict[str, int] = {}
    for i, name in enumerate(listing.classes):
        j = first.setdefault(name, i)
        if j == i:
            continue
        where = (
            f"{origins[i]}: class {name!r} is listed again (first at {origins[j]})" if origins
            else f"the class list read from {root} holds {name!r} twice (entries {j + 1} and {i + 1})"
        )
        raise DatasetError(f"{where}: two classes would become one label. Give each class its own name, or list it once")


def _require_two_classes(root: Path, records: list[SourceRecord], dataset: str, skipped: int = 0) -> None:
    """Refuse a dataset whose images are all of one class: any network scores 100% on it, a silent wrong result."""
    present = sorted({r.class_name for r in records})
    if len(present) >= 2:
        return
    name = f"dataset `{dataset}` ({root})" if dataset else f"the dataset under {root}"
    after = f" once the {skipped} unreadable image(s) are skipped" if skipped else ""
    raise DatasetError(
        f"{name} has images of {len(present)} class only{after} ({', '.join(present)}): classification needs at least "
        "2 classes, and with one every prediction is right whatever the network learns. Add the images of the other "
        "classes (or point the dataset's root at the complete dataset)"
    )


def _checked_records(root: Path, records: list[SourceRecord]) -> tuple[list[SourceRecord], dict[str, Path]]:
    """The records with their paths normalised, and each path's file with symlinks resolved (checked to lie inside
    ``root``); refuses a repeated id, an unknown split, a path escaping ``root`` and every missing file at once.

    A path that is a symbolic link loop resolves nowhere: it is kept as it is, and decoding it fails like any other
    unreadable image (listed, or skipped with ``skip_bad``)."""
    if not records:
        raise DatasetError(f"the annotation files under {root} list no images")
    seen: dict[str, str] = {}
    missing = []
    out = []
    files: dict[str, Path] = {}
    for r in records:
        if r.image_id in seen:
            raise DatasetError(f"{r.origin or root}: image id {r.image_id!r} is listed twice (first at {seen[r.image_id]})")
        seen[r.image_id] = r.origin or r.path
        if r.split not in SPLITS:
            raise DatasetError(f"{r.origin or root}: split must be one of {', '.join(SPLITS)}, got {r.split!r}")
        rel = safe_relpath(root, r.path, r.origin or str(root))
        try:
            full = (root / rel).resolve()
        except (RuntimeError, OSError):  # a symlink loop (RuntimeError up to Python 3.12, OSError ELOOP after)
            full = None
        if full is None:
            full = root / rel  # opening it fails with ELOOP: an unreadable image
        elif not full.is_relative_to(root.resolve()):
            raise DatasetError(f"{r.origin or root}: path {r.path!r} resolves outside the dataset root {root}")
        elif not full.is_file():
            what = " (a folder, not an image file)" if full.is_dir() else ""
            missing.append(f"{root / rel}{what}" + (f" (listed at {r.origin})" if r.origin else ""))
        out.append(r if rel == r.path else SourceRecord(r.image_id, rel, r.class_name, r.split, r.box, r.origin))
        files[rel] = full
    if missing:
        shown = "\n  ".join(missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DatasetError(f"{len(missing)} listed image file(s) do not exist:\n  {shown}{more}")
    return out, files


def _decode_all(
    root: Path, records: list[SourceRecord], files: dict[str, Path], verify: bool, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[dict[str, tuple[int, int]], dict[str, str], list[tuple[str, str]]]:
    """Sizes of every image (decoding each when ``verify``), a key of each file's bytes, and the unreadable ones
    with the reason.

    An image declaring more than ``max_pixels`` pixels is unreadable (before any decoding). The key is equal for
    byte-identical files only: byte-identical files have equal byte sizes, so only files whose size another file
    (``files``: each path's file, resolved) shares are hashed (SHA-256); every other file's key is its unique size.
    Without ``verify`` only the headers and the sizes are read, not the whole dataset.
    """
    sizes: dict[str, tuple[int, int]] = {}
    nbytes: dict[str, int] = {}
    bad: list[tuple[str, str]] = []

    def one(rel: str) -> tuple[str, tuple[int, int] | None, str | int]:
        try:
            return rel, image_size(root / rel, verify, max_pixels), files[rel].stat().st_size
        except DECODE_ERRORS as exc:  # PIL's errors for a corrupt, truncated, unknown or too large file
            return rel, None, f"{type(exc).__name__}: {exc}"

    with progress() as bar, ThreadPoolExecutor(max_workers=2) as pool:
        task = bar.add_task("decoding images" if verify else "reading image sizes", total=len(records))
        for rel, size, found in pool.map(one, [r.path for r in records]):
            if size is None:
                bad.append((rel, str(found)))
            else:
                sizes[rel], nbytes[rel] = size, int(found)
            bar.advance(task)

    by_size: dict[int, set[Path]] = defaultdict(set)  # byte size -> the distinct files of that size
    for rel, n in nbytes.items():
        by_size[n].add(files[rel])
    shared = sorted({f for same in by_size.values() if len(same) > 1 for f in same})
    hashed: dict[Path, str] = {}
    if shared:
        with progress() as bar, ThreadPoolExecutor(max_workers=2) as pool:
            task = bar.add_task("hashing files of equal byte size", total=len(shared))
            for path, digest in zip(shared, pool.map(file_sha256, shared)):
                hashed[path] = digest
                bar.advance(task)
    digests = {rel: hashed.get(files[rel], f"{n} bytes") for rel, n in nbytes.items()}
    return sizes, digests, bad


def clip_annotation(box: Box, width: int, height: int) -> tuple[Box | None, bool]:
    """Clip a ground-truth box of the annotations to its image: (the box, whether it changed); (None, True) when
    nothing of it is left inside."""
    x0, y0, x1, y1 = box
    c = (min(max(x0, 0.0), width), min(max(y0, 0.0), height), min(max(x1, 0.0), width), min(max(y1, 0.0), height))
    clipped = c != (x0, y0, x1, y1)
    if c[2] - c[0] <= 0 or c[3] - c[1] <= 0:
        return None, True
    return c, clipped


def carve_val(records: list[SourceRecord], label_of: dict[str, int], fraction: float, seed: int) -> dict[str, str]:
    """Final split per image id: a stratified share of each class's train images becomes val.

    Datasets that ship an official val split keep it (their records already say ``val``). Per class,
    round(fraction * n) images (at least 1 when the class has 2 or more) move to val, chosen by a
    seeded permutation of the ids in sorted order, so the split is the same on every machine.
    """
    split = {r.image_id: r.split for r in records}
    if any(r.split == "val" for r in records):
        return split
    by_class: dict[int, list[str]] = defaultdict(list)
    for r in records:
        if r.split == "train":
            by_class[label_of[r.class_name]].append(r.image_id)
    rng = np.random.default_rng(seed)
    for label in sorted(by_class):
        ids = sorted(by_class[label])
        n_val = int(round(fraction * len(ids)))
        if len(ids) >= 2:
            n_val = min(max(n_val, 1), len(ids) - 1)
        else:
            n_val = 0
        for i in rng.permutation(len(ids))[:n_val]:
            split[ids[i]] = "val"
    return split
