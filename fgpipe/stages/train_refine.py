"""Stage `train-refine`: the object branch on object crops and the part branch on MPALM patches (METHODS.md 6).

Reads:  data/NAME/manifest.csv, data/NAME/dataset.json, the images (from data/NAME/images.h5 when prepare built it),
        data/NAME/crops.h5 (object and part boxes),
        data/NAME/stage1/best.pt (backbone architecture and initial weights); params `train_refine`.
        crops.h5 is checked against the manifest, data/NAME/attention.h5 and the stage-1 checkpoint it was made
        from (best or last), by SHA-256 (:mod:`fgpipe.lineage`).
Writes: data/NAME/refine/{best,last}.pt (recording the SHA-256 of the manifest, crops.h5 and stage1/best.pt),
        metrics/NAME/train_refine.json and train_refine.provenance.json, metrics/NAME/train_refine/ (per-epoch curves for `dvc plots`, written by
        dvclive).

The stage supplies its data, its step and its figures (:class:`RefineTrainer`) and the box jitter
(:func:`jittered_crops`); the loop is :func:`fgpipe.training.fit`, the regions :mod:`fgpipe.branch_data`.
No crop is ever written as an image: every box is cut from images.h5 (or the image file) batch by batch by the input
pipeline's workers (:mod:`fgpipe.streaming`; ``in_memory: true`` decodes them all once instead).
Train boxes are decoded with a margin of ``box_jitter`` times the box side on each side, so that every epoch
can move each box edge by up to that fraction (a random shift and scale) before the usual random crop, flip
and colour jitter; val boxes are decoded exactly, resized to ``input_size * resize_ratio`` and centre-cropped,
as stage-1 evaluates. Part patches are resized to ``part_size`` (0: ``input_size // 2``); an image with no
part uses its object box as its single patch. With ``pad_parts`` (the default) every training step's part batch
holds the same number of patches, batch x the most any train image has: an image with fewer repeats its own
(exact copies, run through the part backbone but left out of its pooled logits), so the network's part batch does
not depend on the images' patch counts (a heap fragmented by part batches of varying sizes grew with the steps:
bench/RESULTS.md). The copies weigh in the batch-norm statistics of the backbone they run through (with
``shared_backbone``, the object branch's too); no draw from the stage's generator changes, but draws from torch's
global one (the trunk's stochastic depth, ``dropout``) are made for the padded batch.

Both branches train jointly (loss = CE_object + CE_parts); the epoch kept as best maximises the mean of the
two branches' val top-1 (test is never read here). ``--resume`` continues from the unfinished run's last.pt;
each epoch is seeded from (seed, epoch), so a resumed run ends with the same weights as an uninterrupted one.
Until the run ends, its checkpoints and curves stay in data/NAME/refine/unfinished/ (:class:`fgpipe.training.RunFiles`);
the previous run's outputs stay untouched, and are replaced together at the end (:func:`fgpipe.training.finish_run`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import roi_align

from fgpipe.branch_data import BranchData, padded_positions, part_size, read_crops, split_data
from fgpipe.branch_inference import predict_branches
from fgpipe.checkpoints import config_dict
from fgpipe.config import ModelConfig, Settings, TrainRefineConfig
from fgpipe.errors import ArtifactError
from fgpipe.h5schema import CropsReader
from fgpipe.imagecache import open_image_cache
from fgpipe.lineage import check_crops, check_crops_params, params_record, read_dataset_inputs
from fgpipe.loader import check_image_files, normalize, resized_side, train_augment
from fgpipe.models.branches import build_refine_net
from fgpipe.stage1_network import stage1_state
from fgpipe.store import FileHashes, StageRecord, check_output_paths
from fgpipe.streaming import Feed, FeedOptions, Pixels
from fgpipe.training import (
    FitResult,
    RunFiles,
    Runtime,
    StepHook,
    Trainer,
    all_reduce_sum,
    check_loss,
    config_mismatch,
    feed_options,
    fit,
    optimizer_for,
    scheduler_for,
    seed_everything,
    training_runtime,
    unwrap,
)

STAGE = "train_refine"
MIN_JITTERED_SIDE = 0.5  # a jittered box narrower than this fraction of the box falls back to the box itself


def jittered_crops(
    stored: Tensor, regions: Tensor, boxes: Tensor, u: Tensor, jitter: float, out_side: int
) -> Tensor:
    """Cut jittered boxes out of stored regions, resized to ``out_side``: float (n, 3, out, out) in [0, 255].

    ``stored`` (n, 3, S, S) uint8 holds ``regions`` (n, 4); every edge of ``boxes`` (n, 4) moves by
    ``u * jitter`` (u (n, 4) in [-1, 1]) times the box side, the result is clipped to the region (a box
    that would shrink below half its side keeps its original edges) and resampled with ``roi_align``
    (pixel-edge coordinates, ``aligned=True``).
    """
    n, side = stored.shape[0], stored.shape[-1]
    wh = torch.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], dim=1)  # (n, 2)
    jb = boxes + u * jitter * wh.repeat(1, 2)  # (n, 4)
    lo, hi = regions[:, :2].repeat(1, 2), regions[:, 2:].repeat(1, 2)  # (n, 4) each
    jb = torch.minimum(torch.maximum(jb, lo), hi)
    small = ((jb[:, 2:] - jb[:, :2]) < MIN_JITTERED_SIDE * wh).any(dim=1)  # (n,)
    jb = torch.where(small[:, None], boxes, jb)
    scale = side / (regions[:, 2:] - regions[:, :2])  # (n, 2) stored pixels per original pixel
    local = (jb - lo) * scale.repeat(1, 2)  # (n, 4) in stored pixels
    rois = torch.cat([torch.arange(n, dtype=torch.float32)[:, None], local.float()], dim=1)  # (n, 5)
    return roi_align(stored.float(), rois, output_size=(out_side, out_side), spatial_scale=1.0, sampling_ratio=-1, aligned=True)


def train_inputs(
    data: BranchData, idx: Tensor, stored: tuple[Tensor, Tensor], cfg: TrainRefineConfig, gen: torch.Generator,
    pad_to: int = 0,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """Augmented object crops (B, 3, S, S), patches (T, 3, s, s), both float in [0, 1], each patch's owner (T,) and
    which patches to pool (None: all), of the images ``idx`` whose stored regions ``data.feed`` gave (``stored``:
    uint8 objects and patches).

    Draw order from ``gen``: object jitter (B, 4), patch jitter (T, 4), then :func:`train_augment` for objects
    and for patches. ``pad_to`` > 0: the augmented patches are then padded to ``pad_to`` an image
    (:func:`fgpipe.branch_data.padded_positions`: T = B * pad_to, each copy identical to its patch; the returned
    mask (T,) marks the patches themselves, the ones to pool), which draws nothing from ``gen``.
    """
    objects_in, patches_in = stored  # (B, 3, So, So), (T, 3, Sp, Sp) uint8
    rows, owner = data.patch_index(idx)
    u_obj = torch.rand(len(idx), 4, generator=gen) * 2 - 1  # (B, 4)
    u_part = torch.rand(len(rows), 4, generator=gen) * 2 - 1  # (T, 4)
    obj_side = resized_side(cfg.input_size, cfg.augment)
    p_size = part_size(cfg)
    objects = jittered_crops(objects_in, data.object_regions[idx], data.object_boxes[idx], u_obj, cfg.box_jitter, obj_side)
    patches = jittered_crops(
        patches_in, data.patch_regions[rows], data.patch_boxes[rows], u_part, cfg.box_jitter, resized_side(p_size, cfg.augment)
    )
    objects, patches = train_augment(objects, cfg.input_size, cfg.augment, gen), train_augment(patches, p_size, cfg.augment, gen)
    if pad_to <= 0:
        return objects, patches, owner, None
    positions, keep = padded_positions(data.patch_count[idx], pad_to)  # (B * pad_to,) each
    return objects, patches[positions], owner[positions], keep


# --------------------------------------------------------------------------- the stage
def run(settings: Settings, dataset: str, resume: bool = False, on_step: StepHook | None = None) -> StageRecord:
    """Train both branches on train, select on val; return the metrics and provenance (also written to
    metrics/NAME/train_refine.json and train_refine.provenance.json)."""
    cfg = settings.params.train_refine
    with training_runtime(cfg) as rt:
        t_start = time.perf_counter()
        return fit(RefineTrainer.build(settings, dataset, cfg, rt, t_start), rt, resume, on_step)


@dataclass
class RefineTrainer(Trainer):
    """The object branch on object crops and the part branch on part patches, trained jointly."""

    settings: Settings
    dataset: str
    cfg: TrainRefineConfig
    mcfg: ModelConfig
    rt: Runtime
    t_start: float
    files: RunFiles
    parts: dict[str, Any]
    state: dict[str, Any]
    train: BranchData
    val: BranchData
    stage1_path: Path
    loaded: int  # tensors of the stage-1 checkpoint the branches started from
    options: FeedOptions  # how the regions are read
    kind: str = "refine"
    lr_key: str = "train_refine.lr"
    counts: tuple[tuple[str, str], ...] = (("object_top1", "obj"), ("parts_top1", "parts"))

    @classmethod
    def build(cls, settings: Settings, dataset: str, cfg: TrainRefineConfig, rt: Runtime, t_start: float) -> RefineTrainer:
        """Read and check the inputs, decode the train and val regions, build both branches from stage 1, the optimiser
        and the schedule."""
        settings.dataset(dataset)  # a clear error for an unknown dataset name
        layout = settings.layout(dataset)
        data, out = layout.data, layout.metrics
        files = RunFiles(
            data.refine("best"), data.refine("last"), out.stage(STAGE), out.provenance(STAGE), out.curves(STAGE),
            data.unfinished("refine"),
        )
        check_output_paths([files.best, files.last, files.metrics, files.provenance], [files.curves, files.unfinished])  # not after the training
        inputs = read_dataset_inputs(settings, dataset)
        info, root, classes, by_split = inputs.info, inputs.root, inputs.classes, inputs.by_split
        sha = FileHashes()  # each input hashed once
        manifest_sha = sha(data.manifest)
        stage1_path = data.stage1("best")
        stage1 = stage1_state(stage1_path, manifest_sha, classes, dataset, settings)
        inputs.require("train", "val")
        with CropsReader(data.crops) as crops:  # made from this manifest, attention.h5 and stage-1 checkpoint
            check_crops(crops, data.path, dataset, sha)
            check_crops_params(crops, data.path, settings, dataset)  # and with the params now
        boxes = {s: read_crops(data.crops, manifest_sha, by_split[s]) for s in ("train", "val")}
        hashes = {"manifest_sha256": manifest_sha, "crops_sha256": sha(data.crops), "stage1_sha256": sha(stage1_path)}

        cache = open_image_cache(data.images, root, manifest_sha, dataset)
        check_image_files(info, by_split["train"] + by_split["val"], cache, dataset, data.manifest)  # before any checkpoint is written
        options = feed_options(cfg)
        train = split_data(root, by_split["train"], boxes["train"], cfg, cfg.box_jitter, "train", options, cache)
        val = split_data(root, by_split["val"], boxes["val"], cfg, 0.0, "val", options, cache)

        seed_everything(cfg.seed)
        mcfg = ModelConfig(**stage1["config"]["model"])  # checked by stage1_state
        # a stage-1 state_dict that does not fit is a ConfigError naming each key (fgpipe.models.weights.apply_state_dict)
        model, report = build_refine_net(
            mcfg, len(classes), cfg.shared_backbone, stage1["model"], str(stage1_path), cfg.dropout
        )
        model = model.to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = optimizer_for(model.parameters(), cfg)
        sched = scheduler_for(opt, cfg, len(train), rt)
        state = {
            "config": {"model": dict(stage1["config"]["model"]), "train_refine": config_dict(cfg)},
            "class_names": classes,
            "dataset": dataset,
            **hashes,
            "params": params_record(settings, "train-refine", dataset),  # compared by later stages (fgpipe.lineage.check_params)
        }
        return cls(
            settings=settings, dataset=dataset, cfg=cfg, mcfg=mcfg, rt=rt, t_start=t_start, files=files,
            parts={"model": model, "optimizer": opt, "scheduler": sched}, state=state, train=train, val=val,
            stage1_path=stage1_path, loaded=report.loaded if report else 0, options=options,
        )

    @property
    def pad_to(self) -> int:
        """Patches an image brings to a training step: the most any train image has (``pad_parts``), else 0 (its own)."""
        return int(self.train.patch_count.max()) if self.cfg.pad_parts and len(self.train) else 0

    @property
    def command(self) -> str:  # type: ignore[override]
        return f"fgpipe train-refine --dataset {self.dataset}"

    @property
    def train_size(self) -> int:  # type: ignore[override]
        return len(self.train)

    @property
    def train_feed(self) -> Feed:  # type: ignore[override]
        return self.train.feed

    def check_resumable(self, state: dict[str, Any]) -> None:
        for key, what in (("manifest_sha256", "manifest"), ("crops_sha256", "crops.h5"), ("stage1_sha256", "stage-1 checkpoint")):
            if state.get(key) != self.state[key]:
                raise ArtifactError(f"{self.files.running_last} was trained from another {what}: delete it or run without --resume")
        config_mismatch(state, self.state["config"], self.files.running_last)

    def train_step(self, net: nn.Module, idx: Tensor, pixels: Pixels, gen: torch.Generator) -> tuple[Tensor, tuple[int, ...], int]:
        """loss = CE(object logits) + CE(mean patch logits), on jittered, augmented crops and patches."""
        cfg, rt, opt = self.cfg, self.rt, self.parts["optimizer"]
        objects, patches, owner, keep = train_inputs(self.train, idx, (pixels[0], pixels[1]), cfg, gen, self.pad_to)
        y = self.train.labels[idx].to(rt.device)
        with rt.autocast():
            out = net(
                rt.to_input(normalize(objects)), rt.to_input(normalize(patches)), owner.to(rt.device),
                None if keep is None else keep.nonzero().squeeze(1).to(rt.device),  # the real patches' positions
            )
            loss_obj = F.cross_entropy(out.object_logits.float(), y, label_smoothing=cfg.label_smoothing)
            loss_parts = F.cross_entropy(out.part_logits.float(), y, label_smoothing=cfg.label_smoothing)
            loss = loss_obj + loss_parts
        check_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        correct = (int((out.object_logits.detach().argmax(1) == y).sum()), int((out.part_logits.detach().argmax(1) == y).sum()))
        return loss.detach(), correct, len(y)

    def validate(self) -> dict[str, float]:
        return evaluate_branches(self.parts["model"], self.val, self.cfg, self.rt)

    def figures(self, stats: dict[str, float], val: dict[str, float]) -> dict[str, float]:
        return {
            "train_object_top1": stats["object_top1"], "train_parts_top1": stats["parts_top1"],
            "val_object_top1": val["object"], "val_parts_top1": val["parts"], "val_top1": val["mean"],
        }

    def best_figures(self, val: dict[str, float]) -> dict[str, float]:
        return {"object": val["object"], "parts": val["parts"]}

    def describe(self, stats: dict[str, float], val: dict[str, float]) -> str:
        return (
            f"train obj {stats['object_top1']:.3f} parts {stats['parts_top1']:.3f}  "
            f"val obj {val['object']:.3f} parts {val['parts']:.3f}"
        )

    def finish(self, result: FitResult) -> tuple[StageRecord, dict[str, Any] | None]:
        cfg, rt = self.cfg, self.rt
        best, last = result.best, result.history[-1]
        metrics = {
            "input_size": cfg.input_size,
            "part_size": part_size(cfg),
            "epochs": cfg.epochs,
            "best_epoch": best["epoch"],
            "val": {"object": best["object"], "parts": best["parts"], "mean": best["val_top1"]},
            "train": {"loss": last["train_loss"], "object_top1": last["train_object_top1"], "parts_top1": last["train_parts_top1"]},
            "patches_per_image": round(float(self.train.patch_count.float().mean()), 3),
            # each step's part batch: images x this (0: each image's own count); the copies' share of the part branch's inputs
            "padded_patches_per_image": self.pad_to,
            "padding_share": round(1 - float(self.train.patch_count.float().mean()) / self.pad_to, 4) if self.pad_to else 0.0,
            "images_per_s": result.images_per_s,
            "seconds": round(time.perf_counter() - self.t_start, 2),
        }
        provenance = {
            "backbone": self.mcfg.backbone,
            "shared_backbone": cfg.shared_backbone,
            "initialised_from": {"checkpoint": self.stage1_path, "tensors": self.loaded},  # the path relative to the project
            "resumed_from_epoch": result.resumed_from_epoch,
            "world_size": rt.world_size,
            "device": str(rt.device),
            **self.options.describe(),  # which input pipeline ran: stream (and its workers) or memory
        }
        return self.settings.record(self.dataset, metrics, provenance), None


def evaluate_branches(model: nn.Module, data: BranchData, cfg: TrainRefineConfig, rt: Runtime) -> dict[str, float]:
    """Val top-1 of each branch and their mean (sharded over ranks: each reads only its own images; counts summed)."""
    idx = torch.arange(len(data))[rt.rank :: rt.world_size] if rt.distributed else torch.arange(len(data))
    obj, parts = predict_branches(unwrap(model), data, cfg, rt, idx=idx)  # type: ignore[arg-type]
    y = data.labels[idx]
    counts = torch.tensor([(obj.argmax(1) == y).sum(), (parts.argmax(1) == y).sum(), len(y)], dtype=torch.float64)
    all_reduce_sum(counts, rt)
    n = max(float(counts[2]), 1.0)
    top_obj, top_parts = float(counts[0]) / n, float(counts[1]) / n
    return {"object": top_obj, "parts": top_parts, "mean": (top_obj + top_parts) / 2, "images": int(counts[2])}
