"""Localisation of stored heatmaps over a grid of object thresholds, per split, without a network pass.

For every method stored in attention.h5, every threshold T of a grid and every split (train, val, test),
the object boxes of METHODS.md section 4 are compared with the manifest's ground-truth boxes: the share of
images whose box has IoU >= 0.5 (``accuracy``) and the mean IoU. The boxes only *measure*: nothing is trained
on them; ``crops.threshold: auto`` picks the grid value with the best train+val localisation of the selected
method (:func:`choose_threshold`), never looking at test.

:func:`boxes_over_thresholds` is the vectorised form of :func:`fgpipe.localize.boxes.object_boxes` for a
whole grid: the T x N masks are laid out as one mosaic, each map followed by an empty row (so no 8-connected
component crosses from one map to the next), labelled by ONE ``skimage.measure.label`` call, and the
largest component of each map is picked with array operations (same ties: the one holding the max, then
the lowest label, i.e. the first in raster order). AOLM's stored heatmap is the indicator of its box, so
its boxes do not depend on T: it is reported once (threshold ``any``).
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from skimage.measure import label as label_components
from torch import Tensor

from fgpipe.h5schema import AttentionReader
from fgpipe.localize.boxes import _as_numpy, _check_threshold, paired_iou
from fgpipe.manifest import ManifestRow
from fgpipe.store import atomic_path, output_error, remove_output

SPLITS = ("train", "val", "test")
CHOICE_SPLITS = ("train", "val")  # where crops.threshold auto is chosen: never test
IOU_HIT = 0.5  # an image is localised when its object box has IoU >= this with the ground truth
FALLBACK_THRESHOLD = 0.2  # auto without train/val boxes: METHODS.md section 4's default ("20% of the maximum")
THRESHOLD_FREE = frozenset({"aolm"})  # methods whose stored heatmap gives the same box at every threshold
ANY = "any"  # the threshold key of a threshold-free method
_MOSAIC_CELLS = 4_000_000  # cells labelled per skimage call (bounds memory: ~8 bytes per cell)


class GridBoxes(NamedTuple):
    """Object boxes of N heatmaps at each of T thresholds."""

    boxes: np.ndarray  # (T, N, 4) float64 (x0, y0, x1, y1) in original-image pixels
    fallback: np.ndarray  # (N,) bool: all-zero heatmap, the box is the whole image (at every threshold)


def boxes_over_thresholds(
    heatmaps: np.ndarray | Tensor, thresholds: Sequence[float], image_wh: np.ndarray | Tensor
) -> GridBoxes:
    """Section-4 object boxes of ``heatmaps`` (N, H, W) at every threshold (T,); ``image_wh`` (N, 2) original (W, H).

    Equal, box for box, to :func:`fgpipe.localize.object_boxes` run once per threshold.
    """
    maps = _as_numpy(heatmaps)
    sizes = _as_numpy(image_wh)
    grid = np.asarray(list(thresholds), dtype=np.float64)
    if maps.ndim != 3 or sizes.shape != (maps.shape[0], 2) or grid.ndim != 1 or grid.size == 0:
        raise ValueError(
            f"expected heatmaps (N, H, W), image_wh (N, 2) and a non-empty list of thresholds, "
            f"got {maps.shape}, {sizes.shape} and {grid.shape}"
        )
    for t in grid:
        _check_threshold(float(t))
    if not np.isfinite(maps).all():
        raise ValueError("heatmaps contain NaN or infinite values (the model that made them has probably diverged)")
    if (sizes <= 0).any():
        raise ValueError("image sizes must be positive")
    n, h, w = maps.shape
    boxes = np.zeros((grid.size, n, 4), dtype=np.float64)
    step = max(1, _MOSAIC_CELLS // (grid.size * (h + 1) * w))
    for start in range(0, n, step):
        sl = slice(start, min(start + step, n))
        boxes[:, sl] = _grid_boxes(maps[sl], grid, sizes[sl])
    return GridBoxes(boxes, maps.max(axis=(1, 2)) <= 0)


def _grid_boxes(maps: np.ndarray, grid: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """:func:`boxes_over_thresholds` for one chunk that fits a mosaic: (T, n, 4)."""
    n, h, w = maps.shape
    t = grid.size
    k = t * n
    peak = maps.max(axis=(1, 2))  # (n,)
    empty = peak <= 0  # all zero (heatmaps are non-negative): whole image
    norm = maps / np.where(empty, 1.0, peak)[:, None, None]  # (n, H, W), max exactly 1 unless empty
    masks = norm[None] >= grid[:, None, None, None]  # (T, n, H, W)
    masks[:, empty] = False
    canvas = np.zeros((k, h + 1, w), dtype=bool)  # an empty row below every map keeps components apart
    canvas[:, :h] = masks.reshape(k, h, w)
    labels = label_components(canvas.reshape(k * (h + 1), w), connectivity=2)  # 8-connectivity, raster order
    labels = labels.reshape(k, h + 1, w)[:, :h].reshape(k, h * w)  # (K, H*W), map k = threshold k // n, image k % n
    count = int(labels.max())
    box = np.zeros((k, 4), dtype=np.float64)
    if count:
        on = labels > 0
        owner = np.zeros(count + 1, dtype=np.int64)  # label -> the map (k) it lies in
        owner[labels[on]] = np.nonzero(on)[0]
        area = np.bincount(labels[on], minlength=count + 1)  # (count + 1,)
        holds = np.zeros(count + 1, dtype=bool)  # label holds the map's max (normalised value exactly 1)
        at_peak = np.broadcast_to((norm == 1.0).reshape(1, n, h * w), (t, n, h * w)).reshape(k, h * w)
        holds[labels[on & at_peak]] = True
        ids = np.arange(1, count + 1)
        # per map, the last after sorting by (map, area, holds the max, -label): the largest component, ties
        # to the one holding the max, then to the lowest label (first in raster order), as largest_component
        order = np.lexsort((-ids, holds[1:], area[1:], owner[1:]))
        maps_sorted = owner[1:][order]
        last = np.r_[maps_sorted[1:] != maps_sorted[:-1], True]
        chosen = np.zeros(k, dtype=np.int64)
        chosen[maps_sorted[last]] = ids[order][last]
        kept = (labels == chosen[:, None]) & (chosen[:, None] > 0)  # (K, H*W)
        kept = kept.reshape(k, h, w)
        rows, cols = kept.any(axis=2), kept.any(axis=1)  # (K, H), (K, W)
        r0, r1 = rows.argmax(axis=1), h - 1 - rows[:, ::-1].argmax(axis=1)
        c0, c1 = cols.argmax(axis=1), w - 1 - cols[:, ::-1].argmax(axis=1)
        width = np.tile(sizes[:, 0], t)  # (K,)
        height = np.tile(sizes[:, 1], t)
        # cell j of w covers [j * W / w, (j + 1) * W / w) (the same arithmetic as cells_to_pixels)
        box = np.stack([c0 * width / w, r0 * height / h, (c1 + 1) * width / w, (r1 + 1) * height / h], axis=1)
        box = np.clip(box, 0.0, np.stack([width, height, width, height], axis=1))
    whole = np.concatenate([np.zeros((n, 2)), sizes], axis=1)  # (n, 4)
    box = box.reshape(t, n, 4)
    box[:, empty] = whole[empty]
    return box


# --------------------------------------------------------------------------- the sweep over a file
class MethodSweep(NamedTuple):
    """One method's IoU with the ground truth, per threshold and image (images with a box only)."""

    thresholds: tuple[float, ...]  # the grid; a threshold-free method has one row for all of it
    threshold_free: bool
    iou: np.ndarray  # (T, n) float64, T = 1 when threshold_free
    splits: np.ndarray  # (n,) str: each image's split

    def figures(self, splits: Iterable[str]) -> list[dict[str, Any]]:
        """Per row of ``iou``: accuracy (share with IoU >= 0.5), mean IoU and image count over ``splits``."""
        sel = np.isin(self.splits, list(splits))
        count = int(sel.sum())
        if count == 0:
            return [{"accuracy": None, "mean_iou": None, "images": 0} for _ in range(self.iou.shape[0])]
        iou = self.iou[:, sel]  # (T, n_sel)
        hits = (iou >= IOU_HIT).mean(axis=1)
        means = iou.mean(axis=1)
        return [
            {"accuracy": float(a), "mean_iou": float(m), "images": count} for a, m in zip(hits, means, strict=True)
        ]

    def keys(self) -> list[str]:
        """The threshold keys of the rows: ``f"{T:g}"``, or ``any`` for a threshold-free method."""
        return [ANY] if self.threshold_free else [threshold_key(t) for t in self.thresholds]


