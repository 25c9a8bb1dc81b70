"""What every figure fgpipe draws shares (the font, the ink, text fitted to a width, atomic PNG writes) and evaluate's
confusion heatmap (data/NAME/confusion.png). The per-image pictures of heatmaps, boxes and parts are
:mod:`fgpipe.preview`. Drawing uses PIL and numpy only.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from fgpipe.store import atomic_path

TEXT = (20, 20, 20)  # the ink of every label


def label_font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """PIL's built-in font at ``size`` pixels."""
    return ImageFont.load_default(size=size)


def fit_text(draw: ImageDraw.ImageDraw, text: str, width: float, font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> str:
    """``text`` shortened with an ellipsis until it fits in ``width`` pixels."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "...", font=font) > width:
        text = text[:-1]
    return text + "..."


def save_png(image: Image.Image, path: Path) -> Path:
    """Atomically write ``image`` as PNG."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
    return path


# --------------------------------------------------------------------------- evaluate's confusion heatmap
_LOW, _HIGH = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])  # white -> dark blue


def confusion_image(matrix: np.ndarray, names: list[str], title: str) -> Image.Image:
    """A heatmap of ``matrix`` (K, K), each row normalised to its true class's images, with class labels.

    Cells shrink with K (4 to 36 pixels); when a cell is smaller than a text line only every n-th class is
    labelled; counts are written in the cells when they are large enough.
    """
    k = len(names)
    cell = int(np.clip(720 // max(k, 1), 4, 36))
    font, small = label_font(12), label_font(max(8, min(12, cell // 2)))
    every = max(1, math.ceil(15 / cell))  # label every n-th class so labels never overlap
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = int(min(200, max((probe.textlength(n, font=font) for n in names), default=10))) + 8
    shown = [(i, fit_text(probe, n, label_w - 8, font)) for i, n in enumerate(names) if i % every == 0]
    top = 28 + 16 + label_w
    left = 22 + label_w
    grid = k * cell
    width, height = left + grid + 90, top + grid + 20
    img = Image.new("RGB", (max(width, 420), height), (255, 255, 255))
    d = ImageDraw.Draw(img)
    d.text((8, 6), fit_text(d, title, img.width - 16, font), fill=TEXT, font=font)
    d.text((left, 28), "predicted class" + (f" (every {every}th labelled)" if every > 1 else ""), fill=TEXT, font=font)

    totals = matrix.sum(axis=1, keepdims=True)  # (K, 1)
    share = np.divide(matrix, totals, out=np.zeros(matrix.shape, dtype=np.float64), where=totals > 0)  # (K, K)
    colours = (_LOW + share[..., None] * (_HIGH - _LOW)).round().astype(np.uint8)  # (K, K, 3)
    heat = Image.fromarray(colours, mode="RGB").resize((grid, grid), Image.NEAREST)
    img.paste(heat, (left, top))
    d.rectangle([left - 1, top - 1, left + grid, top + grid], outline=(120, 120, 120))
    if cell >= 22:
        for r in range(k):
            for c in range(k):
                if matrix[r, c]:
                    ink = (255, 255, 255) if share[r, c] > 0.5 else TEXT
                    d.text((left + c * cell + cell / 2, top + r * cell + cell / 2), str(matrix[r, c]), fill=ink, font=small, anchor="mm")

    for i, text in shown:
        y = top + i * cell + cell / 2
        d.text((left - 6, y), text, fill=TEXT, font=font, anchor="rm")
        strip = Image.new("RGB", (label_w, 16), (255, 255, 255))
        ImageDraw.Draw(strip).text((2, 8), text, fill=TEXT, font=font, anchor="lm")
        rotated = strip.rotate(90, expand=True)  # reads bottom to top
        img.paste(rotated, (int(left + i * cell + cell / 2 - 8), top - label_w - 2))
    side_w = int(probe.textlength("true class", font=font)) + 4
    side = Image.new("RGB", (side_w, 16), (255, 255, 255))
    ImageDraw.Draw(side).text((2, 8), "true class", fill=TEXT, font=font, anchor="lm")
    img.paste(side.rotate(90, expand=True), (2, top + max(0, (grid - side_w) // 2)))

    # colour bar: share of the true class's images
    bx, by, bh = left + grid + 16, top, min(grid, 160)
    ramp = np.linspace(1.0, 0.0, bh)[:, None, None]  # (bh, 1, 1) top = 1
    bar = (_LOW + ramp * (_HIGH - _LOW)).round().astype(np.uint8).repeat(12, axis=1)  # (bh, 12, 3)
    img.paste(Image.fromarray(bar, mode="RGB"), (bx, by))
    d.text((bx + 16, by), "1", fill=TEXT, font=font, anchor="lt")
    d.text((bx + 16, by + bh), "0", fill=TEXT, font=font, anchor="lb")
    d.text((bx, by + bh + 4), "share", fill=TEXT, font=font)
    return img
