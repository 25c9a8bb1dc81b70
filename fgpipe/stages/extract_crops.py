"""Stage `extract-crops`: object boxes from the heatmaps and MPALM part boxes (METHODS.md sections 4-5).

Reads:  data/NAME/manifest.csv, data/NAME/dataset.json, the images (from data/NAME/images.h5 when prepare
        built it), data/NAME/attention.h5 and the stage-1 checkpoint it was made from (named in its
        provenance, checked by SHA-256); params `crops`.
Writes: data/NAME/crops.h5 (one row per manifest image, in manifest order; see fgpipe/h5schema.py),
        data/NAME/crops_preview.png, metrics/NAME/extract_crops.json and extract_crops.provenance.json,
        metrics/NAME/localization.json and metrics/NAME/localization/METHOD.csv (one per stored method, for
        ``dvc plots``); all renamed into place together at the end (:func:`fgpipe.store.replaced_together`).
        crops.h5 records the SHA-256 of the manifest, attention.h5 and the stage-1 checkpoint;
        extract_crops.provenance.json that of crops.h5 (``sources.crops_sha256``: evaluate takes the
        localisation figures of extract_crops.json only for that file).

The stage reads no `attention` params: the method, the checkpoint and the input size all come from
attention.h5, so changing ``crops.threshold`` reruns only this stage and what follows it.

First, from the stored heatmaps alone (no network): the localisation of every method attention.h5 holds, at
every threshold of ``crops.thresholds``, on train, val and test (``fgpipe.localize.sweep``; the boxes only
measure). ``crops.threshold: auto`` takes the grid value with the best train+val localisation of the
selected method (attention.h5's ``method``); test never chooses anything.

Per batch of ``crops.batch_size`` images: object boxes (threshold ``crops.threshold`` of each heatmap's
max, largest 8-connected component, cell edges to original pixels; an empty heatmap gives the whole image
and counts as a fallback); then each object crop, cut from the image (or its cached copy) and resized to the
stage-1 input size, goes through the stage-1 backbone (no grad) and MPALM turns its feature map into part
boxes, stored in original-image pixels. Crops are never stored as images.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from fgpipe import __version__
from fgpipe.config import CropsConfig, Settings
from fgpipe.console import console
from fgpipe.crop_parts import parts_of
from fgpipe.errors import ArtifactError
from fgpipe.figures import save_png
from fgpipe.h5schema import AttentionReader, AttentionRecords, CropsMeta, CropsReader, CropsWriter
from fgpipe.imagecache import ImageCache, open_image_cache
from fgpipe.layout import DataDir
from fgpipe.lineage import check_attention, check_params, params_record, read_dataset_info
from fgpipe.loader import LoadRequest, check_image_files, prefetched
from fgpipe.localize import ObjectBoxes, PartBoxes, object_boxes, paired_iou
from fgpipe.localize.sweep import IOU_HIT, localization_report, localization_sweep, resolve_threshold, write_curves
from fgpipe.manifest import ManifestRow, read_manifest
from fgpipe.preview import load_samples, preview_indices, render
from fgpipe.runtime import configure_threads
from fgpipe.sharding import in_order, main_progress, ranks, share
from fgpipe.stage1_network import load_checked_stage1, stage1_input_size
from fgpipe.store import FileHashes, StageRecord, check_output_paths, file_sha256, pending, replaced_together, write_json, write_record
from fgpipe.training import Runtime

STAGE = "extract_crops"


def object_boxes_of(records: AttentionRecords, rows: Sequence[ManifestRow], threshold: float) -> ObjectBoxes:
    """Section-4 object boxes of a batch, in original pixels of each image's manifest area."""
    wh = np.array([[r.width, r.height] for r in rows], dtype=np.float64)  # (B, 2)
    return object_boxes(records.heatmaps, threshold, wh)


