"""Where every artefact of a dataset lives: the one place the files under data/NAME/ and metrics/NAME/ are named.

``prepare.data_dir`` and ``prepare.metrics_dir`` (params) say where the two folders are
(:meth:`fgpipe.config.Settings.layout`); this module says what lies in them (README "The pipeline")::

    data/NAME/manifest.csv, dataset.json, images.h5        prepare
    data/NAME/stage1/{best,last}.pt                         train-backbone
    data/NAME/stage1/unfinished/{best,last}.pt, curves/     a training run until it finishes (--resume reads it)
    data/NAME/attention.h5                                  extract-attention
    data/NAME/crops.h5, crops_preview.png                   extract-crops
    data/NAME/refine/{best,last}.pt                         train-refine
    data/NAME/confusion.png                                 evaluate
    data/NAME/show_ID.png                                   fgpipe show (default --out)
    metrics/NAME/STAGE.json                                 every stage: the figures a user compares (numbers only)
    metrics/NAME/STAGE.provenance.json                      every stage: how they were made (dataset, strings, paths
                                                            relative to the project, hashes, options)
    metrics/NAME/STAGE/                                     the training stages' dvclive curves
    metrics/NAME/localization.json, localization/METHOD.csv extract-crops
    metrics/NAME/per_class.csv, confusion.csv, predictions.csv  evaluate

Nothing here reads or writes a file; dvc.yaml spells the same paths for DVC.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

CHECKPOINTS = ("best", "last")  # the two checkpoints each training stage writes
UNFINISHED = "unfinished"  # the folder, beside a training stage's checkpoints, of its run in progress


@dataclass(frozen=True)
class DataDir:
    """data/NAME: the artefacts the stages hand each other."""

    path: Path

    @property
    def manifest(self) -> Path:
        return self.path / "manifest.csv"

    @property
    def dataset_json(self) -> Path:
        return self.path / "dataset.json"

    @property
    def images(self) -> Path:
        """The decoded image cache (:mod:`fgpipe.imagecache`)."""
        return self.path / "images.h5"

    def stage1(self, which: str = "best") -> Path:
        """A stage-1 checkpoint: ``best`` or ``last``."""
        return self.path / "stage1" / f"{which}.pt"

    def unfinished(self, folder: str) -> Path:
        """Where a training run writes its checkpoints and curves until it finishes (``folder``: stage1 | refine):
        the finished run's files beside it stay as they were until the new run's end replaces them together."""
        return self.path / folder / UNFINISHED

    @property
    def attention(self) -> Path:
        return self.path / "attention.h5"

    @property
    def crops(self) -> Path:
        return self.path / "crops.h5"

    @property
    def crops_preview(self) -> Path:
        return self.path / "crops_preview.png"

    def refine(self, which: str = "best") -> Path:
        """A refine checkpoint: ``best`` or ``last``."""
        return self.path / "refine" / f"{which}.pt"

    @property
    def confusion_png(self) -> Path:
        return self.path / "confusion.png"

    def show_png(self, name: str) -> Path:
        """``fgpipe show``'s default output for an image whose id is ``name`` once made file-safe."""
        return self.path / f"show_{name}.png"


# the PNGs stages write into data/NAME/ (fgpipe show never writes over them)
STAGE_PNGS = (DataDir(Path()).crops_preview.name, DataDir(Path()).confusion_png.name)


@dataclass(frozen=True)
class MetricsDir:
    """metrics/NAME: each stage's metrics file and provenance record, the curves `dvc plots` draws, evaluate's reports."""

    path: Path

    def stage(self, stage: str) -> Path:
        """metrics/NAME/STAGE.json (STAGE with underscores: ``train_backbone``): the stage's figures, numbers only
        (what `dvc metrics show` and `dvc exp show` compare)."""
        return self.path / f"{stage}.json"

    def provenance(self, stage: str) -> Path:
        """metrics/NAME/STAGE.provenance.json: how the figures of :meth:`stage` were made (the dataset, names,
        devices, options, hashes of the inputs; paths relative to the project)."""
        return self.path / f"{stage}.provenance.json"

    def curves(self, stage: str) -> Path:
        """metrics/NAME/STAGE/: a training stage's per-epoch curves (dvclive)."""
        return self.path / stage

    @property
    def localization(self) -> Path:
        return self.stage("localization")

    @property
    def localization_curves(self) -> Path:
        """metrics/NAME/localization/: one METHOD.csv per stored heatmap method."""
        return self.curves("localization")

    @property
    def per_class(self) -> Path:
        return self.path / "per_class.csv"

    @property
    def confusion(self) -> Path:
        return self.path / "confusion.csv"

    @property
    def predictions(self) -> Path:
        return self.path / "predictions.csv"


@dataclass(frozen=True)
class Layout:
    """Both folders of one dataset."""

    data: DataDir
    metrics: MetricsDir

    @classmethod
    def of(cls, data_dir: Path, metrics_dir: Path) -> Layout:
        """The layout of the dataset whose folders are ``data_dir`` (data/NAME) and ``metrics_dir`` (metrics/NAME)."""
        return cls(DataDir(data_dir), MetricsDir(metrics_dir))
