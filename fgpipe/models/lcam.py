"""LCAM: local cross-channel attention (TL-AAM), ECA-Net style (METHODS.md section 1).

y = GAP(X); w = sigmoid(Conv1d(1, 1, k, padding=(k - 1) // 2, bias=False) over the channel axis of y);
output X * w. No dimensionality reduction: every channel's weight depends on its k neighbours only.
"""

from __future__ import annotations

import math
from typing import Literal, get_args

import torch
from torch import Tensor, nn

from fgpipe.errors import ConfigError

LCAMPlacement = Literal["none", "block", "stage"]
LCAM_PLACEMENTS: tuple[str, ...] = get_args(LCAMPlacement)


def adaptive_kernel_size(channels: int, gamma: float = 2.0, b: float = 1.0) -> int:
    """ECA-Net's k = |log2(C) / gamma + b / gamma| rounded to the nearest odd number (ties up), at least 3.

    Rounding to the nearest odd number with ties going up is ECA's ``t if t % 2 else t + 1`` on
    ``t = int(|...|)``: for t in [2n, 2n + 1) it gives 2n + 1, for t in [2n + 1, 2n + 2) it gives 2n + 1.
    """
    if channels < 1:
        raise ValueError(f"channels must be >= 1, got {channels}")
    t = int(abs(math.log2(channels) / gamma + b / gamma))
    k = t if t % 2 else t + 1
    return max(k, 3)


def check_kernel_size(kernel_size: int) -> None:
    """0 (adaptive) or an odd number >= 3; anything else is a ConfigError naming ``model.lcam_kernel``."""
    if kernel_size != 0 and (kernel_size < 3 or kernel_size % 2 == 0):
        raise ConfigError(
            f"model.lcam_kernel must be 0 (adaptive from the channel count) or an odd number >= 3, got {kernel_size}"
        )


def check_placement(placement: str) -> None:
    """``model.lcam`` must be one of none, block, stage."""
    if placement not in LCAM_PLACEMENTS:
        raise ConfigError(f"model.lcam: unknown placement `{placement}` (allowed: {', '.join(LCAM_PLACEMENTS)})")


class LCAM(nn.Module):
    """Channel re-weighting by a 1-D convolution over the globally pooled channel descriptor."""

    def __init__(self, channels: int, kernel_size: int = 0) -> None:
        """``kernel_size`` 0 picks k from ``channels`` (:func:`adaptive_kernel_size`); else a fixed odd k >= 3."""
        super().__init__()
        check_kernel_size(kernel_size)
        self.channels = channels
        self.kernel_size = kernel_size or adaptive_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, self.kernel_size, padding=(self.kernel_size - 1) // 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, C, _, _ = x.shape
        y = x.mean(dim=(2, 3))  # (B, C) global average pool
        w = torch.sigmoid(self.conv(y.unsqueeze(1)))  # (B, 1, C): conv over the channel axis
        return x * w.view(B, C, 1, 1)  # (B, C, H, W)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, kernel_size={self.kernel_size}"
