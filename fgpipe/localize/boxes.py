"""Heatmap -> object box (METHODS.md section 4), box IoU and NMS.

Conventions used throughout fgpipe:

- A box is ``(x0, y0, x1, y1)`` in *continuous pixel-edge* coordinates of the original image: it covers
  ``x0 <= x < x1`` and ``y0 <= y < y1`` (what ``PIL.Image.crop`` takes); the whole image is
  ``(0, 0, W, H)``.
- A heatmap of ``h x w`` feature cells spans the whole image the network saw (the image resized to the
  input size, no centre crop), so feature cell ``j`` covers ``[j * W / w, (j + 1) * W / w)`` of the
  original width (cell *edges*, not centres), and likewise for rows.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import numpy as np
import torch
import torchvision
from skimage.measure import label as label_components
from torch import Tensor

ArrayOrTensor = TypeVar("ArrayOrTensor", np.ndarray, Tensor)


class ObjectBoxes(NamedTuple):
    """Object boxes of a batch of heatmaps."""

    boxes: np.ndarray  # (N, 4) float64 (x0, y0, x1, y1) in original-image pixels
    scores: np.ndarray  # (N,) share of the heatmap's mass inside the kept component; 0 for a fallback
    fallback: np.ndarray  # (N,) bool: all-zero heatmap, the box is the whole image


def _as_numpy(x: np.ndarray | Tensor) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"threshold must be in (0, 1] (a fraction of the heatmap's max), got {threshold!r}")


def largest_component(mask: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (H, W) as a bool mask; ties: the one holding max ``values``.

    Among components of equal largest area, the one containing a cell where ``values`` reaches its maximum
    over ``mask`` wins; if several (or none) do, the first in raster order (lowest skimage label) wins.
    An empty ``mask`` gives an empty result.
    """
    if mask.ndim != 2 or mask.shape != values.shape:
        raise ValueError(f"mask and values must be 2-D of the same shape, got {mask.shape} and {values.shape}")
    labels = label_components(mask, connectivity=2)  # (H, W) int, 0 = background; 8-connectivity
    n = int(labels.max())
    if n == 0:
        return np.zeros(mask.shape, dtype=bool)
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:]  # (n,) area of labels 1..n
    tied = np.flatnonzero(areas == areas.max()) + 1  # labels of the largest components, ascending
    if len(tied) > 1:
        peak = values[mask].max()
        holding = [lab for lab in tied if (values[labels == lab] == peak).any()]
        if holding:
            tied = np.asarray(holding)
    return labels == tied[0]


def cells_to_pixels(
    rows: tuple[int, int], cols: tuple[int, int], grid_hw: tuple[int, int], image_wh: tuple[float, float]
) -> np.ndarray:
    """Map the inclusive cell ranges ``rows = (r0, r1)``, ``cols = (c0, c1)`` to a pixel box by cell edges.

    Cell ``j`` of ``w`` covers ``[j * W / w, (j + 1) * W / w)``; the box is clipped to ``(0, 0, W, H)``.
    """
    h, w = grid_hw
    width, height = float(image_wh[0]), float(image_wh[1])
    box = np.array(
        [cols[0] * width / w, rows[0] * height / h, (cols[1] + 1) * width / w, (rows[1] + 1) * height / h],
        dtype=np.float64,
    )
    return np.clip(box, 0.0, [width, height, width, height])


def _locate(heatmap: np.ndarray, threshold: float, image_wh: tuple[float, float]) -> tuple[np.ndarray, bool, float]:
    """Box, fallback flag and mass score of one heatmap (H, W) (see :func:`object_box`)."""
    if heatmap.ndim != 2:
        raise ValueError(f"heatmap must be 2-D (H, W), got shape {heatmap.shape}")
    if not np.isfinite(heatmap).all():
        raise ValueError("heatmap contains NaN or infinite values (the model that made it has probably diverged)")
    width, height = float(image_wh[0]), float(image_wh[1])
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {image_wh!r}")
    peak = heatmap.max()
    if peak <= 0:  # all zero (heatmaps are non-negative): nothing to localise
        return np.array([0.0, 0.0, width, height]), True, 0.0
    norm = heatmap / peak  # (H, W) in [.., 1]; the max cell is exactly 1 >= threshold
    component = largest_component(norm >= threshold, norm)
    rows = np.flatnonzero(component.any(axis=1))
    cols = np.flatnonzero(component.any(axis=0))
    box = cells_to_pixels((rows[0], rows[-1]), (cols[0], cols[-1]), heatmap.shape, (width, height))
    positive = np.clip(norm, 0.0, None)
    score = float(positive[component].sum() / positive.sum())
    return box, False, score


