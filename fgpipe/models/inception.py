"""torchvision Inception-v3 trunk (the WS-DAN backbone), auxiliary classifier off.

Stages: ``Mixed_5d`` (nominal stride 8, 288 channels), ``Mixed_6e`` (16, 768; WS-DAN's feature layer)
and ``Mixed_7c`` (32, 2048). Inception's convolutions are unpadded, so a stage's side is a little
below ``H / stride`` (35, 17, 8 at 299 px). LCAM ``block`` follows every Mixed block.

Input, as for every fgpipe backbone, is ImageNet-normalised; like torchvision's ``transform_input``
the stem maps it to the [-1, 1] scaling the TF-ported ImageNet weights expect. This is part of the
architecture (always on), so a checkpoint behaves the same whatever ``weights`` built it.
"""

from __future__ import annotations

import torch
import torchvision
from torch import Tensor
from torchvision.models import Inception_V3_Weights

from fgpipe.models.staged import BlockSpec, StagedBackbone, StageSpec
from fgpipe.models.weights import torchvision_state_dict

_STEM = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2")
# stage name, nominal stride, [(Mixed block, output channels)]
_STAGES = (
    ("Mixed_5d", 8, (("Mixed_5b", 256), ("Mixed_5c", 288), ("Mixed_5d", 288))),
    ("Mixed_6e", 16, (("Mixed_6a", 768), ("Mixed_6b", 768), ("Mixed_6c", 768), ("Mixed_6d", 768), ("Mixed_6e", 768))),
    ("Mixed_7c", 32, (("Mixed_7a", 1280), ("Mixed_7b", 2048), ("Mixed_7c", 2048))),
)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class InceptionV3Backbone(StagedBackbone):
    """Inception-v3 without AuxLogits, pooling and classifier."""

    ignored_prefixes = ("fc.", "AuxLogits.")

    def __init__(self, lcam: str = "none", lcam_kernel: int = 0) -> None:
        super().__init__()
        self.name = "inception_v3"
        net = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=True, transform_input=False)
        for name in _STEM + tuple(block for _, _, blocks in _STAGES for block, _ in blocks):
            setattr(self, name, getattr(net, name))
        stages = [
            StageSpec(name, stride, tuple(BlockSpec(block, ch) for block, ch in blocks))
            for name, stride, blocks in _STAGES
        ]
        self._setup_stages(stages, lcam, lcam_kernel)

    def forward_stem(self, x: Tensor) -> Tensor:
        mean = torch.tensor(_IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(_IMAGENET_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        x = (x * std + mean - 0.5) / 0.5  # (B, 3, H, W): ImageNet-normalised -> [-1, 1]
        for name in _STEM:
            x = getattr(self, name)(x)
        return x  # (B, 192, ~H / 8, ~W / 8)

    def imagenet_state_dict(self) -> dict[str, Tensor]:
        return torchvision_state_dict(Inception_V3_Weights.IMAGENET1K_V1, self.name)
