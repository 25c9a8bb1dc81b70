"""Training machinery shared by stage-1 and the refinement branches: the one training loop, :func:`fit`.

A trainer (train-backbone's, train-refine's) supplies its data, its step and its figures (:class:`Trainer`); fit
owns the rest: per-epoch seeding (so that a run resumed from its last checkpoint, :mod:`fgpipe.checkpoints`,
replays exactly what an uninterrupted run would have done), the epochs, best.pt and last.pt, ``--resume``, DDP,
the dvclive curves, the stop on a NaN loss, Ctrl-C, the progress bar. Below it, flat functions in the spirit of
torchvision's references: device and distributed set-up, optimizer and schedule.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from rich.progress import TextColumn
from torch import Tensor, nn

from fgpipe.checkpoints import RESUME_KEYS, finished, load_checkpoint, rebuilding, save_checkpoint
from fgpipe.config import TrainingConfig
from fgpipe.console import console, progress
from fgpipe.errors import ArtifactError, ConfigError, Interrupted, TrainingError
from fgpipe.runtime import HeapTrimmer, configure_threads, env_int
from fgpipe.store import StageRecord, move_output, output_error, remove_folder, replaced_together, write_json
from fgpipe.streaming import Feed, FeedOptions, Pixels, feeds_closed

INPUT_KEYS = ("num_workers", "in_memory")  # training keys that say how the pixels are read: --resume may change them


# --------------------------------------------------------------------------- device and distributed
@dataclass(frozen=True)
class Runtime:
    """Where training runs: device, precision, memory format, and this process's DDP rank."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def to_input(self, x: Tensor) -> Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


LAUNCHED = "(set by torchrun; leave it unset for a single process)"


def launch_ranks() -> tuple[int, int, int]:
    """``(world_size, rank, local_rank)`` of this process as torchrun sets them (1, 0, 0 when it did not), checked."""
    world_size = env_int("WORLD_SIZE", 1, 1, f"an integer >= 1, the number of processes {LAUNCHED}")
    rank = env_int("RANK", 0, 0, f"an integer from 0 to WORLD_SIZE - 1 = {world_size - 1} {LAUNCHED}")
    local_rank = env_int("LOCAL_RANK", 0, 0, f"an integer >= 0, this process's GPU on its machine {LAUNCHED}")
    if rank >= world_size:
        raise ConfigError(
            f"environment variable RANK={rank} is invalid: it must be an integer from 0 to WORLD_SIZE - 1 = "
            f"{world_size - 1} {LAUNCHED}"
        )
    return world_size, rank, local_rank


def start_ranks(use_cuda: bool) -> tuple[torch.device, int, int]:
    """This process's device (LOCAL_RANK's GPU, or the CPU) and ``(rank, world_size)``; under torchrun the process
    group is started (NCCL on GPUs, gloo on the CPU)."""
    world_size, rank, local_rank = launch_ranks()
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"environment variable LOCAL_RANK={local_rank} is invalid: torch sees {torch.cuda.device_count()} CUDA "
            f"device(s), so it must be from 0 to {torch.cuda.device_count() - 1} {LAUNCHED}"
        )
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dev, rank, world_size


