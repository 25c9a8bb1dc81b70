"""The built-in fine-grained synthetic dataset: one small "bird" per image, classes differ only in part details.

Every image holds exactly one object, a bird-like figure made of four parts (``head`` with beak and eye,
``wing``, ``tail``, ``body``) drawn in the same silhouette for every class, at a random position, length
(``object_size``, a fraction of the image side), rotation (``max_rotation`` degrees either way) and facing
(left or right), on a textured background with ``distractors`` clutter shapes: single parts (decoys: with a
random class's marking, or plain with ``decoy_markings: false``), blobs in the object's colours, specks in
the markings' colours and twigs, never a whole object. Plain decoys have the object's shapes and colours
but none of its class evidence: they fool class-agnostic localisers (AOLM, the mean attention map), not a
class-aware one (OAAM), which is TL-AAM's argument.

A class is a unique combination of one marking per part (e.g. red crown + wing bars + white tail tip), so no
single part decides the class. ``class_markings`` picks the markings each part's classes draw from. Some
markings are coarse colours a whole-image view reads at any resolution (``redcrown``/``bluecrown``, and the
plumage markings ``greyplumage``, ``skyplumage``, ``lilacplumage``, ``tealplumage``, ``roseplumage``, which
colour the body, head and tail); others are fine patterns whose period ``marking_detail`` scales.
``wingbars`` and ``wingstreaks`` are the same pale bands across or along the wing: the same colour and the
same share of the wing, so once the bands are too fine to resolve the two wings look alike, and only a crop
zoomed to the object tells them apart. The defaults in params.yaml combine both: plumage and crown colours
spread class evidence over the whole bird, for the class-aware heatmap to outline, and the wing needs the
object crop's resolution.

This module is the generator (:func:`generate`, what ``run.NAME`` names in params.yaml for a synthetic dataset);
the files it writes under ``root`` and the reader prepare lists them with are :mod:`fgpipe.datasets.synthetic_reader`.
The parts and markings (hence the class limit) are the options' vocabulary, :data:`fgpipe.config.SYNTHETIC_MARKINGS`.
The object box is the tight box of every pixel the object covers at all (anti-aliased edges included), a part box
that of the pixels where the part is visible. Generation is deterministic: the same options give byte-identical
files on the same library versions.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from fgpipe.config import SYNTHETIC_MARKINGS as MARKINGS
from fgpipe.config import SYNTHETIC_PARTS as PARTS
from fgpipe.config import SyntheticOptions
from fgpipe.console import progress
from fgpipe.datasets.synthetic_reader import ANNOTATION_COLUMNS, FILES, PART_COLUMNS, SPLIT_NAMES
from fgpipe.errors import DatasetError
from fgpipe.manifest import Box
from fgpipe.runtime import available_cores
from fgpipe.store import output_error

# Bump whenever the rendering or the layout changes: an existing dataset with another version is regenerated.
GENERATOR_VERSION = "synthetic-birds-1"
JPEG_QUALITY = 92
SUPERSAMPLE = 2  # sub-pixels per pixel side when drawing shapes (anti-aliasing)


# Colours (RGB): the object's (shared by every class), the markings' and the background palette.
BODY = np.array([150.0, 118.0, 80.0])
WING = np.array([118.0, 90.0, 60.0])
HEAD = np.array([140.0, 110.0, 76.0])
TAIL = np.array([112.0, 86.0, 58.0])
BEAK = np.array([70.0, 62.0, 50.0])
EYE = np.array([22.0, 20.0, 20.0])
RED = np.array([205.0, 45.0, 35.0])
DARK = np.array([38.0, 32.0, 28.0])
WHITE = np.array([238.0, 234.0, 220.0])
YELLOW = np.array([228.0, 196.0, 48.0])
BLUE = np.array([52.0, 92.0, 196.0])
GREY = np.array([112.0, 118.0, 138.0])
SKY = np.array([96.0, 160.0, 226.0])
LILAC = np.array([150.0, 112.0, 178.0])
TEAL = np.array([48.0, 150.0, 160.0])
ROSE = np.array([180.0, 100.0, 115.0])
# body markings that colour the whole plumage: index in MARKINGS["body"] -> colour
PLUMAGE = {
    MARKINGS["body"].index(name): colour
    for name, colour in (("greyplumage", GREY), ("skyplumage", SKY), ("lilacplumage", LILAC), ("tealplumage", TEAL),
                         ("roseplumage", ROSE))
}
PLUMAGE_PARTS = ("head", "tail", "body")  # the parts a plumage marking recolours (the wing keeps its own)
OBJECT_COLOURS = (BODY, WING, HEAD, TAIL)
MARK_COLOURS = (RED, DARK, WHITE, YELLOW)
BACKGROUND = np.array(
    [[92, 112, 70], [118, 128, 88], [78, 92, 62], [138, 130, 102], [104, 98, 80], [126, 118, 86], [86, 100, 84]],
    dtype=np.float64,
)

# Object geometry in its own frame: u forward (towards the beak), v down, lengths in units of the
# object's length L. Its extent is about u in [-0.5, 0.52], v in [-0.24, 0.18].
OBJECT_EXTENT = ((-0.47, -0.29), (0.53, 0.23))  # (u_min, v_min), (u_max, v_max): holds every shape of the object
PART_EXTENT = {  # the same for each part alone (markings, beak and eye included)
    "head": ((0.11, -0.29), (0.53, 0.03)),
    "wing": ((-0.28, -0.14), (0.16, 0.13)),
    "tail": ((-0.47, -0.16), (-0.19, 0.10)),
    "body": ((-0.28, -0.19), (0.28, 0.23)),
}
HEAD_C, HEAD_R = (0.27, -0.13), 0.155
EYE_C, EYE_R = (0.31, -0.155), 0.028
WING_C, WING_AB, WING_TILT = (-0.06, 0.0), (0.21, 0.11), math.radians(-10.0)
BODY_C, BODY_AB = (0.0, 0.02), (0.27, 0.20)
TAIL_POLY = ((-0.20, -0.06), (-0.46, -0.15), (-0.46, 0.09), (-0.20, 0.07))
BEAK_POLY = ((0.40, -0.19), (0.52, -0.12), (0.40, -0.08))

DISTRACTOR_KINDS = {"part": 0.25, "blob": 0.3, "speck": 0.25, "twig": 0.2}  # kind -> probability

Mask = np.ndarray  # bool array over a window's sub-pixels
Shape = Callable[[np.ndarray, np.ndarray], Mask]  # (u, v) -> inside


# --------------------------------------------------------------------------- what one image is
@dataclass(frozen=True)
class Pose:
    """Where the object (or a distractor) sits: centre in pixels, length L in pixels, rotation, facing."""

    cx: float
    cy: float
    length: float
    angle: float  # degrees, counter-clockwise on screen
    facing_left: bool


@dataclass(frozen=True)
class Distractor:
    """One clutter shape: ``kind`` is part (a single object part), blob, speck or twig."""

    kind: str
    pose: Pose
    part: str = ""  # kind part: which part
    marking: int = 0  # kind part: which marking of that part (-1: none, a plain decoy)
    colour: int = 0  # blob: index into OBJECT_COLOURS; speck: into MARK_COLOURS
    aspect: float = 1.0  # blob/speck: minor/major axis ratio; twig: width/length


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides one image's pixels; :func:`render` is a pure function of it."""

    size: int
    attributes: tuple[int, ...]  # marking index per part, in PARTS order
    pose: Pose
    object_gain: tuple[float, float, float]  # per-channel gain of the object's (and look-alikes') colours
    brightness: float
    distractors: tuple[Distractor, ...]
    background_seed: int
    detail: float = 1.0  # scale of the patterned markings' periods and sizes (marking_detail)


