"""Training machinery shared by stage-1 and the refinement branches.

Flat functions in the spirit of torchvision's references: device and distributed set-up, optimizer and
schedule, and per-epoch seeding so that a run resumed from its last checkpoint (:mod:`fgpipe.checkpoints`)
replays exactly what an uninterrupted run would have done.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fgpipe.checkpoints import RESUME_KEYS, load_checkpoint, mark_finished, rebuilding
from fgpipe.console import console
from fgpipe.errors import ConfigError, Interrupted
from fgpipe.runtime import env_int
from fgpipe.store import output_error, replaced_together, write_json


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


def setup_runtime(device: str, amp: str, channels_last: str) -> Runtime:
    """Pick the device (starting torch.distributed when launched by torchrun) and the precision."""
    launched = "(set by torchrun; leave it unset for a single process)"
    world_size = env_int("WORLD_SIZE", 1, 1, f"an integer >= 1, the number of processes {launched}")
    rank = env_int("RANK", 0, 0, f"an integer from 0 to WORLD_SIZE - 1 = {world_size - 1} {launched}")
    local_rank = env_int("LOCAL_RANK", 0, 0, f"an integer >= 0, this process's GPU on its machine {launched}")
    if rank >= world_size:
        raise ConfigError(
            f"environment variable RANK={rank} is invalid: it must be an integer from 0 to WORLD_SIZE - 1 = "
            f"{world_size - 1} {launched}"
        )
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda was asked for, but torch sees no CUDA device (use device: auto or cpu)")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda and local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"environment variable LOCAL_RANK={local_rank} is invalid: torch sees {torch.cuda.device_count()} CUDA "
            f"device(s), so it must be from 0 to {torch.cuda.device_count() - 1} {launched}"
        )
    dev = torch.device(f"cuda:{local_rank}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
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


def interrupted(command: str, saved: int, epochs: int) -> Interrupted:
    """What a Ctrl-C during training left and how to go on; ``command`` (``fgpipe train-backbone --dataset NAME``)
    wrote the checkpoints of epoch ``saved`` (0: none yet, the previous outputs are untouched)."""
    if saved > 0:
        return Interrupted(
            f"interrupted (Ctrl-C) after epoch {saved} of {epochs}: its checkpoints are kept, marked unfinished; "
            f"continue with `{command} --resume`"
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
            console.print(f"[yellow]--resume: no checkpoint at {path}, starting from scratch")
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


# --------------------------------------------------------------------------- the end of a run
def finish_run(best: Path, last: Path, metrics_path: Path, metrics: dict[str, Any], best_state: dict[str, Any] | None = None) -> None:
    """The end of a training run: best.pt and last.pt marked finished and the metrics file written, all three
    replaced together (:func:`fgpipe.store.replaced_together`). ``best_state``: best.pt's state if already loaded."""
    with replaced_together():
        mark_finished(best, best_state if best_state is not None else load_checkpoint(best))
        mark_finished(last, load_checkpoint(last))
        write_json(metrics_path, metrics)