def setup_runtime(device: str, amp: str, channels_last: str) -> Runtime:
    """Pick the device (starting torch.distributed when launched by torchrun) and the precision."""
    launch_ranks()  # a malformed torchrun variable is named before the device is looked at
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for, but torch sees no CUDA device (use device: auto or cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    dev, rank, world_size = start_ranks(use_cuda)
    amp_dtype = torch.bfloat16 if (amp == "bf16" or (amp == "auto" and use_cuda)) else None
    cl = channels_last != "off"  # faster on CUDA and on CPU alike (measured: bench/RESULTS.md)
    return Runtime(device=dev, amp_dtype=amp_dtype, channels_last=cl, rank=rank, world_size=world_size)


def teardown_runtime(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor, rt: Runtime) -> Tensor:
    """Sum a tensor over every rank (a no-op in a single process)."""
    if rt.distributed:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier(rt: Runtime) -> None:
    if rt.distributed:
        dist.barrier()


def batches(indices: Tensor, batch_size: int) -> list[Tensor]:
    """Consecutive batches of ``indices``; a trailing batch of one is dropped (BatchNorm needs two)."""
    chunks = list(indices.split(batch_size))
    if chunks and len(chunks[-1]) < 2 and len(chunks) > 1:
        chunks.pop()
    return chunks


def open_live(directory: str | os.PathLike[str], resume: bool) -> Any:
    """A dvclive logger writing per-epoch curves under ``directory`` (``resume`` appends to existing ones)."""
    from dvclive import Live

    try:
        return Live(dir=str(directory), resume=resume, report=None, save_dvc_exp=False, dvcyaml=None)
    except OSError as exc:  # a read-only or full metrics folder
        raise output_error(directory, exc, atomic=False) from None


def close_live(live: Any, failing: bool = False) -> None:
    """End a dvclive logger (it writes its summary); a failed write is an OutputError naming the curves folder.
    ``failing``: the run is already stopping on another error, which is the one to report (this one is dropped)."""
    try:
        live.end()
    except OSError as exc:
        if not failing:
            raise output_error(live.dir, exc, atomic=False) from None


def interrupted(command: str, saved: int, epochs: int, folder: Path | None = None) -> Interrupted:
    """What a Ctrl-C during training left and how to go on; ``command`` (``fgpipe train-backbone --dataset NAME``)
    wrote the checkpoints of epoch ``saved`` into ``folder`` (0: none yet); the previous outputs are untouched."""
    if saved > 0:
        return Interrupted(
            f"interrupted (Ctrl-C) after epoch {saved} of {epochs}: its checkpoints and curves are kept in {folder}, "
            f"the previous outputs are unchanged; continue with `{command} --resume`"
        )
    return Interrupted(
        f"interrupted (Ctrl-C) before the first checkpoint: nothing was replaced, the previous outputs are unchanged; "
        f"rerun `{command}`"
    )


def log_epoch(live: Any, record: dict[str, float]) -> None:
    """Log one epoch's figures to dvclive: ``train_loss`` -> ``train/loss`` (a plot per split), others as named."""
    try:
        for key, value in record.items():
            if key == "epoch":
                continue
            split, _, rest = key.partition("_")
            live.log_metric(f"{split}/{rest}" if split in ("train", "val") and rest else key, value)
        live.next_step()
    except OSError as exc:  # dvclive writes the curves at each step
        raise output_error(live.dir, exc, atomic=False) from None


def resume_from(
    path: Path, resume: bool, rt: Runtime, check: Callable[[dict[str, Any]], None], parts: dict[str, Any],
    kind: str | None = None, dataset: str | None = None,
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    """``--resume``: load ``path`` (a checkpoint of ``kind`` for ``dataset``), ``check`` it, restore each object in
    ``parts`` (checkpoint key -> anything with ``load_state_dict``) and the global RNGs; return (start epoch, best,
    history).

    Without ``resume``, or with no checkpoint yet, returns a fresh start.
    """
    fresh: tuple[int, dict[str, Any], list[dict[str, Any]]] = (0, {"epoch": -1, "val_top1": -1.0}, [])
    if not resume:
        return fresh
    if not path.is_file():
        if rt.is_main:
            console.print(f"[yellow]--resume: no unfinished run to continue ({path} does not exist), starting from scratch")
        return fresh
    keys = {**RESUME_KEYS, **{key: dict for key in parts}} if kind is not None else None
    state = load_checkpoint(path, map_location=rt.device, kind=kind, dataset=dataset, keys=keys)
    check(state)
    with rebuilding(path, kind, dataset) if kind is not None else contextlib.nullcontext():
        for key, obj in parts.items():
            obj.load_state_dict(state[key])
        set_rng_state(state["rng"])
    if rt.is_main:
        console.print(f"resuming from {path} after epoch {state['epoch']}")
    return state["epoch"], state["best"], state["history"]


def wrap_ddp(model: nn.Module, rt: Runtime) -> nn.Module:
    """The model wrapped in DistributedDataParallel under torchrun; the model itself otherwise."""
    if not rt.distributed:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)


def shard_indices(order: Tensor, rt: Runtime) -> Tensor:
    """This rank's share of an epoch's order, padded by wrapping so every rank runs the same number of steps."""
    if not rt.distributed:
        return order
    per_rank = math.ceil(len(order) / rt.world_size)
    padded = torch.cat([order, order[: per_rank * rt.world_size - len(order)]])
    return padded[rt.rank :: rt.world_size]


# --------------------------------------------------------------------------- seeding
def epoch_seed(seed: int, epoch: int) -> int:
    """A distinct, reproducible seed per (run seed, epoch)."""
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63 - 1)


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch's global RNG; return a fresh generator for data order and augmentation."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Global RNG states in a form ``torch.load(weights_only=True)`` accepts."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": list(random.getstate()[1]) + [random.getstate()[2]],
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((3, tuple(py[:-1]), py[-1]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- optimisation
def build_optimizer(params: Iterator[nn.Parameter] | list[Any], name: str, lr: float, momentum: float, weight_decay: float) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=momentum > 0)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"optimizer must be sgd or adamw, got {name!r}")


