"""MMAL-Net's attention object location module (AOLM), stored as a heatmap (METHODS.md section 3).

AOLM is box-valued and follows MMAL-Net's reference code (``utils/AOLM.py``) on the backbone's last block
(conv5_c: the last stage's output) and the block before it (conv5_b, ``PENULTIMATE_BLOCK``), both on the
same grid: A = sum_c F_last (B, h, w); M = A > mean(A); label M (8-connectivity, ``skimage.measure.label``)
and keep the largest component by area (ties: the first in raster order, the lowest label, as
``areas.index(max(areas))`` picks); A1 = sum_c F_penultimate, M1 = A1 > mean(A1); the object is the
bounding box of ``component & M1`` (all its pieces), and the whole image when that intersection is empty
(also when M itself is empty, where the reference code would fail).

Stored heatmap (choice): the *indicator of AOLM's box* on the grid (1 inside the box's cells, 0 outside; all
zero for an empty intersection). Section 4's common box logic then reproduces AOLM's box exactly for every
threshold T in (0, 1], and the empty case becomes section 4's whole-image fallback. The masked activation
would not: thresholding at T * max drops the weak cells of the region, and keeping the largest component
drops the pieces into which the intersection may split, whereas AOLM boxes the whole intersection. Cells
map to pixels by their edges (section 4); the reference code's ``bbox * 32 - 1`` is the same box a pixel
to the top-left.
"""

from __future__ import annotations

import numpy as np
import torch
from skimage.measure import label as label_components
from torch import Tensor

from fgpipe.attention.base import ForwardPass, HeatmapMethod, Stage1Like
from fgpipe.errors import ConfigError
from fgpipe.models.base import PENULTIMATE_BLOCK


def aolm_region(last: np.ndarray, penultimate: np.ndarray) -> np.ndarray:
    """AOLM's region (h, w) bool from the channel sums of the last block ``last`` (h, w) and of the block
    before it ``penultimate`` (h, w): the largest 8-connected component of ``last > mean`` (ties: lowest
    label) intersected with ``penultimate > mean``; empty when that intersection (or the mask) is."""
    if last.ndim != 2 or last.shape != penultimate.shape:
        raise ValueError(f"AOLM needs two maps on the same grid, got {last.shape} and {penultimate.shape}")
    labels = label_components(last > last.mean(), connectivity=2)  # (h, w) int, 0 = background
    if labels.max() == 0:
        return np.zeros(last.shape, dtype=bool)
    areas = np.bincount(labels.ravel())[1:]  # (n,) area of labels 1..n
    component = labels == int(np.argmax(areas)) + 1  # argmax: the first of equal areas, as MMAL-Net
    return component & (penultimate > penultimate.mean())


def box_indicator(region: np.ndarray) -> np.ndarray:
    """1 on the cells of the bounding box of ``region`` (h, w), 0 elsewhere (all zero for an empty region)."""
    out = np.zeros(region.shape, dtype=np.float64)
    if region.any():
        rows = np.flatnonzero(region.any(axis=1))
        cols = np.flatnonzero(region.any(axis=0))
        out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = 1.0
    return out


class AOLM(HeatmapMethod):
    """AOLM (Zhang et al., MMAL-Net, 2021) on the last block and the one before it; class-agnostic, no gradient."""

    name = "aolm"
    needs_penultimate = True
    flip_averaged = False  # box-valued: always MMAL-Net's own box

    @classmethod
    def unsupported(cls, model: Stage1Like) -> str | None:
        if getattr(model.backbone, "penultimate_block", None) is None:
            return "AOLM reads the last block and the block before it, and this backbone has no block before the last"
        return None

    @property
    def layer(self) -> str:
        return self.model.backbone.stage_names[-1]  # the last block's output

    def compute(self, fp: ForwardPass) -> Tensor:
        # MMAL-Net AOLM: A = sum_c F_last; M = A > mean(A); box(largest CC(M) & (A1 > mean(A1))), A1 from conv5_b
        last = fp.features[self.layer].to(fp.activation.dtype).sum(dim=1)  # (B, h, w)
        pen = fp.features[PENULTIMATE_BLOCK].to(fp.activation.dtype).sum(dim=1)  # (B, h, w)
        if pen.shape != last.shape:
            raise ConfigError(
                f"attention.method `aolm`: the block before the last ({self.model.backbone.penultimate_block}) "
                f"gives a {tuple(pen.shape[1:])} map, the last block a {tuple(last.shape[1:])} one; AOLM needs one grid"
            )
        last_np, pen_np = last.cpu().numpy(), pen.cpu().numpy()
        maps = [box_indicator(aolm_region(last_np[i], pen_np[i])) for i in range(last_np.shape[0])]
        return torch.as_tensor(np.stack(maps), dtype=last.dtype, device=last.device)  # (B, h, w)
