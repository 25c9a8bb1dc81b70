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
metrics/NAME/extract_crops.json  ``sources.crops_sha256`` (the crops.h5 its figures describe)
refine/{best,last}.pt            ``manifest_sha256``, ``crops_sha256``, ``stage1_sha256`` (stage1/best.pt)
metrics/NAME/evaluate.json       ``sources``: ``manifest_sha256``, ``stage1_sha256``, ``refine_sha256``,
                                 ``crops_sha256`` (what its joint weights were chosen for)
===============================  ====================================================================

Every reader compares them with the files on disk now (each hashed once per run, :class:`FileHashes`) and
refuses a mismatch with one error naming both files and the commands that rebuild the stale one, so a stage
run by hand after an upstream one was redone never takes the old artefact. A recorded source that is no
longer on disk is not compared (there is nothing newer to pair with), unless the reader needs it anyway.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fgpipe.errors import ArtifactError
from fgpipe.h5schema import AttentionReader, CropsReader
from fgpipe.store import FileHashes


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
    if not isinstance(recorded, str) or not recorded:
        raise ArtifactError(f"{path} does not record which {what} it was {made} from (no {key}: an older fgpipe wrote it): {fix}")
    raise ArtifactError(
        f"{path} was {made} from another {what} than {source} ({key} {recorded[:12]}..., the file's is {now[:12]}...): {fix}"
    )


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
    if which not in ("best", "last"):
        raise ArtifactError(
            f"{attention.path}: its provenance names no stage-1 checkpoint (best or last); {rerun(dataset, 'extract-attention')}"
        )
    path = data_dir / "stage1" / f"{which}.pt"
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
    manifest = data_dir / "manifest.csv"
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
    if which not in ("best", "last"):
        raise ArtifactError(
            f"{crops.path}: its provenance names no stage-1 checkpoint (best or last); {rerun(dataset, 'extract-crops')}"
        )
    return data_dir / "stage1" / f"{which}.pt"


def check_crops(crops: CropsReader, data_dir: Path, dataset: str, hashes: FileHashes) -> None:
    """Refuse crops.h5 made from another manifest, attention.h5 or stage-1 checkpoint than data/NAME's.

    The fix names extract-attention too when attention.h5 is as stale as crops.h5 (made from the same old source)."""
    attention = data_dir / "attention.h5"
    sources = {"manifest_sha256": data_dir / "manifest.csv", "checkpoint_sha256": _crops_checkpoint(crops, data_dir, dataset)}
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
    sources = {
        "manifest_sha256": (data_dir / "manifest.csv", "manifest"),
        "crops_sha256": (data_dir / "crops.h5", "crops.h5"),
        "stage1_sha256": (data_dir / "stage1" / "best.pt", "stage-1 checkpoint"),
    }
    check_sources(path, state, sources, hashes, rerun(dataset, "train-refine"), made="trained")


def check_evaluation(path: Path, metrics: Mapping[str, Any], data_dir: Path, dataset: str, hashes: FileHashes) -> None:
    """Refuse evaluate.json (``metrics``, read from ``path``) computed for other checkpoints than data/NAME's: its joint
    weights were chosen for those (``sources``)."""
    recorded = metrics.get("sources")
    sources = {
        "stage1_sha256": (data_dir / "stage1" / "best.pt", "stage-1 checkpoint"),
        "refine_sha256": (data_dir / "refine" / "best.pt", "refine checkpoint"),
    }
    check_sources(path, recorded if isinstance(recorded, Mapping) else {}, sources, hashes, rerun(dataset, "evaluate"), made="computed")
