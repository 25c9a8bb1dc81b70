"""Object boxes (section 4), IoU/NMS and MPALM parts (section 5) on hand-made inputs and plain references."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from fgpipe.localize import (
    box_iou,
    mpalm_parts,
    mpalm_parts_batch,
    nms,
    object_box,
    object_boxes,
    pyramid_sizes,
)


# --------------------------------------------------------------------------- object boxes
def test_tie_between_equal_areas_goes_to_the_component_holding_the_max() -> None:
    h = np.zeros((6, 6))
    h[0, 0:2] = 0.5  # area 2, first in raster order
    h[4, 3:5] = [0.6, 1.0]  # area 2, holds the max
    box, fallback = object_box(h, 0.2, (60, 60))
    np.testing.assert_array_equal(box, [30, 40, 50, 50])
    assert not fallback


def test_largest_component_wins_over_the_one_holding_the_max() -> None:
    h = np.zeros((6, 6))
    h[5, 5] = 1.0  # the max, area 1
    h[1:3, 1:4] = 0.3  # area 6
    h[0, 5] = 0.9  # area 1
    box, fallback = object_box(h, 0.2, (60, 60))
    np.testing.assert_array_equal(box, [10, 10, 40, 30])
    assert not fallback


def test_eight_connectivity_joins_diagonal_cells() -> None:
    h = np.zeros((5, 5))
    h[0, 0] = h[1, 1] = h[2, 2] = 0.5  # one 8-connected component of area 3
    h[4, 0:2] = 1.0  # area 2
    box, _ = object_box(h, 0.2, (50, 50))
    np.testing.assert_array_equal(box, [0, 0, 30, 30])


def test_threshold_is_inclusive_and_relative_to_the_max() -> None:
    h = np.zeros((4, 4))
    h[1, 1] = 4.0
    h[1, 2] = 0.8  # exactly 0.2 of the max: kept
    h[1, 3] = 0.79  # below: dropped
    box, _ = object_box(h, 0.2, (40, 40))
    np.testing.assert_array_equal(box, [10, 10, 30, 20])
    box, _ = object_box(h, 0.5, (40, 40))
    np.testing.assert_array_equal(box, [10, 10, 20, 20])


def test_empty_heatmap_falls_back_to_the_whole_image() -> None:
    box, fallback = object_box(np.zeros((7, 7)), 0.2, (123, 45))
    np.testing.assert_array_equal(box, [0, 0, 123, 45])
    assert fallback


def test_component_on_the_border_is_clipped_to_the_image() -> None:
    h = np.zeros((3, 7))
    h[1:3, 5:7] = 1.0  # touches the right and bottom borders
    box, _ = object_box(h, 0.2, (100, 50))
    np.testing.assert_array_equal(box, [5 * 100 / 7, 50 / 3, 100, 50])
    assert box[2] <= 100 and box[3] <= 50


def test_cell_edges_with_non_divisible_sizes() -> None:
    h = np.zeros((3, 7))
    h[1, 2:4] = 1.0
    box, _ = object_box(torch.as_tensor(h, dtype=torch.float16), 0.2, (100, 50))
    # cell j of w covers [j * W / w, (j + 1) * W / w)
    np.testing.assert_allclose(box, [2 * 100 / 7, 1 * 50 / 3, 4 * 100 / 7, 2 * 50 / 3], rtol=1e-12)


def test_batched_boxes_match_single_and_score_is_mass_share() -> None:
    rng = np.random.default_rng(0)
    maps = rng.random((5, 6, 8)) ** 4
    maps[2] = 0.0
    sizes = np.array([[80, 60], [100, 37], [50, 50], [640, 480], [33, 99]], dtype=np.float64)
    out = object_boxes(torch.as_tensor(maps), 0.2, sizes)
    for i in range(5):
        box, fallback = object_box(maps[i], 0.2, tuple(sizes[i]))
        np.testing.assert_array_equal(out.boxes[i], box)
        assert out.fallback[i] == fallback
    assert out.fallback.tolist() == [False, False, True, False, False]
    assert out.scores[2] == 0.0
    # score of image 0, computed plainly: mass of the kept component (found by flood fill) / total mass
    norm = maps[0] / maps[0].max()
    seen = np.zeros_like(norm, dtype=bool)
    comps = []
    for start in zip(*np.nonzero(norm >= 0.2)):
        if seen[start]:
            continue
        stack, comp = [start], []
        seen[start] = True
        while stack:
            r, c = stack.pop()
            comp.append((r, c))
            for dr, dc in itertools.product((-1, 0, 1), repeat=2):
                rr, cc = r + dr, c + dc
                if 0 <= rr < 6 and 0 <= cc < 8 and not seen[rr, cc] and norm[rr, cc] >= 0.2:
                    seen[rr, cc] = True
                    stack.append((rr, cc))
        comps.append(comp)
    best = max(comps, key=lambda comp: (len(comp), max(norm[p] for p in comp)))
    assert out.scores[0] == pytest.approx(sum(norm[p] for p in best) / norm.sum())


def test_box_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="threshold"):
        object_box(np.ones((3, 3)), 0.0, (10, 10))
    with pytest.raises(ValueError, match="NaN"):
        object_box(np.full((3, 3), np.nan), 0.2, (10, 10))


# --------------------------------------------------------------------------- IoU and NMS
def test_box_iou_numpy_torch_and_by_hand() -> None:
    a = np.array([[0, 0, 10, 10], [0, 0, 0, 0]], dtype=np.float64)
    b = np.array([[5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30]], dtype=np.float64)
    expected = np.array([[25 / 175, 1.0, 0.0], [0.0, 0.0, 0.0]])
    np.testing.assert_allclose(box_iou(a, b), expected)
    np.testing.assert_allclose(box_iou(torch.as_tensor(a[:1]), torch.as_tensor(b)).numpy(), expected[:1])


def test_nms_numpy_in_numpy_out() -> None:
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30]], dtype=np.float64)
    keep = nms(boxes, np.array([0.9, 0.95, 0.1]), 0.5)
    assert isinstance(keep, np.ndarray) and keep.tolist() == [1, 2]


# --------------------------------------------------------------------------- MPALM
def _iou(a: list[float], b: list[float]) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def mpalm_reference(fmap: np.ndarray, crop, input_size, top_k=4, sizes=(96, 160, 224), iou=0.5, max_parts=6):
    """Section 5 written plainly with lists."""
    c_, h_, w_ = fmap.shape
    maxima = [float(fmap[c].max()) for c in range(c_)]
    channels = sorted(range(c_), key=lambda c: -maxima[c])[:top_k]  # sorted() is stable
    cands = []
    for c in channels:
        flat = list(fmap[c].ravel())
        pos = flat.index(max(flat))
        r, col = divmod(pos, w_)
        cx, cy = (col + 0.5) * input_size / w_, (r + 0.5) * input_size / h_
        for s in sizes:
            side = min(s * input_size / 448, input_size)
            x0 = min(max(cx - side / 2, 0), input_size - side)
            y0 = min(max(cy - side / 2, 0), input_size - side)
            cands.append(([x0, y0, x0 + side, y0 + side], maxima[c], side))
    kept = []
    for box, score, side in cands:  # NMS only against kept boxes of the same side
        if all(_iou(box, k[0]) <= iou for k in kept if k[2] == side):
            kept.append((box, score, side))
    kept = kept[:max_parts]
    sx, sy = (crop[2] - crop[0]) / input_size, (crop[3] - crop[1]) / input_size
    boxes = [[crop[0] + b[0] * sx, crop[1] + b[1] * sy, crop[0] + b[2] * sx, crop[1] + b[3] * sy] for b, _, _ in kept]
    return np.array(boxes).reshape(-1, 4), np.array([s for _, s, _ in kept])


def test_mpalm_hand_made_square_crop() -> None:
    fmap = torch.zeros(6, 7, 7)
    fmap[0, 3, 3] = 5.0  # strongest channel: centre cell -> centre (112, 112) of a 224 crop
    fmap[1, 0, 0] = 4.0  # corner: its boxes are shifted inside the crop
    fmap[2, 6, 6] = 3.0
    fmap[3, 3, 3] = 2.0  # same place as channel 0: all its boxes are duplicates
    fmap[4, 2, 5] = 1.0  # 5th channel: outside the top 4
    crop = (100.0, 50.0, 324.0, 274.0)  # 224 x 224, offset
    boxes, scores = mpalm_parts(fmap, crop, input_size=224)
    sides = pyramid_sizes(224)
    np.testing.assert_array_equal(sides, [48, 80, 112])
    # channel 0: all three sides 48, 80, 112 around (112, 112); 112 has IoU 0.51 with 80 but NMS only compares
    # boxes of the same side, so the pyramid stays whole
    np.testing.assert_allclose(boxes[0], [100 + 88, 50 + 88, 100 + 136, 50 + 136])
    np.testing.assert_allclose(boxes[1], [100 + 72, 50 + 72, 100 + 152, 50 + 152])
    np.testing.assert_allclose(boxes[2], [100 + 56, 50 + 56, 100 + 168, 50 + 168])
    # channel 1 at cell (0, 0), centre (16, 16): the 48 box is shifted to start at the crop corner
    np.testing.assert_allclose(boxes[3], [100, 50, 148, 98])
    assert len(boxes) == 6 and len(scores) == len(boxes)  # capped at max_parts: channel 2 (score 3) is cut
    assert scores.tolist() == [5.0, 5.0, 5.0, 4.0, 4.0, 4.0]
    assert 2.0 not in scores.tolist() and 1.0 not in scores.tolist()
    _check_parts(boxes, crop, sides, 224)
    ref_boxes, ref_scores = mpalm_reference(fmap.numpy(), crop, 224)
    np.testing.assert_allclose(boxes, ref_boxes)
    np.testing.assert_array_equal(scores, ref_scores)


def _check_parts(boxes: np.ndarray, crop, sides: np.ndarray, input_size: int) -> None:
    sx, sy = (crop[2] - crop[0]) / input_size, (crop[3] - crop[1]) / input_size
    eps = 1e-9
    assert (boxes[:, 0] >= crop[0] - eps).all() and (boxes[:, 2] <= crop[2] + eps).all()
    assert (boxes[:, 1] >= crop[1] - eps).all() and (boxes[:, 3] <= crop[3] + eps).all()
    w_local = (boxes[:, 2] - boxes[:, 0]) / sx  # sides back in the resized-crop frame
    h_local = (boxes[:, 3] - boxes[:, 1]) / sy
    np.testing.assert_allclose(w_local, h_local)
    assert all(np.isclose(w, sides).any() for w in w_local)
    iou = box_iou(boxes, boxes)
    np.fill_diagonal(iou, 0)
    same_side = np.isclose(w_local[:, None], w_local[None, :])  # NMS applies among boxes of one side only
    assert iou[same_side].max(initial=0) <= 0.5


@pytest.mark.parametrize("seed", range(4))
def test_mpalm_batch_matches_plain_reference_on_offset_crops(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    fmaps = torch.rand(3, 16, 7, 7, generator=g, dtype=torch.float64)
    crops = np.array([[10, 20, 122, 468], [0, 0, 448, 448], [33.5, 7.25, 300, 100]], dtype=np.float64)
    parts = mpalm_parts_batch(fmaps, crops, input_size=448, top_k=5, max_parts=4)
    assert parts.boxes.shape == (3, 4, 4) and parts.scores.shape == (3, 4)
    for i in range(3):
        n = parts.counts[i]
        ref_boxes, ref_scores = mpalm_reference(fmaps[i].numpy(), crops[i], 448, top_k=5, max_parts=4)
        assert n == len(ref_boxes) <= 4
        np.testing.assert_allclose(parts.boxes[i, :n], ref_boxes, rtol=1e-12)
        np.testing.assert_array_equal(parts.scores[i, :n], ref_scores)
        assert not parts.boxes[i, n:].any() and not parts.scores[i, n:].any()
        _check_parts(parts.boxes[i, :n], crops[i], pyramid_sizes(448), 448)


def test_mpalm_cap_and_top_k_above_channel_count() -> None:
    fmap = torch.zeros(2, 7, 7)
    fmap[0, 0, 0] = 1.0
    fmap[1, 6, 6] = 2.0
    boxes, scores = mpalm_parts(fmap, (0, 0, 448, 448), 448, top_k=10, sizes=(64,), max_parts=1)
    assert boxes.shape == (1, 4) and scores.tolist() == [2.0]
    np.testing.assert_allclose(boxes[0], [448 - 64, 448 - 64, 448, 448])  # centre (416, 416), shifted inside


def test_mpalm_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="x1 > x0"):
        mpalm_parts(torch.rand(4, 7, 7), (10, 10, 10, 20), 224)
    with pytest.raises(ValueError, match="top_k"):
        mpalm_parts(torch.rand(4, 7, 7), (0, 0, 10, 20), 224, top_k=0)