@dataclass
class Rendered:
    """A rendered image with the exact masks it was drawn with."""

    image: np.ndarray  # (H, W, 3) uint8
    object_mask: np.ndarray  # (H, W) bool: pixels the object covers at all
    part_masks: dict[str, np.ndarray]  # part -> (H, W) bool: pixels where that part is visible

    @property
    def box(self) -> Box:
        """Tight (x0, y0, x1, y1) box of the object, pixel edges."""
        return mask_box(self.object_mask)

    def part_boxes(self) -> dict[str, Box]:
        return {p: mask_box(m) for p, m in self.part_masks.items() if m.any()}


def mask_box(mask: np.ndarray) -> Box:
    """Tight (x0, y0, x1, y1) box of a non-empty boolean mask, pixel edges (x1, y1 exclusive)."""
    ys = np.flatnonzero(mask.any(axis=1))
    xs = np.flatnonzero(mask.any(axis=0))
    if ys.size == 0:
        raise ValueError("mask_box: the mask is empty")
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


# --------------------------------------------------------------------------- classes
Palette = tuple[tuple[int, ...], ...]  # per part (PARTS order): the marking indices classes draw from, in order
FULL_PALETTE: Palette = tuple(tuple(range(len(MARKINGS[p]))) for p in PARTS)


