"""extract-attention, extract-crops and evaluate under torchrun: each rank computes a share of the batches, every rank
receives all the results in the single-process order, and rank 0 alone writes.

The batches are the ones a single process makes (the same images in each, in the same order); rank ``r`` of ``W``
computes batches ``r, r + W, r + 2W, ...`` (:func:`share`) and reads only their images. :func:`in_order` gathers
the results round by round (one ``all_gather_object`` per ``W`` batches: memory stays flat) and hands them out in
batch order, so rank 0 appends them to its HDF5 file exactly as one process would: the file is identical
(tests/test_sharding.py compares them). :func:`gather_chunks` does the same in one gather for evaluate's logits.
An error of the stage's own family on any rank (a diverged network, a missing image) is raised on every rank, so
every process stops with the same message; anything else stops its rank, and torchrun stops the others.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from fgpipe.console import progress
from fgpipe.errors import FgpipeError, portable
from fgpipe.stage1_network import inference_runtime
from fgpipe.streaming import feeds_closed
from fgpipe.training import Runtime, teardown_runtime

T = TypeVar("T")
R = TypeVar("R")


@contextlib.contextmanager
def ranks() -> Iterator[Runtime]:
    """The runtime of an extraction or evaluation stage (:func:`fgpipe.stage1_network.inference_runtime`) with, under
    torchrun, its process group started for the block and closed after it."""
    rt = inference_runtime(distributed=True)
    try:
        with feeds_closed():  # evaluate's input pipeline workers stop at the end
            yield rt
    finally:
        teardown_runtime(rt)


def share(items: Iterable[T], rt: Runtime) -> Iterator[T]:
    """The items this rank computes, lazily: items rank, rank + world_size, ... (all of them in a single process)."""
    return itertools.islice(items, rt.rank, None, rt.world_size)


def in_order(results: Iterable[R], total: int, rt: Runtime) -> Iterator[R]:
    """Every rank's results of its :func:`share` of ``total`` items, on every rank, in the order of the items.

    ``results`` is this rank's, lazily (each is computed when the round needs it). An :class:`FgpipeError` raised
    while computing one is raised on every rank once its round is gathered."""
    if not rt.distributed:
        yield from results
        return
    mine = iter(results)
    for start in range(0, total, rt.world_size):
        payload: tuple[bool, Any] = (True, None)
        if start + rt.rank < total:
            try:
                payload = (True, next(mine))
            except FgpipeError as exc:
                payload = (False, portable(exc))
        for offset, value in enumerate(_all_gather(payload, rt)):
            if start + offset < total:
                yield value


def _all_gather(payload: tuple[bool, Any], rt: Runtime) -> list[Any]:
    """Every rank's ``(ok, value)``: their values in rank order, or the first rank's error raised on every rank."""
    gathered: list[Any] = [None] * rt.world_size
    dist.all_gather_object(gathered, payload)
    for ok, value in gathered:
        if not ok:
            raise value
    return [value for _, value in gathered]


def gather_chunks(compute: Callable[[], Sequence[Tensor]], sizes: Sequence[int], rt: Runtime) -> list[Tensor]:
    """``compute()`` gives this rank's outputs for its :func:`share` of chunks of ``sizes`` rows: tensors (n, ...), each
    its chunks' rows concatenated; returned on every rank put together in chunk order, (sum(sizes), ...) each, on the
    CPU. An :class:`FgpipeError` of ``compute`` on any rank is raised on every rank."""
    if not rt.distributed:
        return [t.cpu() for t in compute()]
    try:
        payload: tuple[bool, Any] = (True, [t.cpu() for t in compute()])
    except FgpipeError as exc:
        payload = (False, portable(exc))
    gathered = _all_gather(payload, rt)
    out = []
    for k in range(len(gathered[0])):
        pieces: dict[int, Tensor] = {}
        for rank, tensors in enumerate(gathered):
            mine = range(rank, len(sizes), rt.world_size)
            pieces.update(zip(mine, tensors[k].split([sizes[i] for i in mine]), strict=True))
        out.append(torch.cat([pieces[i] for i in range(len(sizes))]))
    return out


class Bar:
    """A progress bar shown by rank 0 only (every rank advances it: the others' calls do nothing)."""

    def __init__(self, bar: Any, task: Any) -> None:
        self._bar, self._task = bar, task

    def advance(self, n: int) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)


@contextlib.contextmanager
def main_progress(rt: Runtime, description: str, total: int) -> Iterator[Bar]:
    """:func:`fgpipe.console.progress` with one task, on rank 0 (a single process: always)."""
    if not rt.is_main:
        yield Bar(None, None)
        return
    with progress() as bar:
        yield Bar(bar, bar.add_task(description, total=total))