def batches_with_boxes(
    attention: AttentionReader,
    rows: Sequence[ManifestRow],
    root: Path,
    cfg: CropsConfig,
    cache: ImageCache | None = None,
    threshold: float | None = None,
) -> Iterator[tuple[tuple[slice, AttentionRecords, ObjectBoxes], list[LoadRequest]]]:
    """Per batch: (rows slice, its attention records, its object boxes) and the crop regions to decode (from ``cache``
    when given). ``threshold``: the object threshold (None: ``cfg.threshold``, which must then be a number)."""
    if threshold is None:
        if cfg.threshold == "auto":
            raise ValueError("crops.threshold is auto: pass the threshold resolve_threshold chose")
        threshold = float(cfg.threshold)
    for start in range(0, len(rows), cfg.batch_size):
        sl = slice(start, min(start + cfg.batch_size, len(rows)))
        records = attention.read(sl.start, sl.stop)
        boxes = object_boxes_of(records, rows[sl], threshold)
        requests = [LoadRequest(root / r.path, tuple(float(v) for v in b), cache) for r, b in zip(rows[sl], boxes.boxes, strict=True)]
        yield (sl, records, boxes), requests


def run(settings: Settings, dataset: str) -> StageRecord:
    """Object and part boxes for every image; return the metrics and provenance (also written to
    metrics/NAME/extract_crops.json and extract_crops.provenance.json). Under torchrun each rank computes the parts
    of its share of the batches and rank 0 writes (:mod:`fgpipe.sharding`)."""
    configure_threads()
    with ranks() as rt, replaced_together():  # crops.h5, the preview, the localisation files and the metrics together
        return _run(settings, dataset, rt)


