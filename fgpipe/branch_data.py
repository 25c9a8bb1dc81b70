"""The refinement branches' inputs: crops.h5's boxes, decoded once into object crops and part patches.

train-refine trains on them (adding its box jitter, :mod:`fgpipe.stages.train_refine`), evaluate and
``fgpipe predict`` run the branches on them exactly as train-refine validates (:mod:`fgpipe.branch_inference`). Boxes are in
original pixels, clipped to the image; no crop is ever written as an image: every box is decoded once into memory
(:func:`fgpipe.loader.load_regions`). Part patches are resized to ``part_size`` (0: ``input_size // 2``); an image
with no part uses its object box as its single patch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fgpipe.config import TrainRefineConfig
from fgpipe.errors import ArtifactError
from fgpipe.h5schema import CropsReader
from fgpipe.imagecache import ImageCache
from fgpipe.loader import LoadRequest, center_crop, load_regions, resized_side
from fgpipe.manifest import ManifestRow

RegionLoader = Callable[..., Tensor]  # (requests, out_wh, desc=...) -> (N, 3, H, W) uint8, like load_regions


# --------------------------------------------------------------------------- boxes from crops.h5
@dataclass(frozen=True)
class ImageBoxes:
    """One image's boxes from crops.h5, in original pixels, clipped to the image."""

    box: np.ndarray  # (4,) object box
    parts: np.ndarray  # (P, 4) part boxes, P >= 1 (the object box when MPALM found none)
    fallback: bool  # the object box is the whole image (empty heatmap)
    num_parts: int  # parts found by MPALM (0 when ``parts`` holds the object box)


def clip_boxes(box: np.ndarray, wh: tuple[float, float]) -> np.ndarray:
    """Clip (4,) or (P, 4) boxes to ``(0, 0, W, H)``, keeping at least one pixel of extent."""
    w, h = float(wh[0]), float(wh[1])
    out = np.asarray(box, dtype=np.float64).copy()
    out[..., 0::2] = np.clip(out[..., 0::2], 0.0, w)
    out[..., 1::2] = np.clip(out[..., 1::2], 0.0, h)
    out[..., 0] = np.minimum(out[..., 0], w - 1.0)
    out[..., 1] = np.minimum(out[..., 1], h - 1.0)
    out[..., 2] = np.maximum(out[..., 2], out[..., 0] + 1.0)
    out[..., 3] = np.maximum(out[..., 3], out[..., 1] + 1.0)
    return out


def image_boxes(box: np.ndarray, parts: np.ndarray, count: int, fallback: bool, wh: tuple[float, float]) -> ImageBoxes:
    """An :class:`ImageBoxes` from one crops.h5 row (parts zero-padded past ``count``)."""
    obj = clip_boxes(box, wh)
    valid = clip_boxes(parts[:count], wh) if count > 0 else obj[None]
    return ImageBoxes(box=obj, parts=valid, fallback=bool(fallback), num_parts=int(count))


def read_crops(path: Path, manifest_sha256: str, rows: list[ManifestRow]) -> list[ImageBoxes]:
    """The boxes of ``rows`` (in their order) from crops.h5; refuses a file made from another manifest."""
    with CropsReader(path) as reader:
        reader.check_source(manifest_sha256=manifest_sha256)
        rec = reader.read()
        index = {image_id: i for i, image_id in enumerate(rec.image_ids)}
        missing = [r.image_id for r in rows if r.image_id not in index]
        if missing:
            raise ArtifactError(
                f"{path}: no boxes for {len(missing)} image(s) of the manifest (e.g. {', '.join(missing[:5])}); "
                "rerun `fgpipe extract-crops` (or `dvc repro`)"
            )
        picked = [index[r.image_id] for r in rows]
        reader.check_inside(rec, np.array(picked, dtype=np.int64), np.array([[r.width, r.height] for r in rows]).reshape(-1, 2))
    out = []
    for r, i in zip(rows, picked):
        out.append(image_boxes(rec.boxes[i], rec.parts[i], int(rec.part_counts[i]), bool(rec.fallback[i]), (r.width, r.height)))
    return out


def margin_region(box: np.ndarray, margin: float, wh: tuple[float, float]) -> np.ndarray:
    """``box`` (4,) grown by ``margin`` times its side on every side, clipped to ``(0, 0, W, H)``."""
    x0, y0, x1, y1 = (float(v) for v in box)
    dx, dy = margin * (x1 - x0), margin * (y1 - y0)
    return clip_boxes(np.array([x0 - dx, y0 - dy, x1 + dx, y1 + dy]), wh)


