"""Benchmark: peak memory of `fgpipe train-backbone` and `fgpipe train-refine` at N and 4N images.

The trainers read their pixels through the input pipeline (:mod:`fgpipe.streaming`): worker processes cut each batch
from images.h5, so a trainer's memory must not grow with the dataset (issue 16: at most 1.15 for 4x the images).
Two synthetic datasets of N and ``factor`` x N images (every split grows: train, val and test), each get
`fgpipe prepare`, then one epoch of `fgpipe train-backbone` (``tiny`` model), `extract-attention`, `extract-crops`
and one epoch of `fgpipe train-refine`, each stage its own process. For the two trainers we record:

- ``peak_rss_mib``: the stage process's peak resident set size (``ru_maxrss`` from ``os.wait4``, which also takes the
  maximum over the data-loader workers it reaped: each is counted alone, not added);
- ``peak_tree_pss_mib``: the peak of the summed proportional set size (PSS: a page shared by k processes counts 1/k
  in each) of the stage process and all its children (the workers), sampled every 50 ms: the memory the whole stage
  holds, its workers included, each page once.

``--code DIR`` runs the stages with DIR/fgpipe instead of this checkout's (e.g. the code before streaming, for the
"before" figures); ``--set KEY=VALUE`` sets a params key for both trainers (``num_workers=0``, ``in_memory=true``), ``--set
train_refine.KEY=VALUE`` for one (``train_refine.pad_parts=false``).

    uv run python bench/train_memory.py --images 100 --factor 4 --image-size 384
    uv run python bench/train_memory.py --code /path/to/old/checkout   # before
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import emit, machine_info  # noqa: E402
from extract_memory import WRAPPER  # noqa: E402
from tinyproject import make_project, project_env, tiny_params  # noqa: E402

TRAINERS = ("train-backbone", "train-refine")
CHAIN = ("prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine")


def dataset_params(images: int, classes: int, image_size: int, input_size: int, batch_size: int,
                   extra: dict[str, Any], epochs: int = 1) -> dict[str, Any]:
    """Tiny-project params for ``images`` synthetic images (4/5 train + val, 1/5 test) seen at ``input_size``, both
    trainers for ``epochs`` epochs."""
    per_class, rest = divmod(images, classes)
    if rest or per_class % 5:
        raise ValueError(f"images ({images}) must be a multiple of 5 x classes ({classes})")
    synthetic = {"num_classes": classes, "train_per_class": per_class * 4 // 5, "test_per_class": per_class // 5,
                 "image_size": image_size, "distractors": 2}
    shared = {k: v for k, v in extra.items() if "." not in k}
    only = {section: {k.split(".", 1)[1]: v for k, v in extra.items() if k.startswith(section + ".")} for section in ("train_backbone", "train_refine")}
    if unknown := [k for k in extra if "." in k and k.split(".", 1)[0] not in only]:
        raise ValueError(f"--set: a dotted key must start with train_backbone. or train_refine., got {unknown}")
    train = {"input_size": input_size, "epochs": epochs, "batch_size": batch_size, **shared}
    return tiny_params(
        datasets={"synthetic": {"kind": "synthetic", "root": "data/synthetic/raw", "val_fraction": 0.2, "synthetic": synthetic}},
        train_backbone={**train, **only["train_backbone"]},
        attention={"method": "oaam", "batch_size": batch_size},
        crops={"batch_size": batch_size, "preview_images": 2},
        train_refine={**train, "input_size": input_size, **only["train_refine"]},
    )


def tree_pss_peak(pid: int, stop: threading.Event, out: list[float]) -> None:
    """Sample the summed PSS of ``pid``'s process tree every 50 ms until ``stop``; the peak (bytes) goes to ``out``."""
    peak = 0.0
    while not stop.is_set():
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            procs = []
        total = 0
        for p in procs:
            try:
                total += p.memory_full_info().pss  # /proc/PID/smaps_rollup
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak = max(peak, total)
        time.sleep(0.05)
    out.append(peak)


