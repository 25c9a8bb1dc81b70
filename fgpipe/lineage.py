"""What each artefact was made from, and the checks that refuse a stale pairing of artefacts.

Every artefact records the SHA-256 of its direct inputs:

===============================  ====================================================================
artefact                         records
===============================  ====================================================================
images.h5                        ``manifest_sha256``
stage1/{best,last}.pt            ``manifest_sha256``
attention.h5                     ``manifest_sha256``, ``checkpoint_sha256`` (the stage-1 checkpoint its
                                 provenance ``checkpoint`` names: best or last)
crops.h5                         ``manifest_sha256``, ``attention_sha256``, ``checkpoint_sha256`` (that
                                 checkpoint again: MPALM's backbone)
metrics/NAME/extract_crops.json  in extract_crops.provenance.json, ``sources.crops_sha256`` (the crops.h5
                                 its figures describe)
refine/{best,last}.pt            ``manifest_sha256``, ``crops_sha256``, ``stage1_sha256`` (stage1/best.pt)
metrics/NAME/evaluate.json       in evaluate.provenance.json, ``sources``: ``manifest_sha256``,
                                 ``stage1_sha256``, ``refine_sha256``, ``crops_sha256`` (what its joint
                                 weights were chosen for)
===============================  ====================================================================

Every reader compares them with the files on disk now (each hashed once per run, :class:`FileHashes`) and
refuses a mismatch with one error naming both files and the commands that rebuild the stale one, so a stage
run by hand after an upstream one was redone never takes the old artefact. A recorded source that is no
longer on disk is not compared (there is nothing newer to pair with), unless the reader needs it anyway.
Before a mismatch is blamed on the artefact, the source itself is opened: a damaged source (an empty crops.h5)
is named with the command that writes it, not the one that wrote its reader.

Every artefact also records the params its stage ran with (:func:`params_record`: the values of the sections
dvc.yaml lists for that stage, per_dataset and preset merged, and which keys a command-line option set):
dataset.json (``params``), both checkpoints (``params``), attention.h5 and crops.h5 (provenance ``params``),
evaluate.json (``sources.params`` in evaluate.provenance.json). A stage reading an artefact compares those values with the params now
(:func:`check_params`) and refuses a difference, naming the key, both values and the command that remakes the
artefact: changing ``crops.threshold`` and running train-refine by hand is refused with `fgpipe extract-crops`.
DVC reruns a stage whenever one of these params changed, before the stages that read its outputs, so
`dvc repro` never meets a difference. Not compared: a key a command-line option set (for the artefact or for
this run: the user chose it for that command), keys that only say where or how fast a stage runs
(:data:`NOT_COMPARED`), keys one side does not know (an older fgpipe), and artefacts without a record.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fgpipe.config import PRESET_SECTIONS, STAGE_SECTIONS, Settings
from fgpipe.errors import ArtifactError
from fgpipe.h5schema import AttentionReader, CropsReader
from fgpipe.layout import CHECKPOINTS, DataDir
from fgpipe.manifest import DatasetInfo, ManifestRow, class_names, read_dataset_json, read_manifest
from fgpipe.store import FileHashes, safe_torch_load


def rerun(dataset: str, *commands: str) -> str:
    """``rerun `fgpipe A --dataset D`, then `fgpipe B --dataset D` (or `dvc repro`)``."""
    return "rerun " + ", then ".join(f"`fgpipe {c} --dataset {dataset}`" for c in commands) + " (or `dvc repro`)"


def check_recorded(
    path: Path, recorded: str | None, source: Path, now: str, what: str, fix: str, key: str, made: str = "made"
) -> None:
    """Refuse ``path`` when the hash it records (``key`` = ``recorded``) of its source ``what`` is not ``now``, the
    hash of ``source`` on disk: one error naming both files, the two hashes and ``fix``."""
    if recorded == now:
        return
    require_intact(source)  # a damaged source is named as such, with the command that writes it
    if not isinstance(recorded, str) or not recorded:
        raise ArtifactError(f"{path} does not record which {what} it was {made} from (no {key}: an older fgpipe wrote it): {fix}")
    raise ArtifactError(
        f"{path} was {made} from another {what} than {source} ({key} {recorded[:12]}..., the file's is {now[:12]}...): {fix}"
    )


def require_intact(source: Path) -> None:
    """Open ``source`` as the artefact its name says (manifest.csv, attention.h5, crops.h5, a stage-1 or refine
    checkpoint) and let its own error, naming the command that writes it, stop the run if it is damaged."""
    if not source.is_file():
        return
    here, above = DataDir(source.parent), DataDir(source.parent.parent)  # data/NAME for a file in it, or in stage1/
    checkpoints = {**{above.stage1(w): "train-backbone" for w in CHECKPOINTS}, **{above.refine(w): "train-refine" for w in CHECKPOINTS}}
    if source == here.manifest:
        read_manifest(source)
    elif source == here.attention:
        AttentionReader(source, source.parent.name).close()
    elif source == here.crops:
        CropsReader(source, source.parent.name).close()
    elif source in checkpoints:
        fix = rerun(above.path.name, checkpoints[source])
        state = safe_torch_load(source, "checkpoint", fix)
        if not isinstance(state, dict):
            raise ArtifactError(f"{source} is not an fgpipe checkpoint; {fix}")


def check_sources(
    path: Path, recorded: Mapping[str, Any], sources: Mapping[str, tuple[Path, str]], hashes: FileHashes, fix: str,
    made: str = "made",
) -> None:
    """:func:`check_recorded` for each ``key -> (source file, what it is)`` of ``sources`` on disk; ``recorded``
    holds the hashes ``path`` records."""
    for key, (source, what) in sources.items():
        if source.is_file():
            check_recorded(path, recorded.get(key), source, hashes(source), what, fix, key, made)


def checkpoint_of(attention: AttentionReader, data_dir: Path, dataset: str, required: bool = True) -> Path:
    """The stage-1 checkpoint attention.h5 was made from (its provenance names best or last); with ``required``,
    refuse one that is not on disk."""
    which = attention.meta.provenance.get("checkpoint")
    if which not in CHECKPOINTS:
        raise ArtifactError(
            f"{attention.path}: its provenance names no stage-1 checkpoint (best or last); {rerun(dataset, 'extract-attention')}"
        )
    path = DataDir(data_dir).stage1(which)
    if required and not path.is_file():
        raise ArtifactError(
            f"{path} (the checkpoint {attention.path.name} was made from) not found: "
            f"{rerun(dataset, 'train-backbone', 'extract-attention')}"
        )
    return path


def check_attention(
    attention: AttentionReader, data_dir: Path, dataset: str, hashes: FileHashes, required: bool = False
) -> Path:
    """Refuse attention.h5 made from another manifest or stage-1 checkpoint than data/NAME's; return that checkpoint.

    ``required``: the checkpoint must be on disk (the caller loads it)."""
    checkpoint = checkpoint_of(attention, data_dir, dataset, required)
    fix = rerun(dataset, "extract-attention")
    manifest = DataDir(data_dir).manifest
    check_recorded(attention.path, attention.meta.manifest_sha256, manifest, hashes(manifest), "manifest", fix, "manifest_sha256")
    if checkpoint.is_file():
        check_recorded(
            attention.path, attention.meta.checkpoint_sha256, checkpoint, hashes(checkpoint), "checkpoint", fix,
            "checkpoint_sha256",
        )
    return checkpoint


def _crops_checkpoint(crops: CropsReader, data_dir: Path, dataset: str) -> Path:
    """The stage-1 checkpoint crops.h5's parts came from (its provenance ``checkpoint``: best, last or that file's path)."""
    named = str(crops.meta.provenance.get("checkpoint", ""))
    which = Path(named).stem
    if which not in CHECKPOINTS:
        raise ArtifactError(
            f"{crops.path}: its provenance names no stage-1 checkpoint (best or last); {rerun(dataset, 'extract-crops')}"
        )
    return DataDir(data_dir).stage1(which)


def check_crops(crops: CropsReader, data_dir: Path, dataset: str, hashes: FileHashes) -> None:
    """Refuse crops.h5 made from another manifest, attention.h5 or stage-1 checkpoint than data/NAME's.

    The fix names extract-attention too when attention.h5 is as stale as crops.h5 (made from the same old source)."""
    files = DataDir(data_dir)
    attention = files.attention
    sources = {"manifest_sha256": files.manifest, "checkpoint_sha256": _crops_checkpoint(crops, data_dir, dataset)}
    for key, source in sources.items():
        if not source.is_file():
            continue
        now = hashes(source)
        if getattr(crops.meta, key) == now:
            continue
        commands = ("extract-crops",) if _attention_has(attention, key, now) else ("extract-attention", "extract-crops")
        what = "manifest" if key == "manifest_sha256" else "checkpoint"
        check_recorded(crops.path, getattr(crops.meta, key), source, now, what, rerun(dataset, *commands), key)
    if attention.is_file():
        check_recorded(
            crops.path, crops.meta.attention_sha256, attention, hashes(attention), "attention file",
            rerun(dataset, "extract-crops"), "attention_sha256",
        )


def _attention_has(path: Path, key: str, sha256: str) -> bool:
    """Whether attention.h5 at ``path`` records ``key`` = ``sha256`` (it is not stale for that source)."""
    if not path.is_file():
        return False
    try:
        with AttentionReader(path) as attention:
            return bool(getattr(attention.meta, key) == sha256)
    except ArtifactError:
        return False


def check_refine(state: Mapping[str, Any], path: Path, data_dir: Path, dataset: str, hashes: FileHashes) -> None:
    """Refuse a refine checkpoint (``state``, loaded from ``path``) trained from another manifest, crops.h5 or
    stage1/best.pt than those of data/NAME."""
    files = DataDir(data_dir)
    sources = {
        "manifest_sha256": (files.manifest, "manifest"),
        "crops_sha256": (files.crops, "crops.h5"),
        "stage1_sha256": (files.stage1("best"), "stage-1 checkpoint"),
    }
    check_sources(path, state, sources, hashes, rerun(dataset, "train-refine"), made="trained")


def check_evaluation(path: Path, provenance: Mapping[str, Any], data_dir: Path, dataset: str, hashes: FileHashes) -> None:
    """Refuse evaluate.json (at ``path``) computed for other checkpoints than data/NAME's: its joint weights were chosen
    for those (``sources`` in ``provenance``, read from evaluate.provenance.json beside it)."""
    recorded = provenance.get("sources")
    files = DataDir(data_dir)
    sources = {
        "stage1_sha256": (files.stage1("best"), "stage-1 checkpoint"),
        "refine_sha256": (files.refine("best"), "refine checkpoint"),
    }
    check_sources(path, recorded if isinstance(recorded, Mapping) else {}, sources, hashes, rerun(dataset, "evaluate"), made="computed")


# --------------------------------------------------------------------------- params
# stage -> the params it reads, which its outputs record and later stages compare (sections or keys; {dataset}: the
# dataset's name). The one table: dvc.yaml's `params:` of each stage are derived from it (:func:`dvc_params`), and
# tests/test_dvc_pipeline.py checks both dvc.yaml and the stages' code against it.
STAGE_PARAMS: dict[str, tuple[str, ...]] = {
    "prepare": ("datasets.{dataset}", "prepare.cache_side", "prepare.max_pixels"),
    "train-backbone": ("model", "train_backbone"),
    "extract-attention": ("attention",),
    "extract-crops": ("crops",),
    "train-refine": ("train_refine",),
    "evaluate": ("evaluate",),
}
# keys that say where or how fast a stage runs, or shape a file no later stage reads, not what the artefact holds:
# recorded, never compared (a batch size lowered to fit a smaller machine must not refuse the chain). The dataset
# root is where the images are, not which: the manifest records what prepare read and every stage checks the image
# files against it (fgpipe.loader.check_image_files), so a dataset (or project) moved and its root updated goes on.
NOT_COMPARED = frozenset({
    "datasets.{dataset}.root", "datasets.{dataset}.download",
    "train_backbone.device", "train_backbone.amp", "train_backbone.channels_last",
    "train_backbone.num_workers", "train_backbone.in_memory",
    "train_refine.device", "train_refine.amp", "train_refine.channels_last",
    "train_refine.num_workers", "train_refine.in_memory",
    "attention.batch_size", "crops.batch_size", "crops.preview_images", "evaluate.batch_size", "evaluate.top_k",
    "evaluate.num_workers", "evaluate.in_memory",
})


# params that say where the files are: every stage reads them (:meth:`fgpipe.config.Settings.layout`), none records
# them (a project moved or copied keeps its artefacts). prepare.data_dir also shapes dataset.json (``root_relative``,
# the dataset root relative to data/NAME), so dvc.yaml tracks it for prepare; prepare.metrics_dir shapes no output
# (and dvc.yaml spells the outputs' paths anyway).
LOCATION_PARAMS = ("prepare.data_dir", "prepare.metrics_dir")
TRACKED_LOCATIONS: dict[str, tuple[str, ...]] = {"prepare": ("prepare.data_dir",)}


def dvc_params(stage: str) -> list[str]:
    """The `params:` of ``stage`` in dvc.yaml (``${key}``: the dataset): what it reads (:data:`STAGE_PARAMS`), the
    locations it tracks (:data:`TRACKED_LOCATIONS`) and, where it reads stage sections, ``preset`` (a preset sets
    only those) and the dataset's own block of each (``per_dataset.${key}.SECTION``)."""
    reads = [spec.format(dataset="${key}") for spec in STAGE_PARAMS[stage]]
    sections = [spec for spec in reads if spec in STAGE_SECTIONS]
    preset = ["preset"] if any(spec.split(".")[0] in PRESET_SECTIONS for spec in reads) else []
    return [*preset, *reads, *TRACKED_LOCATIONS.get(stage, ()), *(f"per_dataset.${{key}}.{s}" for s in sections)]


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten(f"{prefix}.{key}", item, out)
    else:
        out[prefix] = value


