"""The input pipeline of the trainers and evaluate: the uint8 pixels of each batch, streamed or held in memory.

A stage decides the order of its batches in the main process (:func:`fgpipe.training.fit` draws each epoch's order
from (seed, epoch) and shards it over the DDP ranks; validation and evaluation go through their split in order,
sharded the same way) and asks a :class:`Feed` for the pixels of each batch, in that order:

- :class:`StreamFeed` (the default) reads them through a ``torch.utils.data.DataLoader`` whose worker processes
  cut and resize each region from images.h5 (or decode the file) with :func:`fgpipe.loader.decode_request`, the
  code :func:`fgpipe.loader.load_regions` runs. Memory stays flat in the split's size and each rank reads only the
  batches of its own shard. The workers start with a feed's first pass, serve its later ones, and stop when the
  stage's :func:`feeds_closed` block ends (or at :meth:`Feed.close`). An fgpipe error in a worker (an unreadable
  image) is raised in the stage with its own message.
- :class:`MemoryFeed` (``in_memory: true``) decodes the whole split once (:func:`fgpipe.loader.load_regions`) and
  indexes it.

Either way a batch holds the same uint8 values, and every random draw (data order, augmentation, box jitter,
WS-DAN's crops and drops) stays in the main process, in the stage's order, and the loader draws nothing from
torch's global generator (its workers' seeds come from a generator of its own): the results do not depend on the
path or on the number of workers (tests/test_streaming.py trains both ways and compares the weights). The batches
are augmented on the CPU in the main process and copied to the device from there: pinning the decoded uint8 batch
would only add a copy.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fgpipe.errors import FgpipeError, portable
from fgpipe.loader import LoadRequest, decode_request, load_regions

Pixels = tuple[Tensor, ...]  # one uint8 tensor (n, 3, H, W) per kind of region (whole images; objects and patches)


@dataclass(frozen=True)
class FeedOptions:
    """How a stage reads its pixels: ``num_workers`` worker processes (0: in the main process), or the whole split
    decoded once into memory (``in_memory``)."""

    num_workers: int = 0
    in_memory: bool = False

    def describe(self) -> dict[str, int | str]:
        """What a provenance record says of the path that ran."""
        if self.in_memory:
            return {"loader": "memory"}
        return {"loader": "stream", "num_workers": self.num_workers}


class Feed(ABC):
    """The pixels of a split, batch by batch in an order the caller chose."""

    @abstractmethod
    def __len__(self) -> int:
        """Images in the split."""

    @abstractmethod
    def batches(self, chunks: Sequence[Tensor]) -> Iterator[tuple[Tensor, Pixels]]:
        """``(idx, pixels)`` for each batch of image indices ``idx`` in ``chunks``, in that order."""

    def close(self) -> None:
        """Stop the feed's worker processes, if it has any (a later pass starts new ones)."""


class MemoryFeed(Feed):
    """A split decoded once: ``take(idx)`` cuts a batch out of the tensors in memory."""

    def __init__(self, size: int, take: Callable[[Tensor], Pixels]) -> None:
        self._size, self._take = size, take

    def __len__(self) -> int:
        return self._size

    def batches(self, chunks: Sequence[Tensor]) -> Iterator[tuple[Tensor, Pixels]]:
        for idx in chunks:
            yield idx, self._take(idx)


class Regions(Dataset[Pixels]):
    """Item ``i``: for each kind ``k`` of region, the requests ``items[i][k]`` decoded at ``sizes[k]`` (w, h) and
    stacked, (n_k, 3, h, w) uint8 (an image's object crop, its part patches; or its whole image)."""

    def __init__(self, items: Sequence[Sequence[Sequence[LoadRequest]]], sizes: Sequence[tuple[int, int]]) -> None:
        self.items, self.sizes = items, tuple(sizes)

    def __len__(self) -> int:
        return len(self.items)

    def empty(self) -> Pixels:
        """A batch of no image."""
        return tuple(torch.empty((0, 3, wh[1], wh[0]), dtype=torch.uint8) for wh in self.sizes)

    def __getitem__(self, i: int) -> Pixels | Failed:
        try:
            return tuple(
                torch.stack([decode_request(req, wh) for req in reqs]) if reqs else self.empty()[k]
                for k, (reqs, wh) in enumerate(zip(self.items[i], self.sizes, strict=True))
            )
        except FgpipeError as exc:  # handed back as a value: torch would wrap a raised one in its own traceback
            return Failed(portable(exc))


