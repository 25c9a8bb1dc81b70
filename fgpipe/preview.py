"""Pictures of what extract-attention and extract-crops found: image, heatmap, object box, parts.

One picture per image, as a pair of tiles and a caption:

- left: the image with the ground-truth box (green, where the dataset has boxes), the predicted object box
  (red) and the MPALM part boxes (yellow);
- right: the heatmap, upsampled bilinearly over the whole image (the grid spans the image the network saw,
  the manifest area resized to the input size), blended over the image, with the object box;
- caption: image id, true class, predicted class (of the stored stage-1 logits), IoU with the ground truth,
  number of parts, and FALLBACK when the heatmap was empty and the box is the whole image.

``extract-crops`` draws a grid of the first ``crops.preview_images`` test images (data/NAME/crops_preview.png);
``fgpipe show`` draws one image (:mod:`fgpipe.commands.show`), ``fgpipe predict --save-png`` its own two tiles
with the same colours (:mod:`fgpipe.commands.predict`); the font, the ink and the PNG writes are
:mod:`fgpipe.figures`. Drawing uses PIL and numpy only.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fgpipe.errors import ArtifactError
from fgpipe.figures import TEXT, fit_text, label_font
from fgpipe.h5schema import AttentionReader, CropsReader
from fgpipe.loader import decode_region
from fgpipe.localize import box_iou
from fgpipe.manifest import ManifestRow, class_names

TILE = 224  # longest side of each tile, pixels
GAP = 8
CAPTION_LINES = 2
LINE = 15  # caption line height, pixels
BACKGROUND = (255, 255, 255)
COLOURS = {"ground truth": (0, 190, 60), "object box": (230, 30, 30), "parts": (255, 210, 0)}
# jet-like colormap anchors: value -> RGB in [0, 1]
_CMAP_X = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
_CMAP_RGB = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])


@dataclass(frozen=True)
class Sample:
    """Everything drawn for one image."""

    row: ManifestRow
    path: Path  # the image file
    heatmap: np.ndarray  # (h, w) in [0, 1]
    box: np.ndarray  # (4,) predicted object box, original pixels
    fallback: bool
    parts: np.ndarray  # (P, 4) valid part boxes, original pixels
    true_name: str
    predicted_name: str

    @property
    def iou(self) -> float | None:
        """IoU of the object box with the ground-truth box (None without one)."""
        if self.row.box is None:
            return None
        return float(box_iou(self.box[None].astype(np.float64), np.asarray(self.row.box, dtype=np.float64)[None])[0, 0])


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (H, W) -> RGB uint8 (H, W, 3), a jet-like colormap."""
    v = np.clip(values, 0.0, 1.0)
    rgb = np.stack([np.interp(v, _CMAP_X, _CMAP_RGB[:, c]) for c in range(3)], axis=-1)  # (H, W, 3)
    return (rgb * 255 + 0.5).astype(np.uint8)


def _tile_size(width: int, height: int) -> tuple[int, int]:
    scale = TILE / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _scaled(box: Sequence[float] | np.ndarray, sx: float, sy: float) -> list[float]:
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * sx, y0 * sy, max(x0 * sx, x1 * sx - 1), max(y0 * sy, y1 * sy - 1)]  # PIL boxes are inclusive


