"""fgpipe's checkpoints: the file format and the checks every reader makes.

A checkpoint is a dict saved with :func:`torch.save` and loaded with ``weights_only=True`` (nothing in the file is
ever executed), atomically written; ``kind`` says which network it holds (``stage1``: train-backbone's, ``refine``:
train-refine's) and it carries what rebuilding that network needs (``config``, ``class_names``, ``model``), what it
was made from (:mod:`fgpipe.lineage`) and ``finished`` (False until its training run ended). Every error names the
file and the command that rewrites it.

The networks are rebuilt from them by :mod:`fgpipe.stage1_network` (stage 1) and :mod:`fgpipe.branch_inference`
(the branches); training writes them (:func:`fgpipe.training.fit`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import Tensor

from fgpipe.errors import ArtifactError
from fgpipe.store import atomic_path, safe_torch_load


CHECKPOINT_FORMAT = "fgpipe-checkpoint-1"


# kind -> (the name error messages give it, the command that writes it)
CHECKPOINT_KINDS = {"stage1": ("stage-1", "fgpipe train-backbone"), "refine": ("train-refine", "fgpipe train-refine")}
# what every checkpoint of a kind holds to rebuild its network: key -> type, and the config sections it needs
_REBUILD_KEYS: dict[str, type] = {"model": dict, "config": dict, "class_names": list}
_CONFIG_SECTIONS = {"stage1": ("model", "train_backbone"), "refine": ("model", "train_refine")}
# what --resume needs besides (and each object of ``parts`` it restores: a dict)
RESUME_KEYS: dict[str, type] = {"epoch": int, "best": dict, "history": list, "rng": dict}


def rerun_hint(kind: str | None, dataset: str | None) -> str:
    """``rerun `fgpipe train-backbone --dataset NAME` (or `dvc repro`)``: how to rewrite a checkpoint of ``kind``."""
    if kind not in CHECKPOINT_KINDS:
        return "rerun the training stage that writes it (or `dvc repro`)"
    return f"rerun `{CHECKPOINT_KINDS[kind][1]} --dataset {dataset or 'NAME'}` (or `dvc repro`)"


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """Atomically write a checkpoint (temp file + rename: a crash never leaves a partial one).

    Written through a Python file object, so a full disk raises OSError(ENOSPC) (which atomic_path reports) rather
    than torch's opaque RuntimeError from its own C++ writer."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, fh)


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    kind: str | None = None,
    dataset: str | None = None,
    keys: dict[str, type] | None = None,
) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True`` (nothing in the file is ever executed); errors name the file
    and the command that rewrites it.

    With ``kind`` (stage1 or refine; ``dataset`` names the command in messages), refuse a checkpoint of another
    kind or one without what rebuilding its network needs; ``keys``: what else it must hold (key -> type).
    """
    path = Path(path)
    rerun = rerun_hint(kind, dataset)
    if not path.is_file():
        raise ArtifactError(f"checkpoint not found: {path} ({rerun})")
    state = safe_torch_load(path, "checkpoint", rerun, map_location=map_location)
    if not isinstance(state, dict):
        raise ArtifactError(f"{path} is not an fgpipe checkpoint (it holds a {type(state).__name__}, not a dict); {rerun}")
    if state.get("format") != CHECKPOINT_FORMAT:
        what = (
            f"format {state['format']!r}, this fgpipe reads {CHECKPOINT_FORMAT!r}" if "format" in state
            else "a dict without fgpipe's `format` key: a plain state_dict, or another program's checkpoint"
        )
        raise ArtifactError(f"{path} is not an fgpipe checkpoint ({what}); {rerun}")
    if kind is not None:
        name = CHECKPOINT_KINDS[kind][0]
        if state.get("kind") != kind:
            raise ArtifactError(f"{path}: not a {name} checkpoint (kind {state.get('kind')!r}); {rerun}")
        wrong = [_key_problem(state, key, typ) for key, typ in {**_REBUILD_KEYS, **(keys or {})}.items()]
        if all(w is None for w in wrong[: len(_REBUILD_KEYS)]):  # model, config, class_names have their types: look inside
            wrong += [_key_problem(state["config"], sec, dict, "config.") for sec in _CONFIG_SECTIONS[kind]]
            if not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state["model"].items()):
                wrong.append("`model` is not a mapping of names to tensors")
            if not all(isinstance(c, str) for c in state["class_names"]):
                wrong.append("`class_names` is not a list of names")
        problems = [w for w in wrong if w is not None]
        if problems:
            raise ArtifactError(f"{path} is not a complete fgpipe {name} checkpoint: {'; '.join(problems)}; {rerun}")
    return state


def _key_problem(state: dict[str, Any], key: str, typ: type, prefix: str = "") -> str | None:
    """What is wrong with ``state[key]`` (missing, or not a ``typ``), or None."""
    if key not in state:
        return f"no `{prefix}{key}`"
    if not isinstance(state[key], typ) or (typ is int and isinstance(state[key], bool)):
        return f"`{prefix}{key}` is a {type(state[key]).__name__}, not a {typ.__name__}"
    return None


@contextlib.contextmanager
def rebuilding(path: str | os.PathLike[str], kind: str, dataset: str | None) -> Iterator[None]:
    """Around the calls that take a loaded checkpoint's contents as they are (a config section into its
    ``XConfig(**...)``, ``load_state_dict``, :func:`fgpipe.training.set_rng_state`) and nothing else: contents that do not fit
    (edited by hand, another fgpipe's) become an ArtifactError naming the file, not a traceback from inside torch.
    Building the network and anything else stays outside, so a genuine bug or running out of memory is not
    reported as a damaged checkpoint."""
    try:
        yield
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:  # pydantic's ValidationError is a ValueError
        if isinstance(exc, ValidationError):
            detail = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        else:
            detail = " ".join(str(exc).split())
        detail = f"{exc.title if isinstance(exc, ValidationError) else type(exc).__name__}: {detail[:240]}"
        raise ArtifactError(
            f"{path} is not a complete fgpipe {CHECKPOINT_KINDS[kind][0]} checkpoint: its contents do not rebuild "
            f"the network ({detail}); {rerun_hint(kind, dataset)}"
        ) from None


def finished(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` (a loaded checkpoint) as the result of a finished run, to save at its final place."""
    return {**{k: v for k, v in state.items() if k != "format"}, "finished": True}


def require_finished(state: dict[str, Any], path: str | os.PathLike[str], command: str) -> None:
    """Refuse a checkpoint left by a run that was killed or failed before its last epoch (``finished: False``).

    ``command`` is the one that wrote it. Checkpoints without the key (made by hand, or by an older fgpipe) pass.
    """
    if state.get("finished") is False:
        epochs = [sec["epochs"] for sec in state.get("config", {}).values() if isinstance(sec, dict) and "epochs" in sec]
        of = f" of {epochs[0]}" if epochs else ""
        raise ArtifactError(
            f"{path} is from a training run that did not finish (it stopped after epoch {state.get('epoch')}{of}): "
            f"finish it with `{command} --resume`, or rerun `{command}` (or `dvc repro`)"
        )


# kind -> the learning rate to lower when its network diverged
_LR_KEYS = {"stage1": "train_backbone.lr", "refine": "train_refine.lr"}


def require_finite(
    values: Tensor | np.ndarray, names: Sequence[str], what: str, path: str | os.PathLike[str], kind: str, dataset: str
) -> None:
    """Refuse NaN or infinite outputs of the network of checkpoint ``path`` (of ``kind``): ``values`` (B, ...) holds
    one row per image, named by ``names`` (B,). The error names the images and the checkpoint: it has diverged."""
    rows = values.detach().float().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values, dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(rows.reshape(len(rows), -1)).all(axis=1))
    if not len(bad):
        return
    shown = ", ".join(str(names[i]) for i in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    raise ArtifactError(
        f"the {CHECKPOINT_KINDS[kind][0]} network of {path} gives NaN or infinite {what} for {len(bad)} image(s) "
        f"({shown}): the model has probably diverged; {rerun_hint(kind, dataset)}, e.g. with a lower {_LR_KEYS[kind]}"
    )


def config_dict(cfg: Any) -> dict[str, Any]:
    """A (nested) config dataclass as plain data for a checkpoint."""
    return dataclasses.asdict(cfg)
