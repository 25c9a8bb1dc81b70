"""Backbone registry and factories (timm style): ``create_backbone(name, ...)``, ``build_stage1(cfg, K)``.

Every backbone is registered by name with a builder ``(lcam, lcam_kernel) -> StagedBackbone`` that
returns a randomly initialised trunk; ``create_backbone`` then applies the weights option
(``none`` | ``imagenet`` | a path to a state_dict file, see :mod:`fgpipe.models.weights`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from fgpipe.config import ModelConfig
from fgpipe.errors import ConfigError
from fgpipe.models.base import Backbone, WeightsReport
from fgpipe.models.efficientnet import EfficientNetLiteBackbone
from fgpipe.models.inception import InceptionV3Backbone
from fgpipe.models.lcam import LCAM, LCAM_PLACEMENTS, adaptive_kernel_size, check_kernel_size, check_placement
from fgpipe.models.resnet import ResNetBackbone
from fgpipe.models.staged import StagedBackbone
from fgpipe.models.tiny import TinyBackbone
from fgpipe.models.weights import load_backbone_weights
from fgpipe.models.wsdan import (
    CenterLoss,
    HeadOutput,
    Stage1Net,
    attention_box,
    attention_boxes,
    attention_crop_drop,
    bap,
    crop_resize,
    drop_images,
    refine_boxes,
    refine_crop,
    select_attention_maps,
    selection_probabilities,
)

Builder = Callable[[str, int], StagedBackbone]


@dataclass(frozen=True)
class BackboneEntry:
    """A registered backbone: how to build it and a one-line description for ``fgpipe models``."""

    name: str
    builder: Builder
    description: str


_REGISTRY: dict[str, BackboneEntry] = {}


def register_backbone(name: str, description: str) -> Callable[[Builder], Builder]:
    """Decorator: register ``builder(lcam, lcam_kernel) -> StagedBackbone`` under ``name``."""

    def deco(builder: Builder) -> Builder:
        if name in _REGISTRY:
            raise ValueError(f"backbone `{name}` is registered twice")
        _REGISTRY[name] = BackboneEntry(name, builder, description)
        return builder

    return deco


def list_backbones() -> list[str]:
    """Registered backbone names, sorted."""
    return sorted(_REGISTRY)


def describe_backbones() -> dict[str, str]:
    """Registered name -> one-line description."""
    return {name: _REGISTRY[name].description for name in list_backbones()}


def create_backbone(
    name: str,
    weights: str | os.PathLike[str] = "none",
    lcam: str = "none",
    lcam_kernel: int = 0,
    until: str = "",
    output_stride: int = 0,
) -> StagedBackbone:
    """Build backbone ``name`` with LCAM placed per ``lcam`` and load ``weights`` (none | imagenet | a file).

    ``until`` names the last stage to keep (``truncate``); weights of the stages cut off are ignored, so
    a full-trunk file and a truncated one both load. ``output_stride`` (0: the trunk's own) dilates the
    stages past that stride instead of downsampling (``set_output_stride``); it changes no weight.
    ``weights_report`` says what was loaded (None for none).
    """
    if name not in _REGISTRY:
        raise ConfigError(f"model.backbone: unknown backbone `{name}` (allowed: {', '.join(list_backbones())})")
    check_placement(lcam)
    check_kernel_size(lcam_kernel)
    backbone = _REGISTRY[name].builder(lcam, lcam_kernel)
    if until:
        backbone.truncate(until)
    backbone.set_output_stride(output_stride)
    backbone.weights_report = load_backbone_weights(backbone, weights)
    return backbone


def build_stage1(cfg: ModelConfig, num_classes: int, weights: str | os.PathLike[str] | None = None) -> Stage1Net:
    """The stage-1 network of ``cfg``; ``weights`` overrides ``cfg.weights`` (a resolved path, or ``none``
    when a checkpoint will be loaded next)."""
    # the head reads feature_layer: stages after it would be dead weight, so they are cut off
    backbone = create_backbone(
        cfg.backbone, cfg.weights if weights is None else weights, cfg.lcam, cfg.lcam_kernel,
        until=cfg.feature_layer, output_stride=cfg.output_stride,
    )
    net = Stage1Net(
        backbone,
        num_classes,
        num_attentions=cfg.num_attentions,
        feature_layer=cfg.feature_layer,
        logit_scale=cfg.logit_scale,
        cam_channels=cfg.cam_channels,
        head=cfg.head,
    )
    set_bn_momentum(net, cfg.bn_momentum)
    return net


def set_bn_momentum(module: nn.Module, momentum: float) -> None:
    """Set the running-statistics momentum of every batch norm in ``module``; 0 leaves each as built."""
    if momentum > 0:
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = momentum


# --------------------------------------------------------------------------- registered backbones
def _register_resnet(depth: int) -> None:
    block = "BasicBlock" if depth < 50 else "Bottleneck"

    @register_backbone(f"resnet{depth}", f"torchvision ResNet-{depth} ({block}); stages layer1..layer4, strides 4-32")
    def _build(lcam: str, lcam_kernel: int) -> StagedBackbone:
        return ResNetBackbone(depth, lcam, lcam_kernel)


for _depth in (18, 34, 50, 101, 152):
    _register_resnet(_depth)


@register_backbone(
    "inception_v3", "torchvision Inception-v3 (WS-DAN); stages Mixed_5d, Mixed_6e, Mixed_7c (strides 8, 16, 32)"
)
def _inception_v3(lcam: str, lcam_kernel: int) -> StagedBackbone:
    return InceptionV3Backbone(lcam, lcam_kernel)


@register_backbone(
    "efficientnet_lite0", "EfficientNet-Lite0 (efficientnet_lite_pytorch); stages stage1..stage5 (strides 2-32) and head"
)
def _efficientnet_lite0(lcam: str, lcam_kernel: int) -> StagedBackbone:
    return EfficientNetLiteBackbone("efficientnet-lite0", lcam, lcam_kernel)


@register_backbone("tiny", "3-stage residual CNN for tests; stages layer1..layer3, strides 4, 8, 16")
def _tiny(lcam: str, lcam_kernel: int) -> StagedBackbone:
    return TinyBackbone(lcam, lcam_kernel)


__all__ = [
    "LCAM",
    "LCAM_PLACEMENTS",
    "Backbone",
    "BackboneEntry",
    "CenterLoss",
    "HeadOutput",
    "Stage1Net",
    "StagedBackbone",
    "WeightsReport",
    "adaptive_kernel_size",
    "attention_box",
    "attention_boxes",
    "attention_crop_drop",
    "bap",
    "build_stage1",
    "crop_resize",
    "drop_images",
    "create_backbone",
    "describe_backbones",
    "list_backbones",
    "load_backbone_weights",
    "refine_boxes",
    "refine_crop",
    "register_backbone",
    "select_attention_maps",
    "set_bn_momentum",
    "selection_probabilities",
]
