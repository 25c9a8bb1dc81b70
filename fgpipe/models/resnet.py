"""torchvision ResNet-18/34/50/101/152 trunks: stages layer1..layer4 (strides 4, 8, 16, 32).

The modules keep torchvision's names (``conv1``, ``bn1``, ``layer1.0.conv1``...), so torchvision's
ImageNet state_dicts load key for key; the classifier (``fc``) is dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torchvision
from torch import Tensor, nn
from torchvision.models import (
    ResNet18_Weights,
    ResNet34_Weights,
    ResNet50_Weights,
    ResNet101_Weights,
    ResNet152_Weights,
)

from fgpipe.models.staged import BlockSpec, StagedBackbone, StageSpec
from fgpipe.models.weights import torchvision_state_dict

# depth -> (torchvision builder, the ImageNet weight enum used for `weights: imagenet`)
RESNETS: dict[int, tuple[Callable[..., torchvision.models.ResNet], Any]] = {
    18: (torchvision.models.resnet18, ResNet18_Weights.IMAGENET1K_V1),
    34: (torchvision.models.resnet34, ResNet34_Weights.IMAGENET1K_V1),
    50: (torchvision.models.resnet50, ResNet50_Weights.IMAGENET1K_V2),
    101: (torchvision.models.resnet101, ResNet101_Weights.IMAGENET1K_V2),
    152: (torchvision.models.resnet152, ResNet152_Weights.IMAGENET1K_V2),
}


class ResNetBackbone(StagedBackbone):
    """A torchvision ResNet without its pooling and classifier; LCAM ``block`` follows every residual block."""

    ignored_prefixes = ("fc.",)

    def __init__(self, depth: int, lcam: str = "none", lcam_kernel: int = 0) -> None:
        super().__init__()
        builder, self._imagenet = RESNETS[depth]
        self.name = f"resnet{depth}"
        net = builder(weights=None)
        self.conv1, self.bn1, self.relu, self.maxpool = net.conv1, net.bn1, net.relu, net.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = net.layer1, net.layer2, net.layer3, net.layer4
        stages = []
        for i in range(1, 5):
            layer: nn.Sequential = getattr(self, f"layer{i}")
            channels = 64 * 2 ** (i - 1) * type(layer[0]).expansion  # 64..512, times 4 for Bottleneck
            blocks = tuple(BlockSpec(f"layer{i}.{j}", channels) for j in range(len(layer)))
            stages.append(StageSpec(f"layer{i}", 2 ** (i + 1), blocks))
        self._setup_stages(stages, lcam, lcam_kernel)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))  # (B, 64, H / 4, W / 4)

    def imagenet_state_dict(self) -> dict[str, Tensor]:
        return torchvision_state_dict(self._imagenet, self.name)
