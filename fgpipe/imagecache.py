"""The decoded image cache, data/NAME/images.h5: every manifest image decoded once, by `fgpipe prepare`.

Each image's manifest area (the whole image, less any banner the manifest excludes) is decoded, resized so
that its longest side is at most ``prepare.cache_side`` (aspect kept, never enlarged) and stored as raw
uint8 RGB in one contiguous array (layout in :mod:`fgpipe.h5schema`). The loaders memory-map it and cut
any region from it: region coordinates stay in original-image pixels and are scaled to the cached copy, so
no caller needs to know the cache exists (:func:`fgpipe.loader.decode_region` takes it as an option).

With ``cache_side`` at least the images' longest side the copy is lossless (decoded pixels, unresampled),
and a cut equals a cut from the JPEG file up to resampling; a smaller side saves disk and memory at the
price of blurrier crops of small objects (README, "Parameters that matter").
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from rich.markup import escape

from fgpipe.console import console, progress
from fgpipe.errors import ArtifactError, DatasetError
from fgpipe.h5schema import ImagesMeta, ImagesReader, ImagesWriter
from fgpipe.images import DECODE_ERRORS, open_image, to_rgb
from fgpipe.manifest import Box, ManifestRow
from fgpipe.runtime import available_cores

BATCH = 64  # images decoded (in threads) per write
DRAFT_MARGIN = 2  # JPEGs are decoded at a reduced DCT scale only when still this many times the cached size


def cached_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(w, h) of the cached copy of a ``width`` x ``height`` area: longest side at most ``side``, aspect kept."""
    if side <= 0:
        raise ValueError(f"cache side must be > 0, got {side}")
    scale = side / max(width, height)
    if scale >= 1.0:
        return width, height
    return max(1, round(width * scale)), max(1, round(height * scale))


