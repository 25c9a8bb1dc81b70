"""Image regions decoded: crop to the manifest's area (or a box), resize; then batched augmentation on uint8 tensors.

A region is cut from the decoded image cache that `fgpipe prepare` builds (data/NAME/images.h5,
:mod:`fgpipe.imagecache`) when it holds the image, so that no file is decoded at all; otherwise the file is decoded
(JPEGs at reduced scale with PIL's ``draft`` where that loses nothing). :func:`decode_request` is the one place a
region becomes uint8 pixels: the input pipeline's workers (:mod:`fgpipe.streaming`), :func:`load_regions` (many
regions in threads into one tensor) and :func:`decode_batch` all call it, so a region is the same pixels whichever
path read it. Augmentation then works on whole batches, in the training process, drawing from its generator.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fgpipe.config import AugmentConfig
from fgpipe.console import progress
from fgpipe.errors import DatasetError
from fgpipe.imagecache import ImageCache
from fgpipe.images import DECODE_ERRORS, open_image, to_rgb
from fgpipe.manifest import Box, DatasetInfo, ManifestRow
from fgpipe.runtime import process_cores

T = TypeVar("T")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_region(path: Path, region: Box, out_wh: tuple[int, int], cache: ImageCache | None = None) -> np.ndarray:
    """Decode ``region`` (x0, y0, x1, y1 in original pixels) of an image, resized to ``out_wh``.

    Returns (H, W, 3) uint8. When ``cache`` holds ``path`` the region is cut from its decoded copy (scaled
    to it); otherwise JPEGs are decoded at the coarsest DCT scale that still leaves the region at least
    ``out_wh`` large, which is exact up to resampling and several times faster.
    """
    if cache is not None:
        cut = cache.cut(path, region, out_wh)
        if cut is not None:
            return cut
    x0, y0, x1, y1 = region
    with open_image(path) as img:
        full_w, full_h = img.size
        need = (
            max(1, math.ceil(out_wh[0] * full_w / max(x1 - x0, 1e-6))),
            max(1, math.ceil(out_wh[1] * full_h / max(y1 - y0, 1e-6))),
        )
        if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK"):
            img.draft(img.mode, need)
        img.load()
        # a JPEG draft decodes at exactly 1/k scale (k = 1, 2, 4, 8) but rounds the size up, so its last row or
        # column may be block padding: map the region with 1/k, not with the rounded size
        k = max(1, round(full_w / img.size[0]))
        sx = sy = 1.0 / k
        rgb = to_rgb(img)
    box = (x0 * sx, y0 * sy, x1 * sx, y1 * sy)
    out = rgb.resize(out_wh, Image.BILINEAR, box=box, reducing_gap=None)
    return np.array(out, dtype=np.uint8)  # a writable copy


@dataclass(frozen=True)
class LoadRequest:
    """One image region to load: the file, the region in original pixels, and the decoded image cache to
    cut it from (None, or a cache without the file: the file is decoded)."""

    path: Path
    region: Box
    cache: ImageCache | None = None


def decode_request(req: LoadRequest, out_wh: tuple[int, int]) -> Tensor:
    """One region decoded by :func:`decode_region`: (3, H, W) uint8; an unreadable file is a :class:`DatasetError`."""
    try:
        arr = decode_region(req.path, req.region, out_wh, req.cache)  # (H, W, 3)
    except DECODE_ERRORS as exc:  # PIL's errors for a missing, corrupt or too large file (a bug is not caught)
        raise DatasetError(f"cannot read image {req.path}: {exc} (rerun `fgpipe prepare` to recheck the dataset)") from None
    return torch.from_numpy(arr).permute(2, 0, 1)  # (3, H, W)


def load_regions(requests: list[LoadRequest], out_wh: tuple[int, int], desc: str = "loading images") -> Tensor:
    """Decode many regions in threads into one (N, 3, H, W) uint8 tensor, with a progress bar."""
    out = torch.empty((len(requests), 3, out_wh[1], out_wh[0]), dtype=torch.uint8)

    def one(i: int) -> None:
        out[i] = decode_request(requests[i], out_wh)

    with progress() as bar, ThreadPoolExecutor(max_workers=process_cores()) as pool:
        task = bar.add_task(desc, total=len(requests))
        for _ in pool.map(one, range(len(requests))):
            bar.advance(task)
    return out


def whole_image_requests(root: Path, rows: list[ManifestRow], cache: ImageCache | None = None) -> list[LoadRequest]:
    """The manifest area of each image (the full image, less any banner the manifest excludes)."""
    return [LoadRequest(root / r.path, (0.0, 0.0, float(r.width), float(r.height)), cache) for r in rows]


def check_image_files(
    info: DatasetInfo, rows: Sequence[ManifestRow], cache: ImageCache | None, dataset: str, manifest: Path
) -> None:
    """Refuse, before a stage writes anything, when an image file it will decode changed since `fgpipe prepare`.

    ``info``: data/NAME/dataset.json as the stage read it; ``rows``: the rows the stage decodes; ``manifest``: the
    file they come from, for the message. Each row whose image ``cache`` does not hold (every row without a cache)
    must still have its file, which must open as an image of the size the manifest records (its width, and its
    height plus the banner prepare dropped, dataset.json's ``crop_bottom``). Only the headers are read, in threads
    (one per available core). The error lists each image id and file, and says to restore the files or rerun
    prepare: a stage that found out midway would have stopped with some outputs rewritten and others not, and a
    replaced file would be decoded silently.
    """
    todo = [r for r in rows if cache is None or info.root / r.path not in cache]

    def problem(r: ManifestRow) -> str | None:
        path = info.root / r.path
        try:
            with open_image(path) as img:  # the header only
                size = img.size
        except FileNotFoundError:
            return f"image id {r.image_id}: {path} is missing"
        except OSError as exc:  # PIL's error for an unidentified file, ImageTooLargeError (open_image raises no other)
            return f"image id {r.image_id}: {path} cannot be read ({type(exc).__name__}: {exc})"
        want = (r.width, r.height + info.crop_bottom)
        if size != want:
            return f"image id {r.image_id}: {path} is {size[0]} x {size[1]} pixels, not the {want[0]} x {want[1]} prepare read"
        return None

    if len(todo) > 1:
        with ThreadPoolExecutor(max_workers=process_cores()) as pool:
            found = list(pool.map(problem, todo))
    else:
        found = [problem(r) for r in todo]
    bad = [p for p in found if p is not None]
    if bad:
        shown = "\n  ".join(bad[:20]) + (f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else "")
        raise DatasetError(
            f"{len(bad)} image file(s) are missing or changed since `fgpipe prepare --dataset {dataset}` listed them in "
            f"{manifest}:\n  {shown}\nRestore them, or rerun `fgpipe prepare --dataset {dataset}` "
            "(and the stages after it) to use the dataset as it is now."
        )


# --------------------------------------------------------------------------- batched augmentation
def normalize(x: Tensor) -> Tensor:
    """uint8 or [0, 1] float (B, 3, H, W) -> ImageNet-normalised float32."""
    if x.dtype == torch.uint8:
        x = x.float().div_(255.0)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def center_crop(x: Tensor, size: int) -> Tensor:
    """Central ``size`` x ``size`` window of (B, C, S, S)."""
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def train_augment(x: Tensor, size: int, cfg: AugmentConfig, generator: torch.Generator) -> Tensor:
    """Random crop to ``size``, horizontal flip, colour jitter; uint8 (B, 3, S, S) -> float [0, 1] (B, 3, size, size).

    Every random draw comes from ``generator`` so a seeded epoch replays exactly.
    """
    b, _, h, w = x.shape
    tops = torch.randint(0, h - size + 1, (b,), generator=generator)
    lefts = torch.randint(0, w - size + 1, (b,), generator=generator)
    flips = torch.rand(b, generator=generator) < 0.5
    jitter = (torch.rand(b, 3, generator=generator) * 2 - 1) * cfg.color_jitter + 1  # (B, 3) factors
    out = torch.empty((b, 3, size, size), dtype=torch.float32)
    for i in range(b):
        crop = x[i, :, tops[i] : tops[i] + size, lefts[i] : lefts[i] + size]
        out[i] = crop.flip(-1) if (cfg.hflip and flips[i]) else crop
    out.div_(255.0)
    if cfg.color_jitter > 0:
        brightness, contrast, saturation = (jitter[:, k].view(b, 1, 1, 1) for k in range(3))
        out.mul_(brightness)
        gray = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).unsqueeze(1)  # (B, 1, H, W)
        out = (out - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * out[:, 0] + 0.587 * out[:, 1] + 0.114 * out[:, 2]).unsqueeze(1)
        out = (gray + (out - gray) * saturation).clamp_(0.0, 1.0)
    return out


def resized_side(input_size: int, cfg: AugmentConfig) -> int:
    """Side of the square images held in memory: the input size times the resize ratio."""
    return int(round(input_size * cfg.resize_ratio))


# --------------------------------------------------------------------------- batched decoding
def decode_batch(requests: Sequence[LoadRequest], out_wh: tuple[int, int], pool: ThreadPoolExecutor | None = None) -> Tensor:
    """Decode one batch of regions into a (B, 3, H, W) uint8 tensor (in ``pool``'s threads when given)."""
    out = torch.empty((len(requests), 3, out_wh[1], out_wh[0]), dtype=torch.uint8)

    def one(i: int) -> None:
        out[i] = decode_request(requests[i], out_wh)

    if pool is None:
        for i in range(len(requests)):
            one(i)
    else:
        for _ in pool.map(one, range(len(requests))):
            pass
    return out


def batched(items: Sequence[Any], batch_size: int) -> list[Sequence[Any]]:
    """Consecutive slices of at most ``batch_size`` items (the last may be shorter)."""
    return [items[i : i + batch_size] for i in range(0, len(items), batch_size)]


def prefetched(
    jobs: Iterable[tuple[T, Sequence[LoadRequest]]], out_wh: tuple[int, int], decode: Callable[..., Tensor] | None = None
) -> Iterator[tuple[T, Tensor]]:
    """``(payload, decoded batch)`` for each ``(payload, requests)`` job, in order.

    Each batch is decoded (by :func:`decode_batch`, in threads) while the caller works on the previous one,
    so at most two decoded batches exist at a time; ``jobs`` is advanced lazily, one ahead.
    """
    decode = decode or decode_batch
    it = iter(jobs)
    with ThreadPoolExecutor(max_workers=process_cores()) as pool, ThreadPoolExecutor(max_workers=1) as ahead:

        def submit() -> tuple[T, Future[Tensor]] | None:
            job = next(it, None)
            if job is None:
                return None
            payload, requests = job
            return payload, ahead.submit(decode, requests, out_wh, pool)

        pending = submit()
        while pending is not None:
            payload, future = pending
            images = future.result()
            pending = submit()
            yield payload, images
