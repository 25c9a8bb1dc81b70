"""The input pipeline of the trainers and evaluate: the uint8 pixels of each batch, streamed or held in memory.

A stage decides the order of its batches in the main process (:func:`fgpipe.training.fit` draws each epoch's order
from (seed, epoch) and shards it over the DDP ranks; validation and evaluation go through their split in order,
sharded the same way) and asks a :class:`Feed` for the pixels of each batch, in that order:

- :class:`StreamFeed` (the default) reads them through a ``torch.utils.data.DataLoader`` whose worker processes
  cut and resize each region from images.h5 (or decode the file) with :func:`fgpipe.loader.decode_request`, the
  code :func:`fgpipe.loader.load_regions` runs, into pinned memory on CUDA. Memory stays flat in the split's size
  and each rank reads only the batches of its own shard.
- :class:`MemoryFeed` (``in_memory: true``) decodes the whole split once (:func:`fgpipe.loader.load_regions`) and
  indexes it.

Either way a batch holds the same uint8 values, and every random draw (data order, augmentation, box jitter,
WS-DAN's crops and drops) stays in the main process, in the stage's order: the results do not depend on the path
or on the number of workers (tests/test_streaming.py trains both ways and compares the weights).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from fgpipe.loader import LoadRequest, decode_request, load_regions

Pixels = tuple[Tensor, ...]  # one uint8 tensor (n, 3, H, W) per kind of region (whole images; objects and patches)


@dataclass(frozen=True)
class FeedOptions:
    """How a stage reads its pixels: ``num_workers`` worker processes (0: in the main process), or the whole split
    decoded once into memory (``in_memory``); ``pin_memory`` on CUDA."""

    num_workers: int = 0
    in_memory: bool = False
    pin_memory: bool = False

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

    def __getitem__(self, i: int) -> Pixels:
        return tuple(
            torch.stack([decode_request(req, wh) for req in reqs]) if reqs else torch.empty((0, 3, wh[1], wh[0]), dtype=torch.uint8)
            for reqs, wh in zip(self.items[i], self.sizes, strict=True)
        )


def concat(items: Sequence[Pixels]) -> Pixels:
    """A batch of :class:`Regions` items: each kind's regions concatenated in item order."""
    return tuple(torch.cat(kind) for kind in zip(*items, strict=True))


class _Chunks(Sampler[list[int]]):
    """The batches of the current pass, as the caller chose them (set before each pass)."""

    def __init__(self) -> None:
        self.chunks: list[list[int]] = []

    def __iter__(self) -> Iterator[list[int]]:
        return iter(list(self.chunks))

    def __len__(self) -> int:
        return len(self.chunks)


class StreamFeed(Feed):
    """A split read batch by batch through a DataLoader over :class:`Regions`. Its workers start with the first pass
    and serve every later one (``persistent_workers``: no start-up per epoch); each pass's batches are handed to them
    in the caller's order."""

    def __init__(self, dataset: Regions, options: FeedOptions) -> None:
        self.dataset, self.options = dataset, options
        self._sampler = _Chunks()
        self._loader: DataLoader[Pixels] | None = None

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
                pin_memory=self.options.pin_memory, prefetch_factor=2 if workers else None, persistent_workers=workers > 0,
            )
        self._sampler.chunks = [c.tolist() for c in full]
        it = iter(self._loader)  # a pass left unfinished (an error in the caller) is dropped by the next one's reset
        for idx in chunks:
            yield idx, (next(it) if len(idx) else self.dataset.empty())


def whole_image_feed(requests: Sequence[LoadRequest], side: int, options: FeedOptions, name: str) -> Feed:
    """Whole images (:func:`fgpipe.loader.whole_image_requests`) at ``side`` x ``side``: pixels ``(images,)``, as
    :func:`fgpipe.loader.load_regions` decodes them."""
    if options.in_memory:
        images = load_regions(list(requests), (side, side), desc=f"loading {name} images")  # (N, 3, S, S)
        return MemoryFeed(len(requests), lambda idx: (images[idx],))
    return StreamFeed(Regions([[[req]] for req in requests], [(side, side)]), options)


def sequential_chunks(idx: Tensor, batch_size: int) -> list[Tensor]:
    """``idx`` in consecutive batches of ``batch_size`` (an evaluation pass: every image, in order)."""
    return list(idx.split(batch_size))
