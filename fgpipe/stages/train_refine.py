"""Stage `train-refine`: the object branch on object crops and the part branch on MPALM patches (METHODS.md 6).

Reads:  data/NAME/manifest.csv, data/NAME/dataset.json, the images (from data/NAME/images.h5 when prepare built it),
        data/NAME/crops.h5 (object and part boxes),
        data/NAME/stage1/best.pt (backbone architecture and initial weights); params `train_refine`.
        crops.h5 is checked against the manifest, data/NAME/attention.h5 and the stage-1 checkpoint it was made
        from (best or last), by SHA-256 (:mod:`fgpipe.lineage`).
Writes: data/NAME/refine/{best,last}.pt (recording the SHA-256 of the manifest, crops.h5 and stage1/best.pt),
        metrics/NAME/train_refine.json, metrics/NAME/train_refine/ (per-epoch curves for `dvc plots`, written by
        dvclive).

No crop is ever written as an image: every box is decoded once into memory (:func:`fgpipe.loader.load_regions`).
Train boxes are decoded with a margin of ``box_jitter`` times the box side on each side, so that every epoch
can move each box edge by up to that fraction (a random shift and scale) before the usual random crop, flip
and colour jitter; val boxes are decoded exactly, resized to ``input_size * resize_ratio`` and centre-cropped,
as stage-1 evaluates. Part patches are resized to ``part_size`` (0: ``input_size // 2``); an image with no
part uses its object box as its single patch.

Both branches train jointly (loss = CE_object + CE_parts); the epoch kept as best maximises the mean of the
two branches' val top-1 (test is never read here). ``--resume`` continues from last.pt; each epoch is seeded
from (seed, epoch), so a resumed run ends with the same weights as an uninterrupted one.
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
from torchvision.ops import roi_align

from fgpipe.branch_data import BranchData, part_size, read_crops, split_data, subset
from fgpipe.checkpoints import config_dict, save_checkpoint, stage1_state
from fgpipe.config import ModelConfig, Settings, TrainRefineConfig
from fgpipe.console import console, progress
from fgpipe.errors import ArtifactError, TrainingError
from fgpipe.h5schema import CropsReader
from fgpipe.imagecache import open_image_cache
from fgpipe.inference import predict_branches
from fgpipe.lineage import check_crops, check_crops_params, params_record, read_dataset_info
from fgpipe.loader import check_image_files, normalize, resized_side, train_augment
from fgpipe.manifest import class_names, read_manifest
from fgpipe.models.branches import build_refine_net
from fgpipe.runtime import configure_threads
from fgpipe.store import FileHashes, check_output_paths
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

STAGE = "train_refine"
StepHook = Callable[[int, int], None]  # (epoch, step) -> None; tests use it to interrupt a run
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


def train_inputs(data: BranchData, idx: Tensor, cfg: TrainRefineConfig, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Augmented object crops (B, 3, S, S), patches (T, 3, s, s), both float in [0, 1], and each patch's owner (T,).

    Draw order from ``gen``: object jitter (B, 4), patch jitter (T, 4), then :func:`train_augment` for objects
    and for patches.
    """
    rows, owner = data.patch_index(idx)
    u_obj = torch.rand(len(idx), 4, generator=gen) * 2 - 1  # (B, 4)
    u_part = torch.rand(len(rows), 4, generator=gen) * 2 - 1  # (T, 4)
    obj_side = resized_side(cfg.input_size, cfg.augment)
    p_size = part_size(cfg)
    objects = jittered_crops(data.objects[idx], data.object_regions[idx], data.object_boxes[idx], u_obj, cfg.box_jitter, obj_side)
    patches = jittered_crops(
        data.patches[rows], data.patch_regions[rows], data.patch_boxes[rows], u_part, cfg.box_jitter, resized_side(p_size, cfg.augment)
    )
    return (
        train_augment(objects, cfg.input_size, cfg.augment, gen),
        train_augment(patches, p_size, cfg.augment, gen),
        owner,
    )