def threshold_key(t: float) -> str:
    """A threshold as a JSON key: ``0.05`` -> ``"0.05"``."""
    return f"{t:g}"


def localization_sweep(
    attention: AttentionReader, rows: Sequence[ManifestRow], thresholds: Sequence[float], methods: Sequence[str] | None = None
) -> dict[str, MethodSweep]:
    """Every stored method's (or ``methods``') IoU per grid threshold over the images with a ground-truth box.

    ``rows`` is the manifest attention.h5 was made from (one row per file row, same order; checked by the caller).
    """
    if len(rows) != len(attention):
        raise ValueError(f"{attention.path} has {len(attention)} rows, the manifest {len(rows)}")
    grid = tuple(float(t) for t in thresholds)
    idx = np.array([i for i, r in enumerate(rows) if r.box is not None], dtype=np.int64)
    gt = np.array([rows[i].box for i in idx], dtype=np.float64).reshape(-1, 4)  # (n, 4)
    wh = np.array([[rows[i].width, rows[i].height] for i in idx], dtype=np.float64).reshape(-1, 2)
    splits = np.array([rows[i].split for i in idx], dtype=object)
    out: dict[str, MethodSweep] = {}
    for name in methods if methods is not None else attention.methods:
        free = name in THRESHOLD_FREE
        if idx.size:
            maps = attention.method_heatmaps(name)[idx]  # (n, H, W)
            found = boxes_over_thresholds(maps, grid[:1] if free else grid, wh)
            iou = paired_iou(found.boxes, gt)  # (T, n)
        else:
            iou = np.zeros((1 if free else len(grid), 0))
        out[name] = MethodSweep(grid, free, iou, splits)
    return out


