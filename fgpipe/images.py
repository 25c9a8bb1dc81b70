"""Image decoding: every mode (grayscale, CMYK, alpha, 16-bit, palette) becomes 8-bit RGB.

Every image fgpipe decodes is opened by :func:`open_image`, which refuses one that declares more pixels than
a limit (``prepare.max_pixels`` where a stage passes it) before any pixel is decoded: a small file declaring
20000 x 10000 pixels (a decompression bomb) would otherwise take gigabytes. It is refused as an
:class:`ImageTooLargeError`, an OSError like every other unreadable image, so each caller's handling of
unreadable images (prepare's list and ``skip_bad``, predict's report-and-skip, the loaders' clean error)
covers it. PIL's own decompression-bomb guard (``Image.MAX_IMAGE_PIXELS``: a warning above it, an error above
twice it) is left as it is; its warning is filtered out once, when this module is imported, since fgpipe
applies its own limit right after every open (a filter around each open would be process-wide, not
thread-safe, and would reset Python's warn-once registry).
"""

from __future__ import annotations

import os
import re
import stat
import warnings
from typing import IO

import numpy as np
from PIL import Image, ImageFile

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, never silently padded
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # fgpipe's own limit follows every open

# The default of prepare.max_pixels: PIL's own default Image.MAX_IMAGE_PIXELS (1024**3 / 4 / 3, about a
# 9459 x 9459 image, 268 MB as 8-bit RGB), past which PIL warns of a decompression bomb.
DEFAULT_MAX_PIXELS = 89_478_485
# The highest limit fgpipe accepts: twice PIL's default, past which PIL's Image.open itself refuses a file.
# Loaders of images prepare already accepted apply it (they never refuse what prepare let through).
PIXEL_CEILING = 2 * DEFAULT_MAX_PIXELS
# What PIL raises for a file it cannot decode: OSError (a missing, unidentified or truncated file; PIL's
# UnidentifiedImageError and ImageTooLargeError are OSErrors), DecompressionBombError (a frame larger than its
# header said), and SyntaxError, which PIL's plugins raise for a broken chunk met while decoding (Pillow 13's
# PngImagePlugin ChunkStream.read, its load_read; Image.open itself turns it into UnidentifiedImageError).
# Anything else (a ValueError, a TypeError) is a bug, not a bad image, and is not caught.
DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, Image.DecompressionBombError, SyntaxError)


class ImageTooLargeError(OSError):
    """An image declares more pixels than the limit: refused before any pixel is decoded."""


class NotAFileError(OSError):
    """A path that is not a regular file (a folder, a FIFO, a device): refused before it is opened, since reading
    a FIFO or /dev/zero would block or never end."""


def _require_regular_file(path: str | os.PathLike[str]) -> None:
    """Raise :class:`NotAFileError` for a path that is not a regular file (links followed); OSError (missing, a
    symlink loop, no permission) as ``os.stat`` raises it."""
    mode = os.stat(path).st_mode
    if stat.S_ISREG(mode):
        return
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    what = next((name for test, name in kinds if test(mode)), "a special file")
    raise NotAFileError(f"not a regular file ({what}): only image files are read")


def open_image(path: str | os.PathLike[str] | IO[bytes], max_pixels: int | None = None) -> ImageFile.ImageFile:
    """``Image.open(path)`` (the header only, nothing decoded yet) that refuses an image over ``max_pixels``.

    ``max_pixels``: ``prepare.max_pixels`` where a file is read for the first time (prepare, predict); None for a
    file `fgpipe prepare` accepted, held to :data:`PIXEL_CEILING` (prepare's limit is at most that). Raises
    :class:`ImageTooLargeError` naming the declared size and what to do, or OSError (PIL's UnidentifiedImageError
    included) for a missing or unidentifiable file, :class:`NotAFileError` for a folder, FIFO or device (checked
    before anything is opened). The caller closes the image.
    """
    if isinstance(path, (str, os.PathLike)):
        _require_regular_file(path)  # a FIFO or a device is never opened
    try:
        img = Image.open(path)
    except Image.DecompressionBombError as exc:  # over twice PIL's Image.MAX_IMAGE_PIXELS: PIL refuses it
        found = re.search(r"\((\d+) pixels\)", str(exc))
        raise ImageTooLargeError(_too_large(f"{found.group(1)} pixels" if found else f"too many pixels ({exc})", max_pixels)) from None
    width, height = img.size
    if width * height > (PIXEL_CEILING if max_pixels is None else max_pixels):
        img.close()
        raise ImageTooLargeError(_too_large(f"{width} x {height} = {width * height} pixels", max_pixels))
    return img


def _too_large(declared: str, max_pixels: int | None) -> str:
    """The message of an image over ``max_pixels`` (None: a file prepare accepted, see :func:`open_image`)."""
    limit = PIXEL_CEILING if max_pixels is None else max_pixels
    said = f"image declares {declared}, over the limit of {limit} pixels (a decompression bomb"
    if max_pixels is None:  # prepare read it within its limit: the file has changed since
        return f"{said}; `fgpipe prepare` accepted no such file, so it was replaced since: restore it, or rerun `fgpipe prepare`)"
    if max_pixels < PIXEL_CEILING:
        return f"{said}; if the image is genuine, raise prepare.max_pixels, at most {PIXEL_CEILING})"
    return f"{said}; {PIXEL_CEILING}, twice PIL's own limit, is the most fgpipe reads: shrink the image)"


def open_rgb(path: str | os.PathLike[str], max_pixels: int | None = None) -> Image.Image:
    """Decode an image fully and return it as 8-bit RGB (``max_pixels`` as in :func:`open_image`).

    Raises one of :data:`DECODE_ERRORS` (PIL's UnidentifiedImageError and :class:`ImageTooLargeError` are
    OSErrors) for a missing, corrupt, truncated or too large file.
    """
    with open_image(path, max_pixels) as img:
        try:
            img.load()
        except Image.DecompressionBombError as exc:  # a GIF frame or TIFF tile larger than its header said
            raise ImageTooLargeError(str(exc)) from None
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


def image_size(path: str | os.PathLike[str], verify: bool, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height); with ``verify`` the whole image is decoded so corrupt files are caught.

    An image over ``max_pixels`` (as in :func:`open_image`) raises :class:`ImageTooLargeError` either way, before
    any decoding.
    """
    if verify:
        img = open_rgb(path, max_pixels)
        return img.size
    with open_image(path, max_pixels) as img:
        return img.size
