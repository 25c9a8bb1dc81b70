"""The HDF5 artefacts, defined in one place: ``attention.h5``, ``crops.h5`` and ``images.h5``.

``attention.h5`` (written by ``fgpipe extract-attention``), one row per image, N rows:

==============  ==============  ======================================================================
dataset         shape, dtype    meaning
==============  ==============  ======================================================================
image_id        (N,) utf-8 str  the manifest's image_id
label           (N,) int64      the manifest's label
heatmap         (N, M, H, W)    the heatmap of each of the M stored methods (attr ``methods``, in that
                f16             order) at feature resolution, each in [0, 1] (chunked, gzip)
logits          (N, K) f32      pre-softmax class scores of the classifier the gradient methods explain
                                (provenance ``score``: the CAM head's for ``cam``, the WS-DAN head's for ``wsdan``)
prediction      (N,) int64      argmax of the logits (= the class explained, with target ``predicted``)
==============  ==============  ======================================================================

attrs: ``schema`` ("fgpipe.attention"), ``schema_version``, ``method`` (the selected method, one of
``methods``: the one extract-crops cuts its crops from), ``methods`` (JSON list of the stored methods),
``layer``, ``input_size``, ``checkpoint_sha256``, ``manifest_sha256``, ``provenance`` (free JSON text).
Version 2 stores every method the checkpoint supports (version 1 held one ``heatmap`` (N, H, W)).

``crops.h5`` (written by ``fgpipe extract-crops``), one row per image, P = max parts per image:

==============  ==============  ======================================================================
image_id        (N,) utf-8 str  the manifest's image_id
box             (N, 4) f32      object box (x0, y0, x1, y1) in original-image pixels (pixel edges)
score           (N,) f32        share of the heatmap's mass inside the kept component (0: fallback)
fallback        (N,) bool       the heatmap was empty: the box is the whole image
parts           (N, P, 4) f32   MPALM part boxes in original-image pixels, zero-padded past part_count
part_scores     (N, P) f32      each part's channel response, zero-padded
part_count      (N,) int32      number of valid parts of each image (<= P)
==============  ==============  ======================================================================

attrs: ``schema`` ("fgpipe.crops"), ``schema_version``, ``method``, ``threshold``, ``attention_sha256``
(SHA-256 of the attention.h5 the boxes came from), ``checkpoint_sha256`` (of the stage-1 checkpoint whose
backbone gave the parts: the one attention.h5 was made from, which its provenance ``checkpoint`` names),
``manifest_sha256``, ``provenance``. Version 2 added ``checkpoint_sha256``; a version-1 file is refused (rerun
``fgpipe extract-crops``).

``images.h5`` (written by ``fgpipe prepare``: the decoded image cache), one row per manifest image:

==============  ==============  ======================================================================
image_id        (N,) utf-8 str  the manifest's image_id
path            (N,) utf-8 str  the manifest's path (relative to the dataset root)
original_wh     (N, 2) int32    (width, height) of the manifest area, the frame of every region
cached_wh       (N, 2) int32    (width, height) of the cached copy: longest side <= cache_side
offset          (N,) int64      where the image's bytes start in ``pixels``
pixels          (T,) uint8      every image as (h, w, 3) RGB bytes, one after the other; contiguous and
                                uncompressed, so readers memory-map it (T = sum of w * h * 3)
==============  ==============  ======================================================================

attrs: ``schema`` ("fgpipe.images"), ``schema_version``, ``cache_side`` (0: caching off, no rows),
``manifest_sha256``, ``provenance``.

Writers append batches to resizable, chunked datasets (memory stays flat however many images) in a
temporary file that is renamed onto the target only when the ``with`` block succeeds
(:func:`fgpipe.store.atomic_path`). Readers validate the schema, version, datasets and attrs on open, read
any slice without loading the rest, and :meth:`check_source` refuses a file made from other inputs. Each
schema's value rules (:class:`ValueRule`: finite, in range, boxes with an area) are one table that the writer
applies to every batch it appends (a producer's bug stops it before the file is written) and the reader to
every slice it reads (a damaged or edited file is refused, naming the row, its image and the command
``rerun `fgpipe PRODUCER --dataset NAME```, NAME being the file's folder, data/NAME/).
h5py handles must not cross a fork: open one reader per data-loader worker.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

import h5py
import numpy as np

from fgpipe.errors import ArtifactError
from fgpipe.store import _json_default, atomic_path

ATTENTION_SCHEMA_VERSION = 2
CROPS_SCHEMA_VERSION = 2
IMAGES_SCHEMA_VERSION = 1

_STR = h5py.string_dtype(encoding="utf-8")
_CHUNK_BYTES = 256 * 1024  # target chunk size; rows per chunk follow from the row size


# --------------------------------------------------------------------------- value rules
_BOX_RULE = "(x0, y0, x1, y1) with 0 <= x0 < x1 and 0 <= y0 < y1"
_EDGE_TOLERANCE = 1e-2  # pixels: float32 rounding of a box edge on the image's border


def _rows_not_finite(a: np.ndarray) -> np.ndarray:
    """(n,) True where row i of ``a`` (n, ...) holds a NaN or an infinity."""
    return ~np.isfinite(a).all(axis=tuple(range(1, a.ndim)))


def _rows_outside(a: np.ndarray, low: float, high: float) -> np.ndarray:
    """(n,) True where row i of ``a`` (n, ...) holds a value outside [low, high] (NaN is not counted here)."""
    return ((a < low) | (a > high)).any(axis=tuple(range(1, a.ndim)))


def _bad_boxes(boxes: np.ndarray) -> np.ndarray:
    """(...) True where a box (..., 4) (x0, y0, x1, y1) starts left of or above the image or has no area."""
    x0, y0, x1, y1 = (boxes[..., j] for j in range(4))
    return (x0 < 0) | (y0 < 0) | ~(x1 > x0) | ~(y1 > y0)


@dataclass(frozen=True)
class ValueRule:
    """A rule every row of one dataset obeys: the writer refuses a batch that breaks it (a bug in the producer,
    found before the file is written) and the reader a slice read from disk (a damaged or hand-edited file)."""

    dataset: str
    bad: Callable[[Mapping[str, np.ndarray], Mapping[str, int]], np.ndarray]  # (columns, dims) -> (n,) True: breaks it
    what: Callable[[Mapping[str, int]], str]  # (dims) -> what a bad row does, for the message


def _not_finite(name: str) -> ValueRule:
    return ValueRule(name, lambda c, d: _rows_not_finite(c[name]), lambda d: "holds NaN or infinite values")


def _class_index(name: str) -> ValueRule:
    return ValueRule(
        name, lambda c, d: _rows_outside(c[name], 0, d["K"] - 1),
        lambda d: f"is not a class index in [0, {d['K'] - 1}] (`logits` holds {d['K']} classes)",
    )


def _parts_in_use(columns: Mapping[str, np.ndarray], dims: Mapping[str, int]) -> np.ndarray:
    """(n, P) True for the part slots a row uses (its first ``part_count``)."""
    return np.arange(dims["P"])[None, :] < columns["part_count"][:, None]


ATTENTION_RULES = (
    _not_finite("heatmap"),
    _not_finite("logits"),
    ValueRule("heatmap", lambda c, d: _rows_outside(c["heatmap"], 0, 1), lambda d: "holds values outside [0, 1]"),
    _class_index("label"),
    _class_index("prediction"),
)
CROPS_RULES = (
    *(_not_finite(name) for name in ("box", "score", "parts", "part_scores")),
    ValueRule("box", lambda c, d: _bad_boxes(c["box"]), lambda d: f"is not a box {_BOX_RULE}"),
    ValueRule(
        "part_count", lambda c, d: _rows_outside(c["part_count"], 0, d["P"]), lambda d: f"is outside [0, {d['P']}] (the parts slots)"
    ),
    ValueRule(
        "parts", lambda c, d: (_bad_boxes(c["parts"]) & _parts_in_use(c, d)).any(axis=1),
        lambda d: f"holds a part that is not a box {_BOX_RULE}",
    ),
)
IMAGES_RULES = (
    ValueRule("original_wh", lambda c, d: (c["original_wh"] < 1).any(axis=1), lambda d: "is not a size of at least 1 x 1"),
)


# --------------------------------------------------------------------------- schema definitions
@dataclass(frozen=True)
class DatasetSpec:
    """One per-image dataset: name, dtype ("str" for utf-8 text), per-row shape (ints or dim names)."""

    name: str
    dtype: str
    row_shape: tuple[int | str, ...] = ()
    compress: bool = False


@dataclass(frozen=True)
class FileSchema:
    """A whole file: its kind, version, per-image datasets, required attrs and source hashes."""

    kind: str  # the ``schema`` attr
    version: int
    producer: str  # the command that writes it, named in error messages
    datasets: tuple[DatasetSpec, ...]
    attrs: dict[str, type]  # required attrs besides schema, schema_version and provenance
    sources: dict[str, str]  # hash attr -> what it identifies, for check_source messages
    rules: tuple[ValueRule, ...] = ()  # what every row's values obey, checked on every append and every read

    def broken(self, columns: Mapping[str, np.ndarray], dims: Mapping[str, int]) -> Iterator[tuple[str, np.ndarray, str]]:
        """(dataset, (n,) bad rows, what they do) of each rule that rows ``columns`` (n rows) break, in rule order."""
        for rule in self.rules:
            bad = rule.bad(columns, dims)
            if bad.any():
                yield rule.dataset, bad, rule.what(dims)

    def rerun(self, dataset: str) -> str:
        """``rerun `fgpipe extract-crops --dataset NAME```: how to rebuild a file of this schema."""
        return f"rerun `{self.producer} --dataset {dataset}`"


ATTENTION = FileSchema(
    kind="fgpipe.attention",
    version=ATTENTION_SCHEMA_VERSION,
    producer="fgpipe extract-attention",
    datasets=(
        DatasetSpec("image_id", "str"),
        DatasetSpec("label", "int64"),
        DatasetSpec("heatmap", "float16", ("M", "H", "W"), compress=True),
        DatasetSpec("logits", "float32", ("K",)),
        DatasetSpec("prediction", "int64"),
    ),
    attrs={
        "method": str, "methods": tuple, "layer": str, "input_size": int, "checkpoint_sha256": str,
        "manifest_sha256": str,
    },
    sources={"manifest_sha256": "manifest", "checkpoint_sha256": "checkpoint"},
    rules=ATTENTION_RULES,
)

CROPS = FileSchema(
    kind="fgpipe.crops",
    version=CROPS_SCHEMA_VERSION,
    producer="fgpipe extract-crops",
    datasets=(
        DatasetSpec("image_id", "str"),
        DatasetSpec("box", "float32", (4,)),
        DatasetSpec("score", "float32"),
        DatasetSpec("fallback", "bool"),
        DatasetSpec("parts", "float32", ("P", 4), compress=True),
        DatasetSpec("part_scores", "float32", ("P",)),
        DatasetSpec("part_count", "int32"),
    ),
    attrs={"method": str, "threshold": float, "attention_sha256": str, "checkpoint_sha256": str, "manifest_sha256": str},
    sources={"manifest_sha256": "manifest", "attention_sha256": "attention file", "checkpoint_sha256": "checkpoint"},
    rules=CROPS_RULES,
)

IMAGES = FileSchema(  # plus `pixels`, one flat byte array (not per image), checked by ImagesReader
    kind="fgpipe.images",
    version=IMAGES_SCHEMA_VERSION,
    producer="fgpipe prepare",
    datasets=(
        DatasetSpec("image_id", "str"),
        DatasetSpec("path", "str"),
        DatasetSpec("original_wh", "int32", (2,)),
        DatasetSpec("cached_wh", "int32", (2,)),
        DatasetSpec("offset", "int64"),
    ),
    attrs={"cache_side": int, "manifest_sha256": str},
    sources={"manifest_sha256": "manifest"},
    rules=IMAGES_RULES,
)


@dataclass(frozen=True)
class AttentionMeta:
    """File attrs of attention.h5 (``schema`` and ``schema_version`` are added by the writer)."""

    method: str
    layer: str
    input_size: int
    checkpoint_sha256: str
    manifest_sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)
    methods: tuple[str, ...] = ()  # every stored method, in the file's order; () = just ``method``

    def __post_init__(self) -> None:
        methods = tuple(self.methods) or (self.method,)
        if self.method not in methods or len(set(methods)) != len(methods):
            raise ValueError(f"methods {list(methods)} must be distinct names and hold method `{self.method}`")
        object.__setattr__(self, "methods", methods)


@dataclass(frozen=True)
class CropsMeta:
    """File attrs of crops.h5 (``schema`` and ``schema_version`` are added by the writer)."""

    method: str
    threshold: float
    attention_sha256: str
    manifest_sha256: str
    checkpoint_sha256: str  # the stage-1 checkpoint MPALM's backbone came from (attention.h5's)
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImagesMeta:
    """File attrs of images.h5 (``schema`` and ``schema_version`` are added by the writer)."""

    cache_side: int
    manifest_sha256: str
    provenance: dict[str, Any] = field(default_factory=dict)


class AttentionRecords(NamedTuple):
    """A slice of attention.h5."""

    image_ids: list[str]
    labels: np.ndarray  # (n,) int64
    heatmaps: np.ndarray  # (n, H, W) float32: the selected method's (``meta.method``)
    logits: np.ndarray  # (n, K) float32
    predictions: np.ndarray  # (n,) int64
    all_heatmaps: np.ndarray  # (n, M, H, W) float32: every stored method's, in ``meta.methods`` order


class CropsRecords(NamedTuple):
    """A slice of crops.h5."""

    image_ids: list[str]
    boxes: np.ndarray  # (n, 4) float32
    scores: np.ndarray  # (n,) float32
    fallback: np.ndarray  # (n,) bool
    parts: np.ndarray  # (n, P, 4) float32
    part_scores: np.ndarray  # (n, P) float32
    part_counts: np.ndarray  # (n,) int32


class ImagesRecords(NamedTuple):
    """A slice of images.h5's per-image rows (the pixels are read through :meth:`ImagesReader.pixels`)."""

    image_ids: list[str]
    paths: list[str]
    original_wh: np.ndarray  # (n, 2) int64
    cached_wh: np.ndarray  # (n, 2) int64
    offsets: np.ndarray  # (n,) int64