def marking_palette(opts: SyntheticOptions) -> Palette:
    """The markings each part's classes use (``class_markings``; every marking, in MARKINGS order, by default)."""
    chosen = opts.class_markings or {}
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown:
        raise DatasetError(f"datasets.*.synthetic.class_markings: unknown part `{unknown[0]}` (parts: {', '.join(PARTS)})")
    palette = []
    for part in PARTS:
        names = chosen.get(part, list(MARKINGS[part]))
        bad = [n for n in names if n not in MARKINGS[part]]
        if bad or not names or len(set(names)) != len(names):
            what = f"unknown marking `{bad[0]}`" if bad else "needs distinct markings, at least one"
            raise DatasetError(
                f"datasets.*.synthetic.class_markings.{part}: {what} (markings: {', '.join(MARKINGS[part])})"
            )
        palette.append(tuple(MARKINGS[part].index(n) for n in names))
    return tuple(palette)


def marking_counts(num_classes: int, palette: Palette = FULL_PALETTE) -> tuple[int, ...]:
    """How many markings each part uses: raised one part at a time (PARTS order, within the palette) until
    the combinations suffice."""
    most = math.prod(len(m) for m in palette)
    if not 1 <= num_classes <= most:
        raise DatasetError(f"datasets.*.synthetic.num_classes must be between 1 and {most} (the palette's combinations), got {num_classes}")
    counts = [1] * len(PARTS)
    while math.prod(counts) < num_classes:
        i = min((k for k in range(len(PARTS)) if counts[k] < len(palette[k])), key=lambda k: (counts[k], k))
        counts[i] += 1
    return tuple(counts)


def class_attributes(num_classes: int, palette: Palette = FULL_PALETTE) -> list[tuple[int, ...]]:
    """The marking (index into MARKINGS[part]) of each part for each class: evenly spaced over the
    combinations of the used markings."""
    counts = marking_counts(num_classes, palette)
    combos = list(itertools.product(*(range(c) for c in counts)))
    picks = [int(round(k * len(combos) / num_classes)) for k in range(num_classes)]
    return [tuple(palette[p][i] for p, i in enumerate(combos[j])) for j in picks]


def class_names(num_classes: int, palette: Palette = FULL_PALETTE) -> list[str]:
    """``01.redcrown-wingbars-whitetip``: a number and the markings of the parts that vary."""
    counts = marking_counts(num_classes, palette)
    width = len(str(num_classes))
    names = []
    for k, attrs in enumerate(class_attributes(num_classes, palette)):
        varying = [MARKINGS[p][a] for p, a, c in zip(PARTS, attrs, counts) if c > 1]
        names.append(f"{k + 1:0{width}d}." + "-".join(varying))
    return names


# --------------------------------------------------------------------------- sampling
def image_id(class_index: int, split: str, index: int) -> str:
    return f"c{class_index + 1:03d}_{split}_{index:05d}"


def _extent_radius(angle: float, extent: tuple[tuple[float, float], tuple[float, float]] = OBJECT_EXTENT) -> tuple[float, float]:
    """Half-width and half-height (in units of L) of a box around the origin holding the rotated extent, either facing."""
    c, s = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    (u0, v0), (u1, v1) = extent
    corners = [(u, v) for u in (u0, u1, -u0, -u1) for v in (v0, v1)]  # either facing
    xs = [abs(u * c + v * s) for u, v in corners]
    ys = [abs(-u * s + v * c) for u, v in corners]
    return max(xs), max(ys)


