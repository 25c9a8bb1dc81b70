"""params.yaml -> frozen, typed dataclasses.

Validation is done by pydantic dataclasses (``extra="forbid"``, strict types): an unknown key, a
wrong type or a value out of range fails before any work, with a message naming the key path
(``datasets.cub.val_fraction``) and what is allowed. CLI options that override a param are applied
as dotted keys *before* validation and recorded, so every artefact can say how it was made.
A dataset's own values of the stage sections (``per_dataset.NAME``) are merged in for a run on that
dataset, in the order params.yaml < per_dataset.NAME < preset < CLI options.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import re
import types
import typing
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator
from pydantic.dataclasses import dataclass

from fgpipe.errors import ConfigError
from fgpipe.images import DEFAULT_MAX_PIXELS, PIXEL_CEILING
from fgpipe.layout import Layout
from fgpipe.store import StageRecord, relative_paths

_CFG = ConfigDict(extra="forbid", allow_inf_nan=False)  # every float field: NaN and +-inf are refused, naming the key

DatasetKind = Literal["synthetic", "cub", "aircraft", "cars", "imagefolder"]
SYNTHETIC_SOURCE = "fgpipe/datasets/synthetic.py"


# --------------------------------------------------------------------------- datasets
# The synthetic dataset's vocabulary (fgpipe/datasets/synthetic.py draws it): its birds' parts in the order classes
# vary them, each with its markings. Class k uses the first few markings of each part (synthetic.class_attributes), so
# 8 classes vary head, wing and tail with two each unless class_markings says otherwise (params.yaml: head, wing and
# body). A class is one combination of markings: there are SYNTHETIC_MAX_CLASSES.
SYNTHETIC_PARTS = ("head", "wing", "tail", "body")
SYNTHETIC_MARKINGS: dict[str, tuple[str, ...]] = {
    "head": ("redcrown", "eyestripe", "whitecheek", "darkhood", "bluecrown"),
    "wing": ("wingbars", "wingspots", "paleedge", "yellowpatch", "wingstreaks"),
    "tail": ("whitetip", "tailband", "redbase", "tailstripes"),
    "body": ("plain", "spotted", "streaked", "yellowbreast", "greyplumage", "skyplumage", "lilacplumage", "tealplumage",
             "roseplumage"),
}
SYNTHETIC_MAX_CLASSES = math.prod(len(m) for m in SYNTHETIC_MARKINGS.values())


@dataclass(frozen=True, config=_CFG)
class SyntheticOptions:
    """The built-in fine-grained synthetic dataset (see fgpipe/datasets/synthetic.py)."""

    num_classes: int = Field(8, ge=2, le=SYNTHETIC_MAX_CLASSES)  # every combination of markings
    train_per_class: int = Field(60, ge=2, le=100_000)
    test_per_class: int = Field(20, ge=1, le=100_000)
    image_size: int = Field(224, ge=64, le=2048)
    object_size: tuple[float, float] = (0.32, 0.46)  # object length as a fraction of the image side (min, max)
    max_rotation: float = Field(40.0, ge=0.0, le=180.0)  # object rotation drawn from +-this many degrees
    distractors: int = Field(6, ge=0, le=100)  # clutter shapes per image (lone parts, blobs, specks, twigs)
    decoy_markings: bool = True  # lone-part distractors carry a class's marking (true) or are plain (false)
    # the markings each part's classes draw from, in order (part -> names; a part left out: all four)
    class_markings: dict[str, list[str]] | None = None
    # period and size of the patterned markings (bars, spots, streaks, stripes) relative to the default:
    # below 1 they are finer, so telling them apart needs a closer look (a zoomed crop)
    marking_detail: float = Field(1.0, ge=0.1, le=2.0)
    seed: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _check_range(self) -> SyntheticOptions:
        lo, hi = self.object_size
        if not 0 < lo <= hi <= 0.8:
            raise ValueError(f"object_size must satisfy 0 < min <= max <= 0.8 (the object must fit), got {self.object_size!r}")
        return self


@dataclass(frozen=True, config=_CFG)
class AircraftOptions:
    """FGVC-Aircraft 2013b options."""

    annotation_level: Literal["variant", "family", "manufacturer"] = "variant"
    drop_banner: bool = True  # remove the 20-pixel copyright banner at the bottom of every image
    official_val: bool = False  # use images_*_val.txt as val instead of carving val from train


@dataclass(frozen=True, config=_CFG)
class ImageFolderOptions:
    """root/<split>/<class>/* layout: which folder holds which split."""

    train_dir: str = "train"
    test_dir: str = "test"
    val_dir: str | None = None  # a folder with a ready-made val split; otherwise val is carved from train


@dataclass(frozen=True, config=_CFG)
class DatasetConfig:
    """One dataset: where it is, what layout it has, and how val is carved from train."""

    kind: DatasetKind
    root: str
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    split_seed: int = Field(0, ge=0)
    skip_bad: bool = False  # skip undecodable images (counted) instead of failing
    verify_images: bool = True  # decode every image once during prepare
    download: bool = False  # fetch the official archive when root is missing (cub, aircraft)
    synthetic: SyntheticOptions | None = None
    aircraft: AircraftOptions | None = None
    imagefolder: ImageFolderOptions | None = None

    @model_validator(mode="after")
    def _options_match_kind(self) -> DatasetConfig:
        for block in ("synthetic", "aircraft", "imagefolder"):
            if getattr(self, block) is not None and self.kind != block:
                raise ValueError(f"option block `{block}` is only allowed with kind: {block} (kind is {self.kind})")
        return self

    def options(self) -> Any:
        """The kind-specific option block, defaults filled in where it was left out."""
        default = {"synthetic": SyntheticOptions, "aircraft": AircraftOptions, "imagefolder": ImageFolderOptions}
        value = getattr(self, self.kind, None)
        if value is None and self.kind in default:
            return default[self.kind]()
        return value


# --------------------------------------------------------------------------- stages
@dataclass(frozen=True, config=_CFG)
class PrepareConfig:
    """Options of the prepare stage shared by every dataset."""

    metrics_dir: str = "metrics"
    data_dir: str = "data"
    # longest side of the decoded copies in data/NAME/images.h5 (aspect kept, never enlarged); 0 = no cache
    cache_side: int = Field(512, ge=0, le=8192)
    # an image declaring more pixels is unreadable (a decompression bomb): prepare lists it (or skips it with
    # skip_bad), predict reports and skips it. Default: PIL's own MAX_IMAGE_PIXELS; at most twice that, where
    # PIL itself refuses to open a file
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1, le=PIXEL_CEILING)

    @field_validator("cache_side")
    @classmethod
    def _cache_side(cls, value: int) -> int:
        if 0 < value < 32:
            raise ValueError("must be 0 (no image cache) or at least 32 pixels")
        return value


@dataclass(frozen=True, config=_CFG)
class ModelConfig:
    """The stage-1 network: backbone (+ LCAM) and the WS-DAN attention head (METHODS.md sections 1-2)."""

    backbone: str = "resnet18"  # a name registered in fgpipe.models (see `fgpipe models`)
    weights: str = "none"  # none | imagenet (torchvision enum / bundled file) | a path to a state_dict
    lcam: Literal["none", "block", "stage"] = "block"
    lcam_kernel: int = Field(0, ge=0, le=31)  # 0: adaptive k from the channel count; else a fixed odd k
    num_attentions: int = Field(32, ge=1, le=512)  # M
    feature_layer: str = ""  # backbone stage the head and every attention method read; "" = the last stage
    # 0: the trunk's own stride; 8/16: dilate the stages past it instead of downsampling (finer heatmaps, same weights)
    output_stride: int = Field(0, ge=0, le=64)
    # wsdan: attention maps + BAP classifier (+ the CAM head); plain: global average pooling + linear on the
    # feature layer, trained with cross-entropy on the whole image only (the baseline every paper reports)
    head: Literal["wsdan", "plain"] = "wsdan"
    # momentum of every batch norm's running statistics (PyTorch's default 0.1); 0 keeps the trunk's own
    # (EfficientNet's TF-ported 0.01 lags so far behind a fine-tuned trunk on a small dataset that eval-mode
    # predictions stay near chance for epochs while training accuracy climbs)
    bn_momentum: float = Field(0.1, ge=0.0, le=1.0)
    logit_scale: float = Field(100.0, gt=0)  # the classifier sees the normalised BAP feature times this
    # the CAM head: 1x1 conv + BN + ReLU to this many maps, GAP, linear; the classifier OAAM explains (0: none)
    cam_channels: int = Field(256, ge=0, le=8192)

    @model_validator(mode="after")
    def _odd_kernel(self) -> ModelConfig:
        if self.lcam_kernel and (self.lcam_kernel < 3 or self.lcam_kernel % 2 == 0):
            raise ValueError(f"lcam_kernel must be 0 (adaptive) or an odd number >= 3, got {self.lcam_kernel}")
        return self


@dataclass(frozen=True, config=_CFG)
class AugmentConfig:
    """Standard FGVC augmentation: resize, random crop, flip, colour jitter."""

    resize_ratio: float = Field(1.15, ge=1.0, le=2.0)  # resize to input_size * ratio, then random-crop input_size
    hflip: bool = True
    color_jitter: float = Field(0.2, ge=0.0, le=1.0)  # brightness/contrast/saturation strength; 0 disables


@dataclass(frozen=True, config=_CFG)
class TrainingConfig:
    """What every trainer shares: input size, schedule, optimiser, augmentation, seed, device, precision."""

    input_size: int = Field(224, ge=32, le=1024)
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(16, ge=1, le=4096)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.01, gt=0, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(1e-4, ge=0, le=1)
    schedule: Literal["cosine", "step"] = "cosine"
    warmup_epochs: float = Field(1.0, ge=0)
    step_size: int = Field(2, ge=1)  # step schedule: decay every step_size epochs
    gamma: float = Field(0.9, gt=0, le=1)  # step schedule: decay factor
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    augment: AugmentConfig = AugmentConfig()
    seed: int = Field(0, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when available
    amp: Literal["auto", "off", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, off on CPU
    channels_last: Literal["auto", "on", "off"] = "auto"  # auto = on: NHWC is faster on CUDA and on CPU
    # the input pipeline (fgpipe.streaming): processes that cut and resize each batch's images (0: the training
    # process itself); in_memory: decode each split once and hold it (memory grows with the split) instead
    num_workers: int = Field(0, ge=0, le=64)
    in_memory: bool = False


@dataclass(frozen=True, config=_CFG)
class TrainBackboneConfig(TrainingConfig):
    """Stage-1 training (WS-DAN losses and attention crop/drop augmentation)."""

    center_loss_weight: float = Field(1.0, ge=0)  # lambda
    center_beta: float = Field(0.05, gt=0, le=1)  # center update rate
    cam_loss_weight: float = Field(1.0, ge=0)  # mu: CE of the CAM head (model.cam_channels) on raw, crop and drop views
    cam_lr: float = Field(0.05, gt=0, le=10)  # the CAM head's (or the plain head's) own learning rate (it starts from scratch)
    # the WS-DAN head's (attention conv and BAP classifier) own rate: its classifier sees logit_scale x the unit
    # feature, so its effective rate is logit_scale^2 x this; WS-DAN's 1e-3 whatever rate the trunk fine-tunes at
    wsdan_lr: float = Field(0.001, gt=0, le=10)
    crop_threshold: tuple[float, float] = (0.4, 0.6)  # theta_c ~ U(a, b) * max(A_k)
    crop_padding: float = Field(0.1, ge=0, le=1)  # pad the crop box by this fraction of the image side
    drop_threshold: tuple[float, float] = (0.2, 0.5)  # theta_d ~ U(a, b) * max(A_k)
    test_refine: bool = True  # test-time refinement: raw + crop from the mean attention map
    refine_threshold: float = Field(0.1, gt=0, lt=1)
    refine_padding: float = Field(0.05, ge=0, le=1)

    @model_validator(mode="after")
    def _ranges(self) -> TrainBackboneConfig:
        for name in ("crop_threshold", "drop_threshold"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi < 1:
                raise ValueError(f"{name} must satisfy 0 < low <= high < 1, got {getattr(self, name)!r}")
        return self


@dataclass(frozen=True, config=_CFG)
class AttentionConfig:
    """Stage extract-attention: heatmaps from the stage-1 network (METHODS.md section 3)."""

    method: Literal["oaam", "gradcam", "aolm", "bap"] = "oaam"
    target: Literal["predicted", "true"] = "predicted"  # class whose score Grad-CAM(++) explains
    # whose score Grad-CAM(++) differentiates: cam = the CAM head (TL-AAM's plain CNN classifier, on its last
    # conv maps; needs model.cam_channels > 0), wsdan = the BAP classifier on the feature layer, auto = cam if any
    score: Literal["auto", "cam", "wsdan"] = "auto"
    checkpoint: Literal["best", "last"] = "best"
    # mean of each map-valued heatmap (oaam, gradcam, bap) and the mirrored-back map of the mirrored image (AOLM,
    # box-valued, stays MMAL-Net's): one more pass; smoother maps that cover the whole object
    flip: bool = False
    # side of the square input the heatmaps are computed at; 0 = stage 1's `input_size`. A larger input gives a
    # finer map of the same network (every method, AOLM included, at that size); the stored logits come from it too
    input_size: int = Field(0, ge=0, le=1024)
    batch_size: int = Field(32, ge=1, le=4096)

    @field_validator("input_size")
    @classmethod
    def _size(cls, v: int) -> int:
        if 0 < v < 32:
            raise ValueError(f"must be 0 (stage 1's input size) or at least 32, got {v}")
        return v


@dataclass(frozen=True, config=_CFG)
class CropsConfig:
    """Stage extract-crops: object boxes from heatmaps and MPALM part boxes (METHODS.md sections 4-5)."""

    # object mask: heatmap >= threshold * its max; auto = the `thresholds` value with the best localisation on the
    # train and val boxes (ties: the higher mean IoU, then the lower threshold; 0.2 when they have no boxes)
    threshold: Annotated[float, Field(gt=0.0, le=1.0)] | Literal["auto"] = "auto"
    # the grid localisation is reported on (every stored method x split, metrics/NAME/localization.json) and auto picks from
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)
    part_top_k: int = Field(4, ge=1, le=64)  # channels whose peaks become part centres
    part_sizes: tuple[int, ...] = (96, 160, 224)  # box sides at a 448-pixel input; scaled with the input size
    part_nms_iou: float = Field(0.5, gt=0.0, le=1.0)
    max_parts: int = Field(6, ge=1, le=64)
    batch_size: int = Field(32, ge=1, le=4096)
    preview_images: int = Field(8, ge=0, le=64)  # test images drawn in data/NAME/crops_preview.png

    @model_validator(mode="after")
    def _sizes(self) -> CropsConfig:
        if not self.part_sizes or any(v < 8 for v in self.part_sizes):
            raise ValueError(f"part_sizes must be a non-empty list of sides >= 8 pixels, got {self.part_sizes!r}")
        t = self.thresholds
        if not t or any(not 0 < v <= 1 for v in t) or any(a >= b for a, b in zip(t, t[1:])):
            raise ValueError(f"thresholds must be a non-empty increasing list of values in (0, 1], got {list(t)!r}")
        return self


@dataclass(frozen=True, config=_CFG)
class TrainRefineConfig(TrainingConfig):
    """Stage train-refine: object branch on object crops, part branch on MPALM patches (METHODS.md section 6).

    ``input_size`` is the side object crops are resized to.
    """

    epochs: int = Field(10, ge=1, le=10_000)
    part_size: int = Field(0, ge=0, le=1024)  # part patches are resized to this; 0 = input_size // 2
    shared_backbone: bool = False  # one backbone for both branches (MMAL-Net style) or one each
    part_pooling: Literal["mean_logits"] = "mean_logits"  # patch logits pooled per image
    box_jitter: float = Field(0.05, ge=0, le=0.5)  # random shift/scale of crop boxes at train time, fraction of the box side
    dropout: float = Field(0.0, ge=0, lt=1)  # on the pooled features before each branch's classifier, training only
    # train part batches padded to batch x the most patches an image has (copies of each image's own patches, left
    # out of its pooled logits), so every step's part batch has the same size and memory does not depend on the counts
    pad_parts: bool = True


@dataclass(frozen=True, config=_CFG)
class BranchWeights:
    raw: float = Field(1.0, ge=0)
    object: float = Field(1.0, ge=0)
    parts: float = Field(1.0, ge=0)


@dataclass(frozen=True, config=_CFG)
class EvaluateConfig:
    """Stage evaluate: joint prediction on test; combination weights chosen on val or fixed here."""

    combine: Literal["val", "fixed"] = "val"
    # the branches the joint prediction combines (every branch is still reported alone); the others get weight 0
    branches: tuple[Literal["raw", "object", "parts"], ...] = ("raw", "object", "parts")
    weights: BranchWeights = BranchWeights()  # used when combine: fixed
    weight_step: float = Field(0.25, ge=0.01, le=1)  # 0.01: 5,151 weight triples; finer only costs memory  # grid step of the weights searched on val
    select_by: Literal["nll", "top1"] = "nll"  # what the weights searched on val optimise: log-loss or top-1
    calibrate: bool = True  # a temperature per branch fitted on val (log-loss) before the branches are combined
    top_k: int = Field(5, ge=1, le=100)
    batch_size: int = Field(32, ge=1, le=4096)
    num_workers: int = Field(0, ge=0, le=64)  # processes that cut and resize the images (0: evaluate itself)
    in_memory: bool = False  # decode each split once and hold it instead of streaming it

    @model_validator(mode="after")
    def _check_branches(self) -> EvaluateConfig:
        if not self.branches or len(set(self.branches)) != len(self.branches):
            raise ValueError(f"branches must name raw, object or parts at least once and each at most once, got {list(self.branches)!r}")
        return self


# --------------------------------------------------------------------------- the whole file
# The stage sections: shared by every dataset, each one settable per dataset (per_dataset.NAME.SECTION).
STAGE_SECTIONS = ("model", "train_backbone", "attention", "crops", "train_refine", "evaluate")


@dataclass(frozen=True, config=_CFG)
class DatasetOverrides:
    """One dataset's own values of the stage sections (``per_dataset.NAME``), set over the shared sections.

    A block holds any keys of its section, nested ones too (``train_backbone: {augment: {hflip: false}}``),
    and is checked against that section whenever the file is loaded. ``{}`` (or no block) keeps the shared
    values. For ``dvc repro`` a dataset under ``run`` needs all six blocks, ``{}`` at least: dvc.yaml tracks each
    one and DVC refuses a missing params key (fgpipe itself does not need them).
    """

    model: dict[str, Any] | None = None
    train_backbone: dict[str, Any] | None = None
    attention: dict[str, Any] | None = None
    crops: dict[str, Any] | None = None
    train_refine: dict[str, Any] | None = None
    evaluate: dict[str, Any] | None = None

    def blocks(self) -> dict[str, dict[str, Any]]:
        """The non-empty blocks: section -> values (a copy)."""
        return {s: copy.deepcopy(v) for s in STAGE_SECTIONS if (v := getattr(self, s))}


_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True, config=_CFG)
class Params:
    """The whole params.yaml."""

    # datasets `dvc repro` runs: name -> the input DVC watches for its prepare stage
    # (the dataset root, or fgpipe/datasets/synthetic.py for the generated dataset)
    run: dict[str, str]
    datasets: dict[str, DatasetConfig]
    # a parameter preset from fgpipe/presets/ (or a path to a YAML file), applied over this file: none | NAME
    preset: str = "none"
    prepare: PrepareConfig = PrepareConfig()
    model: ModelConfig = ModelConfig()
    train_backbone: TrainBackboneConfig = TrainBackboneConfig()
    attention: AttentionConfig = AttentionConfig()
    crops: CropsConfig = CropsConfig()
    train_refine: TrainRefineConfig = TrainRefineConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    # dataset name -> its own values of the stage sections, over the shared ones (README "Per-dataset parameters")
    per_dataset: dict[str, DatasetOverrides] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check_run(self) -> Params:
        for name, source in self.run.items():
            if name not in self.datasets:
                raise ValueError(f"run.{name}: no such dataset under `datasets` (known: {', '.join(sorted(self.datasets))})")
            ds = self.datasets[name]
            want = SYNTHETIC_SOURCE if ds.kind == "synthetic" else ds.root
            if os.path.normpath(source) != os.path.normpath(want):
                raise ValueError(
                    f"run.{name} must be `{want}` (the input DVC watches: "
                    f"{'the generator' if ds.kind == 'synthetic' else f'datasets.{name}.root'}), got `{source}`"
                )
        return self

    @model_validator(mode="after")
    def _check_names(self) -> Params:
        for name in self.datasets:  # a name is a folder under data/ and metrics/: never a path
            if not _DATASET_NAME.fullmatch(name) or ".." in name:
                raise ValueError(
                    f"datasets.{name}: a dataset name is a folder name under data/ and metrics/: letters, digits, "
                    "`_`, `-` and `.`, starting with a letter or digit, no `..`"
                )
        return self

    @model_validator(mode="after")
    def _check_per_dataset(self) -> Params:
        for name in self.per_dataset:
            if name not in self.datasets:
                raise ValueError(f"per_dataset.{name}: no such dataset under `datasets` (known: {', '.join(sorted(self.datasets))})")
        return self


_PARAMS_ADAPTER = TypeAdapter(Params)


# --------------------------------------------------------------------------- loading
@dataclasses.dataclass(frozen=True)
class Settings:
    """Validated params plus where they came from and which CLI overrides were applied.

    With ``dataset_name`` set (``load_params(..., dataset=NAME)`` or :meth:`for_dataset`), the stage sections of
    ``params`` are that dataset's: its ``per_dataset`` blocks merged in, so stage code just reads ``params.SECTION``.
    """

    params: Params
    params_file: Path
    overrides: dict[str, Any]
    dataset_name: str | None = None  # the dataset whose per_dataset blocks are merged in; None: the shared sections
    raw: dict[str, Any] = dataclasses.field(default_factory=dict, repr=False, compare=False)  # the file as read
    # override key -> the command-line option that gave it (`--epochs 0`), so an error in that value names the option
    options: dict[str, str] = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def base_dir(self) -> Path:
        """Relative paths in params.yaml are relative to the folder holding it."""
        return self.params_file.resolve().parent

    def _lookup(self, name: str) -> DatasetConfig:
        try:
            return self.params.datasets[name]
        except KeyError:
            known = ", ".join(sorted(self.params.datasets)) or "(none)"
            raise ConfigError(
                f"{self.params_file}: no dataset `{name}` under `datasets` (known: {known})"
            ) from None

    def dataset(self, name: str) -> DatasetConfig:
        cfg = self._lookup(name)
        if self.dataset_name is not None and name != self.dataset_name:
            raise ConfigError(
                f"{self.params_file}: these settings hold dataset `{self.dataset_name}`'s parameters, not `{name}`'s "
                f"(load them with dataset={name!r})"
            )
        return cfg

    def for_dataset(self, name: str) -> Settings:
        """These settings for dataset ``name``: its per_dataset blocks merged into the stage sections, in the order
        params.yaml < per_dataset.NAME < preset < CLI overrides, and validated."""
        self._lookup(name)
        entry = self.params.per_dataset.get(name)
        blocks = entry.blocks() if entry is not None else {}
        raw = _effective_raw(self.raw, blocks, self.overrides, self.params_file, self.options)
        params = validate(raw, self.params_file, name, blocks, self.options)
        return dataclasses.replace(self, params=params, dataset_name=name)

    def dataset_overrides(self) -> dict[str, dict[str, Any]]:
        """The per_dataset blocks merged into these settings' stage sections (section -> values; {} for none)."""
        entry = self.params.per_dataset.get(self.dataset_name) if self.dataset_name is not None else None
        return entry.blocks() if entry is not None else {}

    def resolve(self, path: str) -> Path:
        """A path from params.yaml, made absolute against the params file's folder."""
        p = Path(os.path.expanduser(path))
        return p if p.is_absolute() else self.base_dir / p

    def dataset_root(self, name: str) -> Path:
        return self.resolve(self.dataset(name).root)

    def data_dir(self, name: str) -> Path:
        """data/NAME: where every artefact of dataset NAME lives."""
        return self.resolve(self.params.prepare.data_dir) / name

    def layout(self, name: str) -> Layout:
        """Where each artefact of dataset NAME lives: data/NAME/... and metrics/NAME/... (:mod:`fgpipe.layout`)."""
        return Layout.of(self.data_dir(name), self.resolve(self.params.prepare.metrics_dir) / name)

    def metrics_file(self, name: str, stage: str) -> Path:
        """metrics/NAME/<stage>.json: where every stage writes its metrics."""
        return self.layout(name).metrics.stage(stage)

    def provenance(self) -> dict[str, Any]:
        """What to record with an artefact so it says how it was made."""
        return {
            "params_file": str(self.params_file),
            "preset": self.params.preset,
            "overrides": dict(self.overrides),
            "per_dataset": self.dataset_overrides(),
        }

    def record(self, dataset: str, metrics: dict[str, Any], provenance: dict[str, Any]) -> StageRecord:
        """A stage's report on ``dataset``: its figures (``metrics``) and their provenance: the dataset, the stage's
        own ``provenance``, then the params file, preset, overrides and per_dataset blocks (:meth:`provenance`),
        every path relative to the project root (the params file's folder), so the record reads the same on
        every machine."""
        made = {"dataset": dataset, **provenance, **self.provenance(), "params_file": self.params_file.name}
        return StageRecord(metrics, relative_paths(made, self.base_dir))


MAX_PARAMS_NODES = 1_000_000  # values in a params file once its aliases are expanded (the real file: about 400)


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last, dropping the first
    silently: a section pasted twice loses the first one's values)."""

    def construct_mapping(self, node: Any, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key `{key}` is given twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (empty file: {}); ConfigError naming the file otherwise."""
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_StrictLoader) or {}  # noqa: S506 (a safe loader)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.object[exc.start:exc.start + 1]!r}); save it as UTF-8") from None
    except yaml.YAMLError as exc:
        where = str(exc).replace('"<unicode string>"', str(path))
        raise ConfigError(f"{path}: not valid YAML: {where}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: {what}, got {type(data).__name__}")
    if _expanded_size(data, {}) > MAX_PARAMS_NODES:  # aliases (*name) of aliases: a few lines, gigabytes expanded
        raise ConfigError(
            f"{path}: its aliases (*name) expand to more than {MAX_PARAMS_NODES:,} values; write the values out"
        )
    return data


def _expanded_size(node: Any, memo: dict[int, int]) -> int:
    """Values in ``node`` with every shared (aliased) list or mapping counted each time it is referenced; memoised
    by identity, so a YAML alias bomb is measured without being expanded."""
    if not isinstance(node, (dict, list)):
        return 1
    key = id(node)
    if key not in memo:
        children = list(node.keys()) + list(node.values()) if isinstance(node, dict) else node
        memo[key] = 1 + sum(_expanded_size(child, memo) for child in children)
    return memo[key]


def load_params(
    path: str | os.PathLike[str] = "params.yaml",
    overrides: dict[str, Any] | None = None,
    dataset: str | None = None,
    options: Mapping[str, str] | None = None,
) -> Settings:
    """Read, override and validate params.yaml; raise ConfigError naming the culprit.

    With ``dataset``, the stage sections are that dataset's (:meth:`Settings.for_dataset`). Either way every
    dataset's per_dataset blocks are checked, so a typo in one dataset's block stops a run of another.
    ``options`` maps an override key to the command-line option that gave it (``train_backbone.epochs`` ->
    ``--epochs 0``): a value refused there is blamed on that option, not on the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path} (pass --params FILE or run from the project root)")
    raw = _read_mapping(path, "the top level must be a mapping of sections")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    labels = {k: v for k, v in (options or {}).items() if k in overrides}
    listed = raw.get("datasets")
    if dataset is not None and isinstance(listed, dict) and dataset not in listed and any(
        k.startswith(f"datasets.{dataset}.") for k in overrides
    ):  # an option such as --root would make a partial entry of it: say it is not there, as without the option
        known = ", ".join(sorted(str(k) for k in listed)) or "(none)"
        raise ConfigError(f"{path}: no dataset `{dataset}` under `datasets` (known: {known})")
    shared = _effective_raw(raw, {}, overrides, path, labels)
    params = validate(shared, path, options=labels)
    for name, entry in params.per_dataset.items():
        blocks = entry.blocks()
        if blocks:  # each block over the (valid) shared sections: any error is the block's own
            validate(_merge(shared, blocks), path, name, blocks)
    settings = Settings(params=params, params_file=path, overrides=overrides, raw=raw, options=labels)
    return settings if dataset is None else settings.for_dataset(dataset)


def _effective_raw(
    raw: dict[str, Any],
    blocks: dict[str, Any],
    overrides: dict[str, Any],
    path: Path,
    options: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The raw params a stage sees: the file's sections < a dataset's blocks < the preset < CLI overrides."""
    out = _merge(raw, blocks)
    preset = overrides.get("preset", raw.get("preset", "none"))
    if preset not in (None, "none"):
        option = (options or {}).get("preset") if "preset" in overrides else None
        out = apply_preset(out, str(preset), path, option)
    return apply_overrides(out, overrides, path)


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of ``base`` with ``top`` set over it key by key, nested mappings merged too."""
    out = copy.deepcopy(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else copy.deepcopy(value)
    return out


# --------------------------------------------------------------------------- presets
PRESETS_DIR = Path(__file__).parent / "presets"
PRESET_SECTIONS = STAGE_SECTIONS


def preset_names() -> list[str]:
    """The bundled presets (fgpipe/presets/NAME.yaml)."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def preset_path(name: str, params_path: Path, option: str | None = None) -> Path:
    """A bundled preset's file, or ``name`` itself as a path (relative to the params file) when it is a YAML file.
    ``option``: the command-line option that named it (``--preset NAME``), blamed instead of the file's key."""
    bundled = PRESETS_DIR / f"{name}.yaml"
    if bundled.is_file():
        return bundled
    own = Path(name) if Path(name).is_absolute() else params_path.parent / name
    if name.endswith((".yaml", ".yml")) and own.is_file():
        return own
    where = option or f"{params_path}: preset"
    raise ConfigError(f"{where}: unknown preset `{name}` (bundled: {', '.join(preset_names())}; or a path to a .yaml file)")


def apply_preset(raw: dict[str, Any], name: str, params_path: Path, option: str | None = None) -> dict[str, Any]:
    """``raw`` with the preset's values set over it (its sections merged key by key, nested sections too).

    A preset may only set the pipeline sections (PRESET_SECTIONS): datasets, `run` and paths stay the project's.
    """
    path = preset_path(name, params_path, option)
    data = _read_mapping(path, "a preset must be a mapping of sections")
    data.pop("description", None)
    bad = sorted(set(data) - set(PRESET_SECTIONS))
    if bad:
        raise ConfigError(f"{path}: a preset may set only {', '.join(PRESET_SECTIONS)}; not {', '.join(bad)}")

    return _merge(raw, data)


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any], path: Path) -> dict[str, Any]:
    """Set dotted keys (``datasets.cub.root``) in a copy of the raw params."""
    out = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = out
        rest = dotted.split(".")
        while len(rest) > 1:
            # the longest key the section holds that spells the next parts: a dataset name may hold dots (`my.set`)
            n = next((n for n in range(len(rest) - 1, 1, -1) if ".".join(rest[:n]) in node), 1)
            key, rest = ".".join(rest[:n]), rest[n:]
            nxt = node.get(key) if isinstance(node, dict) else None
            if nxt is None:
                nxt = node[key] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"{path}: cannot override `{dotted}`: `{key}` is not a section")
            node = nxt
        node[rest[0]] = value
    return out


def validate(
    raw: dict[str, Any],
    path: str | os.PathLike[str] = "params.yaml",
    dataset: str | None = None,
    blocks: Collection[str] = (),
    options: Mapping[str, str] | None = None,
) -> Params:
    """Validate raw params strictly: YAML scalars are JSON types, so JSON-mode strict validation
    refuses "1" for an int or 1 for a bool, yet accepts a list where a tuple is declared.

    ``raw`` holding dataset ``dataset``'s per_dataset ``blocks`` (section names): an error in one of those
    sections is named by its full path, ``per_dataset.DATASET.SECTION.KEY``. ``options``: override key -> the
    command-line option that set it; an error in that value names the option."""
    try:
        return _PARAMS_ADAPTER.validate_json(json.dumps(raw, default=str), strict=True)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, path, dataset, blocks, options)) from None


def format_validation_error(
    exc: ValidationError,
    path: str | os.PathLike[str],
    dataset: str | None = None,
    blocks: Collection[str] = (),
    options: Mapping[str, str] | None = None,
) -> str:
    """One line per invalid key, ``KEY: what is wrong (got VALUE)``, under ``PATH: N invalid settings:``.

    The union members pydantic tried (``crops.threshold.constrained-float``, ``...literal['auto']``) are not
    keys: their messages become one line for the key (``Input should be greater than 0 or 'auto'``). A key a
    command-line option set (``options``) is named by that option, ``--epochs 0 (train_backbone.epochs): ...``;
    when every line is such a key, the file is not mentioned at all, else the header names the file and those
    options."""
    options = options or {}
    grouped: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for err in exc.errors():
        grouped.setdefault(tuple(_key_path(err["loc"])), []).append(err)
    lines: list[str] = []
    blamed: list[bool] = []  # per line: set by a command-line option
    for loc, errs in grouped.items():
        shown = ["per_dataset", dataset, *loc] if dataset is not None and loc and loc[0] in blocks else list(loc)
        key = ".".join(str(p) for p in shown) or "(top level)"
        dotted = ".".join(loc)
        option = next((o for k, o in options.items() if dotted == k or dotted.startswith(k + ".")), None)
        err = errs[0]
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            allowed = allowed_keys(list(loc[:-1]))
            hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
            text = f"unknown key{hint}"
        elif err["type"] in ("missing_argument", "missing"):
            text = "required key is missing"
        else:
            text = _one_message([e["msg"].removeprefix("Value error, ") for e in errs])
            got = err.get("input")
            if not (isinstance(got, dict) or got is None or f"got {got!r}" in text):  # a validator's own message may say it
                text += f" (got {got!r})"
        lines.append(f"  {option} ({key}): {text}" if option else f"  {key}: {text}")
        blamed.append(option is not None)
    n = len(lines)
    if all(blamed):  # the command line alone is at fault
        if n == 1:
            return lines[0].strip()
        return f"{n} invalid command-line options:\n" + "\n".join(lines)
    named = [o for k, o in options.items() if any(line.startswith(f"  {o} (") for line in lines)]
    given = f" with the command-line option{'s' if len(named) > 1 else ''} {', '.join(named)}" if named else ""
    return f"{path}{given}: {n} invalid setting{'s' if n > 1 else ''}:\n" + "\n".join(lines)


def _one_message(messages: list[str]) -> str:
    """pydantic's messages for one key (one per union member it tried) as one: ``Input should be A or B``."""
    unique = list(dict.fromkeys(messages))
    first, rest = unique[0], unique[1:]
    prefix = "Input should be "
    if first.startswith(prefix):
        rest = [m.removeprefix(prefix) for m in rest]
    return " or ".join([first, *rest])


def _key_path(loc: tuple[int | str, ...]) -> list[str]:
    """The params key path of a pydantic error location, without the union members pydantic names there
    (``constrained-float``, ``literal['auto']``, ``function-after[...]``): found by walking Params' fields."""
    out: list[str] = []
    tp: Any = Params
    for part in loc:
        tp = _unwrapped(tp)
        members = [a for a in typing.get_args(tp) if a is not type(None)] if _is_union(tp) else []
        if len(members) > 1:  # pydantic tried each member and names the one this message is from
            tp = Any
            continue
        out.append(str(part))
        if dataclasses.is_dataclass(tp):
            tp = typing.get_type_hints(tp).get(str(part), Any)
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        elif typing.get_origin(tp) in (tuple, list) and typing.get_args(tp) and isinstance(part, int):
            args = [a for a in typing.get_args(tp) if a is not Ellipsis]
            tp = args[part] if len(args) > 1 and part < len(args) else args[0]
        else:
            tp = Any
    return out


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _unwrapped(tp: Any) -> Any:
    """``tp`` without Annotated, and ``X | None`` as ``X`` (pydantic names no member for an optional value)."""
    while True:
        if typing.get_origin(tp) is Annotated:
            tp = typing.get_args(tp)[0]
        elif _is_union(tp) and type(None) in typing.get_args(tp):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) != 1:
                return tp
            tp = members[0]
        else:
            return tp


def allowed_keys(loc: list[str]) -> list[str]:
    """Field names of the dataclass found by walking ``loc`` down from Params."""
    cls: Any = Params
    for part in loc:
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part in fields:
            cls = _dataclass_in(typing.get_type_hints(cls)[part])
        elif typing.get_origin(cls) is dict:
            cls = _dataclass_in(typing.get_args(cls)[1])
        else:
            return []
        if cls is None:
            return []
    return [f.name for f in dataclasses.fields(cls)] if dataclasses.is_dataclass(cls) else []


def _dataclass_in(tp: Any) -> Any:
    """The dataclass (or dict type) inside an annotation such as ``X | None``."""
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        return tp
    for arg in typing.get_args(tp):
        found = _dataclass_in(arg)
        if found is not None:
            return found
    return None