def choose_threshold(sweep: MethodSweep, splits: Sequence[str] = CHOICE_SPLITS) -> float | None:
    """The grid threshold with the highest localisation accuracy over the images of ``splits`` (pooled);
    ties: the higher mean IoU, then the lower threshold (the larger box, which cuts less of the object).
    A threshold-free method ties everywhere: the lowest. None when those splits have no box."""
    sel = np.isin(sweep.splits, list(splits))
    if not sel.any():
        return None
    if sweep.threshold_free:
        return sweep.thresholds[0]
    iou = sweep.iou[:, sel]  # (T, n)
    hits = (iou >= IOU_HIT).sum(axis=1)  # counts: exact ties
    means = iou.mean(axis=1)
    index = np.arange(len(sweep.thresholds))
    best = np.lexsort((-index, means, hits))[-1]  # max hits, then max mean IoU, then min index
    return sweep.thresholds[int(best)]


def resolve_threshold(param: float | str, sweep: MethodSweep) -> tuple[float, str]:
    """``crops.threshold`` as a number and where it came from: ``params``, ``auto`` (chosen on train+val) or
    ``auto-fallback`` (no train/val box: :data:`FALLBACK_THRESHOLD`)."""
    if param != "auto":
        return float(param), "params"
    chosen = choose_threshold(sweep)
    return (FALLBACK_THRESHOLD, "auto-fallback") if chosen is None else (chosen, "auto")


def localization_report(
    sweeps: dict[str, MethodSweep], method: str, threshold: float, source: str
) -> dict[str, Any]:
    """The JSON document of metrics/NAME/localization.json: method -> split -> threshold -> figures."""
    grid = next(iter(sweeps.values())).thresholds if sweeps else ()
    return {
        "iou_hit": IOU_HIT,
        "thresholds": list(grid),
        "method": method,  # the selected method (attention.h5's), the one crops are cut from
        "threshold": threshold,
        "threshold_source": source,  # params | auto | auto-fallback
        "chosen_on": list(CHOICE_SPLITS) if source == "auto" else None,
        "threshold_free": sorted(m for m, s in sweeps.items() if s.threshold_free),
        "methods": {
            name: {split: dict(zip(s.keys(), s.figures([split]), strict=True)) for split in SPLITS}
            for name, s in sweeps.items()
        },
    }


def write_curves(folder: Path, sweeps: dict[str, MethodSweep]) -> list[Path]:
    """One CSV per method, ``folder/METHOD.csv``: threshold, then the localisation accuracy on train, val and
    test (empty where a split has no box), for ``dvc plots``. A threshold-free method repeats its one value
    at every grid threshold (a flat reference line). Files of methods no longer stored are removed."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or full metrics folder
        raise output_error(folder, exc, atomic=False) from None
    written = []
    for name, s in sweeps.items():
        per_split = {split: [f["accuracy"] for f in s.figures([split])] for split in SPLITS}
        path = folder / f"{name}.csv"
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            out = csv.writer(fh)
            out.writerow(["threshold", *SPLITS])
            for i, t in enumerate(s.thresholds):
                row = 0 if s.threshold_free else i
                values = [per_split[split][row] for split in SPLITS]
                out.writerow([threshold_key(t), *("" if v is None else f"{v:.6g}" for v in values)])
        written.append(path)
    for stale in folder.glob("*.csv"):
        if stale not in written:
            remove_output(stale)  # with the other outputs (inside replaced_together), or now
    return written