def sample_spec(opts: SyntheticOptions, class_index: int, split: str, index: int) -> ImageSpec:
    """The spec of image ``index`` of class ``class_index`` in ``split``; seeded by those and opts.seed only."""
    rng = np.random.default_rng([opts.seed, class_index, SPLIT_NAMES.index(split), index])
    size = opts.image_size
    lo, hi = opts.object_size
    length = float(rng.uniform(lo, hi)) * size
    angle = float(rng.uniform(-opts.max_rotation, opts.max_rotation))
    facing_left = bool(rng.random() < 0.5)
    rx, ry = _extent_radius(angle)
    margin = 2.0
    cx, cy = (float(rng.uniform(min(r * length + margin, size / 2), max(size - r * length - margin, size / 2))) for r in (rx, ry))
    pose = Pose(cx, cy, length, angle, facing_left)
    gain = tuple(float(g) for g in rng.uniform(0.92, 1.08, size=3))
    brightness = float(rng.uniform(0.85, 1.15))

    palette = marking_palette(opts)
    counts = marking_counts(opts.num_classes, palette)
    keep_out = (cx - rx * length, cy - ry * length, cx + rx * length, cy + ry * length)
    distractors = tuple(_sample_distractor(rng, opts, counts, palette, keep_out) for _ in range(opts.distractors))
    return ImageSpec(
        size=size,
        attributes=class_attributes(opts.num_classes, palette)[class_index],
        pose=pose,
        object_gain=gain,  # type: ignore[arg-type]
        brightness=brightness,
        distractors=distractors,
        background_seed=int(rng.integers(2**63)),
        detail=opts.marking_detail,
    )


def _sample_distractor(
    rng: np.random.Generator, opts: SyntheticOptions, counts: tuple[int, ...], palette: Palette, keep_out: tuple[float, ...]
) -> Distractor:
    """A clutter shape placed away from the object's box when 20 tries allow (it is drawn behind the object)."""
    size = opts.image_size
    lo, hi = opts.object_size
    kind = str(rng.choice(list(DISTRACTOR_KINDS), p=list(DISTRACTOR_KINDS.values())))
    length = float(rng.uniform(lo, hi)) * size
    angle = float(rng.uniform(0.0, 360.0))
    facing_left = bool(rng.random() < 0.5)
    pose = _place(rng, size, keep_out, length, angle, facing_left)
    if kind == "part":
        p = int(rng.integers(3))  # head, wing or tail: a lone part, with a marking some class uses
        marking = palette[p][int(rng.integers(counts[p]))]  # drawn either way, so the rest of the image is the same
        return Distractor("part", pose, part=PARTS[p], marking=marking if opts.decoy_markings else -1)
    if kind == "blob":
        return Distractor("blob", pose, colour=int(rng.integers(len(OBJECT_COLOURS))), aspect=float(rng.uniform(0.35, 0.9)))
    if kind == "speck":
        return Distractor("speck", pose, colour=int(rng.integers(len(MARK_COLOURS))), aspect=float(rng.uniform(0.4, 1.0)))
    return Distractor("twig", pose, aspect=float(rng.uniform(0.03, 0.05)))


def _place(
    rng: np.random.Generator, size: int, keep_out: tuple[float, ...], length: float, angle: float, facing_left: bool
) -> Pose:
    """A pose whose centre is outside ``keep_out`` (padded by 0.1 length) when 20 tries allow."""
    x0, y0, x1, y1 = keep_out
    pad = 0.1 * length
    for _ in range(20):
        cx, cy = (float(v) for v in rng.uniform(0, size, size=2))
        if not (x0 - pad <= cx <= x1 + pad and y0 - pad <= cy <= y1 + pad):
            break
    return Pose(cx, cy, length, angle, facing_left)


# --------------------------------------------------------------------------- shapes (object frame)
def _ellipse(cu: float, cv: float, a: float, b: float, tilt: float = 0.0) -> Shape:
    c, s = math.cos(tilt), math.sin(tilt)

    def inside(u: np.ndarray, v: np.ndarray) -> Mask:
        du, dv = u - cu, v - cv
        p, q = du * c + dv * s, -du * s + dv * c
        return (p / a) ** 2 + (q / b) ** 2 <= 1.0

    return inside


def _convex(points: tuple[tuple[float, float], ...]) -> Shape:
    """Inside a convex polygon given counter-clockwise or clockwise."""
    pts = [(float(pu), float(pv)) for pu, pv in points]  # Python floats keep the float32 grids float32
    area2 = sum(a[0] * b[1] - b[0] * a[1] for a, b in zip(pts, pts[1:] + pts[:1]))
    sign = 1.0 if area2 > 0 else -1.0
    edges = [(pu, pv, sign * (qu - pu), sign * (qv - pv)) for (pu, pv), (qu, qv) in zip(pts, pts[1:] + pts[:1])]

    def inside(u: np.ndarray, v: np.ndarray) -> Mask:
        ok = np.ones(u.shape, dtype=bool)
        for pu, pv, eu, ev in edges:
            ok &= eu * (v - pv) >= ev * (u - pu)
        return ok

    return inside


