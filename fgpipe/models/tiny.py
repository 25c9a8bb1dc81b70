"""``tiny``: a three-stage residual CNN (stride 4, 8, 16; 16, 32, 64 channels), fast enough for every test."""

from __future__ import annotations

from torch import Tensor, nn

from fgpipe.models.staged import BlockSpec, StagedBackbone, StageSpec


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


class _ResidualBlock(nn.Module):
    """Two 3x3 convs and an identity shortcut (a ResNet BasicBlock without downsampling)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (out + x).relu()


class TinyBackbone(StagedBackbone):
    """Stem (stride 2), then layer1..layer3, each a strided conv block and a residual block."""

    def __init__(self, lcam: str = "none", lcam_kernel: int = 0, widths: tuple[int, int, int] = (16, 32, 64)) -> None:
        super().__init__()
        self.name = "tiny"
        self.stem = _conv_bn_relu(3, widths[0], 2)
        cin = widths[0]
        stages = []
        for i, width in enumerate(widths, start=1):
            setattr(self, f"layer{i}", nn.Sequential(_conv_bn_relu(cin, width, 2), _ResidualBlock(width)))
            blocks = (BlockSpec(f"layer{i}.0", width), BlockSpec(f"layer{i}.1", width))
            stages.append(StageSpec(f"layer{i}", 2 ** (i + 1), blocks))
            cin = width
        self._setup_stages(stages, lcam, lcam_kernel)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self.stem(x)  # (B, 16, H / 2, W / 2)
