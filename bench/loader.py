"""Loader images/s with and without the decoded image cache (data/NAME/images.h5), side by side in one run.

Two loads, each as a stage does it, through :func:`fgpipe.loader.load_regions` (threads, one per core):

- whole:  every train image's manifest area at the stage-1 size (``train_backbone.input_size`` x
          ``augment.resize_ratio``), as train-backbone's in-memory path (``in_memory: true``);
- object: every train image's object box grown by ``train_refine.box_jitter`` on each side, at the refinement
          size (``input_size`` x ``resize_ratio`` x (1 + 2 ``box_jitter``)), as train-refine's in-memory path
          (the ground-truth boxes stand in for the heatmap boxes of crops.h5);
- parts:  likewise every ground-truth part box (4 per image) at the part size (``part_size`` x ``resize_ratio``
          x (1 + 2 ``box_jitter``)), standing in for the MPALM parts; ``refine`` is objects and parts together,
          what train-refine loads.

The dataset is params.yaml's synthetic one (``--dataset`` picks another entry; parts only for synthetic,
which has part boxes), prepared with its cache (``prepare.cache_side``) in a temporary folder: a dataset on
disk is only read. Rounds alternate files and cache after one untimed pass of each, so the drift of a
shared machine hits both; the figures are medians over rounds, and ``ratio`` is cache / files.

    uv run python bench/loader.py                 # 5 rounds
    uv run python bench/loader.py --quick         # 1 round
    uv run python bench/loader.py --dataset cub   # the CUB entry of params.yaml (real 500 x 375 JPEGs)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info  # noqa: E402

from fgpipe.branch_data import margin_region, part_size  # noqa: E402
from fgpipe.config import load_params  # noqa: E402
from fgpipe.console import console  # noqa: E402
from fgpipe.datasets.synthetic_reader import read_parts  # noqa: E402
from fgpipe.imagecache import ImageCache, build_image_cache  # noqa: E402
from fgpipe.loader import LoadRequest, load_regions, resized_side, whole_image_requests  # noqa: E402
from fgpipe.manifest import read_manifest  # noqa: E402
from fgpipe.runtime import available_cores, configure_threads  # noqa: E402
from fgpipe.stages import prepare  # noqa: E402
from fgpipe.store import file_sha256  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _project(params: Path, workdir: Path, dataset: str) -> Path:
    """params.yaml's ``dataset`` and prepare section with outputs under ``workdir`` (and a synthetic root there)."""
    raw = yaml.safe_load(params.read_text(encoding="utf-8"))
    entry = copy.deepcopy(raw["datasets"][dataset])
    root = workdir / "raw" if entry["kind"] == "synthetic" else load_params(params).dataset_root(dataset)
    out = {
        "run": {},
        "datasets": {dataset: {**entry, "root": str(root)}},
        "prepare": {**raw.get("prepare", {}), "data_dir": str(workdir / "data"), "metrics_dir": str(workdir / "metrics")},
    }
    path = workdir / "params.yaml"
    path.write_text(yaml.safe_dump(out, sort_keys=False))
    return path


