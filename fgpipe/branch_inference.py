"""Batched inference of the three branches evaluate and ``fgpipe predict`` combine (METHODS.md section 6).

- raw: the stage-1 network on the whole image, as stage-1 evaluates (:func:`fgpipe.stage1_network.predict_logits`);
- object / parts: the refinement branches on the object crop and on the part patches (mean of the patch logits), as
  train-refine validates (:func:`predict_branches` on :mod:`fgpipe.branch_data`).

:func:`load_refine` rebuilds the branches from refine/best.pt; :class:`Branches` holds the three networks with the settings they were trained with and refuses NaN or infinite
logits (a diverged network), naming the images and the checkpoint; :func:`probabilities` and
:func:`joint_probabilities` turn the logits (each branch's divided by its temperature) into the per-branch and joint class
probabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fgpipe.branch_data import BranchData, eval_inputs, part_size
from fgpipe.checkpoints import load_checkpoint, rebuilding, require_finished, require_finite
from fgpipe.config import ModelConfig, TrainBackboneConfig, TrainRefineConfig
from fgpipe.loader import normalize, resized_side
from fgpipe.models.branches import RefineNet, build_refine_net
from fgpipe.models.wsdan import Stage1Net
from fgpipe.sharding import gather_chunks, share
from fgpipe.stage1_network import eval_batch_size, predict_batches, predict_logits
from fgpipe.streaming import Feed, sequential_chunks
from fgpipe.training import Runtime

BRANCHES = ("raw", "object", "parts")


def load_refine(
    path: str | Path, device: str | torch.device = "cpu", dataset: str | None = None
) -> tuple[RefineNet, dict[str, Any]]:
    """Rebuild the branches from a refine checkpoint (its own config) in eval mode; returns (model, checkpoint dict).

    ``dataset`` names the command that rewrites the file in errors (default: the one the checkpoint records)."""
    state = load_checkpoint(path, map_location=device, kind="refine", dataset=dataset)
    dataset = dataset or str(state.get("dataset", "NAME"))
    require_finished(state, path, f"fgpipe train-refine --dataset {dataset}")
    with rebuilding(path, "refine", dataset):
        mcfg = ModelConfig(**state["config"]["model"])
        rcfg = refine_config(state)  # also checks the section: the callers read it
    model, _ = build_refine_net(mcfg, len(state["class_names"]), rcfg.shared_backbone, dropout=rcfg.dropout)
    with rebuilding(path, "refine", dataset):
        model.load_state_dict(state["model"])
    return model.to(device).eval(), state


def refine_config(state: dict[str, Any]) -> TrainRefineConfig:
    """The train_refine settings a refine checkpoint was trained with (input and part sizes, augmentation)."""
    return TrainRefineConfig(**state["config"]["train_refine"])


@torch.no_grad()
def predict_branches(
    model: RefineNet, data: BranchData, cfg: TrainRefineConfig, rt: Runtime, batch_size: int | None = None,
    idx: Tensor | None = None, chunks: Sequence[Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Object-branch logits and pooled part-branch logits (N, K) each, float32 on the CPU, of the images ``idx`` of
    ``data`` (default: all) in batches of ``batch_size`` (default twice the training batch), or of the batches
    ``chunks``."""
    model.eval()
    if chunks is None:
        idx = torch.arange(len(data)) if idx is None else idx
        chunks = sequential_chunks(idx, batch_size or eval_batch_size(cfg))
    obj_all, parts_all = [], []
    for chunk, (objects, patches) in data.feed.batches(chunks):
        objects, patches = eval_inputs(objects, patches, cfg)
        _, owner = data.patch_index(chunk)
        with rt.autocast():
            out = model(rt.to_input(normalize(objects)), rt.to_input(normalize(patches)), owner.to(rt.device))
        obj_all.append(out.object_logits.float().cpu())
        parts_all.append(out.part_logits.float().cpu())
    if not obj_all:  # no batch (a rank with no share of a split smaller than the ranks' batches)
        return torch.zeros(0, model.num_classes), torch.zeros(0, model.num_classes)
    return torch.cat(obj_all), torch.cat(parts_all)


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

    def raw_logits(self, images: Tensor | Feed, names: Sequence[str], batch_size: int | None = None) -> Tensor:
        """The raw branch's logits (N, K) of uint8 images (N, 3, S, S), S = :attr:`whole_side`, or of every image a
        feed of them gives (:func:`fgpipe.streaming.whole_image_feed`); ``names`` (N,) name the images when the logits
        are not finite."""
        if isinstance(images, Feed):  # under torchrun each rank runs its share of the batches (fgpipe.sharding)
            chunks = sequential_chunks(torch.arange(len(images)), batch_size or eval_batch_size(self.stage1_cfg))
            feed = images

            def mine() -> list[Tensor]:
                own = list(share(chunks, self.rt))
                return [predict_batches(self.stage1, (px for _, (px,) in feed.batches(own)), self.stage1_cfg, self.rt)[0]]

            (raw,) = gather_chunks(mine, [len(c) for c in chunks], self.rt)
        else:
            raw, _ = predict_logits(self.stage1, images, self.stage1_cfg, self.rt, batch_size=batch_size)
        require_finite(raw, names, "logits", self.stage1_path, "stage1", self.dataset)
        return raw

    def region_logits(self, data: BranchData, names: Sequence[str], batch_size: int | None = None) -> tuple[Tensor, Tensor]:
        """The object and part branches' logits (N, K) each, of the regions ``data`` holds (decoded at
        :attr:`region_sides`); under torchrun each rank runs its share of the batches (:mod:`fgpipe.sharding`)."""
        chunks = sequential_chunks(torch.arange(len(data)), batch_size or eval_batch_size(self.refine_cfg))

        def mine() -> tuple[Tensor, Tensor]:
            return predict_branches(self.refine, data, self.refine_cfg, self.rt, chunks=list(share(chunks, self.rt)))

        obj, parts = gather_chunks(mine, [len(c) for c in chunks], self.rt)
        for name, logits in (("object", obj), ("parts", parts)):
            require_finite(logits, names, f"{name} logits", self.refine_path, "refine", self.dataset)
        return obj, parts


def probabilities(
    raw: Tensor, obj: Tensor, parts: Tensor, temperatures: Mapping[str, float] | None = None
) -> dict[str, np.ndarray]:
    """Each branch's class probabilities: softmax in float64 of its logits (N, K) divided by the branch's temperature
    (evaluate.json's ``temperatures``, fitted on val; 1 for a branch not given)."""
    t = temperatures or {}
    return {
        name: torch.softmax(logits.double() / float(t.get(name, 1.0)), dim=1).numpy()
        for name, logits in zip(BRANCHES, (raw, obj, parts))
    }


def joint_probabilities(probs: dict[str, np.ndarray], weights: dict[str, float]) -> np.ndarray:
    """Weighted mean of the branch probabilities (weights summing to 1). (N, K)"""
    return sum(weights[b] * probs[b] for b in BRANCHES)  # type: ignore[return-value]