def stage_params(settings: Settings, stage: str, dataset: str) -> dict[str, Any]:
    """The params ``stage`` runs with for ``dataset`` (per_dataset, preset and options merged), as dotted keys with
    JSON values (tuples as lists): ``{"crops.threshold": 0.2, ...}``."""
    out: dict[str, Any] = {}
    for spec in STAGE_PARAMS[stage]:
        key = spec.format(dataset=dataset)
        if key == f"datasets.{dataset}":
            cfg = settings.dataset(dataset)
            value: Any = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("synthetic", "aircraft", "imagefolder")}
            options = cfg.options()  # the kind's option block, defaults filled in (left out or written out: the same)
            if options is not None:
                value[cfg.kind] = dataclasses.asdict(options)
        else:
            value = settings.params
            for part in key.split("."):
                value = getattr(value, part)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)  # type: ignore[arg-type]
        _flatten(key, json.loads(json.dumps(value)), out)
    return out


def params_record(settings: Settings, stage: str, dataset: str) -> dict[str, Any]:
    """What an artefact of ``stage`` records of its params: ``values`` (:func:`stage_params`) and ``overridden``, the
    keys a command-line option set."""
    overridden = sorted(k for k in settings.overrides if k != "preset")
    return {"values": stage_params(settings, stage, dataset), "overridden": overridden}


