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


# --------------------------------------------------------------------------- localisation over a threshold grid
from fgpipe.h5schema import AttentionMeta, AttentionReader, AttentionWriter  # noqa: E402
from fgpipe.localize import sweep as sw  # noqa: E402
from fgpipe.manifest import ManifestRow  # noqa: E402

GRID = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 1.0)


def _random_maps(rng: np.random.Generator, n: int, h: int = 6, w: int = 7) -> np.ndarray:
    """Heatmaps with the hard cases: float16 values, ties of equal areas, all-zero and one-hot maps."""
    maps = rng.random((n, h, w)) ** 3
    maps[::5] = (maps[::5] > 0.5) * rng.choice([0.5, 1.0], size=maps[::5].shape)  # equal areas, several maxima
    maps[1::7] = 0.0  # fallback
    maps[2::9] = 0.0
    maps[2::9, 3, 4] = 0.7  # a single cell
    return maps.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("cells", [4_000_000, 150])  # one mosaic, or many small chunks
def test_grid_boxes_equal_object_boxes_at_every_threshold(cells: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sw, "_MOSAIC_CELLS", cells)
    rng = np.random.default_rng(0)
    maps = _random_maps(rng, 120)
    wh = rng.uniform(10, 500, (120, 2))
    got = sw.boxes_over_thresholds(maps, GRID, wh)
    assert got.boxes.shape == (len(GRID), 120, 4)
    for t, boxes in zip(GRID, got.boxes):
        ref = object_boxes(maps, t, wh)
        np.testing.assert_array_equal(boxes, ref.boxes)
        np.testing.assert_array_equal(got.fallback, ref.fallback)
    assert got.fallback.any() and not got.fallback.all()


def test_grid_boxes_keep_neighbouring_maps_apart_and_check_arguments() -> None:
    maps = np.zeros((2, 3, 3))
    maps[0, 2, :] = 1.0  # bottom row of map 0 ...
    maps[1, 0, 1] = 1.0  # ... and the top row of map 1 would touch in a mosaic without the empty row
    maps[1, 2, 2] = 0.9
    got = sw.boxes_over_thresholds(maps, [0.5], np.array([[30.0, 30.0], [30.0, 30.0]]))
    np.testing.assert_array_equal(got.boxes[0], [[0, 20, 30, 30], [10, 0, 20, 10]])
    with pytest.raises(ValueError, match="threshold must be in"):
        sw.boxes_over_thresholds(maps, [0.0], np.ones((2, 2)))
    with pytest.raises(ValueError, match="non-empty list of thresholds"):
        sw.boxes_over_thresholds(maps, [], np.ones((2, 2)))
    with pytest.raises(ValueError, match="NaN"):
        sw.boxes_over_thresholds(np.full((2, 3, 3), np.nan), [0.5], np.ones((2, 2)))


def _rows_and_file(tmp_path, rng: np.random.Generator, n: int = 90):
    """A manifest (three splits, some images without a box) and an attention.h5 of three methods."""
    splits = rng.choice(["train", "val", "test"], size=n)
    rows, maps = [], {m: _random_maps(rng, n) for m in ("oaam", "aolm", "bap")}
    for i in range(n):
        w, h = int(rng.integers(40, 300)), int(rng.integers(40, 300))
        x0, y0 = rng.uniform(0, w / 2), rng.uniform(0, h / 2)
        box = None if i % 11 == 3 else (x0, y0, rng.uniform(x0 + 1, w), rng.uniform(y0 + 1, h))
        rows.append(ManifestRow(f"i{i}", f"{i}.jpg", 0, "a", str(splits[i]), w, h, box))
    # AOLM's maps are box indicators, as the method stores them
    aolm = np.zeros_like(maps["aolm"])
    for i in range(n):
        r0, c0 = rng.integers(0, 3, 2)
        aolm[i, r0 : r0 + 3, c0 : c0 + 4] = 1.0 if i % 13 else 0.0
    maps["aolm"] = aolm
    path = tmp_path / "attention.h5"
    meta = AttentionMeta("oaam", "layer4", 64, "a" * 64, "b" * 64, methods=("oaam", "aolm", "bap"))
    with AttentionWriter(path, meta, (6, 7), 3) as writer:
        writer.append([r.image_id for r in rows], [0] * n, maps, np.zeros((n, 3)), [0] * n)
    return rows, path


def _iou(a, b) -> float:
    iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - iw * ih
    return iw * ih / union if union > 0 else 0.0


def _brute_force(rows, maps: np.ndarray, t: float, splits) -> dict:
    """Accuracy and mean IoU over the images of ``splits`` with a box: one image at a time, by hand."""
    ious = []
    for i, r in enumerate(rows):
        if r.box is None or r.split not in splits:
            continue
        box, _ = object_box(maps[i], t, (r.width, r.height))
        ious.append(_iou(box, r.box))
    if not ious:
        return {"accuracy": None, "mean_iou": None, "images": 0}
    return {"accuracy": sum(v >= 0.5 for v in ious) / len(ious), "mean_iou": sum(ious) / len(ious), "images": len(ious)}