def draw_sample(sample: Sample) -> Image.Image:
    """The two tiles (image with boxes | heatmap overlay) and the caption of one image."""
    row = sample.row
    tw, th = _tile_size(row.width, row.height)
    sx, sy = tw / row.width, th / row.height
    image = Image.fromarray(decode_region(sample.path, (0.0, 0.0, float(row.width), float(row.height)), (tw, th)))

    left = image.copy()
    d = ImageDraw.Draw(left)
    if row.box is not None:
        d.rectangle(_scaled(row.box, sx, sy), outline=COLOURS["ground truth"], width=2)
    for part in sample.parts:
        d.rectangle(_scaled(part, sx, sy), outline=COLOURS["parts"], width=1)
    d.rectangle(_scaled(sample.box, sx, sy), outline=COLOURS["object box"], width=2)

    heat = Image.fromarray(sample.heatmap.astype(np.float32), mode="F").resize((tw, th), Image.BILINEAR)
    overlay = Image.blend(image, Image.fromarray(colormap(np.asarray(heat))), 0.55)
    d = ImageDraw.Draw(overlay)
    d.rectangle(_scaled(sample.box, sx, sy), outline=COLOURS["object box"], width=2)

    width = 2 * TILE + GAP
    panel = Image.new("RGB", (width, TILE + CAPTION_LINES * LINE + 4), BACKGROUND)
    panel.paste(left, ((TILE - tw) // 2, (TILE - th) // 2))
    panel.paste(overlay, (TILE + GAP + (TILE - tw) // 2, (TILE - th) // 2))
    d = ImageDraw.Draw(panel)
    font = label_font()
    iou = sample.iou
    correct = sample.predicted_name == sample.true_name
    lines = [
        f"{row.image_id}  true: {sample.true_name}",
        f"pred: {sample.predicted_name} ({'right' if correct else 'wrong'})  "
        + (f"IoU {iou:.2f}" if iou is not None else "no GT box")
        + f"  parts {len(sample.parts)}"
        + ("  FALLBACK (empty heatmap)" if sample.fallback else ""),
    ]
    for k, text in enumerate(lines):
        d.text((2, TILE + 2 + k * LINE), fit_text(d, text, width - 4, font), fill=TEXT, font=font)
    return panel


def render(samples: Sequence[Sample], title: str, columns: int = 2) -> Image.Image:
    """A grid of :func:`draw_sample` panels under a title and a colour legend."""
    panels = [draw_sample(s) for s in samples]
    pw, ph = (2 * TILE + GAP, TILE + CAPTION_LINES * LINE + 4) if not panels else panels[0].size
    cols = max(1, min(columns, len(panels)))
    rows = -(-len(panels) // cols) if panels else 0
    header = 2 * LINE + 10
    width = max(cols * pw + (cols + 1) * 2 * GAP, 2 * TILE + 4 * GAP)
    height = header + rows * (ph + 2 * GAP) + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    d = ImageDraw.Draw(canvas)
    font = label_font(13)
    d.text((2 * GAP, 4), fit_text(d, title, width - 4 * GAP, font), fill=TEXT, font=font)
    x = 2 * GAP
    legend = [*COLOURS.items(), ("heatmap: low -> high", None)]
    for name, colour in legend:
        y = 6 + LINE
        if colour is not None:
            d.rectangle([x, y + 2, x + 14, y + 12], outline=colour, width=2)
        else:
            bar = Image.fromarray(colormap(np.tile(np.linspace(0, 1, 40), (10, 1))))
            canvas.paste(bar, (x, y + 2))
            x += 26
        d.text((x + 20, y), name, fill=TEXT, font=label_font())
        x += 20 + int(d.textlength(name, font=label_font())) + 3 * GAP
    if not panels:
        d.text((2 * GAP, header + GAP), "no images to show", fill=TEXT, font=label_font())
    for i, panel in enumerate(panels):
        r, c = divmod(i, cols)
        canvas.paste(panel, (2 * GAP + c * (pw + 2 * GAP), header + GAP + r * (ph + 2 * GAP)))
    return canvas


def load_samples(
    rows: Sequence[ManifestRow], indices: Sequence[int], root: Path, attention: AttentionReader, crops: CropsReader
) -> list[Sample]:
    """The :class:`Sample` of each manifest row index (both files hold one row per manifest row, in its order)."""
    names = class_names(rows)
    samples = []
    for i in indices:
        att = attention.read(i, i + 1)
        crop = crops.read(i, i + 1)
        row = rows[i]
        if att.image_ids[0] != row.image_id or crop.image_ids[0] != row.image_id:
            raise ArtifactError(
                f"row {i} of {attention.path} / {crops.path} is image {att.image_ids[0]!r} / {crop.image_ids[0]!r}, "
                f"the manifest says {row.image_id!r}: rerun `fgpipe extract-attention` and `fgpipe extract-crops`"
            )
        n = int(crop.part_counts[0])
        pred = int(att.predictions[0])
        samples.append(
            Sample(
                row=row,
                path=root / row.path,
                heatmap=att.heatmaps[0],
                box=crop.boxes[0].astype(np.float64),
                fallback=bool(crop.fallback[0]),
                parts=crop.parts[0, :n].astype(np.float64),
                true_name=names[row.label],
                predicted_name=names[pred] if 0 <= pred < len(names) else str(pred),
            )
        )
    return samples


def natural_key(text: str) -> list[int | str]:
    """Sort key that orders digit runs by value: ``"2" < "10"``, ``"img_9" < "img_10"``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def preview_indices(rows: Sequence[ManifestRow], count: int) -> list[int]:
    """Manifest indices of ``count`` test images taken class by class: the first image of every class (in label
    order), then the second of every class, and so on, each class's images in image-id order (natural order
    of digit runs). A preview of 8 images of an 8-class dataset shows every class once."""
    per_class: dict[int, list[int]] = {}
    test = sorted((i for i, r in enumerate(rows) if r.split == "test"), key=lambda i: natural_key(rows[i].image_id))
    for i in test:
        per_class.setdefault(rows[i].label, []).append(i)
    queues = [per_class[label] for label in sorted(per_class)]
    rounds = itertools.zip_longest(*queues)  # (first of each class), (second of each class), ...
    return [i for i in itertools.chain.from_iterable(rounds) if i is not None][:count]


def safe_name(image_id: str) -> str:
    """An image id usable in a file name (``test/class0/000`` -> ``test_class0_000``)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", image_id).strip("._") or "image"
