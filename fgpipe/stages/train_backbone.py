"""Stage `train-backbone`: train the stage-1 network (backbone + LCAM + WS-DAN head), METHODS.md 1-2.

Reads:  data/NAME/manifest.csv, data/NAME/dataset.json, the images (from data/NAME/images.h5 when prepare
        built it); params `model`, `train_backbone`.
Writes: data/NAME/stage1/{best,last}.pt, metrics/NAME/train_backbone.json,
        metrics/NAME/train_backbone/ (per-epoch curves for `dvc plots`, written by dvclive).

The best epoch is selected on val (carved from train); test is only evaluated once, at the end, for
the report. ``--resume`` continues from last.pt; each epoch is seeded from (seed, epoch), so a resumed
run ends with the same weights as an uninterrupted one.
Until the run ends its checkpoints say ``finished: False``, and the later stages refuse them: a killed or
failed run leaves them for ``--resume`` only (Ctrl-C says so); both are marked finished together with the
metrics file, at the very end (:func:`fgpipe.store.replaced_together`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.progress import TextColumn
from torch import Tensor, nn

from fgpipe.checkpoints import config_dict, load_checkpoint, save_checkpoint
from fgpipe.config import ModelConfig, Settings, TrainBackboneConfig
from fgpipe.console import console, progress
from fgpipe.errors import ArtifactError, TrainingError
from fgpipe.imagecache import open_image_cache
from fgpipe.inference import predict_logits
from fgpipe.lineage import params_record, read_dataset_info
from fgpipe.loader import Split, check_image_files, load_split, normalize, resized_side, train_augment
from fgpipe.manifest import class_names, read_manifest
from fgpipe.models import build_stage1
from fgpipe.models.wsdan import CenterLoss, Stage1Net, attention_crop_drop
from fgpipe.runtime import configure_threads
from fgpipe.store import check_output_paths, file_sha256
from fgpipe.training import (
    Runtime,
    all_reduce_sum,
    barrier,
    batches,
    build_optimizer,
    build_scheduler,
    close_live,
    epoch_seed,
    interrupted,
    log_epoch,
    finish_run,
    open_live,
    resume_from,
    rng_state,
    seed_everything,
    setup_runtime,
    shard_indices,
    teardown_runtime,
    unwrap,
    wrap_ddp,
)

STAGE = "train_backbone"
StepHook = Callable[[int, int], None]  # (epoch, step) -> None; tests use it to interrupt a run


def run(settings: Settings, dataset: str, resume: bool = False, on_step: StepHook | None = None) -> dict[str, Any]:
    """Train stage-1 on train, select on val; return the metrics (also written to metrics/NAME/train_backbone.json)."""
    configure_threads()
    cfg = settings.params.train_backbone
    rt = setup_runtime(cfg.device, cfg.amp, cfg.channels_last)
    try:
        return _run(settings, dataset, cfg, settings.params.model, rt, resume, on_step)
    finally:
        teardown_runtime(rt)


def _run(
    settings: Settings, dataset: str, cfg: TrainBackboneConfig, mcfg: ModelConfig, rt: Runtime, resume: bool, on_step: StepHook | None
) -> dict[str, Any]:
    t_start = time.perf_counter()
    settings.dataset(dataset)  # a clear error for an unknown dataset name
    layout = settings.layout(dataset)
    data, out = layout.data, layout.metrics
    paths = {"best": data.stage1("best"), "last": data.stage1("last"), "metrics": out.stage(STAGE), "live": out.curves(STAGE)}
    check_output_paths([paths["best"], paths["last"], paths["metrics"]], [paths["live"]])  # not after the training
    rows = read_manifest(data.manifest)
    info = read_dataset_info(settings, dataset)
    root = info.root
    classes = class_names(rows)
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    for s in ("train", "val"):
        if not by_split[s]:
            raise ArtifactError(f"{data.manifest}: the {s} split is empty")

    side = resized_side(cfg.input_size, cfg.augment)
    cache = open_image_cache(data.images, root, file_sha256(data.manifest), dataset)
    check_image_files(info, rows, cache, dataset, data.manifest)  # test images too: they are read after training
    train = load_split(root, by_split["train"], side, "train", cache)
    val = load_split(root, by_split["val"], side, "val", cache)

    seed_everything(cfg.seed)
    weights = mcfg.weights if mcfg.weights in ("none", "imagenet") else str(settings.resolve(mcfg.weights))
    model = build_stage1(mcfg, len(classes), weights=weights).to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        probe = model(torch.zeros(2, 3, cfg.input_size, cfg.input_size, device=rt.device))
    center = CenterLoss(len(classes), probe.embedding.shape[1]).to(rt.device)
    opt = build_optimizer(param_groups(model, cfg), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    steps_per_epoch = len(batches(shard_indices(torch.arange(len(train)), rt), cfg.batch_size))
    sched = build_scheduler(
        opt, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        schedule=cfg.schedule, step_size=cfg.step_size, gamma=cfg.gamma,
    )
    config = {"model": config_dict(mcfg), "train_backbone": config_dict(cfg)}
    made_with = params_record(settings, "train-backbone", dataset)
    manifest_sha = file_sha256(data.manifest)

    start_epoch, best, history = resume_from(
        paths["last"], resume, rt, lambda state: _check_resumable(state, config, manifest_sha, paths["last"]),
        {"model": model, "center": center, "optimizer": opt, "scheduler": sched}, kind="stage1", dataset=dataset,
    )
    net = wrap_ddp(model, rt)

    live = None  # dvclive, opened once the first checkpoint is written (a fresh run resets the curves folder)
    saved = start_epoch  # the last epoch whose checkpoints are on disk (0: none of this run yet)
    train_seconds, train_images = 0.0, 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            seed = epoch_seed(cfg.seed, epoch)
            torch.manual_seed(seed)  # global RNG (e.g. stochastic depth) replays per epoch
            gen = torch.Generator().manual_seed(seed)  # data order, augmentation, crop/drop sampling
            t0 = time.perf_counter()
            stats = train_one_epoch(net, center, opt, sched, train, cfg, rt, gen, epoch, on_step)
            train_seconds += time.perf_counter() - t0
            train_images += stats["images"]
            val_stats = evaluate(model, val, cfg, rt)
            record = {"epoch": epoch + 1, "train_loss": stats["loss"], "train_top1": stats["top1"],
                      "val_top1": val_stats["top1"], "val_top1_raw": val_stats["top1_raw"],
                      "lr": opt.param_groups[0]["lr"], "images_per_s": stats["images_per_s"]}
            history.append(record)
            improved = val_stats["top1"] >= best["val_top1"]  # a tie goes to the later, longer-trained epoch
            if improved:
                best = {"epoch": epoch + 1, "val_top1": val_stats["top1"]}
            if rt.is_main:
                state = {
                    "kind": "stage1", "model": model.state_dict(), "center": center.state_dict(),
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": epoch + 1,
                    "best": best, "history": history, "rng": rng_state(), "config": config,
                    "class_names": classes, "manifest_sha256": manifest_sha, "dataset": dataset,
                    "params": made_with,  # what later stages compare with the params then (fgpipe.lineage.check_params)
                    "finished": False,  # both are marked at the end, with the metrics (training.finish_run)
                }
                saved = epoch + 1
                if improved:
                    save_checkpoint(paths["best"], state)
                save_checkpoint(paths["last"], state)
                console.print(
                    f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  train {stats['top1']:.3f}  "
                    f"val {val_stats['top1']:.3f} (raw {val_stats['top1_raw']:.3f})  {stats['images_per_s']:.1f} img/s"
                    + ("  [green]best" if improved else ""),
                    highlight=False,
                )
                if live is None:
                    live = open_live(paths["live"], resume and start_epoch > 0)
                log_epoch(live, record)
            barrier(rt)
        if live is not None:
            close_live(live)
            live = None
        if not paths["best"].is_file():
            raise ArtifactError(f"no best checkpoint at {paths['best']}: training ran no epoch (epochs: {cfg.epochs}, resumed at {start_epoch})")
        # Report test accuracy of the val-selected checkpoint (test is never used for selection).
        best_state = load_checkpoint(paths["best"], map_location=rt.device)
        model.load_state_dict(best_state["model"])
        test_stats = evaluate(model, load_split(root, by_split["test"], side, "test", cache), cfg, rt) if by_split["test"] else None
        last = history[-1]
        metrics = {
            "dataset": dataset,
            "backbone": mcfg.backbone,
            "weights": mcfg.weights,
            "input_size": cfg.input_size,
            "epochs": cfg.epochs,
            "best_epoch": best["epoch"],
            "val": {"top1": best["val_top1"]},
            "test": test_stats,
            "train": {"loss": last["train_loss"], "top1": last["train_top1"]},
            "images_per_s": round(train_images / train_seconds, 2) if train_seconds else None,
            "resumed_from_epoch": start_epoch if resume else None,
            "world_size": rt.world_size,
            "device": str(rt.device),
            "seconds": round(time.perf_counter() - t_start, 2),
            **settings.provenance(),
        }
        if rt.is_main:
            finish_run(paths["best"], paths["last"], paths["metrics"], metrics, best_state)  # together, at the end
        return metrics
    except KeyboardInterrupt:
        raise interrupted(f"fgpipe train-backbone --dataset {dataset}", saved, cfg.epochs) from None
    finally:
        if live is not None:  # the run stops on another error: that one is reported
            close_live(live, failing=True)


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


def _check_resumable(state: dict[str, Any], config: dict[str, Any], manifest_sha: str, path: Path) -> None:
    if state.get("manifest_sha256") != manifest_sha:
        raise ArtifactError(f"{path} was trained on another manifest: delete it or run without --resume")
    if state.get("config") != config:
        diff = [f"{sec}.{k}" for sec in config for k in config[sec] if state["config"].get(sec, {}).get(k) != config[sec][k]]
        raise ArtifactError(f"{path} was made with other params ({', '.join(diff)}): delete it or run without --resume")


def train_one_epoch(
    net: nn.Module, center: CenterLoss, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
    data: Split, cfg: TrainBackboneConfig, rt: Runtime, gen: torch.Generator, epoch: int, on_step: StepHook | None,
) -> dict[str, float]:
    """One epoch of WS-DAN training: loss = (CE_raw + CE_crop + CE_drop) / 3 + lambda * center
    (+ mu * the CAM head's CE on the same three views, / 3, when the model has one)."""
    net.train()
    order = torch.randperm(len(data), generator=gen)
    chunks = batches(shard_indices(order, rt), cfg.batch_size)
    total_loss = torch.zeros((), dtype=torch.float64)
    correct, seen = 0, 0
    t0 = time.perf_counter()
    bar = progress(TextColumn("{task.fields[info]}")) if rt.is_main else contextlib.nullcontext()
    with bar as pbar:
        task = pbar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(chunks), info="") if pbar else None
        for step, idx in enumerate(chunks):
            x = rt.to_input(normalize(train_augment(data.images[idx], cfg.input_size, cfg.augment, gen)))
            y = data.labels[idx].to(rt.device)
            loss, logits = train_step(net, center, opt, x, y, cfg, rt, gen, epoch, step)
            sched.step()

            loss_value = float(loss)
            total_loss += loss_value * len(y)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(y)
            if pbar is not None:
                rate = seen * rt.world_size / (time.perf_counter() - t0)
                pbar.update(task, advance=1, info=f"loss {loss_value:.3f} acc {correct / seen:.3f} {rate:.1f} img/s")
            if on_step is not None:
                on_step(epoch, step)
    stats = torch.tensor([float(total_loss), correct, seen], dtype=torch.float64)
    all_reduce_sum(stats, rt)
    elapsed = time.perf_counter() - t0
    return {"loss": float(stats[0] / stats[2]), "top1": float(stats[1] / stats[2]), "images": int(stats[2]),
            "images_per_s": float(stats[2] / elapsed)}