def cache_image(path: str | os.PathLike[str], area_wh: tuple[int, int], out_wh: tuple[int, int]) -> np.ndarray:
    """The manifest area (0, 0, w, h) of an image file, resized to ``out_wh``: (H, W, 3) uint8.

    Antialiased bilinear (PIL's ``BILINEAR``, ``reducing_gap=None``, as :func:`fgpipe.loader.decode_region`);
    a JPEG at least ``DRAFT_MARGIN`` times larger than ``out_wh`` is first decoded at a reduced DCT scale.
    """
    with open_image(path) as img:
        full_w, full_h = img.size
        if img.format == "JPEG" and img.mode in ("RGB", "L", "CMYK") and out_wh != area_wh:
            need = (DRAFT_MARGIN * out_wh[0] * full_w // area_wh[0], DRAFT_MARGIN * out_wh[1] * full_h // area_wh[1])
            img.draft(img.mode, need)
        img.load()
        sx, sy = img.size[0] / full_w, img.size[1] / full_h
        rgb = to_rgb(img)
    if out_wh == area_wh and rgb.size == (full_w, full_h):  # stored as decoded: no resampling at all
        return np.array(rgb if rgb.size == area_wh else rgb.crop((0, 0, *area_wh)), dtype=np.uint8)
    box = (0.0, 0.0, area_wh[0] * sx, area_wh[1] * sy)
    return np.array(rgb.resize(out_wh, Image.BILINEAR, box=box, reducing_gap=None), dtype=np.uint8)


def build_image_cache(
    target: Path, root: Path, rows: Sequence[ManifestRow], side: int, manifest_sha256: str, provenance: dict[str, Any]
) -> dict[str, Any]:
    """Write images.h5 for ``rows`` (in their order) atomically; ``side`` 0 writes an empty file (caching off).

    Returns figures for the prepare metrics: side, images, megabytes.
    """
    sizes = [cached_size(r.width, r.height, side) for r in rows] if side > 0 else []
    total = sum(w * h * 3 for w, h in sizes)
    meta = ImagesMeta(cache_side=side, manifest_sha256=manifest_sha256, provenance=provenance)

    def one(i: int) -> np.ndarray:
        r = rows[i]
        try:
            return cache_image(root / r.path, (r.width, r.height), sizes[i])
        except DECODE_ERRORS as exc:  # PIL's errors for a corrupt, truncated or unknown file (a bug is not caught)
            raise DatasetError(
                f"cannot decode {root / r.path} for the image cache: {type(exc).__name__}: {exc} "
                "(set `verify_images: true` for this dataset to list every bad file, and `skip_bad: true` to skip them)"
            ) from None

    with ImagesWriter(target, meta, total) as writer:
        if sizes:
            with progress() as bar, ThreadPoolExecutor(max_workers=available_cores()) as pool:
                task = bar.add_task(f"caching images (longest side {side})", total=len(rows))
                for start in range(0, len(rows), BATCH):
                    idx = range(start, min(start + BATCH, len(rows)))
                    images = list(pool.map(one, idx))
                    writer.append(
                        [rows[i].image_id for i in idx], [rows[i].path for i in idx],
                        [(rows[i].width, rows[i].height) for i in idx], images,
                    )
                    bar.advance(task, len(idx))
    return {"side": side, "images": len(sizes), "megabytes": round(total / 2**20, 2)}


class ImageCache:
    """images.h5 opened for reading: the decoded copies, read on demand with positioned reads (thread-safe).

    Each image is read with ``os.pread`` rather than through a memory map, so the pages of images already
    used are not counted in the process's resident memory: a pass over N images keeps memory flat in N (the
    OS page cache still keeps the file hot).

    Images are found by their file path (``root`` joined with the manifest path), as :class:`fgpipe.loader.LoadRequest`
    names them; :meth:`cut` returns None for a file it does not hold.
    """

    def __init__(self, path: str | os.PathLike[str], root: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        with ImagesReader(self.path) as reader:
            self.meta = reader.meta
            rec = reader.read()
            self._base, self._length = reader.pixels_offset()  # the pixel block's place in the file
        self._fd = os.open(self.path, os.O_RDONLY)
        self._original = rec.original_wh  # (N, 2)
        self._cached = rec.cached_wh  # (N, 2)
        self._offsets = rec.offsets  # (N,)
        self._index = {str(Path(root) / p): i for i, p in enumerate(rec.paths)}
        self.image_ids = rec.image_ids

    @property
    def side(self) -> int:
        """Longest side of the cached copies (0: caching off, the file holds no image)."""
        return self.meta.cache_side

    def __len__(self) -> int:
        return len(self._offsets)

    def __contains__(self, path: object) -> bool:
        return str(path) in self._index

    def image(self, i: int) -> np.ndarray:
        """Cached copy of image ``i`` (manifest order): a read-only (h, w, 3) uint8 view."""
        w, h = (int(v) for v in self._cached[i])
        start, size = int(self._offsets[i]), w * h * 3
        if start + size > self._length:
            raise DatasetError(f"{self.path}: image {i} lies outside the pixel block (rerun `fgpipe prepare`)")
        data = os.pread(self._fd, size, self._base + start)
        if len(data) != size:
            raise DatasetError(f"{self.path}: truncated (image {i}); rerun `fgpipe prepare`")
        return np.frombuffer(data, dtype=np.uint8).reshape(h, w, 3)

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for a data-loader worker started by spawn: everything but the descriptor, reopened there."""
        return {k: v for k, v in self.__dict__.items() if k != "_fd"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd = os.open(self.path, os.O_RDONLY)

    def close(self) -> None:
        """Close the file (also done when the object is collected)."""
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def cut(self, path: str | os.PathLike[str], region: Box, out_wh: tuple[int, int]) -> np.ndarray | None:
        """``region`` (original pixels) of the image at ``path`` resized to ``out_wh``: (H, W, 3) uint8, or None."""
        i = self._index.get(str(path))
        if i is None:
            return None
        ow, oh = (int(v) for v in self._original[i])
        cw, ch = (int(v) for v in self._cached[i])
        x0, y0, x1, y1 = (float(v) for v in region)
        # to cached pixels; multiplying first keeps the image's edges exact (W * cw / W == cw)
        box = (
            min(max(x0 * cw / ow, 0.0), cw), min(max(y0 * ch / oh, 0.0), ch),
            min(max(x1 * cw / ow, 0.0), cw), min(max(y1 * ch / oh, 0.0), ch),
        )
        return resize_region(self.image(i), box, out_wh)


def open_image_cache(path: Path, root: Path, manifest_sha256: str, dataset: str) -> ImageCache | None:
    """The image cache the stages read: None when ``path`` is missing or caching is off (the loaders then decode
    the image files); refuses a cache built from another manifest."""
    if not path.is_file():
        console.print(
            f"[yellow]no image cache {escape(str(path))}: decoding the image files "
            f"(`fgpipe prepare --dataset {escape(dataset)}` builds it)",
            highlight=False,
        )
        return None
    cache = ImageCache(path, root)
    if cache.meta.manifest_sha256 != manifest_sha256:
        raise ArtifactError(
            f"{path} was built from another manifest than {path.parent / 'manifest.csv'} (manifest_sha256 "
            f"{cache.meta.manifest_sha256[:12]}..., expected {manifest_sha256[:12]}...): rerun "
            f"`fgpipe prepare --dataset {dataset}` (or `dvc repro`)"
        )
    return cache if cache.side > 0 else None


def resize_region(image: np.ndarray, box: tuple[float, float, float, float], out_wh: tuple[int, int]) -> np.ndarray:
    """``box`` (x0, y0, x1, y1; pixel edges) of an (H, W, 3) uint8 image resized to ``out_wh``: (h, w, 3) uint8.

    Antialiased bilinear, as PIL's ``resize(out_wh, BILINEAR, box=box, reducing_gap=None)`` (which it calls);
    the whole image goes through torch's uint8 antialiased kernel instead, a port of PIL's that is within one
    grey level of it and about 3x faster (a smaller box cannot: PIL's filter reads the pixels around it).
    """
    h, w = image.shape[:2]
    if tuple(float(v) for v in box) == (0.0, 0.0, float(w), float(h)):
        if (w, h) == tuple(out_wh):
            return np.array(image)
        t = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None]  # (1, 3, h, w), a writable copy
        out = F.interpolate(t, size=(out_wh[1], out_wh[0]), mode="bilinear", antialias=True, align_corners=False)
        return out[0].permute(1, 2, 0).contiguous().numpy()  # (H, W, 3)
    out_img = Image.fromarray(np.ascontiguousarray(image)).resize(out_wh, Image.BILINEAR, box=box, reducing_gap=None)
    return np.array(out_img, dtype=np.uint8)