@dataclass(frozen=True)
class Failed:
    """An item that could not be read, with the error to raise in the stage."""

    error: FgpipeError


def concat(items: Sequence[Pixels | Failed]) -> Pixels | Failed:
    """A batch of :class:`Regions` items: each kind's regions concatenated in item order (or the first failure)."""
    for item in items:
        if isinstance(item, Failed):
            return item
    return tuple(torch.cat(kind) for kind in zip(*items, strict=True))  # type: ignore[arg-type]


class _Chunks(Sampler[list[int]]):
    """The batches of the current pass, as the caller chose them (set before each pass)."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.chunks))

    def __len__(self) -> int:
        return len(self.chunks)


_BLOCKS: list[list[StreamFeed]] = []  # the feeds made in each open feeds_closed block, innermost last


@contextlib.contextmanager
def feeds_closed() -> Iterator[None]:
    """Close every :class:`StreamFeed` made in the block when it ends (a stage's run: training_runtime, ranks). A feed
    made outside any block stops its workers when it is garbage-collected (torch's loader does), or at ``close()``."""
    made: list[StreamFeed] = []
    _BLOCKS.append(made)
    try:
        yield
    finally:
        _BLOCKS.remove(made)
        for feed in made:
            feed.close()


class StreamFeed(Feed):
    """A split read batch by batch through a DataLoader over :class:`Regions`. Its workers start with the first pass
    and serve every later one (``persistent_workers``: no start-up per epoch) until :meth:`close`; each pass's batches
    are handed to them in the caller's order."""

    def __init__(self, dataset: Regions, options: FeedOptions) -> None:
        self.dataset, self.options = dataset, options
        self._sampler = _Chunks()
        self._loader: DataLoader[Any] | None = None
        if _BLOCKS:
            _BLOCKS[-1].append(self)

    def close(self) -> None:
        loader, self._loader = self._loader, None
        workers = getattr(loader, "_iterator", None)  # a persistent-workers loader keeps its iterator (torch's own attribute)
        if workers is not None and hasattr(workers, "_shutdown_workers"):
            workers._shutdown_workers()

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, chunks: Sequence[Tensor]) -> Iterator[tuple[Tensor, Pixels]]:
        full = [c for c in chunks if len(c)]
        if not full:
            for idx in chunks:
                yield idx, self.dataset.empty()
            return
        if self._loader is None:
            workers = self.options.num_workers
            self._loader = DataLoader(
                self.dataset, batch_sampler=self._sampler, num_workers=workers, collate_fn=concat,
                prefetch_factor=2 if workers else None, persistent_workers=workers > 0,
                generator=torch.Generator(),  # the workers' base seed: never from torch's global generator
                multiprocessing_context=worker_context() if workers else None,
            )
        self._sampler.chunks = [c.tolist() for c in full]
        it = iter(self._loader)  # a pass left unfinished (an error in the caller) is dropped by the next one's reset
        for idx in chunks:
            batch = next(it) if len(idx) else self.dataset.empty()
            if isinstance(batch, Failed):
                raise batch.error
            yield idx, batch


def worker_context() -> Any:
    """How the workers start: from a fork server where the platform has one (a clean process started once per stage,
    which imports this module and torch; each worker is forked from it and shares none of the stage's memory: a worker
    forked from the stage itself keeps a private copy of every page of the stage's heap that the stage rewrites
    later, more the longer the run: bench/train_memory.py), else the platform's default."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["fgpipe.streaming"])  # torch and the decoders imported once, shared by the workers
    return context


def whole_image_feed(requests: Sequence[LoadRequest], side: int, options: FeedOptions, name: str) -> Feed:
    """Whole images (:func:`fgpipe.loader.whole_image_requests`) at ``side`` x ``side``: pixels ``(images,)``, as
    :func:`fgpipe.loader.load_regions` decodes them."""
    if options.in_memory:
        images = load_regions(list(requests), (side, side), desc=f"loading {name} images")  # (N, 3, S, S)
        return MemoryFeed(len(requests), lambda idx: (images[idx],))
    return StreamFeed(Regions([[[req]] for req in requests], [(side, side)]), options)


def sequential_chunks(idx: Tensor, batch_size: int) -> list[Tensor]:
    """``idx`` in consecutive batches of ``batch_size`` (an evaluation pass: every image, in order); none when ``idx``
    is empty."""
    return list(idx.split(batch_size)) if len(idx) else []
