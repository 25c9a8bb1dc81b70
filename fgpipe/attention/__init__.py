"""Heatmap methods ("extract attention", METHODS.md section 3): one base, one weighting each."""

from __future__ import annotations

from typing import Any

from fgpipe.attention.aolm import AOLM
from fgpipe.attention.bap import BAP
from fgpipe.attention.base import (
    CAMMethod,
    ForwardPass,
    HeatmapBatch,
    HeatmapMethod,
    HeatmapSet,
    Stage1Like,
    forward_pass,
    heatmaps_of,
)
from fgpipe.attention.cam import OAAM, GradCAM
from fgpipe.errors import ConfigError

METHODS: dict[str, type[HeatmapMethod]] = {
    OAAM.name: OAAM,
    GradCAM.name: GradCAM,
    AOLM.name: AOLM,
    BAP.name: BAP,
}


def create_method(name: str, model: Stage1Like, **kwargs: Any) -> HeatmapMethod:
    """Build the heatmap method registered as ``name`` on ``model`` (extra keyword arguments go to its constructor)."""
    if name not in METHODS:
        raise ConfigError(f"unknown attention method `{name}` (allowed: {', '.join(sorted(METHODS))})")
    return METHODS[name](model, **kwargs)


def companion_methods(selected: HeatmapMethod) -> list[HeatmapMethod]:
    """Every registered method that runs on ``selected``'s model, score and grid, in registry order (``selected``
    itself included, as that object): what one :func:`heatmaps_of` pass can compute beside it. BAP needs the
    WS-DAN head, AOLM a block before the last on the heatmaps' grid."""
    out: list[HeatmapMethod] = []
    for name, cls in METHODS.items():
        if name == selected.name:
            out.append(selected)
            continue
        if cls.unsupported(selected.model) is not None:
            continue
        method = cls(selected.model, normalize=selected.normalize, score=selected.score)
        if method.layer == selected.layer:
            out.append(method)
    return out


__all__ = [
    "AOLM",
    "BAP",
    "CAMMethod",
    "ForwardPass",
    "GradCAM",
    "HeatmapBatch",
    "HeatmapMethod",
    "HeatmapSet",
    "METHODS",
    "OAAM",
    "Stage1Like",
    "companion_methods",
    "create_method",
    "forward_pass",
    "heatmaps_of",
]
