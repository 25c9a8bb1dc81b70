"""The refinement branches' inputs: crops.h5's boxes, and the object crops and part patches cut from them.

train-refine trains on them (adding its box jitter, :mod:`fgpipe.stages.train_refine`), evaluate and
``fgpipe predict`` run the branches on them exactly as train-refine validates (:mod:`fgpipe.branch_inference`). Boxes are in
original pixels, clipped to the image; no crop is ever written as an image: every box is cut batch by batch by the
input pipeline's workers, or decoded once into memory (:mod:`fgpipe.streaming`). Part patches are resized to ``part_size`` (0: ``input_size // 2``); an image
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
from fgpipe.streaming import Feed, FeedOptions, MemoryFeed, Regions, StreamFeed
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


# --------------------------------------------------------------------------- the regions of a split
@dataclass
class BranchData:
    """Object crops and part patches of a split: where each region comes from, and its pixels (:attr:`feed`).

    Region i of the objects covers ``object_regions[i]`` (original pixels) and holds ``object_boxes[i]``
    (equal to the region when no margin was asked for); likewise for patches. The patches of image i are
    rows ``patch_start[i] : patch_start[i] + patch_count[i]``. ``feed`` gives, for a batch of images ``idx``, their
    object crops (B, 3, So, So) and their patches (T, 3, Sp, Sp), uint8, in :meth:`patch_index` order.
    """

    object_regions: Tensor  # (N, 4) float32
    object_boxes: Tensor  # (N, 4) float32
    patch_regions: Tensor  # (T, 4) float32
    patch_boxes: Tensor  # (T, 4) float32
    patch_start: Tensor  # (N,) int64
    patch_count: Tensor  # (N,) int64, >= 1
    labels: Tensor  # (N,) int64
    feed: Feed

    def __len__(self) -> int:
        return len(self.labels)

    def patch_index(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Rows of the patches of images ``idx`` (T,) and each patch's position in ``idx`` (T,)."""
        return patch_rows(self.patch_start, self.patch_count, idx)


def padded_positions(counts: Tensor, per_image: int) -> tuple[Tensor, Tensor]:
    """Positions that pad a batch's patches to ``per_image`` an image: (B * per_image,) indices into the batch's
    patches (image b's being ``counts[b]`` consecutive ones, as :func:`patch_rows` orders them) and whether each is
    the patch itself (True) or a copy (False).

    Slot j of image b holds its patch ``j mod counts[b]``: an image with fewer patches repeats its own, so every
    batch of B images has the same number of patches whatever each image's count (1 <= counts[b] <= per_image).
    """
    if len(counts) and (int(counts.min()) < 1 or int(counts.max()) > per_image):
        raise ValueError(f"patches per image must be in [1, {per_image}], got {counts.tolist()}")
    j = torch.arange(per_image).repeat(len(counts))  # (B * P,) slot within its image
    c = torch.repeat_interleave(counts, per_image)  # (B * P,) its image's count
    first = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, per_image)  # (B * P,) its image's first patch
    return first + j % c, j < c


def patch_rows(start: Tensor, count: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Rows of the patches of images ``idx`` (T,) and each patch's position in ``idx`` (T,), the patches of image i
    being rows ``start[i] : start[i] + count[i]``."""
    counts = count[idx]  # (B,)
    owner = torch.repeat_interleave(torch.arange(len(idx)), counts)  # (T,)
    starts = torch.repeat_interleave(start[idx], counts)  # (T,)
    offsets = torch.arange(len(owner)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    return starts + offsets, owner


def load_branch_data(
    paths: list[Path], sizes: list[tuple[int, int]], boxes: list[ImageBoxes], labels: list[int],
    object_side: int, part_side: int, margin: float, name: str, options: FeedOptions, load: RegionLoader = load_regions,
    cache: ImageCache | None = None,
) -> BranchData:
    """Every object box (at ``object_side``) and part box (at ``part_side``) of a split, streamed or decoded into
    memory as ``options`` say.

    With ``margin`` > 0 each region is the box grown by ``margin`` times its side (clipped to the image),
    decoded at ``side * (1 + 2 * margin)`` so that the box itself keeps about ``side`` pixels. In memory, ``load``
    decodes a list of regions (default: :func:`fgpipe.loader.load_regions`, with a progress bar); either way each is
    cut from ``cache`` when given.
    """
    obj_store = int(round(object_side * (1 + 2 * margin)))
    part_store = int(round(part_side * (1 + 2 * margin)))
    obj_regions = [margin_region(b.box, margin, wh) for b, wh in zip(boxes, sizes)]
    part_boxes = [p for b in boxes for p in b.parts]
    part_regions = [margin_region(p, margin, wh) for b, wh in zip(boxes, sizes) for p in b.parts]
    part_paths = [path for path, b in zip(paths, boxes) for _ in range(len(b.parts))]
    obj_requests = [LoadRequest(p, tuple(r), cache) for p, r in zip(paths, obj_regions)]
    part_requests = [LoadRequest(p, tuple(r), cache) for p, r in zip(part_paths, part_regions)]
    counts = torch.tensor([len(b.parts) for b in boxes], dtype=torch.long)
    starts = torch.cumsum(counts, 0) - counts
    feed: Feed
    if options.in_memory:
        objects = load(obj_requests, (obj_store, obj_store), desc=f"loading {name} objects")  # (N, 3, So, So)
        patches = load(part_requests, (part_store, part_store), desc=f"loading {name} parts")  # (T, 3, Sp, Sp)
        feed = MemoryFeed(len(boxes), lambda idx: (objects[idx], patches[patch_rows(starts, counts, idx)[0]]))
    else:
        items = [
            [[obj_requests[i]], part_requests[int(starts[i]) : int(starts[i] + counts[i])]] for i in range(len(boxes))
        ]
        feed = StreamFeed(Regions(items, [(obj_store, obj_store), (part_store, part_store)]), options)

    def as_tensor(rows: list[np.ndarray]) -> Tensor:
        return torch.tensor(np.asarray(rows, dtype=np.float64).reshape(-1, 4), dtype=torch.float32)

    return BranchData(
        object_regions=as_tensor(obj_regions),
        object_boxes=as_tensor([b.box for b in boxes]),
        patch_regions=as_tensor(part_regions),
        patch_boxes=as_tensor(part_boxes),
        patch_start=starts,
        patch_count=counts,
        labels=torch.tensor(labels, dtype=torch.long),
        feed=feed,
    )


def split_data(
    root: Path, rows: list[ManifestRow], boxes: list[ImageBoxes], cfg: TrainRefineConfig, margin: float, name: str,
    options: FeedOptions, cache: ImageCache | None = None,
) -> BranchData:
    """:func:`load_branch_data` for manifest rows at the sizes of ``cfg`` (cut from ``cache`` when given)."""
    return load_branch_data(
        [root / r.path for r in rows], [(r.width, r.height) for r in rows], boxes, [r.label for r in rows],
        resized_side(cfg.input_size, cfg.augment), resized_side(part_size(cfg), cfg.augment), margin, name, options,
        cache=cache,
    )


def part_size(cfg: TrainRefineConfig) -> int:
    """Side of the part patches fed to the part branch (``part_size``, 0 -> ``input_size // 2``)."""
    return cfg.part_size or cfg.input_size // 2


def eval_inputs(objects: Tensor, patches: Tensor, cfg: TrainRefineConfig) -> tuple[Tensor, Tensor]:
    """A batch's object crops and patches (uint8, as :attr:`BranchData.feed` gives them), centre-cropped to the input
    and part sizes."""
    return center_crop(objects, cfg.input_size), center_crop(patches, part_size(cfg))