def lr_factor(step: int, *, steps_per_epoch: int, epochs: int, warmup_epochs: float, schedule: str, step_size: int, gamma: float) -> float:
    """Learning-rate multiplier at optimisation step ``step``: linear warm-up, then cosine or step decay."""
    warmup = int(round(warmup_epochs * steps_per_epoch))
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        total = max(epochs * steps_per_epoch - warmup, 1)
        progress = min((step - warmup) / total, 1.0)
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return gamma ** ((step // steps_per_epoch) // step_size)


def build_scheduler(opt: torch.optim.Optimizer, **kwargs: Any) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step LambdaLR following :func:`lr_factor` (stepped after every optimiser step)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: lr_factor(step, **kwargs))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --------------------------------------------------------------------------- the training loop
StepHook = Callable[[int, int], None]  # (epoch, step) -> None, after each step; tests use it to interrupt a run


class NonFiniteLoss(TrainingError):
    """A training step's loss is NaN or infinite; :func:`fit` says at which epoch and step, and which rate to lower."""

    def __init__(self, value: float) -> None:
        super().__init__(f"the loss became {value}; training stopped")
        self.value = value


def check_loss(loss: Tensor) -> None:
    """Stop on a NaN or infinite loss before it reaches the weights (call it before each ``backward``)."""
    if not torch.isfinite(loss.detach()).all():
        raise NonFiniteLoss(float(loss.detach()))


@dataclass(frozen=True)
class RunFiles:
    """Where a training stage writes: its two checkpoints, its metrics file and provenance record and its dvclive
    curves folder, once the run has finished; until then, the run's checkpoints and curves are in the ``unfinished``
    folder (which ``--resume`` continues from), and the previous finished run's files stay as they were."""

    best: Path
    last: Path
    metrics: Path
    provenance: Path
    curves: Path
    unfinished: Path

    @property
    def running_best(self) -> Path:
        return self.unfinished / self.best.name

    @property
    def running_last(self) -> Path:
        return self.unfinished / self.last.name

    @property
    def running_curves(self) -> Path:
        return self.unfinished / "curves"


@dataclass
class FitResult:
    """What :func:`fit` hands the trainer at the end of the epochs, for its metrics."""

    start_epoch: int  # the epoch this run began at (0, or the epoch --resume continued after)
    resumed: bool  # --resume was asked for
    best: dict[str, Any]  # the epoch kept as best.pt and its val figures
    history: list[dict[str, Any]]  # one record per epoch, resumed ones included
    train_seconds: float  # time in the training epochs of this run (validation left out)
    train_images: int  # images trained on in this run, over every rank

    @property
    def images_per_s(self) -> float | None:
        return round(self.train_images / self.train_seconds, 2) if self.train_seconds else None

    @property
    def resumed_from_epoch(self) -> int | None:
        return self.start_epoch if self.resumed else None


class Trainer(ABC):
    """What a training stage gives :func:`fit`: its step, its validation and its figures; fit does the rest.

    ``parts`` holds the objects every checkpoint saves and ``--resume`` restores, in the checkpoint's order:
    ``model`` first, ``optimizer`` and ``scheduler`` among them (fit steps the scheduler after each step and logs the
    first group's learning rate). ``state`` is the rest of each checkpoint (config, class names, what the run was
    made from, params). Each training step also returns how many of its images each head got right, one count per
    entry of ``counts`` (the train statistics key and the progress bar's label).
    """

    kind: str  # the checkpoints' kind: stage1 | refine (fgpipe.checkpoints)
    command: str  # `fgpipe train-backbone --dataset NAME`: named by Ctrl-C's message
    lr_key: str  # the params key to lower when the loss diverges
    cfg: TrainingConfig
    files: RunFiles
    dataset: str
    parts: dict[str, Any]
    state: dict[str, Any]
    counts: tuple[tuple[str, str], ...]
    train_size: int  # images in the train split
    train_feed: Feed  # their pixels, batch by batch in the order fit draws

    @abstractmethod
    def check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse a last.pt that ``--resume`` must not continue (other inputs or params)."""

    @abstractmethod
    def train_step(self, net: nn.Module, idx: Tensor, pixels: Pixels, gen: torch.Generator) -> tuple[Tensor, tuple[int, ...], int]:
        """One optimisation step on the training images ``idx`` (their uint8 ``pixels`` from :attr:`train_feed`),
        drawing randomness from ``gen`` only; returns the loss (detached; :func:`check_loss` before each backward), the
        right answers per count and the batch size."""

    @abstractmethod
    def validate(self) -> dict[str, float]:
        """The val figures of the model as it is now (sharded over ranks, counts summed)."""

    @abstractmethod
    def figures(self, stats: dict[str, float], val: dict[str, float]) -> dict[str, float]:
        """An epoch's figures for its history record, between ``train_loss`` and ``lr``; ``val_top1`` selects best.pt
        (a tie goes to the later, longer-trained epoch)."""

    def best_figures(self, val: dict[str, float]) -> dict[str, float]:
        """What ``best`` records besides the epoch and ``val_top1``."""
        return {}

    @abstractmethod
    def describe(self, stats: dict[str, float], val: dict[str, float]) -> str:
        """The epoch's line on the console, between the loss and the speed."""

    @abstractmethod
    def finish(self, result: FitResult) -> tuple[StageRecord, dict[str, Any] | None]:
        """The run's metrics and provenance once the epochs are done, and best.pt's state if it loaded it (else None)."""


def fit(trainer: Trainer, rt: Runtime, resume: bool, on_step: StepHook | None = None) -> StageRecord:
    """Train ``trainer`` for its epochs, keeping best.pt (by ``val_top1``) and last.pt after every epoch; return its
    metrics and provenance, written with both checkpoints marked finished at the very end (:func:`finish_run`).

    Each epoch is seeded from (seed, epoch) (:func:`epoch_seed`: torch's global RNG and the generator of data order
    and augmentation), so ``resume`` (continue from last.pt, :func:`resume_from`) ends with the weights an
    uninterrupted run has. Under torchrun the model is wrapped in DDP and each rank trains its share of every epoch;
    rank 0 alone writes. Per epoch: a progress bar, a console line, the dvclive curves. Until the end, checkpoints
    and curves go to the run's ``unfinished`` folder (:class:`RunFiles`; a fresh run empties it first), so the
    previous finished run's checkpoints, metrics and curves stay as they were whatever happens to this one. A NaN or
    infinite loss stops the run naming the epoch, the step and the learning rate to lower, and Ctrl-C says what was
    kept: the last good checkpoints, marked unfinished, in that folder for ``--resume``.
    """
    cfg, files, model = trainer.cfg, trainer.files, trainer.parts["model"]
    if rt.is_main and not (resume and files.running_last.is_file()):
        remove_folder(files.unfinished)  # a fresh run: an earlier run's unfinished files go
    start_epoch, best, history = resume_from(
        files.running_last, resume, rt, trainer.check_resumable, trainer.parts, kind=trainer.kind, dataset=trainer.dataset
    )
    net = wrap_ddp(model, rt)
    live = None  # dvclive, opened once the first checkpoint is written
    saved = start_epoch  # the last epoch whose checkpoints are on disk (0: none of this run yet)
    train_seconds, train_images = 0.0, 0
    trimmer = HeapTrimmer()  # one for the run: validation's batches count as growth too
    try:
        for epoch in range(start_epoch, cfg.epochs):
            seed = epoch_seed(cfg.seed, epoch)
            torch.manual_seed(seed)  # global RNG (e.g. stochastic depth) replays per epoch
            gen = torch.Generator().manual_seed(seed)  # data order, augmentation, crop/drop sampling, box jitter
            t0 = time.perf_counter()
            stats = _train_epoch(trainer, net, rt, gen, epoch, on_step, trimmer)
            train_seconds += time.perf_counter() - t0
            train_images += int(stats["images"])
            val = trainer.validate()
            record = {
                "epoch": epoch + 1, "train_loss": stats["loss"], **trainer.figures(stats, val),
                "lr": trainer.parts["optimizer"].param_groups[0]["lr"], "images_per_s": stats["images_per_s"],
            }
            history.append(record)
            improved = record["val_top1"] >= best["val_top1"]  # a tie goes to the later, longer-trained epoch
            if improved:
                best = {"epoch": epoch + 1, "val_top1": record["val_top1"], **trainer.best_figures(val)}
            if rt.is_main:
                state = {
                    "kind": trainer.kind, **{key: obj.state_dict() for key, obj in trainer.parts.items()},
                    "epoch": epoch + 1, "best": best, "history": history, "rng": rng_state(), **trainer.state,
                    "finished": False,  # both are marked at the end, with the metrics (finish_run)
                }
                saved = epoch + 1
                if improved:
                    save_checkpoint(files.running_best, state)
                save_checkpoint(files.running_last, state)
                console.print(
                    f"epoch {epoch + 1}/{cfg.epochs}  loss {stats['loss']:.4f}  {trainer.describe(stats, val)}  "
                    f"{stats['images_per_s']:.1f} img/s" + ("  [green]best" if improved else ""),
                    highlight=False,
                )
                if live is None:
                    live = open_live(files.running_curves, resume and start_epoch > 0)
                log_epoch(live, record)
            barrier(rt)
        if live is not None:
            close_live(live)
            live = None
        if not files.running_best.is_file():
            raise ArtifactError(
                f"no best checkpoint at {files.running_best}: training ran no epoch (epochs: {cfg.epochs}, resumed at {start_epoch})"
            )
        record, best_state = trainer.finish(FitResult(start_epoch, resume, best, history, train_seconds, train_images))
        if rt.is_main:
            finish_run(files, record, best_state)  # together, at the end
        return record
    except KeyboardInterrupt:
        raise interrupted(trainer.command, saved, cfg.epochs, files.unfinished) from None
    finally:
        if live is not None:  # the run stops on another error: that one is reported
            close_live(live, failing=True)


def _train_epoch(
    trainer: Trainer, net: nn.Module, rt: Runtime, gen: torch.Generator, epoch: int, on_step: StepHook | None,
    trimmer: HeapTrimmer,
) -> dict[str, float]:
    """One epoch of ``trainer``'s steps in a random order drawn from ``gen``, with a progress bar; the mean loss, each
    count's share of right answers, the images seen and their rate, summed over ranks. The order is drawn here, in the
    main process, before any step's draws; each rank's feed reads the pixels of its own share only."""
    cfg, scheduler = trainer.cfg, trainer.parts["scheduler"]
    net.train()
    order = torch.randperm(trainer.train_size, generator=gen)
    chunks = batches(shard_indices(order, rt), cfg.batch_size)
    total_loss = 0.0
    right = [0] * len(trainer.counts)
    seen = 0
    t0 = time.perf_counter()
    bar = progress(TextColumn("{task.fields[info]}")) if rt.is_main else contextlib.nullcontext()
    with bar as pbar:
        task = pbar.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=len(chunks), info="") if pbar else None
        for step, (idx, pixels) in enumerate(trainer.train_feed.batches(chunks)):
            try:
                loss, correct, n = trainer.train_step(net, idx, pixels, gen)
            except NonFiniteLoss as exc:
                kept = (
                    f"the last good checkpoint is kept in {trainer.files.unfinished} for --resume" if epoch > 0
                    else "no checkpoint was written"
                )
                raise TrainingError(
                    f"the loss became {exc.value} at epoch {epoch + 1}, step {step + 1}; training stopped, {kept} and "
                    f"the previous outputs are unchanged. Lower {trainer.lr_key} or check the data."
                ) from None
            scheduler.step()

            loss_value = float(loss)
            total_loss += loss_value * n
            right = [r + c for r, c in zip(right, correct, strict=True)]
            seen += n
            if pbar is not None:
                rate = seen * rt.world_size / (time.perf_counter() - t0)
                shares = " ".join(f"{label} {r / seen:.3f}" for (_, label), r in zip(trainer.counts, right))
                pbar.update(task, advance=1, info=f"loss {loss_value:.3f} {shares} {rate:.1f} img/s")
            if on_step is not None:
                on_step(epoch, step)
            trimmer.after_step()  # the tuned heap's peak must not grow with the steps
    stats = torch.tensor([total_loss, *right, seen], dtype=torch.float64)
    all_reduce_sum(stats, rt)
    elapsed = time.perf_counter() - t0
    n = float(stats[-1])
    return {
        "loss": float(stats[0]) / n, **{key: float(stats[1 + k]) / n for k, (key, _) in enumerate(trainer.counts)},
        "images": int(n), "images_per_s": n / elapsed,
    }


