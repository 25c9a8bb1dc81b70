"""Stage `train-backbone`: train the stage-1 network (backbone + LCAM + WS-DAN head), METHODS.md 1-2.

Reads:  data/NAME/manifest.csv, data/NAME/dataset.json, the images (from data/NAME/images.h5 when prepare
        built it); params `model`, `train_backbone`.
Writes: data/NAME/stage1/{best,last}.pt, metrics/NAME/train_backbone.json and train_backbone.provenance.json,
        metrics/NAME/train_backbone/ (per-epoch curves for `dvc plots`, written by dvclive).

The stage supplies its data, its step (:func:`train_step`) and its figures (:class:`Stage1Trainer`); the loop is
:func:`fgpipe.training.fit`. The best epoch is selected on val (carved from train); test is only evaluated once,
at the end, for the report. ``--resume`` continues from the unfinished run's last.pt; each epoch is
seeded from (seed, epoch), so a resumed run ends with the same weights as an uninterrupted one.
Until the run ends, its checkpoints and curves stay in data/NAME/stage1/unfinished/ (:class:`fgpipe.training.RunFiles`);
the previous run's outputs stay untouched, and are replaced together at the end (:func:`fgpipe.training.finish_run`).
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fgpipe.checkpoints import config_dict, load_checkpoint
from fgpipe.config import ModelConfig, Settings, TrainBackboneConfig
from fgpipe.errors import ArtifactError
from fgpipe.imagecache import ImageCache, open_image_cache
from fgpipe.lineage import params_record, read_dataset_inputs
from fgpipe.loader import check_image_files, normalize, resized_side, train_augment, whole_image_requests
from fgpipe.manifest import ManifestRow
from fgpipe.models import build_stage1
from fgpipe.models.wsdan import CenterLoss, Stage1Net, attention_crop_drop
from fgpipe.stage1_network import eval_batch_size, predict_batches
from fgpipe.store import StageRecord, check_output_paths, file_sha256
from fgpipe.streaming import Feed, FeedOptions, Pixels, sequential_chunks, whole_image_feed
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

STAGE = "train_backbone"


def run(settings: Settings, dataset: str, resume: bool = False, on_step: StepHook | None = None) -> StageRecord:
    """Train stage-1 on train, select on val; return the metrics and provenance (also written to
    metrics/NAME/train_backbone.json and train_backbone.provenance.json)."""
    cfg = settings.params.train_backbone
    with training_runtime(cfg) as rt:
        t_start = time.perf_counter()
        return fit(Stage1Trainer.build(settings, dataset, cfg, settings.params.model, rt, t_start), rt, resume, on_step)


@dataclass
class Stage1Trainer(Trainer):
    """The stage-1 network (backbone + LCAM + WS-DAN head, or the plain head) on whole images, WS-DAN's losses."""

    settings: Settings
    dataset: str
    cfg: TrainBackboneConfig
    mcfg: ModelConfig
    rt: Runtime
    t_start: float
    files: RunFiles
    parts: dict[str, Any]
    state: dict[str, Any]
    train_feed: Feed
    train_labels: Tensor  # (N,)
    val: Feed
    val_labels: Tensor  # (N,)
    test_rows: list[ManifestRow]
    root: Path
    cache: ImageCache | None
    options: FeedOptions
    kind: str = "stage1"
    lr_key: str = "train_backbone.lr"
    counts: tuple[tuple[str, str], ...] = (("top1", "acc"),)

    @classmethod
    def build(
        cls, settings: Settings, dataset: str, cfg: TrainBackboneConfig, mcfg: ModelConfig, rt: Runtime, t_start: float
    ) -> Stage1Trainer:
        """Read and check the inputs, set up the reading of train and val, build the network, its center loss, optimiser
        and schedule."""
        settings.dataset(dataset)  # a clear error for an unknown dataset name
        layout = settings.layout(dataset)
        data, out = layout.data, layout.metrics
        files = RunFiles(
            data.stage1("best"), data.stage1("last"), out.stage(STAGE), out.provenance(STAGE), out.curves(STAGE),
            data.unfinished("stage1"),
        )
        check_output_paths([files.best, files.last, files.metrics, files.provenance], [files.curves, files.unfinished])  # not after the training
        inputs = read_dataset_inputs(settings, dataset)
        rows, info, root, classes, by_split = inputs.rows, inputs.info, inputs.root, inputs.classes, inputs.by_split
        inputs.require("train", "val")

        side = resized_side(cfg.input_size, cfg.augment)
        cache = open_image_cache(data.images, root, file_sha256(data.manifest), dataset)
        check_image_files(info, rows, cache, dataset, data.manifest)  # test images too: they are read after training
        options = feed_options(cfg)
        train = whole_image_feed(whole_image_requests(root, by_split["train"], cache), side, options, "train")
        val = whole_image_feed(whole_image_requests(root, by_split["val"], cache), side, options, "val")

        seed_everything(cfg.seed)
        weights = mcfg.weights if mcfg.weights in ("none", "imagenet") else str(settings.resolve(mcfg.weights))
        model = build_stage1(mcfg, len(classes), weights=weights).to(rt.device)
        if rt.channels_last:
            model = model.to(memory_format=torch.channels_last)
        with torch.no_grad():
            probe = model(torch.zeros(2, 3, cfg.input_size, cfg.input_size, device=rt.device))
        center = CenterLoss(len(classes), probe.embedding.shape[1]).to(rt.device)
        opt = optimizer_for(param_groups(model, cfg), cfg)
        sched = scheduler_for(opt, cfg, len(train), rt)
        state = {
            "config": {"model": config_dict(mcfg), "train_backbone": config_dict(cfg)},
            "class_names": classes,
            "manifest_sha256": file_sha256(data.manifest),
            "dataset": dataset,
            "params": params_record(settings, "train-backbone", dataset),  # compared by later stages (fgpipe.lineage.check_params)
        }
        return cls(
            settings=settings, dataset=dataset, cfg=cfg, mcfg=mcfg, rt=rt, t_start=t_start, files=files,
            parts={"model": model, "center": center, "optimizer": opt, "scheduler": sched}, state=state,
            train_feed=train, train_labels=labels_of(by_split["train"]), val=val, val_labels=labels_of(by_split["val"]),
            test_rows=by_split["test"], root=root, cache=cache, options=options,
        )

    @property
    def command(self) -> str:  # type: ignore[override]
        return f"fgpipe train-backbone --dataset {self.dataset}"

    @property
    def train_size(self) -> int:  # type: ignore[override]
        return len(self.train_feed)

    def check_resumable(self, state: dict[str, Any]) -> None:
        if state.get("manifest_sha256") != self.state["manifest_sha256"]:
            raise ArtifactError(f"{self.files.running_last} was trained on another manifest: delete it or run without --resume")
        config_mismatch(state, self.state["config"], self.files.running_last)

    def train_step(self, net: nn.Module, idx: Tensor, pixels: Pixels, gen: torch.Generator) -> tuple[Tensor, tuple[int, ...], int]:
        cfg, rt = self.cfg, self.rt
        (images,) = pixels  # (B, 3, S, S) uint8
        x = rt.to_input(normalize(train_augment(images, cfg.input_size, cfg.augment, gen)))
        y = self.train_labels[idx].to(rt.device)
        loss, logits = train_step(net, self.parts["center"], self.parts["optimizer"], x, y, cfg, rt, gen)
        return loss, (int((logits.argmax(1) == y).sum()),), len(y)

    def validate(self) -> dict[str, float]:
        return evaluate(self.parts["model"], self.val, self.val_labels, self.cfg, self.rt)

    def figures(self, stats: dict[str, float], val: dict[str, float]) -> dict[str, float]:
        return {"train_top1": stats["top1"], "val_top1": val["top1"], "val_top1_raw": val["top1_raw"]}

    def describe(self, stats: dict[str, float], val: dict[str, float]) -> str:
        return f"train {stats['top1']:.3f}  val {val['top1']:.3f} (raw {val['top1_raw']:.3f})"

    def finish(self, result: FitResult) -> tuple[StageRecord, dict[str, Any] | None]:
        """Test accuracy of the val-selected checkpoint (test is never used for selection), and the run's figures."""
        cfg, mcfg, rt, model = self.cfg, self.mcfg, self.rt, self.parts["model"]
        best_state = load_checkpoint(self.files.running_best, map_location=rt.device)
        model.load_state_dict(best_state["model"])
        side = resized_side(cfg.input_size, cfg.augment)
        test = None
        if self.test_rows:
            feed = whole_image_feed(whole_image_requests(self.root, self.test_rows, self.cache), side, self.options, "test")
            test = evaluate(model, feed, labels_of(self.test_rows), cfg, rt)
            feed.close()  # one pass: its workers stop here
        best, last = result.best, result.history[-1]
        metrics = {
            "input_size": cfg.input_size,
            "epochs": cfg.epochs,
            "best_epoch": best["epoch"],
            "val": {"top1": best["val_top1"]},
            "test": test,
            "train": {"loss": last["train_loss"], "top1": last["train_top1"]},
            "images_per_s": result.images_per_s,
            "seconds": round(time.perf_counter() - self.t_start, 2),
        }
        provenance = {
            "backbone": mcfg.backbone,
            "weights": mcfg.weights,  # none, imagenet or a file (relative to the project in the record)
            "resumed_from_epoch": result.resumed_from_epoch,
            "world_size": rt.world_size,
            "device": str(rt.device),
            **self.options.describe(),  # which input pipeline ran: stream (and its workers) or memory
        }
        return self.settings.record(self.dataset, metrics, provenance), best_state


