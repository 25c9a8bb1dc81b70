"""MMAL-Net's attention object location module (AOLM), stored as a heatmap (METHODS.md section 3).

AOLM is box-valued: activation a = sum over channels of the last stage (B, h, w); mask = a > mean(a);
keep the largest 8-connected component (ties: the one holding max a); intersect it with the same mask from
the stage before the last; the object is the bounding box of that intersection (of the component alone if
the intersection is empty; the whole image if even the mask is empty).

Resizing the earlier stage's mask to the last stage's grid (choice): area interpolation
(``adaptive_avg_pool2d``, which for the usual 2x stride ratio is the mean of each 2x2 block), keeping a
cell when at least half of what it covers is in the mask (a majority vote).

Stored heatmap (choice): the *indicator of AOLM's box* on the grid (1 inside the box's cells, 0 outside;
all zero if the mask is empty). Section 4's common box logic then reproduces AOLM's box exactly for every
threshold T in (0, 1], and the empty case becomes section 4's whole-image fallback. The masked activation
would not: thresholding at T * max drops the weak cells of the region, and keeping the largest component
drops the pieces into which the intersection may split, whereas AOLM boxes the whole intersection.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fgpipe.attention.base import ForwardPass, HeatmapMethod, Stage1Like
from fgpipe.errors import ConfigError
from fgpipe.localize.boxes import largest_component


def aolm_region(activation: np.ndarray, previous_mask: np.ndarray) -> np.ndarray:
    """AOLM's region (h, w) bool from the last stage's channel-summed ``activation`` (h, w) and the
    earlier stage's mask already on the same grid: the largest component of ``activation > mean``
    intersected with ``previous_mask``; the component alone if that is empty (empty if the mask is)."""
    component = largest_component(activation > activation.mean(), activation)
    intersection = component & previous_mask
    return intersection if intersection.any() else component


def box_indicator(region: np.ndarray) -> np.ndarray:
    """1 on the cells of the bounding box of ``region`` (h, w), 0 elsewhere (all zero for an empty region)."""
    out = np.zeros(region.shape, dtype=np.float64)
    if region.any():
        rows = np.flatnonzero(region.any(axis=1))
        cols = np.flatnonzero(region.any(axis=0))
        out[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1] = 1.0
    return out


def previous_mask_on_grid(previous: Tensor, grid_hw: tuple[int, int]) -> Tensor:
    """The mask ``a' > mean(a')`` of the earlier stage's channel sum ``previous`` (B, h', w'), resized to
    ``grid_hw`` by area interpolation and a majority vote -> (B, h, w) bool."""
    mask = (previous > previous.mean(dim=(1, 2), keepdim=True)).to(torch.float32)  # (B, h', w')
    share = F.adaptive_avg_pool2d(mask[:, None], grid_hw)[:, 0]  # (B, h, w) fraction of covered cells in mask
    return share >= 0.5


class AOLM(HeatmapMethod):
    """AOLM (Zhang et al., MMAL-Net, 2021) on the backbone's last two stages; class-agnostic, no gradient."""

    name = "aolm"

    def __init__(self, model: Stage1Like, normalize: bool = True, score: str = "auto") -> None:
        super().__init__(model, normalize, score)
        stages = model.backbone.stage_names
        if len(stages) < 2:
            raise ConfigError(
                f"method `aolm` needs a backbone with at least two stages (the last and the one before), "
                f"got {list(stages)}"
            )
        self.last, self.previous = stages[-1], stages[-2]

    @property
    def layer(self) -> str:
        return self.last

    def compute(self, fp: ForwardPass) -> Tensor:
        # MMAL-Net AOLM: a = sum_c F_c (last stage); M = a > mean(a); box(largest CC(M) & M_prev)
        last = fp.features[self.last].to(fp.activation.dtype).sum(dim=1)  # (B, h, w)
        previous = fp.features[self.previous].to(fp.activation.dtype).sum(dim=1)  # (B, h', w')
        prev_mask = previous_mask_on_grid(previous, tuple(last.shape[-2:])).cpu().numpy()  # (B, h, w)
        last_np = last.cpu().numpy()
        maps = [box_indicator(aolm_region(last_np[i], prev_mask[i])) for i in range(last_np.shape[0])]
        return torch.as_tensor(np.stack(maps), dtype=last.dtype, device=last.device)  # (B, h, w)