# --------------------------------------------------------------------------- data in memory
@dataclass
class BranchData:
    """Object crops and part patches of a split, decoded once: uint8 regions and where they came from.

    Region i of ``objects`` covers ``object_regions[i]`` (original pixels) and holds ``object_boxes[i]``
    (equal to the region when no margin was asked for); likewise for patches. The patches of image i are
    rows ``patch_start[i] : patch_start[i] + patch_count[i]``.
    """

    objects: Tensor  # (N, 3, So, So) uint8
    object_regions: Tensor  # (N, 4) float32
    object_boxes: Tensor  # (N, 4) float32
    patches: Tensor  # (T, 3, Sp, Sp) uint8
    patch_regions: Tensor  # (T, 4) float32
    patch_boxes: Tensor  # (T, 4) float32
    patch_start: Tensor  # (N,) int64
    patch_count: Tensor  # (N,) int64, >= 1
    labels: Tensor  # (N,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def patch_index(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of the patches of images ``idx`` (T,) and each patch's position in ``idx`` (T,)."""
        counts = self.patch_count[idx]  # (B,)
        owner = torch.repeat_interleave(torch.arange(len(idx)), counts)  # (T,)
        starts = torch.repeat_interleave(self.patch_start[idx], counts)  # (T,)
        offsets = torch.arange(len(owner)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
        return starts + offsets, owner


def load_branch_data(
    paths: list[Path], sizes: list[tuple[int, int]], boxes: list[ImageBoxes], labels: list[int],
    object_side: int, part_side: int, margin: float, name: str, load: RegionLoader = load_regions,
    cache: ImageCache | None = None,
) -> BranchData:
    """Decode every object box (at ``object_side``) and part box (at ``part_side``) of a split.

    With ``margin`` > 0 each region is the box grown by ``margin`` times its side (clipped to the image),
    decoded at ``side * (1 + 2 * margin)`` so that the box itself keeps about ``side`` pixels. ``load``
    decodes a list of regions (default: :func:`fgpipe.loader.load_regions`, with a progress bar), cut from
    ``cache`` when given.
    """
    obj_store = int(round(object_side * (1 + 2 * margin)))
    part_store = int(round(part_side * (1 + 2 * margin)))
    obj_regions = [margin_region(b.box, margin, wh) for b, wh in zip(boxes, sizes)]
    part_boxes = [p for b in boxes for p in b.parts]
    part_regions = [margin_region(p, margin, wh) for b, wh in zip(boxes, sizes) for p in b.parts]
    part_paths = [path for path, b in zip(paths, boxes) for _ in range(len(b.parts))]
    objects = load(
        [LoadRequest(p, tuple(r), cache) for p, r in zip(paths, obj_regions)], (obj_store, obj_store), desc=f"loading {name} objects"
    )
    patches = load(
        [LoadRequest(p, tuple(r), cache) for p, r in zip(part_paths, part_regions)], (part_store, part_store), desc=f"loading {name} parts"
    )
    counts = torch.tensor([len(b.parts) for b in boxes], dtype=torch.long)

    def as_tensor(rows: list[np.ndarray]) -> Tensor:
        return torch.tensor(np.asarray(rows, dtype=np.float64).reshape(-1, 4), dtype=torch.float32)

    return BranchData(
        objects=objects,
        object_regions=as_tensor(obj_regions),
        object_boxes=as_tensor([b.box for b in boxes]),
        patches=patches,
        patch_regions=as_tensor(part_regions),
        patch_boxes=as_tensor(part_boxes),
        patch_start=torch.cumsum(counts, 0) - counts,
        patch_count=counts,
        labels=torch.tensor(labels, dtype=torch.long),
    )


def split_data(
    root: Path, rows: list[ManifestRow], boxes: list[ImageBoxes], cfg: TrainRefineConfig, margin: float, name: str,
    cache: ImageCache | None = None,
) -> BranchData:
    """:func:`load_branch_data` for manifest rows at the sizes of ``cfg`` (cut from ``cache`` when given)."""
    return load_branch_data(
        [root / r.path for r in rows], [(r.width, r.height) for r in rows], boxes, [r.label for r in rows],
        resized_side(cfg.input_size, cfg.augment), resized_side(part_size(cfg), cfg.augment), margin, name,
        cache=cache,
    )


def part_size(cfg: TrainRefineConfig) -> int:
    """Side of the part patches fed to the part branch (``part_size``, 0 -> ``input_size // 2``)."""
    return cfg.part_size or cfg.input_size // 2


def eval_inputs(data: BranchData, idx: Tensor, cfg: TrainRefineConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Centre-cropped object crops and patches of images ``idx`` (uint8) and each patch's owner (T,)."""
    rows, owner = data.patch_index(idx)
    return center_crop(data.objects[idx], cfg.input_size), center_crop(data.patches[rows], part_size(cfg)), owner


def subset(data: BranchData, idx: Tensor) -> BranchData:
    """The images ``idx`` of ``data`` with their patches."""
    rows, _ = data.patch_index(idx)
    counts = data.patch_count[idx]
    return BranchData(
        objects=data.objects[idx], object_regions=data.object_regions[idx], object_boxes=data.object_boxes[idx],
        patches=data.patches[rows], patch_regions=data.patch_regions[rows], patch_boxes=data.patch_boxes[rows],
        patch_start=torch.cumsum(counts, 0) - counts, patch_count=counts, labels=data.labels[idx],
    )
