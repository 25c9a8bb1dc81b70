"""The stage-1 network outside training: rebuilt from its checkpoint and checked, where it runs, its logits.

- :func:`load_checked_stage1`: the network of stage1/best.pt (or last.pt), refused when trained on another manifest
  or with other params than those now; :func:`stage1_state` the same checks without building it (train-refine
  starts its branches from the state);
- :func:`extraction_device` / :func:`inference_runtime`: CUDA when torch sees a GPU, else the CPU (the stages that
  only run networks have no device params);
- :func:`predict_logits`: the raw branch, as stage 1 evaluates (resize to ``input_size * resize_ratio``, centre
  crop; the test-time refined logits too): train-backbone's validation, evaluate's and ``fgpipe predict``'s raw
  branch (:mod:`fgpipe.branch_inference`).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fgpipe.checkpoints import load_checkpoint, rebuilding, require_finished
from fgpipe.config import ModelConfig, Settings, TrainBackboneConfig, TrainRefineConfig
from fgpipe.errors import ArtifactError
from fgpipe.lineage import check_params
from fgpipe.loader import center_crop, normalize
from fgpipe.models import build_stage1
from fgpipe.models.wsdan import Stage1Net, refine_crop
from fgpipe.training import Runtime, start_ranks


def extraction_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU (the attention and crops params have no device key)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_runtime(distributed: bool = False, mixed: bool = True) -> Runtime:
    """Where evaluation runs: CUDA (bf16 autocast and channels_last when ``mixed``) when torch sees a GPU, else the CPU
    in float32. ``distributed``: under torchrun, LOCAL_RANK's GPU and this process's rank, the process group started
    (:func:`fgpipe.training.start_ranks`; :func:`fgpipe.sharding.ranks` closes it)."""
    cuda = extraction_device().type == "cuda"
    device, rank, world_size = start_ranks(cuda) if distributed else (extraction_device(), 0, 1)
    mixed = mixed and cuda
    return Runtime(
        device=device, amp_dtype=torch.bfloat16 if mixed else None, channels_last=mixed, rank=rank, world_size=world_size
    )


def predict_logits(model: Stage1Net, images: Tensor, cfg: TrainBackboneConfig, rt: Runtime, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Raw and refined logits (B, K) of uint8 images (N, 3, S, S) center-cropped to the input size, in batches of
    ``batch_size`` (default twice the training batch): :func:`predict_batches`."""
    return predict_batches(model, images.split(batch_size or eval_batch_size(cfg)), cfg, rt)


def eval_batch_size(cfg: TrainBackboneConfig | TrainRefineConfig) -> int:
    """Images per batch when a trained network (stage 1, the branches) is evaluated: twice its training batch (no
    gradients are kept)."""
    return cfg.batch_size * 2


@torch.no_grad()
def predict_batches(model: Stage1Net, batches: Iterable[Tensor], cfg: TrainBackboneConfig, rt: Runtime) -> tuple[Tensor, Tensor]:
    """Raw and refined logits (N, K) of batches of uint8 images (B, 3, S, S), center-cropped to the input size.

    Refined = mean of the raw logits and those of the test-time attention crop (mean of all maps,
    threshold ``refine_threshold`` * max, padding ``refine_padding``); equal to raw when test_refine is off
    or the head is plain (no attention maps).
    """
    model.eval()
    raw_all, ref_all = [], []
    for chunk in batches:
        x = rt.to_input(normalize(center_crop(chunk, cfg.input_size)))
        with rt.autocast():
            out = model(x)
            raw = out.logits.float()
            if cfg.test_refine and out.attention is not None:
                crop = refine_crop(x.float(), out.attention.float(), threshold=cfg.refine_threshold, padding=cfg.refine_padding)
                refined = (raw + model(rt.to_input(crop)).logits.float()) / 2
            else:
                refined = raw
        raw_all.append(raw.cpu())
        ref_all.append(refined.cpu())
    if not raw_all:  # no batch (a rank with no share of a split smaller than the ranks' batches)
        return torch.zeros(0, model.num_classes), torch.zeros(0, model.num_classes)
    return torch.cat(raw_all), torch.cat(ref_all)