MetaT = TypeVar("MetaT", AttentionMeta, CropsMeta, ImagesMeta)
RecordsT = TypeVar("RecordsT", AttentionRecords, CropsRecords, ImagesRecords)


def _array(x: Any) -> np.ndarray:
    """numpy view of an array-like or a torch tensor (on any device)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _attr_out(typ: type, value: Any) -> Any:
    """An attr value as written: a tuple of names as JSON text (h5py stores no numpy unicode arrays)."""
    if typ is tuple:
        return json.dumps([str(v) for v in value])
    return typ(value)


def _attr_in(typ: type, raw: Any) -> Any:
    """An attr value as read back (inverse of :func:`_attr_out`); TypeError/ValueError when malformed."""
    raw = raw.decode() if isinstance(raw, bytes) else raw
    if typ is tuple:
        names = json.loads(str(raw))
        if not isinstance(names, list) or not all(isinstance(v, str) for v in names):
            raise ValueError("not a JSON list of names")
        return tuple(names)
    return typ(raw)


def _kind_ok(spec: DatasetSpec, dtype: np.dtype) -> bool:
    if spec.dtype == "str":
        return h5py.check_string_dtype(dtype) is not None
    want = np.dtype(spec.dtype).kind
    if want in "iu":
        return dtype.kind in "iu"
    return dtype.kind == want


# --------------------------------------------------------------------------- writers
class _Writer(Generic[MetaT]):
    """Append-only writer of one schema; use as a context manager (the file appears only on success)."""

    schema: ClassVar[FileSchema]

    def __init__(self, path: str | os.PathLike[str], meta: MetaT, dims: dict[str, int]) -> None:
        self.path = Path(path)
        self.meta = meta
        self.dims = dims
        self._stack: contextlib.ExitStack | None = None
        self._h5: h5py.File | None = None
        self._count = 0
        for spec in self.schema.datasets:
            for d in spec.row_shape:
                if isinstance(d, str) and (d not in dims or dims[d] < 1):
                    raise ValueError(f"{type(self).__name__} needs a positive size for dimension {d}, got {dims}")

    def _shape(self, spec: DatasetSpec) -> tuple[int, ...]:
        return tuple(self.dims[d] if isinstance(d, str) else d for d in spec.row_shape)

    def __enter__(self) -> _Writer[MetaT]:
        with contextlib.ExitStack() as stack:
            tmp = stack.enter_context(atomic_path(self.path))
            h5 = stack.enter_context(h5py.File(tmp, "w"))
            attrs = asdict(self.meta)
            provenance = attrs.pop("provenance")
            h5.attrs["schema"] = self.schema.kind
            h5.attrs["schema_version"] = self.schema.version
            for name, typ in self.schema.attrs.items():
                h5.attrs[name] = _attr_out(typ, attrs[name])
            h5.attrs["provenance"] = json.dumps(provenance, sort_keys=True, default=_json_default)
            for spec in self.schema.datasets:
                row = self._shape(spec)
                dtype = _STR if spec.dtype == "str" else np.dtype(spec.dtype)
                row_bytes = max(1, int(np.prod(row, dtype=np.int64)) * (8 if spec.dtype == "str" else dtype.itemsize))
                chunk_rows = int(np.clip(_CHUNK_BYTES // row_bytes, 1, 4096))
                h5.create_dataset(
                    spec.name,
                    shape=(0, *row),
                    maxshape=(None, *row),
                    dtype=dtype,
                    chunks=(chunk_rows, *row),
                    **({"compression": "gzip", "compression_opts": 4, "shuffle": True} if spec.compress else {}),
                )
            self._stack = stack.pop_all()  # keep the file open and the temp path alive past this block
            self._h5 = h5
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        stack, self._stack, self._h5 = self._stack, None, None
        if stack is None:
            return None
        # closes the HDF5 file, then renames the temp file onto the target (or deletes it on an exception)
        return stack.__exit__(exc_type, exc, tb)

    def __len__(self) -> int:
        return self._count

    def _append(self, columns: dict[str, Any]) -> None:
        if self._h5 is None:
            raise RuntimeError(f"{type(self).__name__} for {self.path} is not open: use it in a `with` block")
        arrays: dict[str, np.ndarray] = {}
        n: int | None = None
        for spec in self.schema.datasets:
            if spec.dtype == "str":
                values = [str(v) for v in columns[spec.name]]
                arr = np.array(values, dtype=object)
            else:
                with np.errstate(over="ignore"):  # a value beyond the dtype's range becomes inf: refused below
                    arr = _array(columns[spec.name]).astype(spec.dtype, copy=False)
            if arr.shape[1:] != self._shape(spec):
                raise ValueError(
                    f"{self.path}: `{spec.name}` rows must have shape {self._shape(spec)}, got {arr.shape[1:]}"
                )
            if n is None:
                n = arr.shape[0]
            elif arr.shape[0] != n:
                raise ValueError(f"{self.path}: `{spec.name}` has {arr.shape[0]} rows, the others {n}")
            arrays[spec.name] = arr
        if n is None:
            raise RuntimeError(f"schema {self.schema.kind} defines no datasets")
        for name, bad, what in self.schema.broken(arrays, self.dims):  # the readers' rules, before anything is written
            first, more = int(np.argmax(bad)), int(bad.sum()) - 1
            dtype = next(spec.dtype for spec in self.schema.datasets if spec.name == name)
            raise ValueError(
                f"{self.path}: dataset `{name}`, row {self._count + first} (image {arrays['image_id'][first]!r}) {what}"
                + (f" (and {more} more of the {n} rows appended)" if more else "")
                + f"; the file is not written, as its readers would refuse it: a bug in `{self.schema.producer}`"
                + (f" (or a diverged network, or values beyond {dtype}'s range)" if np.dtype(dtype).kind == "f" else "")
            )
        for name, arr in arrays.items():
            ds = self._h5[name]
            ds.resize(self._count + n, axis=0)
            ds[self._count : self._count + n] = arr
        self._count += n


class AttentionWriter(_Writer[AttentionMeta]):
    """Writes attention.h5 batch by batch: ``with AttentionWriter(path, meta, (H, W), K) as w: w.append(...)``."""

    schema = ATTENTION

    def __init__(
        self, path: str | os.PathLike[str], meta: AttentionMeta, heatmap_hw: tuple[int, int], num_classes: int
    ) -> None:
        dims = {"M": len(meta.methods), "H": heatmap_hw[0], "W": heatmap_hw[1], "K": num_classes}
        super().__init__(path, meta, dims)

    def __enter__(self) -> AttentionWriter:
        super().__enter__()
        return self

    def append(
        self, image_ids: Sequence[str], labels: Any, heatmaps: Any, logits: Any, predictions: Any
    ) -> None:
        """Append B images: ids (B,), labels (B,), heatmaps, logits (B, K), predictions (B,).

        ``heatmaps``: a mapping of every method in ``meta.methods`` to its (B, H, W) maps, or one (B, M, H, W)
        array in that order ((B, H, W) when the file stores one method).
        """
        methods = self.meta.methods
        if isinstance(heatmaps, Mapping):
            if set(heatmaps) != set(methods):
                raise ValueError(f"{self.path}: heatmaps must be given for exactly {list(methods)}, got {sorted(heatmaps)}")
            stacked = np.stack([_array(heatmaps[m]) for m in methods], axis=1)  # (B, M, H, W)
        else:
            stacked = _array(heatmaps)
            if stacked.ndim == 3 and len(methods) == 1:
                stacked = stacked[:, None]  # (B, 1, H, W)
        self._append(
            {"image_id": image_ids, "label": labels, "heatmap": stacked, "logits": logits, "prediction": predictions}
        )


class CropsWriter(_Writer[CropsMeta]):
    """Writes crops.h5 batch by batch: ``with CropsWriter(path, meta, max_parts) as w: w.append(...)``."""

    schema = CROPS

    def __init__(self, path: str | os.PathLike[str], meta: CropsMeta, max_parts: int) -> None:
        super().__init__(path, meta, {"P": max_parts})

    def __enter__(self) -> CropsWriter:
        super().__enter__()
        return self

    def append(
        self,
        image_ids: Sequence[str],
        boxes: Any,
        scores: Any,
        fallback: Any,
        parts: Any,
        part_scores: Any,
        part_counts: Any,
    ) -> None:
        """Append B images: ids, boxes (B, 4), scores (B,), fallback (B,), parts (B, P, 4), part_scores (B, P), counts (B,)."""
        self._append(
            {
                "image_id": image_ids,
                "box": boxes,
                "score": scores,
                "fallback": fallback,
                "parts": parts,
                "part_scores": part_scores,
                "part_count": part_counts,
            }
        )


class ImagesWriter(_Writer[ImagesMeta]):
    """Writes images.h5 batch by batch: ``with ImagesWriter(path, meta, total_bytes) as w: w.append(...)``.

    ``total_bytes`` (the sum of w * h * 3 over every image) sizes the contiguous ``pixels`` array up front;
    the file is kept only when exactly that many bytes were appended.
    """

    schema = IMAGES

    def __init__(self, path: str | os.PathLike[str], meta: ImagesMeta, total_bytes: int) -> None:
        super().__init__(path, meta, {})
        if total_bytes < 0:
            raise ValueError(f"{self.path}: total_bytes must be >= 0, got {total_bytes}")
        self.total_bytes = int(total_bytes)
        self._filled = 0

    def __enter__(self) -> ImagesWriter:
        super().__enter__()
        assert self._h5 is not None
        # no chunks, no filters: one contiguous byte range that readers memory-map
        self._h5.create_dataset("pixels", shape=(self.total_bytes,), dtype=np.uint8)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool | None:
        if exc_type is None and self._stack is not None and self._filled != self.total_bytes:
            err = ValueError(f"{self.path}: {self._filled} of {self.total_bytes} pixel bytes were written")
            super().__exit__(ValueError, err, None)  # removes the temporary file
            raise err
        return super().__exit__(exc_type, exc, tb)

    def append(
        self, image_ids: Sequence[str], paths: Sequence[str], original_wh: Any, images: Sequence[np.ndarray]
    ) -> None:
        """Append B images: ids (B,), manifest paths (B,), original (w, h) (B, 2), the cached (h, w, 3) uint8 arrays."""
        if self._h5 is None:
            raise RuntimeError(f"ImagesWriter for {self.path} is not open: use it in a `with` block")
        cached_wh, offsets = [], []
        pos = self._filled
        for img in images:
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or min(img.shape[:2]) < 1:
                raise ValueError(
                    f"{self.path}: images must be non-empty (h, w, 3) uint8 arrays, got {img.shape} {img.dtype}"
                )
            cached_wh.append((img.shape[1], img.shape[0]))
            offsets.append(pos)
            pos += img.size
        if pos > self.total_bytes:
            raise ValueError(f"{self.path}: the images exceed the {self.total_bytes} pixel bytes announced")
        self._append({
            "image_id": image_ids, "path": paths, "original_wh": original_wh,
            "cached_wh": np.array(cached_wh).reshape(-1, 2), "offset": offsets,
        })
        pixels = self._h5["pixels"]
        for img, start in zip(images, offsets):
            pixels[start : start + img.size] = img.reshape(-1)
        self._filled = pos


# --------------------------------------------------------------------------- readers
class _Reader(Generic[MetaT, RecordsT]):
    """Validating reader of one schema; reads slices lazily. Use as a context manager or call close()."""

    schema: ClassVar[FileSchema]

    def __init__(self, path: str | os.PathLike[str], dataset: str | None = None) -> None:
        self.path = Path(path)
        self.dataset = dataset or self.path.parent.name  # named in the command that rebuilds it: data/NAME/FILE
        self._rerun = rerun = self.schema.rerun(self.dataset)
        if not self.path.is_file():
            raise ArtifactError(f"{self.path}: not found ({rerun} first)")
        try:
            self._h5 = h5py.File(self.path, "r")
        except OSError as err:
            raise ArtifactError(f"{self.path}: not a readable HDF5 file ({err}); {rerun}") from err
        try:
            self.meta, self.dims, self._len = self._validate(rerun)
        except BaseException:
            self._h5.close()
            raise

    def _validate(self, rerun: str) -> tuple[MetaT, dict[str, int], int]:
        h5, where = self._h5, self.path
        kind = h5.attrs.get("schema")
        if kind != self.schema.kind:
            raise ArtifactError(f"{where}: not an {self.schema.kind} file (its `schema` attr is {kind!r})")
        version = h5.attrs.get("schema_version")
        if not isinstance(version, (int, np.integer)) or int(version) != self.schema.version:
            shown = "missing" if version is None else repr(version.item() if hasattr(version, "item") else version)
            raise ArtifactError(
                f"{where}: schema version {shown}, this fgpipe reads version {self.schema.version}; {rerun}"
            )
        missing = [a for a in (*self.schema.attrs, "provenance") if a not in h5.attrs]
        if missing:
            raise ArtifactError(f"{where}: missing attrs {', '.join(missing)}; {rerun}")
        try:
            provenance = json.loads(str(h5.attrs["provenance"]))
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{where}: attr `provenance` is not valid JSON ({err}); {rerun}") from err
        if not isinstance(provenance, dict):
            raise ArtifactError(f"{where}: attr `provenance` must be a JSON object, got {type(provenance).__name__}; {rerun}")
        values: dict[str, Any] = {}
        for name, typ in self.schema.attrs.items():
            raw = h5.attrs[name]
            try:
                values[name] = _attr_in(typ, raw)
            except (TypeError, ValueError) as err:
                raise ArtifactError(f"{where}: attr `{name}` = {raw!r} is not a {typ.__name__}; {rerun}") from err

        dims: dict[str, int] = {}
        lengths: dict[str, int] = {}
        for spec in self.schema.datasets:
            if spec.name not in h5:
                raise ArtifactError(f"{where}: missing dataset `{spec.name}`; {rerun}")
            ds = h5[spec.name]
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 + len(spec.row_shape) or not _kind_ok(spec, ds.dtype):
                raise ArtifactError(
                    f"{where}: dataset `{spec.name}` should be (N, {', '.join(map(str, spec.row_shape))}) "
                    f"{spec.dtype}, found {getattr(ds, 'shape', '?')} {getattr(ds, 'dtype', '?')}; {rerun}"
                )
            for d, actual in zip(spec.row_shape, ds.shape[1:]):
                expected = dims.setdefault(d, actual) if isinstance(d, str) else d
                if actual != expected:
                    raise ArtifactError(
                        f"{where}: dataset `{spec.name}` has size {actual} along {d}, expected {expected}; {rerun}"
                    )
            lengths[spec.name] = ds.shape[0]
        if len(set(lengths.values())) > 1:
            raise ArtifactError(f"{where}: datasets have different lengths {lengths}; {rerun}")
        return self._meta(values, provenance), dims, next(iter(lengths.values()))

    def _meta(self, values: dict[str, Any], provenance: dict[str, Any]) -> MetaT:
        raise NotImplementedError

    def _records(self, columns: dict[str, np.ndarray]) -> RecordsT:
        raise NotImplementedError

    def _check_values(self, columns: dict[str, np.ndarray], start: int) -> None:
        """Refuse values the writer never stores (the schema's rules: NaN, infinities, out of range; a damaged or
        hand-edited file) in the rows read into ``columns`` (the first is row ``start``); vectorised."""
        for name, bad, what in self.schema.broken(columns, self.dims):
            self._refuse(name, bad, start, what, columns["image_id"])

    def _refuse(
        self, name: str, bad: np.ndarray, rows: int | np.ndarray, what: str, image_ids: Sequence[str] | None = None
    ) -> None:
        """If any entry of ``bad`` ((n,) bool) is set, an ArtifactError naming dataset ``name``, the first bad row and its
        image id, and ``what`` is wrong. ``rows``: the file row of each entry ((n,) ints), or the first of n consecutive
        rows; ``image_ids``: each entry's id (None: read from the file)."""
        if not bad.any():
            return
        first = int(np.argmax(bad))
        row = int(rows[first]) if isinstance(rows, np.ndarray) else rows + first
        image_id = image_ids[first] if image_ids is not None else self._h5["image_id"].asstr()[row]
        more = int(bad.sum()) - 1
        raise ArtifactError(
            f"{self.path}: dataset `{name}`, row {row} (image {image_id!r}) {what}"
            + (f" (and {more} more of the {len(bad)} rows read)" if more else "")
            + f"; the file is damaged or was edited: {self._rerun}"
        )

    def __len__(self) -> int:
        return self._len

    def __enter__(self) -> _Reader[MetaT, RecordsT]:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._h5.close()

    def image_ids(self) -> list[str]:
        """Every image_id, in file order."""
        return list(self._h5["image_id"].asstr()[:])

    def read(self, start: int = 0, stop: int | None = None) -> RecordsT:
        """Rows ``start:stop`` (only those are read from disk)."""
        sl = slice(*slice(start, stop).indices(self._len)[:2])
        columns: dict[str, np.ndarray] = {}
        for spec in self.schema.datasets:
            ds = self._h5[spec.name]
            columns[spec.name] = ds.asstr()[sl] if spec.dtype == "str" else ds[sl]
        self._check_values(columns, sl.start)
        return self._records(columns)

    def iter_batches(self, batch_size: int) -> Iterator[RecordsT]:
        """Consecutive slices of ``batch_size`` rows."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self._len, batch_size):
            yield self.read(start, start + batch_size)

    def check_source(self, **expected: str | None) -> None:
        """Raise :class:`ArtifactError` if a source hash (e.g. ``manifest_sha256=...``) differs from the file's."""
        for attr, want in expected.items():
            if attr not in self.schema.sources:
                raise TypeError(f"{self.schema.kind} files record {', '.join(self.schema.sources)}, not {attr}")
            if want is None:
                continue
            have = getattr(self.meta, attr)
            if have != want:
                raise ArtifactError(
                    f"{self.path} was made from another {self.schema.sources[attr]} "
                    f"({attr} {have[:12]}..., expected {want[:12]}...): {self._rerun} (or `dvc repro`)"
                )


