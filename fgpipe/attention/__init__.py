"""Heatmap methods ("extract attention", METHODS.md section 3): one base, one weighting each."""

from __future__ import annotations

from typing import Any

from fgpipe.attention.aolm import AOLM
from fgpipe.attention.bap import BAP
from fgpipe.attention.base import CAMMethod, ForwardPass, HeatmapBatch, HeatmapMethod, Stage1Like
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


__all__ = [
    "AOLM",
    "BAP",
    "CAMMethod",
    "ForwardPass",
    "GradCAM",
    "HeatmapBatch",
    "HeatmapMethod",
    "METHODS",
    "OAAM",
    "Stage1Like",
    "create_method",
]