# --------------------------------------------------------------------------- rebuilt from its checkpoint
def read_stage1(path: str | Path, device: str | torch.device = "cpu", dataset: str | None = None) -> dict[str, Any]:
    """A stage-1 checkpoint's state: of a finished run, holding what rebuilding its network needs (its `model` and
    `train_backbone` config sections valid). ``dataset`` names the command that rewrites the file in errors
    (default: the one the checkpoint records)."""
    state = load_checkpoint(path, map_location=device, kind="stage1", dataset=dataset)
    dataset = dataset or str(state.get("dataset", "NAME"))
    require_finished(state, path, f"fgpipe train-backbone --dataset {dataset}")
    with rebuilding(path, "stage1", dataset):
        ModelConfig(**state["config"]["model"])
        TrainBackboneConfig(**state["config"]["train_backbone"])  # checked here: the callers read it
    return state


def load_stage1(
    path: str | Path, device: str | torch.device = "cpu", dataset: str | None = None
) -> tuple[Stage1Net, dict[str, Any]]:
    """Rebuild the stage-1 network from a checkpoint (its own config; no weight download) in eval mode.

    Returns the model and the checkpoint dict (class_names, manifest_sha256, config, ...). ``dataset`` names the
    command that rewrites the file in errors (default: the one the checkpoint records).
    """
    state = read_stage1(path, device, dataset)
    dataset = dataset or str(state.get("dataset", "NAME"))
    model = build_stage1(ModelConfig(**state["config"]["model"]), len(state["class_names"]), weights="none")
    with rebuilding(path, "stage1", dataset):
        model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def check_stage1(
    path: Path, state: dict[str, Any], manifest_sha: str, dataset: str, settings: Settings | None = None,
    classes: list[str] | None = None,
) -> None:
    """Refuse a stage-1 checkpoint trained on another manifest (or, given, another class list) than the one on disk,
    or (with ``settings``) with other `model` / `train_backbone` params than those now (:func:`fgpipe.lineage.check_params`)."""
    if state.get("manifest_sha256") != manifest_sha or (classes is not None and list(state.get("class_names", [])) != classes):
        raise ArtifactError(
            f"{path} was trained on another manifest than {path.parent.parent / 'manifest.csv'}: "
            f"rerun `fgpipe train-backbone --dataset {dataset}` (or `dvc repro`)"
        )
    if settings is not None:
        check_params(path, state.get("params"), settings, "train-backbone", dataset)


def _require_stage1_file(path: Path, dataset: str) -> None:
    if not path.is_file():
        raise ArtifactError(f"checkpoint not found: {path} (run `fgpipe train-backbone --dataset {dataset}` first)")


def load_checked_stage1(
    path: Path, manifest_sha: str, dataset: str, device: torch.device, settings: Settings | None = None
) -> tuple[Stage1Net, dict[str, Any]]:
    """The stage-1 network of ``path`` in eval mode, checked by :func:`check_stage1`."""
    _require_stage1_file(path, dataset)
    model, state = load_stage1(path, device, dataset)
    check_stage1(path, state, manifest_sha, dataset, settings)
    return model, state


def stage1_state(
    path: Path, manifest_sha: str, classes: list[str], dataset: str, settings: Settings | None = None
) -> dict[str, Any]:
    """The stage-1 checkpoint the branches start from, checked by :func:`check_stage1` (against ``classes`` too);
    no network is built."""
    _require_stage1_file(path, dataset)
    state = read_stage1(path, dataset=dataset)
    check_stage1(path, state, manifest_sha, dataset, settings, classes)
    return state


def stage1_input_size(state: dict[str, Any]) -> int:
    """The input size a stage-1 checkpoint was trained at."""
    return int(state["config"]["train_backbone"]["input_size"])
