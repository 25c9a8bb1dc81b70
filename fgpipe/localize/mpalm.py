"""MPALM part boxes (TL-AAM's multi-scale pyramid attention localisation module, METHODS.md section 5).

Input: the backbone's last feature map of the *object crop*, the crop having been resized to
``input_size x input_size`` (both sides, aspect not kept). Everything is first computed in that resized-crop
frame (pixels ``[0, input_size)``) and then mapped to original-image pixels through the crop box:
``X = x0 + x * (x1 - x0) / input_size`` (likewise for y). The map is a per-axis scaling, so IoU and hence NMS
are the same in both frames; square pyramid boxes in the crop frame become rectangles in the original
image when the crop is not square.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
import torchvision
from torch import Tensor

#: default pyramid sides in pixels at :data:`BASE_SIZE` input (scaled by input_size / BASE_SIZE)
DEFAULT_SIZES: tuple[int, ...] = (96, 160, 224)
BASE_SIZE = 448


class PartBoxes(NamedTuple):
    """MPALM parts of a batch, padded to ``max_parts`` per image (padding rows are zeros; trust ``counts``)."""

    boxes: np.ndarray  # (B, P, 4) float64 (x0, y0, x1, y1) in original-image pixels
    scores: np.ndarray  # (B, P) float64 channel max response of each part
    counts: np.ndarray  # (B,) int64 number of valid parts per image, <= P


def pyramid_sizes(input_size: int, sizes: Sequence[float] = DEFAULT_SIZES, base_size: int = BASE_SIZE) -> np.ndarray:
    """Pyramid box sides scaled to the input size (``s * input_size / base_size``), capped at ``input_size``."""
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError(f"pyramid sizes must be a non-empty list of positive sides, got {list(sizes)!r}")
    return np.minimum(np.asarray(sizes, dtype=np.float64) * input_size / base_size, float(input_size))


def _check(top_k: int, iou: float, max_parts: int, input_size: int) -> None:
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if not 0.0 < iou <= 1.0:
        raise ValueError(f"NMS IoU must be in (0, 1], got {iou}")
    if max_parts < 1:
        raise ValueError(f"max_parts must be >= 1, got {max_parts}")
    if input_size < 1:
        raise ValueError(f"input_size must be >= 1, got {input_size}")


def mpalm_parts_batch(
    feature_maps: Tensor,
    crop_boxes: np.ndarray | Tensor,
    input_size: int,
    top_k: int = 4,
    sizes: Sequence[float] = DEFAULT_SIZES,
    iou: float = 0.5,
    max_parts: int = 6,
    base_size: int = BASE_SIZE,
) -> PartBoxes:
    """MPALM parts for a batch of crop feature maps (B, C, h, w) and their crop boxes (B, 4) in original pixels.

    Per image: rank channels by max response (stable: ties keep channel order), take the ``top_k``; for each,
    the first cell (raster order) of its max, whose centre ``((j + .5) * input_size / w, (i + .5) * input_size / h)``
    is the part centre in the resized crop; a square box of every pyramid side around it, shifted to stay inside
    the crop; greedy NMS (drop IoU > ``iou``) *among boxes of the same side only*, in the order (score desc,
    channel rank, pyramid order), each box scored by its channel's max response; keep the first ``max_parts``
    survivors in that order; map to original-image pixels.

    Why NMS per pyramid side: the pyramid is meant to be multi-scale, but concentric boxes of one channel
    overlap a lot across scales (sides 160 and 224 around one centre have IoU 160^2 / 224^2 = 0.51 > 0.5),
    so a plain NMS over all candidates would delete the larger scale of every part. Suppressing only within a
    side (``batched_nms`` with the side as the category) removes near-duplicate parts of *other* channels at the
    same scale and keeps each part's whole pyramid.
    """
    _check(top_k, iou, max_parts, input_size)
    if feature_maps.ndim != 4:
        raise ValueError(f"feature_maps must be (B, C, h, w), got shape {tuple(feature_maps.shape)}")
    b, c, h, w = feature_maps.shape
    crops = np.asarray(crop_boxes.detach().cpu() if isinstance(crop_boxes, Tensor) else crop_boxes, dtype=np.float64)
    if crops.shape != (b, 4):
        raise ValueError(f"crop_boxes must be (B, 4) = ({b}, 4), got {crops.shape}")
    if not ((crops[:, 2] > crops[:, 0]) & (crops[:, 3] > crops[:, 1])).all():
        raise ValueError(f"every crop box needs x1 > x0 and y1 > y0, got {crops.tolist()}")
    sides = pyramid_sizes(input_size, sizes, base_size)  # (S,)
    k = min(top_k, c)

    with torch.no_grad():
        flat = feature_maps.detach().flatten(2)  # (B, C, h*w)
        chan_max = flat.amax(dim=2)  # (B, C)
        order = torch.sort(chan_max, dim=1, descending=True, stable=True).indices[:, :k]  # (B, k) channel ids
        top_maps = flat.gather(1, order[:, :, None].expand(b, k, h * w))  # (B, k, h*w)
        top_scores = chan_max.gather(1, order)  # (B, k)
    top_maps_np = top_maps.to("cpu", torch.float64).numpy()
    scores_np = top_scores.to("cpu", torch.float64).numpy()
    flat_idx = top_maps_np.argmax(axis=2)  # (B, k) first max in raster order
    rows, cols = np.divmod(flat_idx, w)  # (B, k) each
    cx = (cols + 0.5) * input_size / w  # (B, k) part centres in the resized crop
    cy = (rows + 0.5) * input_size / h

    half = sides / 2.0  # (S,)
    limit = input_size - sides  # (S,) largest allowed top-left so the box stays inside the crop
    bx0 = np.clip(cx[:, :, None] - half, 0.0, limit)  # (B, k, S)
    by0 = np.clip(cy[:, :, None] - half, 0.0, limit)  # (B, k, S)
    local = np.stack([bx0, by0, bx0 + sides, by0 + sides], axis=-1).reshape(b, k * len(sides), 4)  # (B, k*S, 4)
    cand_scores = np.repeat(scores_np, len(sides), axis=1)  # (B, k*S): channel r's S boxes share its score

    # resized-crop frame -> original pixels: per-axis scale by crop side / input_size, then offset
    scale = np.stack([crops[:, 2] - crops[:, 0], crops[:, 3] - crops[:, 1]], axis=1) / input_size  # (B, 2) sx, sy
    scale4 = np.concatenate([scale, scale], axis=1)[:, None, :]  # (B, 1, 4)
    origin4 = np.concatenate([crops[:, :2], crops[:, :2]], axis=1)[:, None, :]  # (B, 1, 4)
    candidates = origin4 + local * scale4  # (B, k*S, 4)

    out_boxes = np.zeros((b, max_parts, 4), dtype=np.float64)
    out_scores = np.zeros((b, max_parts), dtype=np.float64)
    counts = np.zeros(b, dtype=np.int64)
    rank = torch.arange(k * len(sides), 0, -1, dtype=torch.float64)  # strictly decreasing: NMS keeps our stable order
    # NMS category of each candidate: its side (equal sides after capping at input_size share one category)
    _, side_ids = np.unique(sides, return_inverse=True)  # (S,)
    category = torch.as_tensor(np.tile(side_ids, k))  # (k*S,) candidates are channel-major, pyramid-minor
    for i in range(b):
        # Candidates are already in (score desc, channel rank, pyramid order); NMS per side on local boxes (same
        # IoU as in original pixels); batched_nms returns the kept indices by decreasing rank, i.e. in that order.
        keep = torchvision.ops.batched_nms(torch.as_tensor(local[i]), rank, category, iou)[:max_parts].numpy()
        counts[i] = len(keep)
        out_boxes[i, : len(keep)] = candidates[i, keep]
        out_scores[i, : len(keep)] = cand_scores[i, keep]
    return PartBoxes(out_boxes, out_scores, counts)


def mpalm_parts(
    feature_map: Tensor,
    crop_box: Sequence[float] | np.ndarray,
    input_size: int,
    top_k: int = 4,
    sizes: Sequence[float] = DEFAULT_SIZES,
    iou: float = 0.5,
    max_parts: int = 6,
    base_size: int = BASE_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
    """MPALM parts of one crop feature map (C, h, w): ``(boxes (P, 4) in original pixels, scores (P,))``, P <= max_parts.

    See :func:`mpalm_parts_batch` for the procedure.
    """
    if feature_map.ndim != 3:
        raise ValueError(f"feature_map must be (C, h, w), got shape {tuple(feature_map.shape)}")
    parts = mpalm_parts_batch(
        feature_map[None],
        np.asarray(crop_box, dtype=np.float64).reshape(1, 4),
        input_size,
        top_k=top_k,
        sizes=sizes,
        iou=iou,
        max_parts=max_parts,
        base_size=base_size,
    )
    n = int(parts.counts[0])
    return parts.boxes[0, :n], parts.scores[0, :n]
