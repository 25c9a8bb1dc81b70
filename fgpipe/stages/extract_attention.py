"""Stage `extract-attention`: heatmaps of the stage-1 network for every image (METHODS.md section 3).

Reads:  data/NAME/manifest.csv, data/NAME/dataset.json, the images (from data/NAME/images.h5 when prepare
        built it), data/NAME/stage1/{best,last}.pt (``attention.checkpoint``); params `attention`.
Writes: data/NAME/attention.h5 (one row per manifest image, in manifest order; see fgpipe/h5schema.py),
        metrics/NAME/extract_attention.json and extract_attention.provenance.json; all renamed into place together at the end
        (:func:`fgpipe.store.replaced_together`). A checkpoint whose network gives NaN or infinite heatmaps or
        logits (diverged) is refused, naming the images.

Besides ``attention.method`` (recorded as the file's ``method``, the one extract-crops cuts crops from), the
file stores the heatmaps of every other method the checkpoint supports on the same grid, from the same
forward pass (Grad-CAM and Grad-CAM++ share the backward; AOLM and BAP need none; BAP only with the WS-DAN
head), so extract-crops and ``fgpipe localize`` can compare their localisation without a network pass. The
logits stored are those of the classifier the gradient methods explain (``attention.score``).

Every image is the manifest's area (0, 0, width, height) resized to the checkpoint's input size on both
sides (no centre crop), so heatmap cell j spans ``[j * W / w, (j + 1) * W / w)`` of the original width,
the convention the box extraction relies on. Images are decoded batch by batch (the next batch while the
current one runs), so memory stays flat however large the dataset is; each batch costs one forward and,
for gradient methods, one backward.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from fgpipe import __version__
from fgpipe.attention import HeatmapMethod, HeatmapSet, companion_methods, create_method
from fgpipe.attention import heatmaps_of as method_heatmaps
from fgpipe.checkpoints import require_finite
from fgpipe.config import Settings
from fgpipe.console import console
from fgpipe.errors import ArtifactError
from fgpipe.h5schema import AttentionMeta, AttentionWriter
from fgpipe.imagecache import open_image_cache
from fgpipe.lineage import params_record, read_dataset_info
from fgpipe.loader import LoadRequest, batched, check_image_files, normalize, prefetched
from fgpipe.manifest import ManifestRow, read_manifest
from fgpipe.runtime import configure_threads
from fgpipe.sharding import in_order, main_progress, ranks, share
from fgpipe.stage1_network import load_checked_stage1, stage1_input_size
from fgpipe.store import StageRecord, check_output_paths, file_sha256, replaced_together, write_record
from fgpipe.training import Runtime

STAGE = "extract_attention"


# --------------------------------------------------------------------------- the stage
def run(settings: Settings, dataset: str) -> StageRecord:
    """Heatmaps for every image of every split; return the metrics and provenance (also written to
    metrics/NAME/extract_attention.json and extract_attention.provenance.json). Under torchrun each rank computes
    its share of the batches and rank 0 writes (:mod:`fgpipe.sharding`)."""
    configure_threads()
    with ranks() as rt, replaced_together():  # attention.h5 and the metrics file change together, or not at all
        return _run(settings, dataset, rt)


def _run(settings: Settings, dataset: str, rt: Runtime) -> StageRecord:
    t_start = time.perf_counter()
    cfg = settings.params.attention
    settings.dataset(dataset)  # a clear error for an unknown dataset name
    layout = settings.layout(dataset)
    data, checkpoint = layout.data, layout.data.stage1(cfg.checkpoint)
    check_output_paths([data.attention, layout.metrics.stage(STAGE), layout.metrics.provenance(STAGE)])
    rows = read_manifest(data.manifest)
    if not rows:
        raise ArtifactError(f"{data.manifest}: lists no images (rerun `fgpipe prepare --dataset {dataset}`)")
    info = read_dataset_info(settings, dataset)
    root = info.root
    manifest_sha = file_sha256(data.manifest)
    device = rt.device
    model, state = load_checked_stage1(checkpoint, manifest_sha, dataset, device, settings)
    size = cfg.input_size or stage1_input_size(state)  # 0: the size stage 1 was trained at
    method = create_method(cfg.method, model, score=cfg.score)
    methods = companion_methods(method)  # every method the checkpoint supports on this grid, one pass for all
    names = [m.name for m in methods]
    with torch.no_grad():
        probe = model.features(torch.zeros(1, 3, size, size, device=device))[method.layer]  # (1, C, h, w): the grid
    grid = (int(probe.shape[-2]), int(probe.shape[-1]))

    meta = AttentionMeta(
        method=cfg.method,
        methods=tuple(names),
        layer=method.layer,
        input_size=size,
        checkpoint_sha256=file_sha256(checkpoint),
        manifest_sha256=manifest_sha,
        provenance={
            "dataset": dataset,
            "checkpoint": cfg.checkpoint,
            "checkpoint_path": str(checkpoint),
            "target": cfg.target,
            "flip": cfg.flip,
            "score": method.score,
            "batch_size": cfg.batch_size,
            "params": params_record(settings, "extract-attention", dataset),  # compared by the stages reading the file
            "fgpipe_version": __version__,
            **settings.provenance(),
        },
    )
    row_batches = batched(rows, cfg.batch_size)
    cache = open_image_cache(data.images, root, manifest_sha, dataset)
    check_image_files(info, rows, cache, dataset, data.manifest)  # a missing or replaced file: stop before writing
    jobs = [(b, [LoadRequest(root / r.path, (0.0, 0.0, float(r.width), float(r.height)), cache) for r in b]) for b in row_batches]

    def computed() -> Iterator[HeatmapSet]:  # this rank's share of the batches, each checked, on the CPU
        for batch_rows, images in prefetched(share(jobs, rt), (size, size)):
            out = heatmaps_of(methods, images, batch_rows, cfg.target, device, cfg.flip)
            ids = [r.image_id for r in batch_rows]
            require_finite(out.logits, ids, "logits", checkpoint, "stage1", dataset)
            for name, maps in out.heatmaps.items():
                require_finite(maps, ids, f"`{name}` heatmaps", checkpoint, "stage1", dataset)
            yield HeatmapSet({k: v.cpu() for k, v in out.heatmaps.items()}, out.logits.cpu(), out.predictions.cpu())

    predictions = np.empty(len(rows), dtype=np.int64)
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack, main_progress(rt, f"{' + '.join(names)} heatmaps", len(rows)) as bar:
        writer = stack.enter_context(AttentionWriter(data.attention, meta, grid, len(state["class_names"]))) if rt.is_main else None
        done = 0
        for (batch_rows, _), out in zip(jobs, in_order(computed(), len(jobs), rt), strict=True):
            if writer is not None:
                writer.append(
                    [r.image_id for r in batch_rows], [r.label for r in batch_rows],
                    out.heatmaps, out.logits, out.predictions,
                )
            predictions[done : done + len(batch_rows)] = out.predictions.numpy()
            done += len(batch_rows)
            bar.advance(len(batch_rows))
    seconds = time.perf_counter() - t0

    labels = np.array([r.label for r in rows])
    test = np.array([r.split == "test" for r in rows])
    metrics = {
        "input_size": size,
        "images": len(rows),
        "images_per_s": round(len(rows) / seconds, 2) if seconds > 0 else None,
        "seconds": round(time.perf_counter() - t_start, 3),
        # predictions of the explained classifier stored with the heatmaps (no test-time refinement): a sanity figure
        "stage1_test_top1": float((predictions[test] == labels[test]).mean()) if test.any() else None,
    }
    record = settings.record(dataset, metrics, {
        "method": cfg.method,
        "methods": names,  # every method stored in attention.h5
        "layer": method.layer,
        "target": cfg.target,
        "flip": cfg.flip,
        "score": method.score,  # the classifier explained, whose logits and predictions are stored
        "checkpoint": cfg.checkpoint,
        "heatmap_size": list(grid),
        "device": str(device),
        "world_size": rt.world_size,  # processes (torchrun ranks) that computed the heatmaps
    })
    if rt.is_main:
        write_record(layout.metrics, STAGE, record)
        console.print(f"wrote {data.attention} ({len(rows)} images)", highlight=False)
    return record


def heatmaps_of(
    methods: Sequence[HeatmapMethod], images: Tensor, rows: Sequence[ManifestRow], target: str, device: torch.device,
    flip: bool = False,
) -> HeatmapSet:
    """One batch of uint8 images (B, 3, S, S) -> every method's heatmaps, one forward pass (two with ``flip``)."""
    x = normalize(images.to(device))  # (B, 3, S, S) float32
    targets = torch.tensor([r.label for r in rows], device=device) if target == "true" else None
    return method_heatmaps(methods, x, targets, flip=flip)