def _rate(requests: list[LoadRequest], out_wh: tuple[int, int]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    images = load_regions(requests, out_wh)
    return len(requests) / (time.perf_counter() - t0), images


def run(
    quick: bool = False, params: Path = REPO / "params.yaml", rounds: int | None = None, dataset: str = "synthetic"
) -> dict[str, Any]:
    """Measure both loads with and without the cache; return the figures (images/s, ratio) as a dict."""
    rounds = rounds or (1 if quick else 5)
    configure_threads()
    settings = load_params(params, dataset=dataset)  # that dataset's sizes (its per_dataset blocks merged in)
    tb, tr = settings.params.train_backbone, settings.params.train_refine
    side = settings.params.prepare.cache_side
    if side == 0:
        raise SystemExit(f"{params}: prepare.cache_side is 0 (no cache); nothing to compare")
    whole_side = resized_side(tb.input_size, tb.augment)
    object_side = int(round(resized_side(tr.input_size, tr.augment) * (1 + 2 * tr.box_jitter)))
    part_side = int(round(resized_side(part_size(tr), tr.augment) * (1 + 2 * tr.box_jitter)))
    was_quiet = console.quiet
    with tempfile.TemporaryDirectory(prefix="fgpipe-bench-loader-") as tmp:
        work = Path(tmp)
        project = load_params(_project(params, work, dataset))
        console.quiet = True  # no progress bars inside the timings
        try:
            t0 = time.perf_counter()
            prepare.run(project, dataset)
            prepare_s = time.perf_counter() - t0
            data, root = project.data_dir(dataset), project.dataset_root(dataset)
            rows = read_manifest(data / "manifest.csv")
            t0 = time.perf_counter()  # the cache alone, built again (prepare also decodes every image to verify it)
            built = build_image_cache(work / "again.h5", root, rows, side, file_sha256(data / "manifest.csv"), {})
            build_s = time.perf_counter() - t0
            cache = ImageCache(data / "images.h5", root)
            train = [r for r in rows if r.split == "train" and r.box is not None]
            regions = [tuple(margin_region(np.array(r.box), tr.box_jitter, (r.width, r.height))) for r in train]
            loads = {
                "whole": ((whole_side, whole_side), lambda c: whole_image_requests(root, train, c)),
                "object": ((object_side, object_side), lambda c: [
                    LoadRequest(root / r.path, g, c) for r, g in zip(train, regions)
                ]),
            }
            if project.dataset(dataset).kind == "synthetic":
                parts = read_parts(root)
                part_regions = [
                    (root / r.path, tuple(margin_region(np.array(b), tr.box_jitter, (r.width, r.height))))
                    for r in train for b in parts[r.image_id].values()
                ]
                loads["parts"] = ((part_side, part_side), lambda c: [LoadRequest(path, g, c) for path, g in part_regions])
            results: dict[str, Any] = {}
            for name, (out_wh, requests) in loads.items():
                files_req, cache_req = requests(None), requests(cache)
                _, from_files = _rate(files_req, out_wh)  # untimed: warms the page cache and the allocator
                _, from_cache = _rate(cache_req, out_wh)
                diff = (from_cache.int() - from_files.int()).abs()
                rates: dict[str, list[float]] = {"files": [], "cache": []}
                for _ in range(rounds):
                    rates["files"].append(_rate(files_req, out_wh)[0])
                    rates["cache"].append(_rate(cache_req, out_wh)[0])
                files, cached = statistics.median(rates["files"]), statistics.median(rates["cache"])
                results[name] = {
                    "out_size": list(out_wh),
                    "images": len(files_req),
                    "files_images_per_s": round(files, 1),
                    "cache_images_per_s": round(cached, 1),
                    "ratio": round(cached / files, 2),
                    "rounds": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
                    "mean_abs_diff": round(float(diff.float().mean()), 4),  # grey levels, cache vs files
                    "max_abs_diff": int(diff.max()),
                }
            if "parts" in results:  # train-refine loads both: their seconds add up
                n_obj, n_part = results["object"]["images"], results["parts"]["images"]
                refine = {
                    mode: (n_obj + n_part)
                    / (n_obj / results["object"][f"{mode}_images_per_s"] + n_part / results["parts"][f"{mode}_images_per_s"])
                    for mode in ("files", "cache")
                }
                results["refine"] = {
                    "images": n_obj + n_part,
                    "files_images_per_s": round(refine["files"], 1),
                    "cache_images_per_s": round(refine["cache"], 1),
                    "ratio": round(refine["cache"] / refine["files"], 2),
                }
        finally:
            console.quiet = was_quiet
    sizes = sorted({(r.width, r.height) for r in rows})
    return {
        "benchmark": "loader",
        "args": {"quick": quick, "rounds": rounds, "params": str(params), "dataset": dataset, "threads": available_cores()},
        "machine": machine_info(),
        "dataset": {
            "name": dataset, "images": len(rows), "train_images": len(train),
            "image_sizes": [list(sizes[0]), list(sizes[-1])] if sizes else [],  # smallest and largest (w, h)
        },
        "cache": {
            "side": side,
            "megabytes": built["megabytes"],
            "build_images_per_s": round(len(rows) / build_s, 1),
            "prepare_seconds": round(prepare_s, 2),
        },
        "results": results,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", type=Path, default=REPO / "params.yaml", help="params file (its dataset entry and sizes)")
    p.add_argument("--dataset", default="synthetic", help="a dataset under `datasets` in the params file")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per mode (default 5; 1 with --quick)")
    p.add_argument("--quick", action="store_true", help="one timed round")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    emit(run(quick=args.quick, params=args.params, rounds=args.rounds, dataset=args.dataset), args.out)


if __name__ == "__main__":
    main()