# --------------------------------------------------------------------------- the stage
def run(settings: Settings, dataset: str, resume: bool = False, on_step: StepHook | None = None) -> dict[str, Any]:
    """Train both branches on train, select on val; return the metrics (also written to metrics/NAME/train_refine.json)."""
    configure_threads()
    cfg = settings.params.train_refine
    rt = setup_runtime(cfg.device, cfg.amp, cfg.channels_last)
    try:
        return _run(settings, dataset, cfg, rt, resume, on_step)
    finally:
        teardown_runtime(rt)


def _run(settings: Settings, dataset: str, cfg: TrainRefineConfig, rt: Runtime, resume: bool, on_step: StepHook | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    settings.dataset(dataset)  # a clear error for an unknown dataset name
    layout = settings.layout(dataset)
    data, out = layout.data, layout.metrics
    paths = {"best": data.refine("best"), "last": data.refine("last"), "metrics": out.stage(STAGE), "live": out.curves(STAGE)}
    check_output_paths([paths["best"], paths["last"], paths["metrics"]], [paths["live"]])  # not after the training
    rows = read_manifest(data.manifest)
    info = read_dataset_info(settings, dataset)
    root = info.root
    classes = class_names(rows)
    sha = FileHashes()  # each input hashed once
    manifest_sha = sha(data.manifest)
    stage1 = stage1_state(data.stage1("best"), manifest_sha, classes, dataset, settings)
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val")}
    for s in ("train", "val"):
        if not by_split[s]:
            raise ArtifactError(f"{data.manifest}: the {s} split is empty")
    with CropsReader(data.crops) as crops:  # made from this manifest, attention.h5 and stage-1 checkpoint
        check_crops(crops, data.path, dataset, sha)
        check_crops_params(crops, data.path, settings, dataset)  # and with the params now
    boxes = {s: read_crops(data.crops, manifest_sha, by_split[s]) for s in ("train", "val")}
    hashes = {"manifest_sha256": manifest_sha, "crops_sha256": sha(data.crops), "stage1_sha256": sha(data.stage1("best"))}

    cache = open_image_cache(data.images, root, manifest_sha, dataset)
    check_image_files(info, by_split["train"] + by_split["val"], cache, dataset, data.manifest)  # before any checkpoint is written
    train = split_data(root, by_split["train"], boxes["train"], cfg, cfg.box_jitter, "train", cache)
    val = split_data(root, by_split["val"], boxes["val"], cfg, 0.0, "val", cache)

    seed_everything(cfg.seed)
    mcfg = ModelConfig(**stage1["config"]["model"])  # checked by stage1_state
    # a stage-1 state_dict that does not fit is a ConfigError naming each key (fgpipe.models.weights.apply_state_dict)
    model, report = build_refine_net(mcfg, len(classes), cfg.shared_backbone, stage1["model"], str(data.stage1("best")))
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(model.parameters(), cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)
    steps_per_epoch = len(batches(shard_indices(torch.arange(len(train)), rt), cfg.batch_size))
    sched = build_scheduler(
        opt, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        schedule=cfg.schedule, step_size=cfg.step_size, gamma=cfg.gamma,
    )
    config = {"model": dict(stage1["config"]["model"]), "train_refine": config_dict(cfg)}
    made_with = params_record(settings, "train-refine", dataset)

    start_epoch, best, history = resume_from(
        paths["last"], resume, rt, lambda state: _check_resumable(state, config, hashes, paths["last"]),
        {"model": model, "optimizer": opt, "scheduler": sched}, kind="refine", dataset=dataset,
    )
    net = wrap_ddp(model, rt)

    live = None  # dvclive, opened once the first checkpoint is written (a fresh run resets the curves folder)
    saved = start_epoch  # the last epoch whose checkpoints are on disk (0: none of this run yet)
    train_seconds, train_images = 0.0, 0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            seed = epoch_seed(cfg.seed, epoch)
            torch.manual_seed(seed)  # global RNG replays per epoch
            gen = torch.Generator().manual_seed(seed)  # data order, box jitter, augmentation
            t0 = time.perf_counter()
            stats = train_one_epoch(net, opt, sched, train, cfg, rt, gen, epoch, on_step)
            train_seconds += time.perf_counter() - t0
            train_images += stats["images"]
            val_stats = evaluate_branches(model, val, cfg, rt)
            record = {
                "epoch": epoch + 1, "train_loss": stats["loss"], "train_object_top1": stats["object_top1"],
                "train_parts_top1": stats["parts_top1"], "val_object_top1": val_stats["object"],
                "val_parts_top1": val_stats["parts"], "val_top1": val_stats["mean"],
                "lr": opt.param_groups[0]["lr"], "images_per_s": stats["images_per_s"],
            }
            history.append(record)
            improved = val_stats["mean"] >= best["val_top1"]  # a tie goes to the later, longer-trained epoch
            if improved:
                best = {"epoch": epoch + 1, "val_top1": val_stats["mean"], "object": val_stats["object"], "parts": val_stats["parts"]}
            if rt.is_main:
                state = {
                    "kind": "refine", "model": model.state_dict(), "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(), "epoch": epoch + 1, "best": best, "history": history,
                    "rng": rng_state(), "config": config, "class_names": classes, "dataset": dataset, **hashes,
                    "params": made_with,  # what later stages compare with the params then (fgpipe.lineage.check_params)
                    "finished": False,  # both are marked at the end, with the metrics (training.finish_run)
                }
                saved = epoch + 1
                if improved:
                    save_checkpoint(paths["best"], state)
                save_checkpoint(paths["last"], state)
                console.print(
                    f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  train obj {stats['object_top1']:.3f} "
                    f"parts {stats['parts_top1']:.3f}  val obj {val_stats['object']:.3f} parts {val_stats['parts']:.3f}  "
                    f"{stats['images_per_s']:.1f} img/s" + ("  [green]best" if improved else ""),
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
        last = history[-1]
        metrics = {
            "dataset": dataset,
            "backbone": mcfg.backbone,
            "shared_backbone": cfg.shared_backbone,
            "input_size": cfg.input_size,
            "part_size": part_size(cfg),
            "epochs": cfg.epochs,
            "best_epoch": best["epoch"],
            "val": {"object": best["object"], "parts": best["parts"], "mean": best["val_top1"]},
            "train": {"loss": last["train_loss"], "object_top1": last["train_object_top1"], "parts_top1": last["train_parts_top1"]},
            "patches_per_image": round(float(train.patch_count.float().mean()), 3),
            "initialised_from": {"checkpoint": str(data.stage1("best")), "tensors": report.loaded if report else 0},
            "images_per_s": round(train_images / train_seconds, 2) if train_seconds else None,
            "resumed_from_epoch": start_epoch if resume else None,
            "world_size": rt.world_size,
            "device": str(rt.device),
            "seconds": round(time.perf_counter() - t_start, 2),
            **settings.provenance(),
        }
        if rt.is_main:
            finish_run(paths["best"], paths["last"], paths["metrics"], metrics)  # together, at the end
        return metrics
    except KeyboardInterrupt:
        raise interrupted(f"fgpipe train-refine --dataset {dataset}", saved, cfg.epochs) from None
    finally:
        if live is not None:  # the run stops on another error: that one is reported
            close_live(live, failing=True)


def _check_resumable(state: dict[str, Any], config: dict[str, Any], hashes: dict[str, str], path: Path) -> None:
    for key, what in (("manifest_sha256", "manifest"), ("crops_sha256", "crops.h5"), ("stage1_sha256", "stage-1 checkpoint")):
        if state.get(key) != hashes[key]:
            raise ArtifactError(f"{path} was trained from another {what}: delete it or run without --resume")
    if state.get("config") != config:
        diff = [f"{sec}.{k}" for sec in config for k in config[sec] if state["config"].get(sec, {}).get(k) != config[sec][k]]
        raise ArtifactError(f"{path} was made with other params ({', '.join(diff)}): delete it or run without --resume")


def train_one_epoch(
    net: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler, data: BranchData,
    cfg: TrainRefineConfig, rt: Runtime, gen: torch.Generator, epoch: int, on_step: StepHook | None,
) -> dict[str, float]:
    """One epoch of joint branch training: loss = CE(object logits) + CE(mean patch logits)."""
    net.train()
    order = torch.randperm(len(data), generator=gen)
    chunks = batches(shard_indices(order, rt), cfg.batch_size)
    total_loss = 0.0
    correct_obj, correct_parts, seen = 0, 0, 0
    t0 = time.perf_counter()
    bar = progress(TextColumn("{task.fields[info]}")) if rt.is_main else contextlib.nullcontext()
    with bar as pbar:
        task = pbar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(chunks), info="") if pbar else None
        for step, idx in enumerate(chunks):
            objects, patches, owner = train_inputs(data, idx, cfg, gen)
            y = data.labels[idx].to(rt.device)
            with rt.autocast():
                out = net(rt.to_input(normalize(objects)), rt.to_input(normalize(patches)), owner.to(rt.device))
                loss_obj = F.cross_entropy(out.object_logits.float(), y, label_smoothing=cfg.label_smoothing)
                loss_parts = F.cross_entropy(out.part_logits.float(), y, label_smoothing=cfg.label_smoothing)
                loss = loss_obj + loss_parts
            if not torch.isfinite(loss.detach()):
                raise TrainingError(
                    f"the loss became {float(loss.detach())} at epoch {epoch + 1}, step {step + 1}; training stopped and "
                    "the last good checkpoint was kept. Lower train_refine.lr or check the data."
                )
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sched.step()

            loss_value = float(loss.detach())
            total_loss += loss_value * len(y)
            correct_obj += int((out.object_logits.detach().argmax(1) == y).sum())
            correct_parts += int((out.part_logits.detach().argmax(1) == y).sum())
            seen += len(y)
            if pbar is not None:
                rate = seen * rt.world_size / (time.perf_counter() - t0)
                pbar.update(task, advance=1, info=f"loss {loss_value:.3f} obj {correct_obj / seen:.3f} parts {correct_parts / seen:.3f} {rate:.1f} img/s")
            if on_step is not None:
                on_step(epoch, step)
    stats = torch.tensor([total_loss, correct_obj, correct_parts, seen], dtype=torch.float64)
    all_reduce_sum(stats, rt)
    elapsed = time.perf_counter() - t0
    n = float(stats[3])
    return {"loss": float(stats[0]) / n, "object_top1": float(stats[1]) / n, "parts_top1": float(stats[2]) / n,
            "images": int(n), "images_per_s": n / elapsed}


def evaluate_branches(model: nn.Module, data: BranchData, cfg: TrainRefineConfig, rt: Runtime) -> dict[str, float]:
    """Val top-1 of each branch and their mean (sharded over ranks, counts summed)."""
    sub = subset(data, torch.arange(len(data))[rt.rank :: rt.world_size]) if rt.distributed else data
    obj, parts = predict_branches(unwrap(model), sub, cfg, rt)  # type: ignore[arg-type]
    counts = torch.tensor([(obj.argmax(1) == sub.labels).sum(), (parts.argmax(1) == sub.labels).sum(), len(sub)], dtype=torch.float64)
    all_reduce_sum(counts, rt)
    n = max(float(counts[2]), 1.0)
    top_obj, top_parts = float(counts[0]) / n, float(counts[1]) / n
    return {"object": top_obj, "parts": top_parts, "mean": (top_obj + top_parts) / 2, "images": int(counts[2])}
