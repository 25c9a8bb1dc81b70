"""Refinement branches (METHODS.md section 6): an object branch and a part branch on stage-1's backbone.

Each branch is a backbone initialised from the stage-1 checkpoint's ``backbone.*`` weights, global
average pooling of its feature layer, and a linear classifier. With ``shared`` (MMAL-Net style) one
backbone feeds both heads; otherwise each branch has its own copy. The part branch classifies every
patch and pools the patch logits of an image by their mean.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from fgpipe.config import ModelConfig
from fgpipe.models import create_backbone, set_bn_momentum
from fgpipe.models.base import Backbone, WeightsReport
from fgpipe.models.weights import apply_state_dict


class BranchOutput(NamedTuple):
    """Logits of both branches for a batch of B images."""

    object_logits: Tensor  # (B, K)
    part_logits: Tensor  # (B, K) mean of each image's patch logits


class ClassifierHead(nn.Module):
    """Global average pooling, dropout (training only; ``p`` 0: none) and a linear classifier: (B, C, h, w) -> (B, K)."""

    def __init__(self, channels: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, feat: Tensor) -> Tensor:
        return self.fc(self.drop(feat.mean(dim=(2, 3))))  # (B, C) -> (B, K)


def pool_patch_logits(logits: Tensor, owner: Tensor, num_images: int) -> Tensor:
    """Mean of the patch logits (T, K) of each image; ``owner`` (T,) gives each patch's image in [0, B).

    Every image must own at least one patch (images without parts use their object box). -> (B, K)
    """
    counts = torch.bincount(owner, minlength=num_images)  # (B,)
    if len(counts) != num_images or bool((counts == 0).any()):
        raise ValueError(f"every image needs at least one patch; patches per image: {counts.tolist()}")
    sums = torch.zeros((num_images, logits.shape[1]), dtype=logits.dtype, device=logits.device)
    sums.index_add_(0, owner, logits)  # (B, K)
    return sums / counts.to(logits.dtype).unsqueeze(1)


class RefineNet(nn.Module):
    """Object and part branches; ``part_backbone`` None shares ``object_backbone`` between both heads."""

    def __init__(
        self, object_backbone: Backbone, part_backbone: Backbone | None, num_classes: int, feature_layer: str = "",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.object_backbone = object_backbone
        self.part_backbone = part_backbone
        self.feature_layer = feature_layer or object_backbone.last_stage
        self.num_classes = num_classes
        channels = object_backbone.stage_channels[self.feature_layer]
        self.object_head = ClassifierHead(channels, num_classes, dropout)
        self.part_head = ClassifierHead(channels, num_classes, dropout)

    @property
    def shared(self) -> bool:
        """Whether both branches read the same backbone."""
        return self.part_backbone is None

    def object_logits(self, x: Tensor) -> Tensor:
        """Object-branch logits of normalised object crops (B, 3, S, S) -> (B, K)."""
        return self.object_head(self.object_backbone.forward_features(x)[self.feature_layer])

    def patch_logits(self, x: Tensor) -> Tensor:
        """Part-branch logits of every normalised patch (T, 3, s, s) -> (T, K), before pooling."""
        backbone = self.object_backbone if self.part_backbone is None else self.part_backbone
        return self.part_head(backbone.forward_features(x)[self.feature_layer])

    def forward(self, objects: Tensor, patches: Tensor, owner: Tensor, keep: Tensor | None = None) -> BranchOutput:
        """Both branches in one call (one DDP forward): object crops (B, ...), patches (T, ...), owner (T,).

        ``keep`` (T',) int64: the positions of the patches pooled into their image's logits; the others (copies that
        pad the batch to a fixed size) run through the backbone but are left out of the pooling (None: every patch is
        pooled). Indices, not a mask: selecting them needs no device sync."""
        obj = self.object_logits(objects)  # (B, K)
        logits = self.patch_logits(patches).float()  # (T, K)
        if keep is not None:
            logits, owner = logits.index_select(0, keep), owner.index_select(0, keep)
        parts = pool_patch_logits(logits, owner, objects.shape[0])  # (B, K), pooled in float32
        return BranchOutput(obj, parts)


def build_refine_net(
    model_cfg: ModelConfig, num_classes: int, shared: bool, stage1_state: Mapping[str, Tensor] | None = None, source: str = "",
    dropout: float = 0.0,
) -> tuple[RefineNet, WeightsReport | None]:
    """The branches on the stage-1 backbone architecture ``model_cfg``, ``dropout`` before each head's classifier.

    ``stage1_state``: a Stage1Net state_dict whose ``backbone.*`` entries initialise every backbone
    (None: random init, e.g. before a refine checkpoint is loaded). Returns the net and the weights report.
    """
    # the same trunk as stage-1's, cut after the feature layer the heads read (as build_stage1 does)
    backbone = create_backbone(
        model_cfg.backbone, "none", model_cfg.lcam, model_cfg.lcam_kernel,
        until=model_cfg.feature_layer, output_stride=model_cfg.output_stride,
    )
    set_bn_momentum(backbone, model_cfg.bn_momentum)
    report = apply_state_dict(backbone, stage1_state, source or "stage-1 checkpoint") if stage1_state is not None else None
    part_backbone = None if shared else copy.deepcopy(backbone)
    net = RefineNet(backbone, part_backbone, num_classes, model_cfg.feature_layer, dropout)
    return net, report
