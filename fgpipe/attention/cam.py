"""Gradient-weighted class activation maps on the feature layer (METHODS.md section 3)."""

from __future__ import annotations

import torch
from torch import Tensor

from fgpipe.attention.base import CAMMethod


class GradCAM(CAMMethod):
    """Grad-CAM (Selvaraju et al., 2017)."""

    name = "gradcam"

    def weights(self, activation: Tensor, gradient: Tensor) -> Tensor:
        # Grad-CAM: w_k = mean_ij g_kij, g = dS_c/dA
        return gradient.mean(dim=(2, 3))  # (B, K)


class OAAM(CAMMethod):
    """TL-AAM's object attention activation module: Grad-CAM++ (Chattopadhay et al., 2018) of the target class."""

    name = "oaam"

    def weights(self, activation: Tensor, gradient: Tensor) -> Tensor:
        # Grad-CAM++: alpha_kij = g^2 / (2 g^2 + sum_ab A_kab * g^3) (0 where the denominator is 0);
        # w_k = sum_ij alpha_kij * ReLU(g_kij)
        g2 = gradient.pow(2)  # (B, K, H, W)
        g3 = g2 * gradient  # (B, K, H, W)
        sum_a = activation.sum(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
        denom = 2 * g2 + sum_a * g3  # (B, K, H, W)
        nonzero = denom != 0
        alpha = torch.where(nonzero, g2 / torch.where(nonzero, denom, torch.ones_like(denom)), torch.zeros_like(denom))
        return (alpha * torch.relu(gradient)).sum(dim=(2, 3))  # (B, K)


GradCAMPlusPlus = OAAM  # the generic name of the same weighting
