"""Stage `prepare`: read a dataset in its official layout and write data/NAME/manifest.csv.

Reads:  datasets.NAME and prepare.cache_side (params), the dataset root (or generates the synthetic one).
Writes: data/NAME/manifest.csv, data/NAME/dataset.json, data/NAME/images.h5 (the decoded image cache the
        later stages cut their inputs from, see fgpipe/imagecache.py; empty with cache_side 0),
        metrics/NAME/prepare.json.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from rich.markup import escape

from fgpipe import __version__
from fgpipe.config import DatasetConfig, Settings
from fgpipe.console import console, progress
from fgpipe.datasets import reader
from fgpipe.datasets.base import SourceListing, SourceRecord, safe_relpath
from fgpipe.errors import BadImagesError, DatasetError
from fgpipe.imagecache import build_image_cache
from fgpipe.images import image_size
from fgpipe.manifest import SPLITS, Box, ManifestRow, write_manifest
from fgpipe.store import file_sha256, write_json

STAGE = "prepare"


def run(settings: Settings, dataset: str) -> dict[str, Any]:
    """Prepare one dataset; return its metrics (also written to metrics/NAME/prepare.json)."""
    t0 = time.perf_counter()
    cfg = settings.dataset(dataset)
    root = settings.dataset_root(dataset)
    mod = reader(cfg.kind)

    if cfg.kind == "synthetic":
        mod.generate(root, cfg.options())
    elif not root.exists():
        if not cfg.download:
            raise DatasetError(f"dataset root not found: {root} (datasets.{dataset}.root)\n{mod.HOW_TO_GET}")
        if not hasattr(mod, "download"):
            raise DatasetError(f"{cfg.kind} has no official archive to download: {mod.HOW_TO_GET}")
        console.print(f"downloading {cfg.kind} to {root}")
        mod.download(root)

    listing: SourceListing = mod.read(root, cfg)
    rows, counts = build_rows(root, cfg, listing)

    out_dir = settings.data_dir(dataset)
    write_manifest(out_dir / "manifest.csv", rows)
    classes = sorted({(r.label, r.class_name) for r in rows})
    write_json(
        out_dir / "dataset.json",
        {
            "dataset": dataset,
            "kind": cfg.kind,
            "root": str(root),
            "classes": [name for _, name in classes],
            "crop_bottom": listing.crop_bottom,
            "fgpipe_version": __version__,
            **settings.provenance(),
        },
    )
    cache = build_image_cache(
        out_dir / "images.h5", root, rows, settings.params.prepare.cache_side, file_sha256(out_dir / "manifest.csv"),
        {"dataset": dataset, "root": str(root), "resample": "bilinear (antialiased)", "fgpipe_version": __version__, **settings.provenance()},
    )
    per_split = Counter(r.split for r in rows)
    metrics = {
        "dataset": dataset,
        "kind": cfg.kind,
        "images": {**{s: per_split.get(s, 0) for s in SPLITS}, "total": len(rows)},
        "classes": len(classes),
        "with_box": sum(r.box is not None for r in rows),
        "skipped": counts["skipped"],
        "boxes_clipped": counts["boxes_clipped"],
        "boxes_dropped": counts["boxes_dropped"],
        "classes_without_images": counts["classes_without_images"],
        "classes_without_train_images": counts["classes_without_train_images"],
        "image_cache": cache,
        **{f"reader_{k}": v for k, v in listing.notes.items()},
        "seconds": round(time.perf_counter() - t0, 3),
        **settings.provenance(),
    }
    write_json(settings.metrics_file(dataset, STAGE), metrics)
    return metrics


def build_rows(root: Path, cfg: DatasetConfig, listing: SourceListing) -> tuple[list[ManifestRow], Counter[str]]:
    """Checks shared by every dataset, then labels and the val split."""
    counts: Counter[str] = Counter(
        skipped=0, boxes_clipped=0, boxes_dropped=0, classes_without_images=0, classes_without_train_images=0
    )
    records = _checked_records(root, listing.records)
    sizes, bad = _decode_all(root, records, verify=cfg.verify_images)
    if bad:
        if not cfg.skip_bad:
            raise BadImagesError(str(root), bad)
        console.print(f"[yellow]skipping {len(bad)} unreadable image(s) (skip_bad: true):[/] {_named(p for p, _ in bad)}")
        bad_paths = {p for p, _ in bad}
        records = [r for r in records if r.path not in bad_paths]
        counts["skipped"] = len(bad)
    if not records:
        raise DatasetError(f"no usable images under {root}")

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
            box, clipped = clip_box(box, w, h)
            counts["boxes_clipped"] += clipped
            counts["boxes_dropped"] += box is None
            if clipped:
                clipped_ids.append(r.image_id if box is not None else f"{r.image_id} (dropped: nothing inside)")
        rows.append(ManifestRow(r.image_id, r.path, label_of[r.class_name], r.class_name, splits[r.image_id], w, h, box))
    if clipped_ids:
        console.print(f"{len(clipped_ids)} box(es) reach outside their image and were clipped, image ids: {_named(clipped_ids)}")
    return rows, counts


def _named(items: Iterable[str], limit: int = 10) -> str:
    """The first ``limit`` items, comma-separated and markup-escaped, then how many more."""
    items = list(items)
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return escape(", ".join(items[:limit])) + more


def _checked_records(root: Path, records: list[SourceRecord]) -> list[SourceRecord]:
    if not records:
        raise DatasetError(f"the annotation files under {root} list no images")
    seen: dict[str, str] = {}
    missing = []
    out = []
    for r in records:
        if r.image_id in seen:
            raise DatasetError(f"{r.origin or root}: image id {r.image_id!r} is listed twice (first at {seen[r.image_id]})")
        seen[r.image_id] = r.origin or r.path
        if r.split not in SPLITS:
            raise DatasetError(f"{r.origin or root}: split must be one of {', '.join(SPLITS)}, got {r.split!r}")
        rel = safe_relpath(root, r.path, r.origin or str(root))
        full = (root / rel).resolve()
        if not full.is_relative_to(root.resolve()):
            raise DatasetError(f"{r.origin or root}: path {r.path!r} resolves outside the dataset root {root}")
        if not full.is_file():
            missing.append(f"{root / rel}" + (f" (listed at {r.origin})" if r.origin else ""))
        out.append(r if rel == r.path else SourceRecord(r.image_id, rel, r.class_name, r.split, r.box, r.origin))
    if missing:
        shown = "\n  ".join(missing[:20])
        more = f"\n  ... and {len(missing) - 20} more" if len(missing) > 20 else ""
        raise DatasetError(f"{len(missing)} listed image file(s) do not exist:\n  {shown}{more}")
    return out


def _decode_all(root: Path, records: list[SourceRecord], verify: bool) -> tuple[dict[str, tuple[int, int]], list[tuple[str, str]]]:
    """Sizes of every image (decoding each when ``verify``); undecodable ones listed with the reason."""
    sizes: dict[str, tuple[int, int]] = {}
    bad: list[tuple[str, str]] = []

    def one(rel: str) -> tuple[str, tuple[int, int] | None, str]:
        try:
            return rel, image_size(root / rel, verify), ""
        except (OSError, ValueError, SyntaxError) as exc:  # PIL's errors for corrupt/truncated/unknown files
            return rel, None, f"{type(exc).__name__}: {exc}"

    with progress() as bar, ThreadPoolExecutor(max_workers=2) as pool:
        task = bar.add_task("decoding images" if verify else "reading image sizes", total=len(records))
        for rel, size, why in pool.map(one, [r.path for r in records]):
            if size is None:
                bad.append((rel, why))
            else:
                sizes[rel] = size
            bar.advance(task)
    return sizes, bad


def clip_box(box: Box, width: int, height: int) -> tuple[Box | None, bool]:
    """Clip a box to the image; (None, True) when nothing of it is left inside."""
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