def _run(settings: Settings, dataset: str, rt: Runtime) -> StageRecord:
    t_start = time.perf_counter()
    cfg = settings.params.crops
    settings.dataset(dataset)  # a clear error for an unknown dataset name
    layout = settings.layout(dataset)
    data, out = layout.data, layout.metrics
    check_output_paths(
        [data.crops, data.crops_preview, out.stage(STAGE), out.provenance(STAGE), out.localization], [out.localization_curves]
    )
    rows = read_manifest(data.manifest)
    info = read_dataset_info(settings, dataset)
    root = info.root
    if not data.attention.is_file():
        raise ArtifactError(
            f"attention file not found: {data.attention} (run `fgpipe extract-attention --dataset {dataset}` first)"
        )
    sha = FileHashes()  # each input hashed once
    manifest_sha = sha(data.manifest)
    attention_sha = sha(data.attention)
    device = rt.device

    n = len(rows)
    boxes = np.zeros((n, 4), dtype=np.float64)
    fallback = np.zeros(n, dtype=bool)
    part_total = 0
    with AttentionReader(data.attention) as attention:
        checkpoint = check_attention(attention, data.path, dataset, sha, required=True)
        check_params(data.attention, attention.meta.provenance.get("params"), settings, "extract-attention", dataset)
        if attention.image_ids() != [r.image_id for r in rows]:
            raise ArtifactError(
                f"{data.attention} does not hold the images of {data.manifest} in its order: "
                f"rerun `fgpipe extract-attention --dataset {dataset}`"
            )
        # localisation of every stored method x threshold x split, from the heatmaps alone; auto picks on train+val
        sweeps = localization_sweep(attention, rows, cfg.thresholds)
        threshold, source = resolve_threshold(cfg.threshold, sweeps[attention.meta.method])
        report = localization_report(sweeps, attention.meta.method, threshold, source)
        model, state = load_checked_stage1(checkpoint, manifest_sha, dataset, device, settings)
        size = stage1_input_size(state)
        cache = open_image_cache(data.images, root, manifest_sha, dataset)
        check_image_files(info, rows, cache, dataset, data.manifest)  # a missing or replaced file: stop before writing
        # the preview (written after crops.h5) draws its images from the files, cache or not
        check_image_files(info, [rows[i] for i in preview_indices(rows, cfg.preview_images)], None, dataset, data.manifest)
        meta = CropsMeta(
            method=attention.meta.method,
            threshold=threshold,
            attention_sha256=attention_sha,
            manifest_sha256=manifest_sha,
            checkpoint_sha256=sha(checkpoint),
            provenance={
                "dataset": dataset,
                "checkpoint": str(checkpoint),
                "threshold_param": cfg.threshold,
                "threshold_source": source,
                "input_size": size,
                "part_top_k": cfg.part_top_k,
                "part_sizes": list(cfg.part_sizes),
                "part_nms_iou": cfg.part_nms_iou,
                "max_parts": cfg.max_parts,
                "part_nms": "per pyramid side",
                "params": params_record(settings, "extract-crops", dataset),  # compared by the stages reading the file
                "fgpipe_version": __version__,
                **settings.provenance(),
            },
        )
        t0 = time.perf_counter()
        total = -(-n // cfg.batch_size)  # batches

        # every batch's object boxes, computed once: the loop below reads them all, this rank's share also goes to
        # the network (tee keeps the few batches one reader is ahead of the other)
        jobs, to_compute = itertools.tee(batches_with_boxes(attention, rows, root, cfg, cache, threshold))

        def computed() -> Iterator[PartBoxes]:  # this rank's share of the batches
            for (_, records, obj), crops in prefetched(share(to_compute, rt), (size, size)):
                yield parts_of(model, crops, obj.boxes, size, cfg, device, names=records.image_ids, checkpoint=checkpoint, dataset=dataset)

        with contextlib.ExitStack() as stack, main_progress(rt, "object boxes + MPALM parts", n) as bar:
            writer = stack.enter_context(CropsWriter(data.crops, meta, cfg.max_parts)) if rt.is_main else None
            for ((sl, records, obj), _), parts in zip(jobs, in_order(computed(), total, rt), strict=True):
                if writer is not None:
                    writer.append(records.image_ids, obj.boxes, obj.scores, obj.fallback, parts.boxes, parts.scores, parts.counts)
                boxes[sl], fallback[sl] = obj.boxes, obj.fallback
                part_total += int(parts.counts.sum())
                bar.advance(sl.stop - sl.start)
        seconds = time.perf_counter() - t0
        method = attention.meta.method

    fallback_rate = float(fallback.mean()) if n else 0.0
    located = localization(rows, boxes)
    metrics = {
        "threshold": threshold,
        # test images against their ground-truth boxes; null when the dataset has no boxes
        "localization": None if located is None else {**located, "fallback_rate": fallback_rate},
        "fallback_rate": fallback_rate,  # over every image, also when there is no localisation to report
        "images": n,
        "parts_per_image": round(part_total / n, 4) if n else 0.0,
        "images_per_s": round(n / seconds, 2) if seconds > 0 else None,
        "input_size": size,
    }
    provenance = {
        "method": method,
        "threshold_source": source,  # params | auto (best train+val localisation on crops.thresholds) | auto-fallback
        "device": str(device),
        "world_size": rt.world_size,  # processes (torchrun ranks) that computed the parts
    }
    if not rt.is_main:  # rank 0 writes
        return settings.record(dataset, {**metrics, "seconds": round(time.perf_counter() - t_start, 3)}, provenance)
    provenance["sources"] = {"crops_sha256": file_sha256(pending(data.crops))}  # the crops.h5 these figures describe
    write_curves(out.localization_curves, sweeps)
    write_preview(data, rows, root, dataset, cfg, method, threshold)
    write_json(out.localization, {"dataset": dataset, **report})
    metrics["seconds"] = round(time.perf_counter() - t_start, 3)
    record = settings.record(dataset, metrics, provenance)
    write_record(out, STAGE, record)
    console.print(f"wrote {data.crops}, {data.crops_preview} and {out.localization}", highlight=False)
    return record


def localization(rows: Sequence[ManifestRow], boxes: np.ndarray) -> dict[str, float | int] | None:
    """Accuracy (share with IoU >= 0.5) and mean IoU of the object boxes over test images with a ground-truth box.

    None when no test image has a box (the dataset has none).
    """
    idx = [i for i, r in enumerate(rows) if r.split == "test" and r.box is not None]
    if not idx:
        return None
    gt = np.array([rows[i].box for i in idx], dtype=np.float64)  # (T, 4)
    iou = paired_iou(boxes[idx], gt)  # (T,) each box against its own ground truth
    return {"accuracy": float((iou >= IOU_HIT).mean()), "mean_iou": float(iou.mean()), "images": len(idx)}


def write_preview(
    data: DataDir,
    rows: Sequence[ManifestRow],
    root: Path,
    dataset: str,
    cfg: CropsConfig,
    method: str,
    threshold: float,
) -> Path:
    """data/NAME/crops_preview.png: ``crops.preview_images`` test images, class by class (``preview_indices``)."""
    indices = preview_indices(rows, cfg.preview_images)
    title = (
        f"{dataset}: {method} heatmaps, object threshold {threshold:g}, "
        f"MPALM parts ({len(indices)} test images, class by class)"
    )
    with AttentionReader(data.attention) as attention, CropsReader(pending(data.crops)) as crops:  # this run's
        samples = load_samples(rows, indices, root, attention, crops)
    return save_png(render(samples, title), data.crops_preview)