def _covered(key: str, prefixes: Sequence[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def check_params(path: Path, record: Any, settings: Settings, stage: str, dataset: str) -> None:
    """Refuse the artefact ``path`` of ``stage`` when the params it records (``record``, :func:`params_record`)
    differ from those ``settings`` give now: one error naming the key, both values and the command that remakes it.

    Not compared: a record that is not there (an older fgpipe, a file made by hand), keys a command-line option set
    for the artefact or for this run, :data:`NOT_COMPARED` and keys only one side knows."""
    if record is None:
        return
    fix = rerun(dataset, stage)
    values = record.get("values") if isinstance(record, Mapping) else None
    overridden = record.get("overridden", []) if isinstance(record, Mapping) else None
    if not isinstance(values, Mapping) or not isinstance(overridden, list) or not all(isinstance(k, str) for k in overridden):
        raise ArtifactError(f"{path}: its record of the params it was made with is damaged; {fix}")
    skip = [*overridden, *(k for k in settings.overrides if k != "preset")]
    ignored = {k.format(dataset=dataset) for k in NOT_COMPARED}
    now = stage_params(settings, stage, dataset)
    changed = [k for k, v in now.items() if k in values and values[k] != v and k not in ignored and not _covered(k, skip)]
    if not changed:
        return
    first = changed[0]
    source = str(settings.params_file) + (f" (with preset {settings.params.preset})" if settings.params.preset != "none" else "")
    more = f" (and {len(changed) - 1} more: {', '.join(changed[1:6])}{', ...' if len(changed) > 6 else ''})" if len(changed) > 1 else ""
    raise ArtifactError(
        f"{path} was made with {first} = {json.dumps(values[first])}, but {source} now gives {json.dumps(now[first])}{more}: "
        f"the params changed since; {fix}"
    )


def check_crops_params(crops: CropsReader, data_dir: Path, settings: Settings, dataset: str) -> None:
    """:func:`check_params` of the attention.h5 beside crops.h5 (when on disk: the crops were cut from its heatmaps),
    then of crops.h5 itself."""
    attention = DataDir(data_dir).attention
    if attention.is_file():
        with AttentionReader(attention, dataset) as att:
            check_params(attention, att.meta.provenance.get("params"), settings, "extract-attention", dataset)
    check_params(crops.path, crops.meta.provenance.get("params"), settings, "extract-crops", dataset)


def read_dataset_info(settings: Settings, dataset: str) -> DatasetInfo:
    """data/NAME/dataset.json: the dataset root the manifest's paths are relative to (:func:`fgpipe.manifest.read_dataset_json`),
    refused when prepare ran with other params than those now (:func:`check_params`)."""
    path = settings.layout(dataset).data.dataset_json
    info = read_dataset_json(path, dataset)
    check_params(path, info.params, settings, "prepare", dataset)
    return info


@dataclasses.dataclass(frozen=True)
class DatasetInputs:
    """What every stage after prepare reads first: the manifest's rows (and by split), its class names and
    dataset.json (the root the rows' paths are relative to)."""

    manifest: Path
    rows: list[ManifestRow]
    by_split: dict[str, list[ManifestRow]]  # train, val, test
    classes: list[str]
    info: DatasetInfo

    @property
    def root(self) -> Path:
        return self.info.root

    def require(self, *splits: str) -> None:
        """Refuse a manifest whose ``splits`` hold no image."""
        for s in splits:
            if not self.by_split[s]:
                raise ArtifactError(f"{self.manifest}: the {s} split is empty")


def read_dataset_inputs(settings: Settings, dataset: str) -> DatasetInputs:
    """data/NAME/manifest.csv and dataset.json (:func:`read_dataset_info`) of ``dataset``, a name params.yaml knows."""
    settings.dataset(dataset)  # a clear error for an unknown dataset name
    manifest = settings.layout(dataset).data.manifest
    rows = read_manifest(manifest)
    info = read_dataset_info(settings, dataset)
    by_split = {s: [r for r in rows if r.split == s] for s in ("train", "val", "test")}
    return DatasetInputs(manifest, rows, by_split, class_names(rows), info)