def finish_run(files: RunFiles, record: StageRecord, best_state: dict[str, Any] | None = None) -> None:
    """The end of a training run: its best.pt and last.pt, marked finished, its curves, the metrics file and the
    provenance record replace the previous run's together (:func:`fgpipe.store.replaced_together`), then its
    ``unfinished`` folder goes (a failure before leaves it, unfinished, for ``--resume``). ``best_state``: best.pt's
    state if already loaded."""
    with replaced_together():
        save_checkpoint(files.best, finished(best_state if best_state is not None else load_checkpoint(files.running_best)))
        save_checkpoint(files.last, finished(load_checkpoint(files.running_last)))
        write_json(files.metrics, record.metrics)
        write_json(files.provenance, record.provenance)
        if files.running_curves.is_dir():
            move_output(files.curves, files.running_curves)
    remove_folder(files.unfinished)


def config_mismatch(state: dict[str, Any], config: dict[str, Any], path: Path) -> None:
    """Refuse to resume from ``path`` when its ``config`` (the params sections it was trained with) is not ``config``,
    naming the keys that differ."""
    def results(cfg: Any) -> Any:  # without the keys that say how the pixels are read (they change no result)
        if not isinstance(cfg, dict):
            return cfg
        return {sec: {k: v for k, v in val.items() if k not in INPUT_KEYS} if isinstance(val, dict) else val for sec, val in cfg.items()}

    if results(state.get("config")) != results(config):
        diff = [
            f"{sec}.{k}" for sec in config for k in config[sec]
            if k not in INPUT_KEYS and state["config"].get(sec, {}).get(k) != config[sec][k]
        ]
        raise ArtifactError(f"{path} was made with other params ({', '.join(diff)}): delete it or run without --resume")


