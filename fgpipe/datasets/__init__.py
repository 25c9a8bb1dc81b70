"""Dataset readers: each turns one official on-disk layout into SourceRecords for the manifest; and the generator of
the dataset that has no files to download (synthetic)."""

from __future__ import annotations

import importlib
from types import ModuleType

# kind -> module implementing read(root, cfg) -> SourceListing and HOW_TO_GET (and download(root) where
# the dataset has an official archive). Imported lazily so one reader's dependency never blocks another.
READERS = {
    "cub": "fgpipe.datasets.cub",
    "aircraft": "fgpipe.datasets.aircraft",
    "cars": "fgpipe.datasets.cars",
    "imagefolder": "fgpipe.datasets.imagefolder",
    "synthetic": "fgpipe.datasets.synthetic_reader",
}
# kind -> module implementing generate(root, options, setting): prepare writes the dataset there first
GENERATORS = {"synthetic": "fgpipe.datasets.synthetic"}


def reader(kind: str) -> ModuleType:
    """The reader module of a dataset kind."""
    return importlib.import_module(READERS[kind])


def generator(kind: str) -> ModuleType | None:
    """The generator module of a dataset kind that prepare generates (None for a dataset read from disk)."""
    return importlib.import_module(GENERATORS[kind]) if kind in GENERATORS else None
