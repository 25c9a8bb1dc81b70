"""Benchmark: peak memory of `fgpipe extract-attention` and `fgpipe extract-crops` at two dataset sizes.

Both stages decode and process images batch by batch, so their peak memory must not grow with the
dataset. Two synthetic datasets, of N and ``factor`` x N images (same classes, image size and model, the
same small train split; the test split makes up the rest), each get `fgpipe prepare` and a one-epoch
`fgpipe train-backbone` of the ``tiny`` model; then each extraction stage runs as its own process
(all cores, the CLI's allocator settings) and its peak resident set size
(``ru_maxrss`` from ``os.wait4``) is recorded. The ratio big / small should be about 1. For scale, each
result also gives what holding every decoded image (uint8, at the input size) at once would add.

    uv run python bench/extract_memory.py --images 100 --factor 4 --input-size 448
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import emit, machine_info  # noqa: E402
from tinyproject import make_project, project_env, tiny_params  # noqa: E402

STAGES = ("extract-attention", "extract-crops")
VAL_FRACTION = 0.2
TRAIN_PER_CLASS = 5


def split_sizes(images: int, classes: int) -> tuple[int, int]:
    """(train_per_class, test_per_class) giving exactly ``images`` images; train stays at 5 per class (1 goes to
    val), so the stage-1 training the benchmark needs costs the same at every size."""
    per_class, rest = divmod(images, classes)
    if rest or per_class <= TRAIN_PER_CLASS:
        raise ValueError(f"images ({images}) must be a multiple of classes ({classes}), more than {TRAIN_PER_CLASS} per class")
    return TRAIN_PER_CLASS, per_class - TRAIN_PER_CLASS


def dataset_params(images: int, classes: int, input_size: int, batch_size: int) -> dict[str, Any]:
    """Tiny-project params for a synthetic dataset of ``images`` images seen by the tiny model at ``input_size``."""
    train, test = split_sizes(images, classes)
    synthetic = {"num_classes": classes, "train_per_class": train, "test_per_class": test,
                 "image_size": input_size, "distractors": 2}
    return tiny_params(
        datasets={"synthetic": {"kind": "synthetic", "root": "data/synthetic/raw", "val_fraction": VAL_FRACTION,
                                "synthetic": synthetic}},
        train_backbone={"input_size": input_size, "epochs": 1, "batch_size": batch_size},
        attention={"method": "oaam", "batch_size": batch_size},
        crops={"batch_size": batch_size, "preview_images": 2},
    )


# Measures its child, ``python -m fgpipe ARGS``: wait4's rusage of that child, as JSON on stdout. The
# benchmark cannot wait4 the stage itself: a child spawned by a large process starts with that process's
# peak RSS as its own ru_maxrss (Linux carries the pre-exec memory's high-water mark over), and the suite's
# process is large after the model benchmarks. The wrapper is a fresh small process, so its child is clean.
WRAPPER = """
import json, os, subprocess, sys
with open(sys.argv[1], "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "fgpipe", *sys.argv[2:]], stdout=log, stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # the stage's own process (it sets its allocator in place: mallopt)
    proc.returncode = os.waitstatus_to_exitcode(status)
print(json.dumps({"returncode": proc.returncode, "maxrss_kib": usage.ru_maxrss}))
"""


def run_measured(args: list[str], cwd: Path, log: Path) -> dict[str, float]:
    """Run ``python -m fgpipe ARGS`` in ``cwd`` (output to ``log``); its wall seconds and peak RSS in MiB."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", WRAPPER, str(log), *args], cwd=cwd, env=project_env(cwd, threads=None),
                          capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - t0
    usage = json.loads(proc.stdout)
    if usage["returncode"] != 0:
        raise RuntimeError(f"`fgpipe {' '.join(args)}` failed ({usage['returncode']}):\n{log.read_text()[-3000:]}")
    return {"seconds": seconds, "peak_rss_mib": usage["maxrss_kib"] / 1024}  # ru_maxrss is in KiB on Linux


def one_size(root: Path, images: int, classes: int, input_size: int, batch_size: int) -> dict[str, Any]:
    """Prepare and train a project of ``images`` images, then measure each extraction stage."""
    project = make_project(root, dataset_params(images, classes, input_size, batch_size), dvc_init=False, copy_code=True)
    logs = project / "logs"
    logs.mkdir()
    setup = {cmd: run_measured([cmd, "--dataset", "synthetic"], project, logs / f"{cmd}.log")["seconds"]
             for cmd in ("prepare", "train-backbone")}
    stages = {cmd: run_measured([cmd, "--dataset", "synthetic"], project, logs / f"{cmd}.log") for cmd in STAGES}
    return {
        "images": images,
        "setup_seconds": setup,
        "stages": stages,
        "all_images_uint8_mib": images * 3 * input_size * input_size / 2**20,
    }


def run(images: int = 100, factor: int = 4, input_size: int = 448, classes: int = 4, batch_size: int = 16,
        workdir: Path | None = None) -> dict[str, Any]:
    """Peak RSS of each extraction stage at ``images`` and ``factor`` x ``images`` images, and their ratio."""
    with tempfile.TemporaryDirectory(prefix="fgpipe-bench-memory-", dir=workdir) as tmp:
        sizes = {name: one_size(Path(tmp) / name, n, classes, input_size, batch_size)
                 for name, n in (("small", images), ("big", images * factor))}
    return {
        "config": {"images": images, "factor": factor, "input_size": input_size, "classes": classes,
                   "batch_size": batch_size, "backbone": "tiny", "method": "oaam"},
        **sizes,
        "big_over_small_peak_rss": {
            cmd: sizes["big"]["stages"][cmd]["peak_rss_mib"] / sizes["small"]["stages"][cmd]["peak_rss_mib"] for cmd in STAGES
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=100, help="N, the small dataset's image count")
    p.add_argument("--factor", type=int, default=4, help="the big dataset has factor x N images")
    p.add_argument("--input-size", type=int, default=448)
    p.add_argument("--classes", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args()
    result = {"benchmark": "extract_memory", "args": {k: str(v) for k, v in vars(a).items()}, "machine": machine_info()}
    result |= run(a.images, a.factor, a.input_size, a.classes, a.batch_size)
    emit(result, a.out)


if __name__ == "__main__":
    main()