@contextlib.contextmanager
def training_runtime(cfg: TrainingConfig) -> Iterator[Runtime]:
    """The CPU threads set, then the device and torch.distributed of ``cfg`` (:func:`setup_runtime`) for the block;
    the input pipeline's workers stop at its end (:func:`fgpipe.streaming.feeds_closed`)."""
    configure_threads()
    rt = setup_runtime(cfg.device, cfg.amp, cfg.channels_last)
    try:
        with feeds_closed():
            yield rt
    finally:
        teardown_runtime(rt)


def optimizer_for(params: Iterator[nn.Parameter] | list[Any], cfg: TrainingConfig) -> torch.optim.Optimizer:
    """:func:`build_optimizer` with ``cfg``'s optimiser, rate, momentum and weight decay."""
    return build_optimizer(params, cfg.optimizer, cfg.lr, cfg.momentum, cfg.weight_decay)


def scheduler_for(opt: torch.optim.Optimizer, cfg: TrainingConfig, train_size: int, rt: Runtime) -> torch.optim.lr_scheduler.LambdaLR:
    """:func:`build_scheduler` with ``cfg``'s schedule, stepped once per step of this rank's share of ``train_size``."""
    steps_per_epoch = len(batches(shard_indices(torch.arange(train_size), rt), cfg.batch_size))
    return build_scheduler(
        opt, steps_per_epoch=steps_per_epoch, epochs=cfg.epochs, warmup_epochs=cfg.warmup_epochs,
        schedule=cfg.schedule, step_size=cfg.step_size, gamma=cfg.gamma,
    )


class ReadsPixels(Protocol):
    """A params section saying how its stage reads pixels (train_backbone, train_refine, evaluate)."""

    num_workers: int
    in_memory: bool


def feed_options(cfg: ReadsPixels) -> FeedOptions:
    """How a stage with ``cfg``'s ``num_workers`` and ``in_memory`` reads its pixels."""
    return FeedOptions(num_workers=cfg.num_workers, in_memory=cfg.in_memory)