def _wing_coords(u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(along, across) the wing's own axes, origin at its centre."""
    du, dv = u - WING_C[0], v - WING_C[1]
    c, s = math.cos(WING_TILT), math.sin(WING_TILT)
    return du * c + dv * s, -du * s + dv * c


def _band(x: np.ndarray, period: float, width: float, phase: float = 0.0) -> Mask:
    """Periodic bands of ``width`` every ``period`` along x."""
    return np.mod(x - phase, period) < width


def _dots(x: np.ndarray, y: np.ndarray, period: float, radius: float, stagger: bool = True) -> Mask:
    """A grid of round dots (alternate rows shifted by half a period)."""
    row = np.floor(y / period)
    xs = x + (0.5 * period * np.mod(row, 2) if stagger else 0.0)
    dx = np.mod(xs, period) - 0.5 * period
    dy = np.mod(y, period) - 0.5 * period
    return dx * dx + dy * dy <= radius * radius


HEAD_SHAPE = _ellipse(HEAD_C[0], HEAD_C[1], HEAD_R, HEAD_R)
BEAK_SHAPE = _convex(BEAK_POLY)
EYE_SHAPE = _ellipse(EYE_C[0], EYE_C[1], EYE_R, EYE_R)
WING_SHAPE = _ellipse(WING_C[0], WING_C[1], WING_AB[0], WING_AB[1], WING_TILT)
BODY_SHAPE = _ellipse(BODY_C[0], BODY_C[1], BODY_AB[0], BODY_AB[1])
TAIL_SHAPE = _convex(TAIL_POLY)


def _head_marking(m: int, u: np.ndarray, v: np.ndarray, detail: float = 1.0) -> tuple[Mask, np.ndarray]:
    hu, hv = u - HEAD_C[0], v - HEAD_C[1]
    if m == 0:  # red crown: the top of the head
        return hv < -0.05, RED
    if m == 1:  # dark stripe through the eye, from the beak to the nape
        return np.abs(v - EYE_C[1]) < 0.04, DARK
    if m == 2:  # white cheek patch below the eye
        return (hu - 0.03) ** 2 + (hv - 0.07) ** 2 < 0.07**2, WHITE
    if m == 3:  # dark hood: the whole head
        return np.ones(u.shape, dtype=bool), DARK
    return hv < -0.05, BLUE  # blue crown: the red crown's region in blue


def _wing_marking(m: int, u: np.ndarray, v: np.ndarray, detail: float = 1.0) -> tuple[Mask, np.ndarray]:
    a, c = _wing_coords(u, v)
    if m == 0:  # pale bars across the wing
        return _band(a, 0.085 * detail, 0.035 * detail, phase=-0.02), WHITE
    if m == 1:  # white spots
        return _dots(a, c, 0.075 * detail, 0.022 * detail), WHITE
    if m == 2:  # pale edge all round
        return (a / (WING_AB[0] - 0.045)) ** 2 + (c / (WING_AB[1] - 0.045)) ** 2 > 1.0, WHITE
    if m == 3:  # yellow shoulder patch
        return a > 0.06, YELLOW
    # pale streaks along the wing: the bars turned a quarter turn, same period, width and colour, so the two
    # differ only in orientation; once too fine to resolve, both blur to the same mean colour
    return _band(c, 0.085 * detail, 0.035 * detail, phase=-0.02), WHITE


def _tail_marking(m: int, u: np.ndarray, v: np.ndarray, detail: float = 1.0) -> tuple[Mask, np.ndarray]:
    if m == 0:  # white tip
        return u < -0.39, WHITE
    if m == 1:  # dark band across the tail
        return (u > -0.37) & (u < -0.30), DARK
    if m == 2:  # red base
        return u > -0.33, RED
    return _band(v, 0.07 * detail, 0.03 * detail, phase=0.0), DARK  # stripes along the tail


def _body_marking(m: int, u: np.ndarray, v: np.ndarray, detail: float = 1.0) -> tuple[Mask, np.ndarray]:
    if m == 0:  # plain
        return np.zeros(u.shape, dtype=bool), BODY
    if m == 1:  # dark spots on the breast
        return (v > 0.08) & _dots(u, v, 0.075 * detail, 0.024 * detail), DARK
    if m == 2:  # streaks along the breast
        return (v > 0.07) & _band(v, 0.06 * detail, 0.025 * detail, phase=0.01), DARK
    if m == 3:  # yellow breast
        return (v > 0.07) & (u > -0.1), YELLOW
    # grey, sky-blue, lilac, teal or rose plumage: the whole body, and the head and tail under their markings
    # (PLUMAGE_PARTS), in a colour no distractor has: class evidence over the whole bird, read at any resolution
    return np.ones(u.shape, dtype=bool), PLUMAGE[m]


MARKING_DRAW = {"head": _head_marking, "wing": _wing_marking, "tail": _tail_marking, "body": _body_marking}
PART_SHAPE = {"head": HEAD_SHAPE, "wing": WING_SHAPE, "tail": TAIL_SHAPE, "body": BODY_SHAPE}
PART_COLOUR = {"head": HEAD, "wing": WING, "tail": TAIL, "body": BODY}
DRAW_ORDER = ("tail", "body", "wing", "head")  # back to front


# --------------------------------------------------------------------------- drawing
class _Window:
    """The sub-pixels of an image window around a pose, with their coordinates in the pose's frame."""

    def __init__(self, image: np.ndarray, pose: Pose, extent: tuple[tuple[float, float], tuple[float, float]]) -> None:
        h, w = image.shape[:2]
        rx, ry = _extent_radius(pose.angle, extent)
        rx, ry = rx * pose.length + 1.0, ry * pose.length + 1.0
        self.x0, self.y0 = max(int(math.floor(pose.cx - rx)), 0), max(int(math.floor(pose.cy - ry)), 0)
        self.x1, self.y1 = min(int(math.ceil(pose.cx + rx)), w), min(int(math.ceil(pose.cy + ry)), h)
        self.empty = self.x1 <= self.x0 or self.y1 <= self.y0
        if self.empty:
            return
        s = SUPERSAMPLE
        xs = self.x0 + (np.arange((self.x1 - self.x0) * s, dtype=np.float32) + 0.5) / s  # sub-pixel centres
        ys = self.y0 + (np.arange((self.y1 - self.y0) * s, dtype=np.float32) + 0.5) / s
        dx = (xs[None, :] - pose.cx) / pose.length  # (h*s, w*s) by broadcasting below
        dy = (ys[:, None] - pose.cy) / pose.length
        t = math.radians(pose.angle)
        c, sn = math.cos(t), math.sin(t)
        # screen = R(angle) @ (mirror * u, v) with y down and counter-clockwise on screen: invert it
        self.u = (dx * c - dy * sn) * (-1.0 if pose.facing_left else 1.0)
        self.v = dx * sn + dy * c
        region = image[self.y0 : self.y1, self.x0 : self.x1]
        self.canvas = np.repeat(np.repeat(region, s, axis=0), s, axis=1)  # (h*s, w*s, 3)
        self.owner = np.zeros(self.canvas.shape[:2], dtype=np.uint8)  # bit k set: part k is visible there

    def paint(self, mask: Mask, colour: np.ndarray, owner: int = 0) -> None:
        """Paint ``colour`` where ``mask``; a part's index + 1 as ``owner`` records that part as visible there."""
        self.canvas[mask] = colour
        if owner:
            self.owner[mask] = 1 << (owner - 1)

    def commit(self, image: np.ndarray) -> None:
        """Average the sub-pixels back into the image."""
        s = SUPERSAMPLE
        h, w = self.y1 - self.y0, self.x1 - self.x0
        rows = self.canvas.reshape(h, s, w * s * 3).sum(axis=1)  # (h, w*s*3)
        image[self.y0 : self.y1, self.x0 : self.x1] = rows.reshape(h, w, s, 3).sum(axis=2) / (s * s)

    def owner_masks(self, size: int) -> dict[int, np.ndarray]:
        """part index + 1 -> full-image mask of pixels where any sub-pixel belongs to that part."""
        s = SUPERSAMPLE
        h, w = self.y1 - self.y0, self.x1 - self.x0
        bits = np.bitwise_or.reduce(np.bitwise_or.reduce(self.owner.reshape(h, s, w, s), axis=3), axis=1)  # (h, w)
        out = {}
        for k in range(1, len(PARTS) + 1):
            full = np.zeros((size, size), dtype=bool)
            full[self.y0 : self.y1, self.x0 : self.x1] = (bits >> (k - 1)) & 1 == 1
            out[k] = full
        return out


def _draw_part(
    win: _Window, part: str, marking: int, gain: np.ndarray, owner: int, detail: float = 1.0, plumage: np.ndarray | None = None
) -> None:
    """One part with its marking (the marking is clipped to the part's shape); marking -1: plain, no marking.
    ``plumage``: the part's base colour instead of its own (a plumage marking of the body)."""
    u, v = win.u, win.v
    shape = PART_SHAPE[part](u, v)
    win.paint(shape, (PART_COLOUR[part] if plumage is None else plumage) * gain, owner)
    if marking >= 0:
        mark, colour = MARKING_DRAW[part](marking, u, v, detail)
        win.paint(shape & mark, colour, owner)
    if part == "head":
        win.paint(BEAK_SHAPE(u, v), BEAK * gain, owner)
        if marking != 3:  # the dark hood hides the eye
            win.paint(EYE_SHAPE(u, v), EYE, owner)


def _background(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth patches of muted greens and browns with a finer mottled texture, float (H, W, 3)."""
    k = int(rng.integers(4, 8))
    grid = BACKGROUND[rng.integers(len(BACKGROUND), size=(k, k))] + rng.normal(0.0, 8.0, size=(k, k, 3))
    low = np.asarray(
        Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8)).resize((size, size), Image.Resampling.BICUBIC),
        dtype=np.float64,
    )
    cells = max(size // 10, 2)
    mottle = rng.normal(0.0, 1.0, size=(cells, cells)).astype(np.float32)
    mid = np.asarray(Image.fromarray(mottle).resize((size, size), Image.Resampling.BILINEAR), dtype=np.float64)
    return (low + 14.0 * mid[:, :, None]).astype(np.float32)


def _draw_distractor(image: np.ndarray, d: Distractor, gain: np.ndarray, detail: float = 1.0) -> None:
    if d.kind == "part":
        win = _Window(image, d.pose, PART_EXTENT[d.part])
        if not win.empty:
            _draw_part(win, d.part, d.marking, gain, owner=0, detail=detail)
            win.commit(image)
        return
    win = _Window(image, d.pose, ((-0.46, -0.2), (0.46, 0.2)))
    if win.empty:
        return
    if d.kind == "blob":
        a = 0.19  # major semi-axis, in units of the distractor's length
        win.paint(_ellipse(0.0, 0.0, a, a * d.aspect)(win.u, win.v), OBJECT_COLOURS[d.colour] * gain)
    elif d.kind == "speck":
        win.paint(_ellipse(0.0, 0.0, 0.05, 0.05 * d.aspect)(win.u, win.v), MARK_COLOURS[d.colour])
    else:  # twig
        half = 0.45
        win.paint(_convex(((-half, -d.aspect), (half, -d.aspect), (half, d.aspect), (-half, d.aspect)))(win.u, win.v), DARK * 1.6)
    win.commit(image)


def render(spec: ImageSpec) -> Rendered:
    """Draw one image: background, distractors (behind), then the object; exact masks come along."""
    rng = np.random.default_rng(spec.background_seed)
    size = spec.size
    image = _background(size, rng)
    gain = np.asarray(spec.object_gain, dtype=np.float64)
    for d in spec.distractors:
        _draw_distractor(image, d, gain, spec.detail)
    win = _Window(image, spec.pose, OBJECT_EXTENT)
    plumage = PLUMAGE.get(spec.attributes[PARTS.index("body")])
    for part in DRAW_ORDER:
        p = PARTS.index(part)
        base = plumage if part in PLUMAGE_PARTS else None
        _draw_part(win, part, spec.attributes[p], gain, owner=p + 1, detail=spec.detail, plumage=base)
    win.commit(image)
    owners = win.owner_masks(size)
    part_masks = {part: owners[PARTS.index(part) + 1] for part in PARTS}
    object_mask = np.logical_or.reduce(list(part_masks.values()))
    noise = 4.0 * rng.standard_normal(size=image.shape, dtype=np.float32)
    pixels = np.clip(image * spec.brightness + noise, 0, 255).round().astype(np.uint8)
    return Rendered(image=pixels, object_mask=object_mask, part_masks=part_masks)


# --------------------------------------------------------------------------- files
def metadata_text(opts: SyntheticOptions) -> str:
    """The exact synthetic.json a complete dataset generated from ``opts`` holds."""
    meta = {
        "generator_version": GENERATOR_VERSION,
        "options": dataclasses.asdict(opts),
        "classes": {name: dict(zip(PARTS, (MARKINGS[p][a] for p, a in zip(PARTS, attrs))))
                    for name, attrs in zip(class_names(opts.num_classes, marking_palette(opts)),
                                            class_attributes(opts.num_classes, marking_palette(opts)))},
    }
    return json.dumps(meta, indent=2, sort_keys=True) + "\n"


def _csv_text(header: tuple[str, ...], rows: list[list[object]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _fmt_box(box: Box) -> list[str]:
    return [str(int(v)) for v in box]


def is_current(root: Path, opts: SyntheticOptions) -> bool:
    """Whether ``root`` already holds the complete dataset ``opts`` describe."""
    meta = root / "synthetic.json"
    if not meta.is_file() or not all((root / f).exists() for f in (*FILES, "parts.csv")):
        return False
    return meta.read_text(encoding="utf-8") == metadata_text(opts)


def generate(root: Path, opts: SyntheticOptions, setting: str = "datasets.NAME.root") -> None:
    """Write the dataset under ``root`` unless it is already there with these options.

    The images and annotation files are written into a hidden temporary folder next to ``root``,
    synthetic.json last, and the folder is then swapped in, so an interrupted run never leaves a
    half dataset that looks complete. A non-empty ``root`` that is not a generated dataset
    (no synthetic.json) is never overwritten. A failed write names ``root`` and, for a read-only or forbidden
    folder, ``setting``: the params key that chooses it.
    """
    root = Path(root)
    if is_current(root, opts):
        return
    if root.exists() and not root.is_dir():
        raise DatasetError(
            f"synthetic dataset root {root} exists and is not a folder; remove it or set datasets.NAME.root elsewhere"
        )
    if root.is_dir() and any(root.iterdir()) and not (root / "synthetic.json").is_file():
        raise DatasetError(
            f"synthetic dataset root {root} is not empty and holds no synthetic.json, so it is not a generated "
            "dataset; refusing to overwrite it. Remove it or set datasets.NAME.root to another folder."
        )
    try:  # a full disk or a read-only folder: one clean error naming root, and no half dataset
        root.parent.mkdir(parents=True, exist_ok=True)
        for stale in root.parent.glob(f".{root.name}.tmp-*"):  # left by an interrupted run
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    except OSError as exc:
        raise output_error(root, exc, setting=setting) from None
    try:
        _write_all(tmp, opts)
        if root.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-old-", dir=root.parent))
            os.replace(root, old / root.name)
            try:
                os.replace(tmp, root)
            except OSError:
                os.replace(old / root.name, root)  # the previous dataset goes back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, root)
    except OSError as exc:
        raise output_error(root, exc, setting=setting) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_all(out: Path, opts: SyntheticOptions) -> None:
    names = class_names(opts.num_classes, marking_palette(opts))
    counts = {"train": opts.train_per_class, "test": opts.test_per_class}
    jobs = [(k, split, i) for k in range(opts.num_classes) for split in SPLIT_NAMES for i in range(counts[split])]
    annotations: list[list[object]] = []
    parts: list[list[object]] = []
    for name in names:
        (out / "images" / name).mkdir(parents=True)

    def one(job: tuple[int, str, int]) -> tuple[str, str, Box, dict[str, Box]]:
        k, split, i = job
        iid = image_id(k, split, i)
        rel = f"images/{names[k]}/{iid}.jpg"
        r = render(sample_spec(opts, k, split, i))
        Image.fromarray(r.image).save(out / rel, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        return iid, rel, r.box, r.part_boxes()

    # numpy and PIL release the GIL in their inner loops, so threads overlap; results keep the job order
    with progress() as bar, ThreadPoolExecutor(max_workers=min(available_cores(), 4)) as pool:
        task = bar.add_task("generating synthetic images", total=len(jobs))
        for (k, split, _), (iid, rel, box, part_boxes) in zip(jobs, pool.map(one, jobs)):
            annotations.append([iid, rel, names[k], split, *_fmt_box(box)])
            for part, pbox in part_boxes.items():
                parts.append([iid, part, *_fmt_box(pbox)])
            bar.advance(task)
    (out / "annotations.csv").write_text(_csv_text(ANNOTATION_COLUMNS, annotations), encoding="utf-8")
    (out / "parts.csv").write_text(_csv_text(PART_COLUMNS, parts), encoding="utf-8")
    attrs = class_attributes(opts.num_classes, marking_palette(opts))
    class_rows: list[list[object]] = [[n, *(MARKINGS[p][a] for p, a in zip(PARTS, at))] for n, at in zip(names, attrs)]
    (out / "classes.csv").write_text(_csv_text(("class_name", *PARTS), class_rows), encoding="utf-8")
    (out / "synthetic.json").write_text(metadata_text(opts), encoding="utf-8")
