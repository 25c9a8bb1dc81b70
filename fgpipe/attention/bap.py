"""WS-DAN's heatmap: the mean of the head's M attention maps (METHODS.md section 3)."""

from __future__ import annotations

from torch import Tensor

from fgpipe.attention.base import ForwardPass, HeatmapMethod, Stage1Like


class BAP(HeatmapMethod):
    """Mean of the WS-DAN attention maps (Hu et al., 2019); no gradient, class-agnostic."""

    name = "bap"

    @classmethod
    def unsupported(cls, model: Stage1Like) -> str | None:
        if getattr(model, "plain", False):
            return "it averages the WS-DAN head's attention maps, and this checkpoint has the plain head (model.head: plain)"
        return None

    def compute(self, fp: ForwardPass) -> Tensor:
        # WS-DAN: L = (1/M) sum_m A_m, A = ReLU(BN(Conv1x1(F))) (B, M, H, W)
        if fp.output.attention is None:
            raise RuntimeError("BAP: the head returned no attention maps")
        return fp.output.attention.to(fp.activation.dtype).mean(dim=1)  # (B, H, W)