def param_groups(model: Stage1Net, cfg: TrainBackboneConfig) -> list[dict[str, Any]]:
    """The trunk at ``lr``; the WS-DAN head (attention conv, BAP classifier) at ``wsdan_lr``; the CAM head or the
    plain head (conv, BN, linear layer) at ``cam_lr``; all on the same schedule.

    The WS-DAN classifier sees its feature times logit_scale (its effective rate is logit_scale^2 x its lr), so it
    keeps WS-DAN's rate whatever the trunk fine-tunes at; the CAM head is a fresh, unscaled classifier, which at
    the fine-tuning rate of the trunk barely learns.
    """
    def params_of(*modules: nn.Module | None) -> list[nn.Parameter]:
        return [p for m in modules if m is not None for p in m.parameters()]

    cam, wsdan = params_of(model.cam_conv, model.cam_fc), params_of(model.attention, model.fc)
    ids = {id(p) for p in cam + wsdan}
    groups: list[dict[str, Any]] = [{"params": [p for p in model.parameters() if id(p) not in ids]}]
    if wsdan:
        groups.append({"params": wsdan, "lr": cfg.wsdan_lr})
    if cam:
        groups.append({"params": cam, "lr": cfg.cam_lr})
    return groups


def train_step(
    net: nn.Module, center: CenterLoss, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
    cfg: TrainBackboneConfig, rt: Runtime, gen: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """One optimisation step on a normalised batch; returns (total loss, raw logits), both detached. A NaN or
    infinite loss stops it before its backward (:func:`fgpipe.training.check_loss`).

    The plain head (``model.head: plain``) takes a plain cross-entropy step on the batch: no attention
    crop or drop, no center loss.

    The raw pass is backpropagated first (its attention maps, detached, define the crops and drops),
    then the crop+drop pass: the gradients add up to those of the summed loss, and under DDP only the
    second backward synchronises (``no_sync`` on the first). Center-loss centers are updated from sums
    all-reduced over ranks, so they stay identical everywhere.
    """
    if unwrap(net).plain:
        with rt.autocast():
            logits = net(x).logits.float()
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        check_loss(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), logits.detach()
    sync_first = net.no_sync() if rt.distributed else contextlib.nullcontext()
    with sync_first:
        with rt.autocast():
            out = net(x)
            loss_raw = F.cross_entropy(out.logits.float(), y, label_smoothing=cfg.label_smoothing)
            loss_raw = loss_raw + _cam_loss(out.cam_logits, y, cfg)
        loss_center = center(out.embedding.float(), y)
        loss1 = loss_raw / 3 + cfg.center_loss_weight * loss_center
        check_loss(loss1)
        loss1.backward()
    with torch.no_grad():
        crops, drops = attention_crop_drop(
            x.detach().float(), out.attention.detach().float(), crop_threshold=cfg.crop_threshold,
            drop_threshold=cfg.drop_threshold, padding=cfg.crop_padding, generator=gen,
        )
    with rt.autocast():
        out2 = net(rt.to_input(torch.cat([crops, drops])))
        logits2 = out2.logits.float()
        y2 = torch.cat([y, y])
        loss2 = (F.cross_entropy(logits2, y2, label_smoothing=cfg.label_smoothing) * 2
                 + _cam_loss(out2.cam_logits, y2, cfg) * 2) / 3
    check_loss(loss2)
    loss2.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sums, counts = center.batch_sums(out.embedding.detach().float(), y)
    center.update_from_sums(all_reduce_sum(sums, rt), all_reduce_sum(counts, rt), cfg.center_beta)
    return (loss1 + loss2).detach(), out.logits.detach()


def _cam_loss(cam_logits: Tensor | None, y: Tensor, cfg: TrainBackboneConfig) -> Tensor | float:
    """mu * CE of the CAM head (0 without one): it learns from the same views as the WS-DAN classifier."""
    if cam_logits is None or cfg.cam_loss_weight == 0:
        return 0.0
    return cfg.cam_loss_weight * F.cross_entropy(cam_logits.float(), y, label_smoothing=cfg.label_smoothing)


def labels_of(rows: list[ManifestRow]) -> Tensor:
    """The class indices of ``rows`` (N,)."""
    return torch.tensor([r.label for r in rows], dtype=torch.long)


def evaluate(model: nn.Module, data: Feed, labels: Tensor, cfg: TrainBackboneConfig, rt: Runtime) -> dict[str, float]:
    """Top-1 of raw and refined predictions on a split (sharded over ranks: each reads only its own images; counts
    summed)."""
    idx = torch.arange(len(data))[rt.rank :: rt.world_size] if rt.distributed else torch.arange(len(data))
    batches = (images for _, (images,) in data.batches(sequential_chunks(idx, eval_batch_size(cfg))))
    raw, refined = predict_batches(unwrap(model), batches, cfg, rt)
    y = labels[idx]
    counts = torch.tensor([(raw.argmax(1) == y).sum(), (refined.argmax(1) == y).sum(), len(y)], dtype=torch.float64)
    all_reduce_sum(counts, rt)
    n = max(float(counts[2]), 1.0)
    return {"top1_raw": float(counts[0]) / n, "top1": float(counts[1]) / n, "images": int(counts[2])}