def train_step(
    net: nn.Module, center: CenterLoss, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
    cfg: TrainBackboneConfig, rt: Runtime, gen: torch.Generator, epoch: int = 0, step: int = 0,
) -> tuple[Tensor, Tensor]:
    """One optimisation step on a normalised batch; returns (total loss, raw logits), both detached.

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
        _check_finite(loss, epoch, step)
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
        _check_finite(loss1, epoch, step)
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
    _check_finite(loss2, epoch, step)
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


def _check_finite(loss: Tensor, epoch: int, step: int) -> None:
    if not torch.isfinite(loss.detach()).all():
        raise TrainingError(
            f"the loss became {float(loss.detach())} at epoch {epoch + 1}, step {step + 1}; training stopped and the "
            "last good checkpoint was kept. Lower train_backbone.lr or check the data."
        )


def evaluate(model: nn.Module, data: Split, cfg: TrainBackboneConfig, rt: Runtime) -> dict[str, float]:
    """Top-1 of raw and refined predictions on a split (sharded over ranks, counts summed)."""
    idx = torch.arange(len(data))[rt.rank :: rt.world_size] if rt.distributed else torch.arange(len(data))
    raw, refined = predict_logits(unwrap(model), data.images[idx], cfg, rt)
    y = data.labels[idx]
    counts = torch.tensor([(raw.argmax(1) == y).sum(), (refined.argmax(1) == y).sum(), len(y)], dtype=torch.float64)
    all_reduce_sum(counts, rt)
    n = max(float(counts[2]), 1.0)
    return {"top1_raw": float(counts[0]) / n, "top1": float(counts[1]) / n, "images": int(counts[2])}
