"""Every benchmark in one command, one JSON file: machine, command, and per benchmark its figures and ratios.

Each ratio is two figures measured side by side in the same run, so it holds up better than either figure
on a shared machine. The benchmarks (the scripts they call also run on their own):

- ``stage1_step``          full stage-1 training step vs the bare backbone step (bench/train_step.py), CPU;
- ``oaam_vs_grad_cam``     fgpipe's batched OAAM vs the grad-cam package's GradCAMPlusPlus (bench/extract.py), CPU;
- ``loader_cache``         loading images with vs without the decoded image cache (bench/loader.py);
- ``extract_peak_memory``  peak RSS of extract-attention and extract-crops at N and 4N images (bench/extract_memory.py);
- ``train_peak_memory``    peak RSS of train-backbone and train-refine at N and 4N images (bench/train_memory.py);
- ``loader_stream``        the input pipeline's images/s with 0, 1, 2 workers against the training step's, and
                           train-backbone streamed vs in memory (bench/stream.py);
- ``dvc``                  no-op `dvc repro` and a threshold ablation vs the full run (bench/dvc_timing.py);
- ``gpu_stage1_precision`` ResNet-50 at 448 px, stage-1 step in fp32 vs bf16 + channels_last vs that + torch.compile;
- ``gpu_extraction``       OAAM heatmaps and the attention stage loop on the GPU (bench/extract.py).

The two GPU benchmarks need CUDA and are otherwise recorded as skipped; with ``--quick`` their code still
runs once on the CPU at toy size (``cpu_check``: no GPU figure, a test that the path works). ``--quick``
runs everything at toy sizes in a few minutes: it checks the suite, its figures mean nothing.

    uv run --group bench python bench/suite.py                        # bench/results/suite-<host>.json
    uv run --group bench python bench/suite.py --quick --out /tmp/suite.json
    uv run --group bench python bench/suite.py --only dvc extract_peak_memory

Figures are seconds, images/s or MiB; ``ratios`` name their numerator and denominator figures. The file
is rewritten after every benchmark (``complete`` is false until the last one is done).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
import dvc_timing  # noqa: E402
import extract_memory  # noqa: E402
import stream  # noqa: E402
import train_memory  # noqa: E402
import train_step  # noqa: E402
from common import machine_info  # noqa: E402

from fgpipe.errors import ConfigError  # noqa: E402
from fgpipe.runtime import configure_threads, tune_malloc  # noqa: E402

Entry = dict[str, Any]
NO_CUDA = "skipped: no CUDA device"

# Sizes per mode. Full: the configurations bench/RESULTS.md reports; quick: toy sizes that only check the suite.
CONFIG: dict[str, dict[str, dict[str, Any]]] = {
    "full": {
        "stage1_step": dict(backbone="resnet50", input_size=448, batch_size=8, classes=200, steps=4, warmup=1),
        "oaam_vs_grad_cam": dict(backbone="resnet50", input_size=448, batch_size=8, classes=200, images=32, steps=2, warmup=1),
        "extract_peak_memory": dict(images=100, factor=4, input_size=448, classes=4, batch_size=16),
        "train_peak_memory": dict(images=100, factor=4, image_size=384, input_size=384, classes=4, batch_size=16),
        "loader_stream": dict(images=160, image_size=384, input_size=224, backbone="efficientnet_lite0", batch_size=16,
                              epochs=2, rounds=3),
        "dvc": dict(tiny=False),
        "gpu_stage1_precision": dict(backbone="resnet50", input_size=448, batch_size=32, classes=200, steps=10, warmup=3,
                                     compile_backend="inductor"),
        "gpu_extraction": dict(backbone="resnet50", input_size=448, batch_size=32, classes=200, images=256, steps=5, warmup=2),
    },
    "quick": {
        "stage1_step": dict(backbone="tiny", input_size=64, batch_size=4, classes=10, steps=2, warmup=1),
        "oaam_vs_grad_cam": dict(backbone="tiny", input_size=64, batch_size=4, classes=10, images=8, steps=2, warmup=1),
        "extract_peak_memory": dict(images=24, factor=4, input_size=128, classes=3, batch_size=16),
        "train_peak_memory": dict(images=20, factor=2, image_size=96, input_size=64, classes=2, batch_size=8),
        "loader_stream": dict(images=40, image_size=96, input_size=64, backbone="tiny", batch_size=8, epochs=1, rounds=1),
        "dvc": dict(tiny=True),
        "gpu_stage1_precision": dict(backbone="resnet50", input_size=224, batch_size=8, classes=200, steps=3, warmup=2,
                                     compile_backend="inductor"),
        "gpu_extraction": dict(backbone="resnet50", input_size=448, batch_size=8, classes=200, images=16, steps=2, warmup=1),
    },
}
# The GPU benchmarks' code on the CPU (--quick without CUDA); the `eager` backend runs torch.compile's graph
# capture without compiling kernels, which would take minutes on a small CPU.
CPU_CHECK = dict(backbone="tiny", input_size=32, batch_size=2, classes=5, steps=1, warmup=2,
                 compile_backend="eager", device="cpu")


# --------------------------------------------------------------------------- entries
def _sig(x: float, digits: int) -> float:
    return float(f"{x:.{digits}g}")


def entry(figures: dict[str, float], ratios: dict[str, tuple[str, str]], **detail: Any) -> Entry:
    """A benchmark's record: ``figures`` (numbers, 6 significant digits) and ``ratios`` {name: (numerator, denominator)}
    computed from the figures as stored (4 significant digits), plus any ``detail``."""
    figs = {k: _sig(float(v), 6) for k, v in figures.items()}
    out: Entry = {"figures": figs, "ratios": {}}
    for name, (num, den) in ratios.items():
        value = figs[num] / figs[den]
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"ratio {name} = {num} / {den} = {value} is not a positive finite number")
        out["ratios"][name] = {"value": _sig(value, 4), "numerator": num, "denominator": den}
    return out | detail


def has_cuda() -> bool:
    """Whether torch sees a GPU (the GPU benchmarks run only then)."""
    return torch.cuda.is_available()


# --------------------------------------------------------------------------- the benchmarks
def stage1_step(cfg: dict[str, Any], quick: bool) -> Entry:
    r = train_step.run(device="cpu", variants=("fp32",), **cfg)["fp32"]
    bare, full = r["bare_s_per_step"], r["full_s_per_step"]
    return entry(
        {"bare_s_per_step": bare, "full_s_per_step": full,
         "bare_images_per_s": cfg["batch_size"] / bare, "full_images_per_s": cfg["batch_size"] / full},
        {"full_over_bare_time": ("full_s_per_step", "bare_s_per_step")},
        config={**cfg, "device": "cpu", "precision": "fp32", "lcam": "block"},
    )


def _extract_figures(r: dict[str, Any], batch_size: int, images: int) -> dict[str, float]:
    s = r["seconds"]
    return {
        "fgpipe_oaam_s_per_batch": s["oaam_fgpipe_batch"],
        "grad_cam_package_s_per_batch": s["oaam_grad_cam_package_batch"],
        "fgpipe_oaam_images_per_s": batch_size / s["oaam_fgpipe_batch"],
        "grad_cam_package_images_per_s": batch_size / s["oaam_grad_cam_package_batch"],
        "agreement_correlation": r["oaam_heatmaps_per_s"]["agreement_correlation"],
        "attention_stage_images_per_s": images / s["attention_stage"],
        "object_boxes_images_per_s": images / s["object_boxes_only"],
        "object_boxes_and_mpalm_images_per_s": images / s["object_boxes_and_mpalm"],
        "decode_images_per_s": batch_size / s["decode_batch"],
    }


def _grad_cam_missing() -> str | None:
    if importlib.util.find_spec("pytorch_grad_cam") is None:
        return "skipped: the grad-cam package is not installed (run with `uv run --group bench`)"
    return None


def oaam_vs_grad_cam(cfg: dict[str, Any], quick: bool) -> Entry:
    if reason := _grad_cam_missing():
        return {"skipped": reason}
    import extract

    r = extract.run(device="cpu", **cfg)
    return entry(
        _extract_figures(r, cfg["batch_size"], cfg["images"]),
        {"package_over_fgpipe_time": ("grad_cam_package_s_per_batch", "fgpipe_oaam_s_per_batch")},
        config={**cfg, "device": "cpu", "lcam": "block"},
        target_layer=r["oaam_heatmaps_per_s"]["target_layer"],
    )


def loader_cache(cfg: dict[str, Any], quick: bool) -> Entry:
    if importlib.util.find_spec("loader") is None:  # bench/loader.py, on sys.path with this folder
        return {"skipped": "skipped: bench/loader.py is missing (the decoded image cache benchmark)"}
    import loader

    r = loader.run(quick=quick)
    figures: dict[str, float] = {}
    ratios: dict[str, tuple[str, str]] = {}
    for name, res in r["results"].items():
        if "files_images_per_s" in res and "cache_images_per_s" in res:
            figures[f"{name}_files_images_per_s"] = res["files_images_per_s"]
            figures[f"{name}_cache_images_per_s"] = res["cache_images_per_s"]
            ratios[f"{name}_cache_over_files_rate"] = (f"{name}_cache_images_per_s", f"{name}_files_images_per_s")
    detail = {k: v for k, v in r.items() if k not in ("benchmark", "machine")}
    return entry(figures, ratios, detail=detail)


def extract_peak_memory(cfg: dict[str, Any], quick: bool) -> Entry:
    r = extract_memory.run(**cfg)
    figures: dict[str, float] = {"images_small": r["small"]["images"], "images_big": r["big"]["images"],
                                 "all_images_uint8_mib_big": r["big"]["all_images_uint8_mib"]}
    ratios: dict[str, tuple[str, str]] = {}
    for stage in extract_memory.STAGES:
        key = stage.replace("-", "_")
        for size in ("small", "big"):
            figures[f"{key}_peak_rss_mib_{size}"] = r[size]["stages"][stage]["peak_rss_mib"]
            figures[f"{key}_seconds_{size}"] = r[size]["stages"][stage]["seconds"]
        ratios[f"{key}_big_over_small_peak_rss"] = (f"{key}_peak_rss_mib_big", f"{key}_peak_rss_mib_small")
    return entry(figures, ratios, config=r["config"])


def train_peak_memory(cfg: dict[str, Any], quick: bool) -> Entry:
    r = train_memory.run(**cfg)
    figures: dict[str, float] = {"images_small": r["small"]["images"], "images_big": r["big"]["images"]}
    ratios: dict[str, tuple[str, str]] = {}
    for stage in train_memory.TRAINERS:
        key = stage.replace("-", "_")
        for what in ("peak_rss_mib", "peak_tree_pss_mib"):
            for size in ("small", "big"):
                figures[f"{key}_{what}_{size}"] = r[size]["stages"][stage][what]
            ratios[f"{key}_big_over_small_{what.removesuffix('_mib')}"] = (f"{key}_{what}_big", f"{key}_{what}_small")
    return entry(figures, ratios, config=r["config"])


def loader_stream(cfg: dict[str, Any], quick: bool) -> Entry:
    r = stream.run(**cfg)
    figures = {**r["loader"], **r["step"]}
    ratios: dict[str, tuple[str, str]] = {
        f"{k.removesuffix('_images_per_s')}_over_step": (k, "full_stage1_step_images_per_s")
        for k in r["loader"] if k.startswith("stream")
    }
    for name, res in r["stage"].items():
        figures[f"stage_{name}_loop_images_per_s"] = res["loop_images_per_s"]
        figures[f"stage_{name}_seconds"] = res["stage_seconds"]
        if name != "memory":
            ratios[f"stage_{name}_seconds_over_memory"] = (f"stage_{name}_seconds", "stage_memory_seconds")
    return entry(figures, ratios, config=r["config"])


def dvc(cfg: dict[str, Any], quick: bool) -> Entry:
    r = dvc_timing.run(**cfg)
    s = r["seconds"]
    return entry(
        {"full_repro_s": s["full_repro"], "noop_repro_s": s["noop_repro"],
         "threshold_ablation_repro_s": s["threshold_ablation_repro"]},
        {"noop_over_full": ("noop_repro_s", "full_repro_s"),
         "threshold_ablation_over_full": ("threshold_ablation_repro_s", "full_repro_s")},
        params=r["params"], threshold_change=r["threshold_change"], stages_ran=r["stages_ran"],
    )


def _precision_entry(cfg: dict[str, Any]) -> Entry:
    """train_step.run for every variant with ``cfg``; speedups of bf16+channels_last over fp32 and of compile over it."""
    r = train_step.run(variants=train_step.VARIANTS, **cfg)
    figures: dict[str, float] = {}
    for v, res in r.items():
        figures[f"{v}_bare_s_per_step"] = res["bare_s_per_step"]
        figures[f"{v}_full_s_per_step"] = res["full_s_per_step"]
        figures[f"{v}_full_images_per_s"] = cfg["batch_size"] / res["full_s_per_step"]
    ratios = {
        "bf16_channels_last_speedup": ("fp32_full_s_per_step", "bf16_channels_last_full_s_per_step"),
        "compile_speedup": ("bf16_channels_last_full_s_per_step", "bf16_channels_last_compile_full_s_per_step"),
        "fp32_full_over_bare_time": ("fp32_full_s_per_step", "fp32_bare_s_per_step"),
        "bf16_channels_last_full_over_bare_time": ("bf16_channels_last_full_s_per_step", "bf16_channels_last_bare_s_per_step"),
    }
    return entry(figures, ratios, config=cfg)


def gpu_stage1_precision(cfg: dict[str, Any], quick: bool) -> Entry:
    if has_cuda():
        return _precision_entry({**cfg, "device": "cuda"})
    if not quick:
        return {"skipped": NO_CUDA + " (--quick runs this code on the CPU at toy size)"}
    return {"skipped": NO_CUDA, "cpu_check": _precision_entry(CPU_CHECK)}


def gpu_extraction(cfg: dict[str, Any], quick: bool) -> Entry:
    if not has_cuda():
        return {"skipped": NO_CUDA + " (the same code runs on the CPU in oaam_vs_grad_cam)"}
    if reason := _grad_cam_missing():
        return {"skipped": reason}
    import extract

    r = extract.run(device="cuda", **cfg)
    return entry(
        _extract_figures(r, cfg["batch_size"], cfg["images"]),
        {"package_over_fgpipe_time": ("grad_cam_package_s_per_batch", "fgpipe_oaam_s_per_batch")},
        config={**cfg, "device": "cuda", "lcam": "block", "precision": "fp32"},
    )


BENCHMARKS: dict[str, Callable[[dict[str, Any], bool], Entry]] = {
    "stage1_step": stage1_step,
    "oaam_vs_grad_cam": oaam_vs_grad_cam,
    "loader_cache": loader_cache,
    "extract_peak_memory": extract_peak_memory,
    "train_peak_memory": train_peak_memory,
    "loader_stream": loader_stream,
    "dvc": dvc,
    "gpu_stage1_precision": gpu_stage1_precision,
    "gpu_extraction": gpu_extraction,
}


# --------------------------------------------------------------------------- the run
def git_state() -> dict[str, Any]:
    """The commit and how many files differ from it (None where git is unavailable)."""
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            return None

    head, status = git("rev-parse", "HEAD"), git("status", "--porcelain")
    return {"commit": head.strip() if head else None, "changed_files": None if status is None else len(status.splitlines())}


def launch_command() -> str:
    """The command line that started the suite: `uv run ...` as uv got it when uv is the parent, else python's."""
    own = shlex.join(["python", *sys.argv])
    if "UV" not in os.environ:
        return own
    try:
        parent = Path(f"/proc/{os.getppid()}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return own
    parent = [a for a in parent if a]
    if parent and Path(parent[0]).name == "uv" and "run" in parent:
        return shlex.join(["uv", *parent[1:]])
    return own


def write(result: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="toy sizes: checks the suite in a few minutes")
    p.add_argument("--out", type=Path, help="the JSON file (default bench/results/suite-<host>[-quick].json)")
    p.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run only these benchmarks")
    args = p.parse_args()
    try:
        tune_malloc()  # the allocator settings the fgpipe CLI runs with (bench/RESULTS.md, malloc); FGPIPE_MALLOC_TUNING=0: none
    except ConfigError as exc:
        p.error(str(exc))
    configure_threads()
    mode = "quick" if args.quick else "full"
    out = args.out or HERE / "results" / f"suite-{platform.node() or 'host'}{'-quick' if args.quick else ''}.json"
    result: dict[str, Any] = {
        "suite": "fgpipe bench/suite.py",
        "command": launch_command(),
        "mode": mode,
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine_info(), "host": platform.node(), "cuda": torch.version.cuda if has_cuda() else None},
        "git": git_state(),
        "complete": False,
        "benchmarks": {},
    }
    t_suite = time.perf_counter()
    for name in args.only or list(BENCHMARKS):
        print(f"[suite] {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        cfg = CONFIG[mode].get(name, {})
        record = BENCHMARKS[name](cfg, args.quick)
        record["seconds"] = round(time.perf_counter() - t0, 1)
        result["benchmarks"][name] = record
        write(result, out)
        ratios = record.get("ratios", record.get("cpu_check", {}).get("ratios", {}))
        shown = json.dumps({k: v["value"] for k, v in ratios.items()})
        print(f"[suite] {name}: {record.get('skipped', '')} {shown} ({record['seconds']} s)", file=sys.stderr, flush=True)
    result["complete"] = True
    result["seconds"] = round(time.perf_counter() - t_suite, 1)
    write(result, out)
    print(json.dumps({n: {k: v["value"] for k, v in r.get("ratios", {}).items()} or r.get("skipped")
                      for n, r in result["benchmarks"].items()}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
