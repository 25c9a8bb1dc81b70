"""Batched inference of the three branches evaluate and ``fgpipe predict`` combine (METHODS.md section 6).

- raw: the stage-1 network on the whole image, as stage-1 evaluates (resize to ``input_size * resize_ratio``,
  centre crop; :func:`predict_logits`, also train-backbone's validation);
- MPALM parts (METHODS.md section 5): the stage-1 backbone's features of object crops (:func:`parts_of`, as
  extract-crops finds them);
- object / parts: the refinement branches on the object crop and on the part patches (mean of the patch logits), as
  train-refine validates (:func:`predict_branches` on :mod:`fgpipe.branch_data`).

:class:`Branches` holds the three networks with the settings they were trained with and refuses NaN or infinite
logits (a diverged network), naming the images and the checkpoint; :func:`probabilities` and
:func:`joint_probabilities` turn the logits into the per-branch and joint class probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fgpipe.branch_data import BranchData, eval_inputs, part_size
from fgpipe.checkpoints import require_finite
from fgpipe.config import CropsConfig, TrainBackboneConfig, TrainRefineConfig
from fgpipe.loader import center_crop, normalize, resized_side
from fgpipe.localize import PartBoxes, mpalm_parts_batch
from fgpipe.models.branches import RefineNet
from fgpipe.models.wsdan import Stage1Net, refine_crop
from fgpipe.training import Runtime

BRANCHES = ("raw", "object", "parts")


def extraction_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU (the attention and crops params have no device key)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def inference_runtime() -> Runtime:
    """Where evaluation runs: CUDA (bf16 autocast, channels_last) when torch sees a GPU, else the CPU in float32."""
    device = extraction_device()
    cuda = device.type == "cuda"
    return Runtime(device=device, amp_dtype=torch.bfloat16 if cuda else None, channels_last=cuda)


@torch.no_grad()
def predict_logits(model: Stage1Net, images: Tensor, cfg: TrainBackboneConfig, rt: Runtime, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Raw and refined logits (B, K) of uint8 images (N, 3, S, S) center-cropped to the input size.

    Refined = mean of the raw logits and those of the test-time attention crop (mean of all maps,
    threshold ``refine_threshold`` * max, padding ``refine_padding``); equal to raw when test_refine is off
    or the head is plain (no attention maps).
    """
    model.eval()
    raw_all, ref_all = [], []
    for chunk in images.split(batch_size or cfg.batch_size * 2):
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
    return torch.cat(raw_all), torch.cat(ref_all)


@torch.no_grad()
def predict_branches(model: RefineNet, data: BranchData, cfg: TrainRefineConfig, rt: Runtime, batch_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Object-branch logits and pooled part-branch logits (N, K) each, float32 on the CPU."""
    model.eval()
    obj_all, parts_all = [], []
    for idx in torch.arange(len(data)).split(batch_size or cfg.batch_size * 2):
        objects, patches, owner = eval_inputs(data, idx, cfg)
        with rt.autocast():
            out = model(rt.to_input(normalize(objects)), rt.to_input(normalize(patches)), owner.to(rt.device))
        obj_all.append(out.object_logits.float().cpu())
        parts_all.append(out.part_logits.float().cpu())
    return torch.cat(obj_all), torch.cat(parts_all)


def parts_of(
    model: Stage1Net, crops: torch.Tensor, boxes: np.ndarray, size: int, cfg: CropsConfig, device: torch.device,
    *, names: Sequence[str] | None = None, checkpoint: Path | None = None, dataset: str = "NAME",
) -> PartBoxes:
    """Section-5 MPALM parts of a batch of decoded object crops (B, 3, size, size) uint8 with their boxes (B, 4).

    With ``checkpoint`` (the network's file), non-finite features (a diverged network) are refused, naming the
    images ``names`` (B,) (default: their positions in the batch)."""
    with torch.no_grad():
        fmap = model.features(normalize(crops.to(device)))[model.feature_layer]  # (B, C, h, w)
    if checkpoint is not None:
        names = names if names is not None else [f"#{i}" for i in range(len(fmap))]
        require_finite(fmap, names, "features of the object crops", checkpoint, "stage1", dataset)
    return mpalm_parts_batch(
        fmap, boxes, size, top_k=cfg.part_top_k, sizes=cfg.part_sizes, iou=cfg.part_nms_iou, max_parts=cfg.max_parts
    )


@dataclass
class Branches:
    """The networks of the three branches, loaded and checked by the caller, with the settings they were trained with."""

    stage1: Stage1Net  # the raw branch (stage1/best.pt)
    stage1_cfg: TrainBackboneConfig  # as stage-1 evaluates, without test-time refinement
    stage1_path: Path
    refine: RefineNet  # the object and part branches (refine/best.pt)
    refine_cfg: TrainRefineConfig  # the settings the branches were trained with (sizes, augmentation)
    refine_path: Path
    rt: Runtime
    dataset: str

    @property
    def whole_side(self) -> int:
        """The side whole images are decoded at for the raw branch (centre-cropped to stage 1's input size)."""
        return resized_side(self.stage1_cfg.input_size, self.stage1_cfg.augment)

    @property
    def region_sides(self) -> tuple[int, int]:
        """The sides object crops and part patches are decoded at (centre-cropped to the branches' input sizes)."""
        cfg = self.refine_cfg
        return resized_side(cfg.input_size, cfg.augment), resized_side(part_size(cfg), cfg.augment)

    def raw_logits(self, images: Tensor, names: Sequence[str], batch_size: int | None = None) -> Tensor:
        """The raw branch's logits (N, K) of uint8 images (N, 3, S, S), S = :attr:`whole_side`; ``names`` (N,) name the
        images when the logits are not finite."""
        raw, _ = predict_logits(self.stage1, images, self.stage1_cfg, self.rt, batch_size=batch_size)
        require_finite(raw, names, "logits", self.stage1_path, "stage1", self.dataset)
        return raw

    def region_logits(self, data: BranchData, names: Sequence[str], batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """The object and part branches' logits (N, K) each, of the regions ``data`` holds (decoded at
        :attr:`region_sides`)."""
        obj, parts = predict_branches(self.refine, data, self.refine_cfg, self.rt, batch_size=batch_size)
        for name, logits in (("object", obj), ("parts", parts)):
            require_finite(logits, names, f"{name} logits", self.refine_path, "refine", self.dataset)
        return obj, parts


def probabilities(raw: Tensor, obj: Tensor, parts: Tensor) -> dict[str, np.ndarray]:
    """Each branch's class probabilities: softmax in float64 of its logits (N, K)."""
    return {name: torch.softmax(logits.double(), dim=1).numpy() for name, logits in zip(BRANCHES, (raw, obj, parts))}


def joint_probabilities(probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of the branch probabilities (weights summing to 1). (N, K)"""
    return sum(weights[b] * probs[b] for b in BRANCHES)  # type: ignore[return-value]