def test_sweep_report_matches_a_brute_force_computation(tmp_path) -> None:
    rng = np.random.default_rng(1)
    rows, path = _rows_and_file(tmp_path, rng)
    with AttentionReader(path) as att:
        sweeps = sw.localization_sweep(att, rows, GRID)
        maps = {m: att.method_heatmaps(m) for m in att.methods}
    assert list(sweeps) == ["oaam", "aolm", "bap"]
    report = sw.localization_report(sweeps, "oaam", 0.2, "params")
    assert report["threshold_free"] == ["aolm"] and report["thresholds"] == list(GRID)
    for method, per_split in report["methods"].items():
        for split in sw.SPLITS:
            figures = per_split[split]
            keys = ["any"] if method == "aolm" else [f"{t:g}" for t in GRID]
            assert list(figures) == keys
            for key in keys:
                ref = _brute_force(rows, maps[method], 0.5 if key == "any" else float(key), [split])
                assert figures[key]["images"] == ref["images"] > 0
                assert figures[key]["accuracy"] == pytest.approx(ref["accuracy"], abs=1e-12)
                assert figures[key]["mean_iou"] == pytest.approx(ref["mean_iou"], abs=1e-12)
    # AOLM is threshold-free: its brute-force figures are the same at every threshold
    assert _brute_force(rows, maps["aolm"], 0.05, ["test"]) == _brute_force(rows, maps["aolm"], 1.0, ["test"])
    # auto: the best pooled train+val accuracy (then mean IoU, then the lower threshold), brute force
    pooled = [_brute_force(rows, maps["oaam"], t, ["train", "val"]) for t in GRID]
    best = max(range(len(GRID)), key=lambda i: (pooled[i]["accuracy"], pooled[i]["mean_iou"], -i))
    assert sw.choose_threshold(sweeps["oaam"]) == GRID[best]
    assert sw.resolve_threshold("auto", sweeps["oaam"]) == (GRID[best], "auto")
    assert sw.resolve_threshold(0.3, sweeps["oaam"]) == (0.3, "params")
    assert sw.choose_threshold(sweeps["aolm"]) == GRID[0]


def test_choose_threshold_ties_and_splits() -> None:
    splits = np.array(["train", "val", "train", "test", "test"], dtype=object)
    iou = np.array(
        [
            [0.6, 0.1, 0.1, 0.9, 0.9],  # 1 hit on train+val
            [0.6, 0.6, 0.2, 0.0, 0.0],  # 2 hits, mean 0.467
            [0.7, 0.5, 0.2, 0.0, 0.0],  # 2 hits, mean 0.467: a tie with the row above
            [0.9, 0.5, 0.1, 0.0, 0.0],  # 2 hits, mean 0.5: the best
        ]
    )
    s = sw.MethodSweep((0.1, 0.2, 0.3, 0.4), False, iou, splits)
    assert sw.choose_threshold(s) == 0.4  # most hits, then the higher mean IoU
    s = sw.MethodSweep((0.1, 0.2, 0.3), False, iou[:3], splits)
    assert sw.choose_threshold(s) == 0.2  # equal hits and mean IoU: the lower threshold
    assert sw.choose_threshold(s, ["test"]) == 0.1  # test would choose otherwise; auto never looks at it
    no_boxes = sw.MethodSweep((0.1, 0.2), False, np.zeros((2, 1)), np.array(["test"], dtype=object))
    assert sw.choose_threshold(no_boxes) is None
    assert sw.resolve_threshold("auto", no_boxes) == (sw.FALLBACK_THRESHOLD, "auto-fallback")


def test_curves_csv_one_per_method(tmp_path) -> None:
    rng = np.random.default_rng(2)
    rows, path = _rows_and_file(tmp_path, rng, n=40)
    with AttentionReader(path) as att:
        sweeps = sw.localization_sweep(att, rows, GRID)
    folder = tmp_path / "curves"
    folder.mkdir()
    (folder / "gradcam.csv").write_text("stale\n")
    written = sw.write_curves(folder, sweeps)
    assert sorted(p.name for p in folder.iterdir()) == ["aolm.csv", "bap.csv", "oaam.csv"] == sorted(p.name for p in written)
    report = sw.localization_report(sweeps, "oaam", 0.2, "params")
    for method in ("oaam", "aolm"):
        lines = (folder / f"{method}.csv").read_text().splitlines()
        assert lines[0] == "threshold,train,val,test" and len(lines) == 1 + len(GRID)
        for line, t in zip(lines[1:], GRID):
            key = "any" if method == "aolm" else f"{t:g}"
            cells = line.split(",")
            assert cells[0] == f"{t:g}"
            for split, cell in zip(sw.SPLITS, cells[1:]):
                assert float(cell) == pytest.approx(report["methods"][method][split][key]["accuracy"], abs=1e-6)
