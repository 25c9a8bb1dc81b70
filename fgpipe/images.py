"""Image decoding: every mode (grayscale, CMYK, alpha, 16-bit, palette) becomes 8-bit RGB."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded


def open_rgb(path: str | os.PathLike[str]) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB.

    Raises OSError (PIL's UnidentifiedImageError included) for a missing, corrupt or truncated file.
    """
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to RGB: 16-bit is rescaled, alpha is composited over white."""
    if img.mode == "RGB":
        return img.copy()
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = max(float(arr.max() - arr.min()), 1e-12)
        return Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def image_size(path: str | os.PathLike[str], verify: bool) -> tuple[int, int]:
    """(width, height); with ``verify`` the whole image is decoded so corrupt files are caught."""
    if verify:
        img = open_rgb(path)
        return img.size
    with Image.open(path) as img:
        return img.size