def run_measured(args: list[str], cwd: Path, log: Path) -> dict[str, float]:
    """``python -m fgpipe ARGS`` in ``cwd``: wall seconds, peak RSS of the stage process and peak PSS of its whole tree
    (MiB)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", WRAPPER, str(log), *args], cwd=cwd, env=project_env(cwd, threads=None),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop, peak = threading.Event(), []
    sampler = threading.Thread(target=tree_pss_peak, args=(proc.pid, stop, peak))
    sampler.start()
    stdout, stderr = proc.communicate()
    stop.set()
    sampler.join()
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"wrapper failed: {stderr[-2000:]}")
    usage = json.loads(stdout)
    if usage["returncode"] != 0:
        raise RuntimeError(f"`fgpipe {' '.join(args)}` failed ({usage['returncode']}):\n{log.read_text()[-3000:]}")
    # the wrapper (a small python) is in the tree too: its own RSS is left in, the same at both sizes
    return {"seconds": seconds, "peak_rss_mib": usage["maxrss_kib"] / 1024, "peak_tree_pss_mib": peak[0] / 2**20}


def one_size(root: Path, images: int, params: dict[str, Any], code: Path | None) -> dict[str, Any]:
    """Make a project of ``images`` images and run the chain up to train-refine, measuring every stage."""
    project = make_project(root, params, dvc_init=False, copy_code=True)
    if code is not None:  # another checkout's fgpipe (the params stay this one's tiny params)
        shutil.rmtree(project / "fgpipe")
        shutil.copytree(code / "fgpipe", project / "fgpipe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    logs = project / "logs"
    logs.mkdir()
    stages = {cmd: run_measured([cmd, "--dataset", "synthetic"], project, logs / f"{cmd}.log") for cmd in CHAIN}
    provenance = {}
    for cmd in TRAINERS:
        made = project / "metrics/synthetic" / f"{cmd.replace('-', '_')}.provenance.json"
        record = json.loads(made.read_text())
        provenance[cmd] = {k: record.get(k) for k in ("loader", "num_workers")}
    return {"images": images, "stages": stages, "provenance": provenance}


def run(images: int = 100, factor: int = 4, image_size: int = 384, input_size: int = 384, classes: int = 4,
        batch_size: int = 16, code: Path | None = None, extra: dict[str, Any] | None = None,
        workdir: Path | None = None, equal_steps: bool = False) -> dict[str, Any]:
    """Peak RSS of each trainer at ``images`` and ``factor`` x ``images`` images, and the ratios big / small.
    ``equal_steps``: the small dataset trains ``factor`` epochs, the big one 1, so both runs take the same steps (and
    see the same number of val images): what grows then is what the stage holds per image, not what a longer run
    costs (the allocator's heap, which grows with the steps: with glibc's mallopt settings it is never returned)."""
    extra = extra or {}
    epochs = {"small": factor if equal_steps else 1, "big": 1}
    with tempfile.TemporaryDirectory(prefix="fgpipe-bench-train-memory-", dir=workdir) as tmp:
        sizes = {
            name: one_size(Path(tmp) / name, n, dataset_params(n, classes, image_size, input_size, batch_size, extra, epochs[name]), code)
            for name, n in (("small", images), ("big", images * factor))
        }
    ratios = {
        f"{cmd}_{what}": sizes["big"]["stages"][cmd][what] / sizes["small"]["stages"][cmd][what]
        for cmd in TRAINERS for what in ("peak_rss_mib", "peak_tree_pss_mib")
    }
    return {
        "config": {"images": images, "factor": factor, "image_size": image_size, "input_size": input_size,
                   "classes": classes, "batch_size": batch_size, "backbone": "tiny", "epochs": epochs,
                   "code": str(code) if code else "this checkout", "set": extra},
        **sizes,
        "big_over_small": ratios,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100, help="N, the small dataset's image count")
    p.add_argument("--factor", type=int, default=4, help="the big dataset has factor x N images")
    p.add_argument("--image-size", type=int, default=384, help="side of the synthetic images")
    p.add_argument("--input-size", type=int, default=384, help="both trainers' input_size")
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--code", type=Path, help="a checkout whose fgpipe/ runs the stages (default: this one)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a key of both trainers' params, e.g. num_workers=0 or in_memory=true; of one trainer's with its "
                        "section, e.g. train_refine.pad_parts=false")
    p.add_argument("--equal-steps", action="store_true",
                   help="the small dataset trains FACTOR epochs, so both sizes take the same steps (see run)")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args()
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.set)}
    result = {"benchmark": "train_memory", "args": {k: str(v) for k, v in vars(a).items()}, "machine": machine_info()}
    result |= run(a.images, a.factor, a.image_size, a.input_size, a.classes, a.batch_size, a.code, extra,
                  equal_steps=a.equal_steps)
    emit(result, a.out)


if __name__ == "__main__":
    main()