def object_box(
    heatmap: np.ndarray | Tensor, threshold: float, image_wh: tuple[float, float]
) -> tuple[np.ndarray, bool]:
    """Object box of one heatmap (H, W) per METHODS.md section 4, and whether it fell back to the whole image.

    Normalise by the max; mask = heatmap >= ``threshold``; keep the largest 8-connected component (ties: the
    one holding the max); its cell box mapped to pixels by cell edges and clipped to ``image_wh = (W, H)``.
    An all-zero heatmap gives the whole image and ``fallback = True``. Returns ``(box (4,) float64, fallback)``.
    """
    _check_threshold(threshold)
    box, fallback, _ = _locate(_as_numpy(heatmap), threshold, image_wh)
    return box, fallback


def object_boxes(
    heatmaps: np.ndarray | Tensor, threshold: float, image_wh: np.ndarray | Tensor | list[tuple[float, float]]
) -> ObjectBoxes:
    """:func:`object_box` for a batch: ``heatmaps`` (N, H, W), ``image_wh`` (N, 2) original (W, H) per image.

    Also returns each box's score: the share of the (normalised) heatmap's mass inside the kept component.
    """
    _check_threshold(threshold)
    maps = _as_numpy(heatmaps)
    sizes = _as_numpy(image_wh)
    if maps.ndim != 3 or sizes.shape != (maps.shape[0], 2):
        raise ValueError(f"expected heatmaps (N, H, W) and image_wh (N, 2), got {maps.shape} and {sizes.shape}")
    n = maps.shape[0]
    boxes = np.zeros((n, 4), dtype=np.float64)
    scores = np.zeros(n, dtype=np.float64)
    fallback = np.zeros(n, dtype=bool)
    for i in range(n):  # connected components are per image; a 14x14 label costs microseconds
        boxes[i], fallback[i], scores[i] = _locate(maps[i], threshold, (sizes[i, 0], sizes[i, 1]))
    return ObjectBoxes(boxes, scores, fallback)


def _box_iou_numpy(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    area_a = np.clip(a[:, 2] - a[:, 0], 0, None) * np.clip(a[:, 3] - a[:, 1], 0, None)  # (N,)
    area_b = np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)  # (M,)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])  # (N, M, 2) intersection top-left
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])  # (N, M, 2) intersection bottom-right
    wh = np.clip(rb - lt, 0, None)  # (N, M, 2)
    inter = wh[..., 0] * wh[..., 1]  # (N, M)
    union = area_a[:, None] + area_b[None, :] - inter  # (N, M)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[..., i, :]`` with ``b[i]`` for boxes (..., N, 4) and (N, 4) xyxy -> (..., N); 0 for an empty union."""
    lt = np.maximum(a[..., :2], b[..., :2])  # (..., N, 2) intersection top-left
    rb = np.minimum(a[..., 2:], b[..., 2:])  # (..., N, 2) intersection bottom-right
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)  # (..., N)
    area_a = np.prod(np.clip(a[..., 2:] - a[..., :2], 0, None), axis=-1)
    area_b = np.prod(np.clip(b[..., 2:] - b[..., :2], 0, None), axis=-1)
    union = area_a + area_b - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def box_iou(a: ArrayOrTensor, b: ArrayOrTensor) -> ArrayOrTensor:
    """Pairwise IoU of boxes ``a`` (N, 4) and ``b`` (M, 4) in xyxy -> (N, M); numpy in, numpy out; tensor in, tensor out.

    Tensors go through ``torchvision.ops.box_iou``; arrays use a plain numpy version (IoU 0 for empty unions).
    """
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return torchvision.ops.box_iou(a, b)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        raise TypeError("box_iou takes two tensors or two numpy arrays, not a mix")
    a = np.asarray(a, dtype=np.float64).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float64).reshape(-1, 4)
    return _box_iou_numpy(a, b)


def nms(boxes: ArrayOrTensor, scores: ArrayOrTensor, iou_threshold: float) -> ArrayOrTensor:
    """Greedy non-maximum suppression (``torchvision.ops.nms``): indices kept, by decreasing score.

    A box is dropped when its IoU with a kept, higher-scoring box is *above* ``iou_threshold``.
    Numpy in -> numpy int64 indices out.
    """
    if isinstance(boxes, Tensor):
        return torchvision.ops.nms(boxes, scores, iou_threshold)
    keep = torchvision.ops.nms(
        torch.as_tensor(np.asarray(boxes, dtype=np.float64).reshape(-1, 4)),
        torch.as_tensor(np.asarray(scores, dtype=np.float64).reshape(-1)),
        iou_threshold,
    )
    return keep.numpy()
