"""`fgpipe localize`: the localisation table of every stored heatmap method x split x threshold, in seconds.

Reads data/NAME/manifest.csv and data/NAME/attention.h5 (checked against the manifest and, by its SHA-256, the
stage-1 checkpoint it was made from) and nothing else: no image, no network pass. For each method attention.h5 stores and each threshold of the grid
(``--thresholds``, default ``crops.thresholds``): the share of images whose object box (METHODS.md section 4)
has IoU >= 0.5 with the ground-truth box, and the mean IoU, on train, val and test. The row
``crops.threshold`` stands for (``auto``: the best train+val one of the selected method) is marked. What
extract-crops writes to metrics/NAME/localization.json, printed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from fgpipe.config import Settings
from fgpipe.errors import ArtifactError, ConfigError
from fgpipe.h5schema import AttentionReader
from fgpipe.lineage import check_attention, check_params
from fgpipe.localize.sweep import SPLITS, localization_report, localization_sweep, resolve_threshold, threshold_key
from fgpipe.manifest import read_manifest
from fgpipe.store import FileHashes


def run(settings: Settings, dataset: str, thresholds: Sequence[float] | None = None) -> dict[str, Any]:
    """The localisation report of data/NAME/attention.h5 (as in metrics/NAME/localization.json)."""
    settings.dataset(dataset)  # a clear error for an unknown dataset name
    cfg = settings.params.crops
    grid = tuple(float(t) for t in thresholds) if thresholds else cfg.thresholds
    if any(not 0 < t <= 1 for t in grid) or any(a >= b for a, b in zip(grid, grid[1:])):
        raise ConfigError(f"--thresholds must be increasing values in (0, 1], got {', '.join(f'{t:g}' for t in grid)}")
    data = settings.layout(dataset).data
    manifest, path = data.manifest, data.attention
    if not manifest.is_file():
        raise ArtifactError(f"{manifest} not found (run `fgpipe prepare --dataset {dataset}` first)")
    if not path.is_file():
        raise ArtifactError(f"{path} not found (run `fgpipe extract-attention --dataset {dataset}` first)")
    rows = read_manifest(manifest)
    with AttentionReader(path) as attention:
        check_attention(attention, data.path, dataset, FileHashes())  # made from this manifest and stage-1 checkpoint
        check_params(path, attention.meta.provenance.get("params"), settings, "extract-attention", dataset)  # and params
        if attention.image_ids() != [r.image_id for r in rows]:
            raise ArtifactError(f"{path} does not hold the images of {manifest} in its order: rerun `fgpipe extract-attention --dataset {dataset}`")
        sweeps = localization_sweep(attention, rows, grid)
        method = attention.meta.method
    threshold, source = resolve_threshold(cfg.threshold, sweeps[method])
    return {"dataset": dataset, **localization_report(sweeps, method, threshold, source)}


def _cell(fig: dict[str, Any]) -> str:
    if fig["accuracy"] is None:
        return "-"
    return f"{fig['accuracy']:.3f} ({fig['mean_iou']:.2f})"


def print_table(out: Console, report: dict[str, Any]) -> None:
    """The report as one rich table: a row per method x threshold, a column per split."""
    methods = report["methods"]
    counts = {s: max((f["images"] for m in methods.values() for f in m[s].values()), default=0) for s in SPLITS}
    chosen = threshold_key(report["threshold"])
    table = Table(
        title=f"{report['dataset']}: localisation, share of images with IoU >= {report['iou_hit']:g} (mean IoU)",
        caption=(
            f"* = crops.threshold ({report['threshold_source']}: {report['threshold']:g}) for {report['method']}, "
            "the method crops are cut from; aolm is threshold-free"
        ),
        title_justify="left",
    )
    table.add_column("method")
    table.add_column("threshold", justify="right")
    for s in SPLITS:
        table.add_column(f"{s} ({counts[s]} boxes)", justify="right")
    for name, per_split in methods.items():
        for key in per_split[SPLITS[0]]:
            mark = " *" if name == report["method"] and key in (chosen, "any") else ""
            table.add_row(name, key + mark, *(_cell(per_split[s][key]) for s in SPLITS))
        table.add_section()
    out.print(table)
