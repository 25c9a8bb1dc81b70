"""`fgpipe show --image ID`: one image's heatmap, object box, ground-truth box and parts, drawn to a PNG.

Reads data/NAME/manifest.csv, dataset.json, attention.h5 and crops.h5 (checked against the manifest, the stage-1
checkpoint and each other, and against the params now: :mod:`fgpipe.lineage`) and the image file; draws with
:mod:`fgpipe.figures`. Writes only a new PNG (or its own ``show_*.png``) directly in data/NAME/, or ``--out``
outside the stages' folders: never over an artefact.
"""

from __future__ import annotations

import os
from pathlib import Path

from fgpipe.config import Settings
from fgpipe.errors import ArtifactError, OutputError
from fgpipe.figures import save_png
from fgpipe.h5schema import AttentionReader, CropsReader
from fgpipe.layout import STAGE_PNGS
from fgpipe.lineage import check_attention, check_crops, check_params, read_dataset_info
from fgpipe.loader import check_image_files
from fgpipe.manifest import read_manifest
from fgpipe.preview import load_samples, render, safe_name
from fgpipe.store import FileHashes


def show(settings: Settings, dataset: str, image_id: str, out: Path | None = None) -> Path:
    """Draw one image's heatmap, object box, ground truth and parts; return the PNG's path.

    Default output: data/NAME/show_<ID>.png; ``out`` is checked before anything is read (:func:`check_show_target`:
    never over an artefact or a file that is not a PNG). Refuses an attention.h5 or crops.h5 made from another
    manifest, stage-1 checkpoint or attention file than those on disk, or with other params than the params now
    (:mod:`fgpipe.lineage`).
    """
    settings.dataset(dataset)
    data = settings.layout(dataset).data
    d = data.path
    target = out if out is not None else data.show_png(safe_name(image_id))
    check_show_target(settings, dataset, target, explicit=out is not None)
    manifest, attention_path, crops_path = data.manifest, data.attention, data.crops
    rows = read_manifest(manifest)
    index = {r.image_id: i for i, r in enumerate(rows)}
    if image_id not in index:
        examples = ", ".join(r.image_id for r in rows[:3])
        raise ArtifactError(f"{manifest}: no image with id `{image_id}` (ids look like: {examples})")
    for path, command in ((attention_path, "extract-attention"), (crops_path, "extract-crops")):
        if not path.is_file():
            raise ArtifactError(f"{path} not found (run `fgpipe {command} --dataset {dataset}` first)")
    info = read_dataset_info(settings, dataset)
    root = info.root
    check_image_files(info, [rows[index[image_id]]], None, dataset, manifest)
    with AttentionReader(attention_path) as att, CropsReader(crops_path) as crops:
        sha = FileHashes()  # each input hashed once
        check_attention(att, d, dataset, sha)
        check_crops(crops, d, dataset, sha)
        check_params(attention_path, att.meta.provenance.get("params"), settings, "extract-attention", dataset)
        check_params(crops_path, crops.meta.provenance.get("params"), settings, "extract-crops", dataset)
        samples = load_samples(rows, [index[image_id]], root, att, crops)
        title = f"{dataset} / {image_id}: {att.meta.method} heatmap, threshold {crops.meta.threshold:g}"
    return save_png(render(samples, title, columns=1), target)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_png(path: Path) -> bool:
    """Whether ``path`` is a regular file starting with PNG's signature."""
    try:
        with open(path, "rb") as fh:
            return os.path.isfile(path) and fh.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE
    except OSError:
        return False


def check_show_target(settings: Settings, dataset: str, target: Path, explicit: bool = True) -> None:
    """Refuse a PNG path ``fgpipe show`` must not write (``explicit``: given as ``--out``): a folder, one in a folder
    that does not exist, anything under prepare.data_dir or prepare.metrics_dir but a new (or show's own
    ``show_*.png``) PNG directly in data/NAME/ (the rest belongs to the stages, DVC's outputs among them), or an
    existing file elsewhere that is not a PNG image. Checked before anything is read."""
    said = f"--out {target}" if explicit else str(target)
    fix = f"choose another --out path, e.g. {settings.layout(dataset).data.show_png('ID')}"
    if target.is_dir():
        raise OutputError(f"{said}: is a folder; give the path of the PNG file to write ({fix})")
    if not target.parent.is_dir():
        if explicit or target.parent.exists():
            raise OutputError(f"{said}: the folder {target.parent} does not exist (or is not a folder): create it first, or {fix}")
        return  # data/NAME itself missing: the inputs' own checks name what to run first
    real = Path(os.path.realpath(target.parent)) / target.name
    data = Path(os.path.realpath(settings.resolve(settings.params.prepare.data_dir)))
    trees = (data, Path(os.path.realpath(settings.resolve(settings.params.prepare.metrics_dir))))
    tree = next((t for t in trees if real.is_relative_to(t)), None)
    if tree is not None:
        own = Path(os.path.realpath(settings.data_dir(dataset)))
        ok = (
            real.parent == own and target.suffix.lower() == ".png" and target.name not in STAGE_PNGS
            and (not os.path.lexists(target) or (target.name.startswith("show_") and _is_png(target)))
        )
        if not ok:
            raise OutputError(
                f"{said}: lies in {tree}, where the stages keep their outputs; fgpipe show writes there only new PNG files "
                f"(or its own show_*.png) directly in {settings.data_dir(dataset)}, so that it never replaces an artefact; {fix}"
            )
    elif os.path.lexists(target) and not _is_png(target):
        raise OutputError(f"{said}: exists and is not a PNG image; fgpipe show replaces only PNG files: {fix}, or remove it")