class AttentionReader(_Reader[AttentionMeta, AttentionRecords]):
    """Reads and validates attention.h5 (see the module docstring for the layout)."""

    schema = ATTENTION

    def __enter__(self) -> AttentionReader:
        return self

    def _validate(self, rerun: str) -> tuple[AttentionMeta, dict[str, int], int]:
        meta, dims, n = super()._validate(rerun)
        if len(meta.methods) != dims["M"]:
            raise ArtifactError(
                f"{self.path}: attr `methods` names {len(meta.methods)} methods, `heatmap` holds {dims['M']}; {rerun}"
            )
        return meta, dims, n

    def _meta(self, values: dict[str, Any], provenance: dict[str, Any]) -> AttentionMeta:
        try:
            return AttentionMeta(**values, provenance=provenance)
        except ValueError as err:
            raise ArtifactError(f"{self.path}: attrs `method` / `methods`: {err}; {self._rerun}") from err

    def _records(self, columns: dict[str, np.ndarray]) -> AttentionRecords:
        every = columns["heatmap"].astype(np.float32)  # (n, M, H, W)
        return AttentionRecords(
            image_ids=list(columns["image_id"]),
            labels=columns["label"].astype(np.int64),
            heatmaps=every[:, self.meta.methods.index(self.meta.method)],
            logits=columns["logits"].astype(np.float32),
            predictions=columns["prediction"].astype(np.int64),
            all_heatmaps=every,
        )

    @property
    def methods(self) -> tuple[str, ...]:
        """The stored methods, in the file's order."""
        return self.meta.methods

    def method_heatmaps(self, method: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``start:stop`` of one stored method's heatmaps (n, H, W) float32 (only those are read)."""
        if method not in self.meta.methods:
            raise ArtifactError(
                f"{self.path} holds no `{method}` heatmaps (it holds {', '.join(self.meta.methods)}); {self._rerun}"
            )
        sl = slice(*slice(start, stop).indices(self._len)[:2])
        maps = self._h5["heatmap"][sl, self.meta.methods.index(method)].astype(np.float32)  # (n, H, W)
        self._refuse("heatmap", _rows_not_finite(maps), sl.start, f"holds NaN or infinite `{method}` values")
        self._refuse("heatmap", _rows_outside(maps, 0, 1), sl.start, f"holds `{method}` values outside [0, 1]")
        return maps

    @property
    def heatmap_hw(self) -> tuple[int, int]:
        return self.dims["H"], self.dims["W"]

    @property
    def num_classes(self) -> int:
        return self.dims["K"]

    def check_source(  # type: ignore[override]
        self, manifest_sha256: str | None = None, checkpoint_sha256: str | None = None
    ) -> None:
        """Refuse a file made from another manifest or checkpoint (None: not checked)."""
        super().check_source(manifest_sha256=manifest_sha256, checkpoint_sha256=checkpoint_sha256)


class CropsReader(_Reader[CropsMeta, CropsRecords]):
    """Reads and validates crops.h5 (see the module docstring for the layout)."""

    schema = CROPS

    def __enter__(self) -> CropsReader:
        return self

    def _meta(self, values: dict[str, Any], provenance: dict[str, Any]) -> CropsMeta:
        if not 0 < values["threshold"] <= 1:  # also NaN
            raise ArtifactError(
                f"{self.path}: attr `threshold` = {values['threshold']!r} is not in (0, 1]; {self._rerun}"
            )
        return CropsMeta(**values, provenance=provenance)

    def check_inside(self, records: CropsRecords, rows: np.ndarray, image_wh: np.ndarray) -> None:
        """Refuse an object or part box of ``records`` rows ``rows`` ((n,), read from row 0) that reaches outside its
        image, ``image_wh`` (n, 2): each one's (width, height) of the manifest area, the boxes' frame."""
        rows = np.asarray(rows, dtype=np.int64)
        wh = np.asarray(image_wh, dtype=np.float64)  # (n, 2)
        limit = wh + _EDGE_TOLERANCE  # x1 <= width, y1 <= height (x0, y0 >= 0 is checked on every read)
        ids = [records.image_ids[r] for r in rows]
        valid = np.arange(self.dims["P"])[None, :] < records.part_counts[rows][:, None]  # (n, P) the parts in use
        for name, outside in (
            ("box", (records.boxes[rows][:, 2:] > limit).any(axis=1)),  # (n,)
            ("parts", ((records.parts[rows][..., 2:] > limit[:, None]).any(axis=2) & valid).any(axis=1)),  # (n,)
        ):
            w, h = (int(v) for v in wh[int(np.argmax(outside))]) if outside.any() else (0, 0)
            self._refuse(name, outside, rows, f"reaches outside its {w} x {h} image (the manifest's size)", ids)

    def _records(self, columns: dict[str, np.ndarray]) -> CropsRecords:
        return CropsRecords(
            image_ids=list(columns["image_id"]),
            boxes=columns["box"].astype(np.float32),
            scores=columns["score"].astype(np.float32),
            fallback=columns["fallback"].astype(bool),
            parts=columns["parts"].astype(np.float32),
            part_scores=columns["part_scores"].astype(np.float32),
            part_counts=columns["part_count"].astype(np.int32),
        )

    @property
    def max_parts(self) -> int:
        return self.dims["P"]

    def check_source(  # type: ignore[override]
        self, manifest_sha256: str | None = None, attention_sha256: str | None = None, checkpoint_sha256: str | None = None
    ) -> None:
        """Refuse a file made from another manifest, attention file or stage-1 checkpoint (None: not checked)."""
        super().check_source(
            manifest_sha256=manifest_sha256, attention_sha256=attention_sha256, checkpoint_sha256=checkpoint_sha256
        )


class ImagesReader(_Reader[ImagesMeta, ImagesRecords]):
    """Reads and validates images.h5 (see the module docstring); :meth:`pixels` memory-maps the image bytes."""

    schema = IMAGES

    def __enter__(self) -> ImagesReader:
        return self

    def _validate(self, rerun: str) -> tuple[ImagesMeta, dict[str, int], int]:
        meta, dims, n = super()._validate(rerun)
        where = self.path
        ds = self._h5.get("pixels")
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype != np.uint8:
            raise ArtifactError(f"{where}: dataset `pixels` should be (T,) uint8; {rerun}")
        if ds.chunks is not None or ds.compression is not None:
            raise ArtifactError(f"{where}: dataset `pixels` must be contiguous and uncompressed (it is memory-mapped); {rerun}")
        wh = self._h5["cached_wh"][:].astype(np.int64)  # (N, 2)
        sizes = wh[:, 0] * wh[:, 1] * 3  # (N,)
        offsets = self._h5["offset"][:].astype(np.int64)
        if (wh < 1).any() or (meta.cache_side > 0 and (wh.max(initial=0) > meta.cache_side)):
            raise ArtifactError(f"{where}: cached sizes must lie in [1, cache_side={meta.cache_side}]; {rerun}")
        if int(sizes.sum()) != ds.shape[0] or not np.array_equal(offsets, np.cumsum(sizes) - sizes):
            raise ArtifactError(f"{where}: `offset` and `cached_wh` do not tile the {ds.shape[0]} pixel bytes; {rerun}")
        if meta.cache_side == 0 and n:
            raise ArtifactError(f"{where}: cache_side is 0 (caching off) yet it holds {n} images; {rerun}")
        if ds.shape[0] and ds.id.get_offset() is None:
            raise ArtifactError(f"{where}: dataset `pixels` was never written; {rerun}")
        return meta, dims, n

    def _meta(self, values: dict[str, Any], provenance: dict[str, Any]) -> ImagesMeta:
        return ImagesMeta(**values, provenance=provenance)

    def _records(self, columns: dict[str, np.ndarray]) -> ImagesRecords:
        return ImagesRecords(
            image_ids=list(columns["image_id"]),
            paths=list(columns["path"]),
            original_wh=columns["original_wh"].astype(np.int64),
            cached_wh=columns["cached_wh"].astype(np.int64),
            offsets=columns["offset"].astype(np.int64),
        )

    def pixels_offset(self) -> tuple[int, int]:
        """(byte offset in the file, length) of the contiguous pixel block, for positioned reads."""
        ds = self._h5["pixels"]
        if ds.shape[0] == 0:
            return 0, 0
        return int(ds.id.get_offset()), int(ds.shape[0])

    def pixels(self) -> np.ndarray:
        """Every image's bytes (T,) uint8, memory-mapped read-only (valid after :meth:`close`)."""
        ds = self._h5["pixels"]
        if ds.shape[0] == 0:
            return np.zeros(0, dtype=np.uint8)
        return np.memmap(self.path, dtype=np.uint8, mode="r", offset=ds.id.get_offset(), shape=(ds.shape[0],))

    def check_source(self, manifest_sha256: str | None = None) -> None:  # type: ignore[override]
        """Refuse a file made from another manifest (None: not checked)."""
        super().check_source(manifest_sha256=manifest_sha256)
