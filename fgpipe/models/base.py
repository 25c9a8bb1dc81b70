"""The interfaces every model in fgpipe implements.

A :class:`Backbone` is a CNN trunk with *named stages*. ``forward_features`` returns every stage's
output in a dict, so the attention methods read any stage without hooks: the WS-DAN head and Grad-CAM++
read ``feature_layer`` (default: the last stage); AOLM reads the last block's output (the last stage) and,
asked with ``penultimate=True``, the output of the block before it (MMAL-Net's conv5_c and conv5_b).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor, nn

#: key of the block before the last in ``forward_features(x, penultimate=True)``; the brackets keep it apart
#: from every stage name (stage names are module-like identifiers)
PENULTIMATE_BLOCK = "block[-2]"


@dataclass(frozen=True)
class WeightsReport:
    """What a weights load did (:mod:`fgpipe.models.weights`): how many tensors it copied and which keys it skipped or
    left new; a backbone keeps it as ``weights_report``."""

    source: str  # "imagenet (ResNet50_Weights.IMAGENET1K_V2)" or the file path
    loaded: int  # tensors copied into the backbone
    ignored: tuple[str, ...]  # keys in the source the backbone does not use (classifier, stage-1 head)
    new: tuple[str, ...]  # backbone keys the source lacks and that keep their fresh init (LCAM only)


class Backbone(nn.Module, ABC):
    """A CNN trunk with named stages, e.g. ``("layer1", "layer2", "layer3", "layer4")`` for a ResNet."""

    #: stage names, input side first; the last one is the default feature layer
    stage_names: tuple[str, ...]
    #: output channels per stage
    stage_channels: dict[str, int]
    #: total stride (input pixels per feature cell) per stage
    stage_strides: dict[str, int]

    #: submodule path of the block before the last (MMAL-Net's conv5_b), or None where there is none
    penultimate_block: str | None = None

    @abstractmethod
    def forward_features(self, x: Tensor, penultimate: bool = False) -> dict[str, Tensor]:
        """Every stage's output for input ``x`` (B, 3, H, W): name -> (B, C_s, H / s, W / s).

        With ``penultimate``, also the output of the block before the last (the map the last block reads)
        under :data:`PENULTIMATE_BLOCK`.
        """

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.forward_features(x)

    @property
    def last_stage(self) -> str:
        return self.stage_names[-1]
