"""A backbone built as stem -> stages of blocks, with LCAM after every block or after every stage.

Every registered backbone derives from :class:`StagedBackbone`: it keeps the trunk's modules under
their original names (so a torchvision / package state_dict loads key for key), declares its stages
as :class:`StageSpec` lists, and implements ``forward_stem``. The LCAM modules live apart, under
``lcam.<block or stage>``, so they never disturb the pretrained key names.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

from torch import Tensor, nn

from fgpipe.errors import ConfigError
from fgpipe.models.base import PENULTIMATE_BLOCK, Backbone, WeightsReport
from fgpipe.models.lcam import LCAM, check_kernel_size, check_placement


@dataclass(frozen=True)
class BlockSpec:
    """One block of a stage: its submodule path, output channels, and whether ``lcam: block`` follows it."""

    path: str  # e.g. "layer1.0", "Mixed_5b", "_blocks.3"
    channels: int
    lcam: bool = True  # False for a plain conv that is not a residual/Mixed/MBConv block (EfficientNet's head)


@dataclass(frozen=True)
class StageSpec:
    """A named stage: its blocks, in order, and its total stride."""

    name: str
    stride: int
    blocks: tuple[BlockSpec, ...]


def _pair(value: int | tuple[int, ...] | list[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[-1]))


def _set_dilation(conv: nn.Conv2d, dilation: tuple[int, int], where: str) -> None:
    """Set a conv's dilation, growing a symmetric "same" padding with it (TF-style dynamic padding has none)."""
    kernel, old, pad = _pair(conv.kernel_size), _pair(conv.dilation), conv.padding
    if isinstance(pad, str) or _pair(pad) == (0, 0) and type(conv) is not nn.Conv2d:
        conv.dilation = dilation  # padding computed from the dilation at run time ("same")
        return
    if _pair(pad) != (old[0] * (kernel[0] - 1) // 2, old[1] * (kernel[1] - 1) // 2):
        raise ConfigError(f"model.output_stride: cannot dilate {where} (padding {conv.padding} is not 'same'); set model.output_stride: 0")
    conv.dilation = dilation
    conv.padding = (dilation[0] * (kernel[0] - 1) // 2, dilation[1] * (kernel[1] - 1) // 2)


def lcam_key(path: str) -> str:
    """ModuleDict keys cannot hold dots: ``layer1.0`` -> ``layer1_0``."""
    return path.replace(".", "_")


class StagedBackbone(Backbone):
    """Stem, then stages of blocks; every stage's output is returned by ``forward_features``."""

    #: registry name, e.g. "resnet50" (used in messages)
    name: str = ""
    #: key prefixes a pretrained file may carry that the trunk does not use (classifier heads)
    ignored_prefixes: tuple[str, ...] = ()
    #: what :func:`fgpipe.models.weights.load_backbone_weights` loaded, set by ``create_backbone``
    weights_report: WeightsReport | None = None
    #: key prefixes of modules removed by :meth:`truncate` (a full-trunk weights file still loads)
    dropped_prefixes: tuple[str, ...] = ()

    def _setup_stages(self, stages: list[StageSpec], lcam: str, lcam_kernel: int) -> None:
        """Record the stages and build the LCAM modules; call at the end of a subclass ``__init__``."""
        check_placement(lcam)
        check_kernel_size(lcam_kernel)
        self._stages = tuple(stages)
        self.stage_names = tuple(s.name for s in stages)
        self.stage_channels = {s.name: s.blocks[-1].channels for s in stages}
        self.stage_strides = {s.name: s.stride for s in stages}
        # plain dict (not registered twice): path -> the block module already held under its own name
        self._block_modules = {b.path: self.get_submodule(b.path) for s in stages for b in s.blocks}
        self.lcam_placement = lcam
        self.lcam_kernel = lcam_kernel
        self.lcam = nn.ModuleDict()
        if lcam == "block":
            for s in stages:
                for b in s.blocks:
                    if b.lcam:
                        self.lcam[lcam_key(b.path)] = LCAM(b.channels, lcam_kernel)
        elif lcam == "stage":
            for s in stages:
                self.lcam[lcam_key(s.name)] = LCAM(self.stage_channels[s.name], lcam_kernel)

    def truncate(self, last: str) -> None:
        """Drop every stage after ``last`` with its modules, so nothing is computed that nothing reads.

        Used when the head reads an inner stage (e.g. a stride-16 layer): the later stages would cost
        time and leave parameters without gradients (which DDP rejects). The stages kept are unchanged.
        """
        if last not in self.stage_names:
            raise ConfigError(f"model.feature_layer: `{last}` is not a stage of `{self.name}` ({', '.join(self.stage_names)})")
        keep = self.stage_names.index(last) + 1
        for stage in reversed(self._stages[keep:]):
            for block in reversed(stage.blocks):
                parent_path, _, child = block.path.rpartition(".")
                parent = self.get_submodule(parent_path) if parent_path else self
                del parent._modules[child]
                self.dropped_prefixes += (block.path + ".", f"lcam.{lcam_key(block.path)}.")
                if lcam_key(block.path) in self.lcam:
                    del self.lcam[lcam_key(block.path)]
            if lcam_key(stage.name) in self.lcam:
                del self.lcam[lcam_key(stage.name)]
            self.dropped_prefixes += (f"lcam.{lcam_key(stage.name)}.",)
        self._stages = self._stages[:keep]
        self.stage_names = tuple(st.name for st in self._stages)
        self.stage_channels = {n: self.stage_channels[n] for n in self.stage_names}
        self.stage_strides = {n: self.stage_strides[n] for n in self.stage_names}
        self._block_modules = {b.path: self._block_modules[b.path] for st in self._stages for b in st.blocks}

    def set_output_stride(self, output_stride: int) -> None:
        """Dilate instead of downsample once the stride reaches ``output_stride`` (DeepLab's atrous trunk).

        In the first stage whose stride exceeds ``output_stride``, every strided conv of that stage becomes
        stride 1; every spatial conv after it (in that stage and the later ones) has its dilation multiplied
        by the stride removed so far, so each kernel still sees the area it saw in the pretrained network.
        The weights are unchanged (a pretrained file loads as before); the maps of the later stages are
        larger by the same factor. ``output_stride`` 0, or at least the trunk's own stride, changes nothing.
        """
        if output_stride == 0 or output_stride >= self.stage_strides[self.stage_names[-1]]:
            return
        if output_stride not in self.stage_strides.values():
            raise ConfigError(
                f"model.output_stride: {output_stride} is not a stride of `{self.name}` "
                f"(its stages: {', '.join(f'{n} {s}' for n, s in self.stage_strides.items())}); or 0 for the trunk's own"
            )
        rate = 1  # the stride removed so far = the dilation every later spatial conv needs
        for stage in self._stages:
            if self.stage_strides[stage.name] <= output_stride:
                continue
            for spec in stage.blocks:
                block = self._block_modules[spec.path]
                applied, after = rate, rate  # the dilation of this block's convs; the rate after the block
                for name, mod in block.named_modules():
                    where = f"{spec.path}.{name}" if name else spec.path
                    if isinstance(mod, (nn.MaxPool2d, nn.AvgPool2d)) and _pair(mod.stride) != (1, 1):
                        raise ConfigError(
                            f"model.output_stride: `{self.name}` downsamples by pooling in {where}; "
                            "it cannot be dilated (set model.output_stride: 0)"
                        )
                    if not isinstance(mod, nn.Conv2d):
                        continue
                    kernel, stride, old = _pair(mod.kernel_size), _pair(mod.stride), _pair(mod.dilation)
                    if kernel != (1, 1) and applied > 1:
                        _set_dilation(mod, (old[0] * applied, old[1] * applied), where)
                    if stride != (1, 1):
                        mod.stride = (1, 1) if isinstance(mod.stride, tuple) else [1, 1]
                        # convs after this one (here and in later blocks) see a map `stride` times larger;
                        # a parallel strided shortcut (ResNet's 1x1 downsample) gives the same rate
                        after = rate * stride[0]
                        applied = after
                rate = after
            self.stage_strides[stage.name] = output_stride

    @abstractmethod
    def forward_stem(self, x: Tensor) -> Tensor:
        """Everything before the first stage's first block."""

    def forward_block(self, index: int, block: nn.Module, x: Tensor) -> Tensor:
        """Run block number ``index`` (counted over all stages); override for blocks with extra arguments."""
        return block(x)

    @property
    def penultimate_block(self) -> str | None:  # type: ignore[override]
        """Path of the block before the last one (ResNet ``layer4.<n-2>``, Inception ``Mixed_7b``,
        EfficientNet ``_blocks.15`` before the ``head`` conv); None for a one-block trunk."""
        paths = [b.path for st in self._stages for b in st.blocks]
        return paths[-2] if len(paths) > 1 else None

    def forward_features(self, x: Tensor, penultimate: bool = False) -> dict[str, Tensor]:
        feats: dict[str, Tensor] = {}
        last = sum(len(st.blocks) for st in self._stages) - 1  # index of the last block
        if penultimate and last < 1:
            raise ConfigError(f"backbone `{self.name}` has a single block: there is no block before the last")
        x = self.forward_stem(x)
        index = 0
        for stage in self._stages:
            for spec in stage.blocks:
                if penultimate and index == last:
                    feats[PENULTIMATE_BLOCK] = x  # the block before the last one's output, with the LCAM after it
                x = self.forward_block(index, self._block_modules[spec.path], x)
                index += 1
                if self.lcam_placement == "block" and spec.lcam:
                    x = self.lcam[lcam_key(spec.path)](x)
            if self.lcam_placement == "stage":
                x = self.lcam[lcam_key(stage.name)](x)
            feats[stage.name] = x  # (B, C_s, ~H / s, ~W / s)
        return feats

    def imagenet_state_dict(self) -> dict[str, Tensor]:
        """The ImageNet weights of this trunk (key names as in this module); subclasses that have them override."""
        raise ConfigError(
            f"backbone `{self.name}` has no ImageNet weights: set model.weights to `none` "
            "or to a path to a state_dict file (CLI: --weights FILE)"
        )
