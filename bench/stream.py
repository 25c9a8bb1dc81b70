"""Benchmark: the input pipeline's images/s (0, 1, 2 workers) against the training step's, and the stage streamed or in
memory.

A synthetic dataset (``--images`` images of ``--image-size`` px, with its images.h5) is prepared in a temporary
project; then, side by side in one run:

- ``loader``: one pass over the train split in a shuffled order, in batches of ``--batch-size``, through
  :func:`fgpipe.streaming.whole_image_feed` with 0, 1 and 2 workers (the pixels train-backbone reads, at
  ``input_size`` x ``resize_ratio``), and the in-memory path's one-off decode (:func:`fgpipe.loader.load_regions`, in
  threads); images/s, median over ``--rounds`` rounds taken in turn;
- ``step``: the full stage-1 training step alone on a batch already in memory (bench/train_step.py), images/s;
- ``stage``: `fgpipe train-backbone` for ``--epochs`` epochs streamed with 0 and 2 workers and with ``in_memory: true``,
  back to back: its training loop's images/s (metrics ``images_per_s``: the epochs, validation left out) and the
  stage's wall seconds (decode, epochs, validation and test included).

The loader keeps up when its images/s exceeds the step's; the stage figures say what that costs end to end. With
``--device cuda`` the step is bf16 + channels_last on the GPU (the stage's ``amp: auto``) and the stage runs there: the
loop's images/s over the bare step's is issue 16's "data never stalls the GPU" figure (bench/gpu.sh).

    uv run python bench/stream.py --backbone efficientnet_lite0 --input-size 224
    uv run python bench/stream.py --backbone tiny --input-size 384
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
import train_step  # noqa: E402
from common import emit, machine_info  # noqa: E402
from tinyproject import make_project, project_env, tiny_params  # noqa: E402

from fgpipe.config import load_params  # noqa: E402
from fgpipe.imagecache import ImageCache  # noqa: E402
from fgpipe.lineage import read_dataset_inputs  # noqa: E402
from fgpipe.loader import load_regions, resized_side, whole_image_requests  # noqa: E402
from fgpipe.streaming import FeedOptions, whole_image_feed  # noqa: E402

PATHS = {"stream_0_workers": {"num_workers": 0}, "stream_2_workers": {"num_workers": 2}, "memory": {"in_memory": True}}


def project_params(images: int, image_size: int, input_size: int, backbone: str, batch_size: int, epochs: int) -> dict[str, Any]:
    classes = 4
    per_class = images // classes
    synthetic = {"num_classes": classes, "train_per_class": per_class * 4 // 5, "test_per_class": per_class // 5,
                 "image_size": image_size, "distractors": 2}
    return tiny_params(
        datasets={"synthetic": {"kind": "synthetic", "root": "data/synthetic/raw", "val_fraction": 0.2, "synthetic": synthetic}},
        model={"backbone": backbone, "weights": "none", "lcam": "block", "num_attentions": 8, "logit_scale": 10.0},
        train_backbone={"input_size": input_size, "epochs": epochs, "batch_size": batch_size, "lr": 0.01},
    )


def fgpipe(project: Path, *args: str) -> float:
    """Run ``python -m fgpipe ARGS`` in ``project`` (all cores); its wall seconds."""
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fgpipe", *args], cwd=project, env=project_env(project, threads=None),
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"`fgpipe {' '.join(args)}` failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def loader_rates(project: Path, batch_size: int, rounds: int) -> dict[str, float]:
    """images/s of one shuffled pass over train through the feed with 0, 1, 2 workers, and of the in-memory decode."""
    settings = load_params(project / "params.yaml")
    inputs = read_dataset_inputs(settings, "synthetic")
    cfg = settings.params.train_backbone
    side = resized_side(cfg.input_size, cfg.augment)
    cache = ImageCache(project / "data/synthetic/images.h5", inputs.root)
    rows = inputs.by_split["train"]
    requests = whole_image_requests(inputs.root, rows, cache)
    chunks = list(torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).split(batch_size))
    timings: dict[str, list[float]] = {}

    def one(name: str, fn: Any) -> None:
        t0 = time.perf_counter()
        fn()
        timings.setdefault(name, []).append(len(rows) / (time.perf_counter() - t0))

    for _ in range(rounds):
        for workers in (0, 1, 2):
            feed = whole_image_feed(requests, side, FeedOptions(num_workers=workers), "train")
            one(f"stream_{workers}_workers_images_per_s", lambda feed=feed: [None for _ in feed.batches(chunks)])
        one("memory_decode_images_per_s", lambda: load_regions(requests, (side, side)))
    return {k: statistics.median(v) for k, v in timings.items()}


def stage_runs(project: Path, device: str = "cpu") -> dict[str, dict[str, float]]:
    """train-backbone streamed with 0 and 2 workers and in memory, in turn: loop images/s and stage seconds."""
    out = {}
    params = project / "params.yaml"
    base = yaml.safe_load(params.read_text())
    for name, values in PATHS.items():
        doc = yaml.safe_load(params.read_text())
        doc["train_backbone"] = {**base["train_backbone"], "device": device, **values}
        params.write_text(yaml.safe_dump(doc))
        seconds = fgpipe(project, "train-backbone", "--dataset", "synthetic")
        metrics = json.loads((project / "metrics/synthetic/train_backbone.json").read_text())
        out[name] = {"loop_images_per_s": metrics["images_per_s"], "stage_seconds": seconds}
    params.write_text(yaml.safe_dump(base))
    return out


def run(images: int = 160, image_size: int = 384, input_size: int = 224, backbone: str = "efficientnet_lite0",
        batch_size: int = 16, epochs: int = 2, rounds: int = 3, device: str = "cpu", workdir: Path | None = None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="fgpipe-bench-stream-", dir=workdir) as tmp:
        project = make_project(Path(tmp) / "p", project_params(images, image_size, input_size, backbone, batch_size, epochs),
                               dvc_init=False, copy_code=True)
        fgpipe(project, "prepare", "--dataset", "synthetic")
        train_images = len(read_dataset_inputs(load_params(project / "params.yaml"), "synthetic").by_split["train"])
        loader = loader_rates(project, batch_size, rounds)
        # the step as the stage runs it on this device: fp32 on the CPU, bf16 autocast + channels_last on CUDA (amp: auto)
        variant = "bf16_channels_last" if device == "cuda" else "fp32"
        step = train_step.measure(backbone=backbone, input_size=input_size, batch_size=batch_size, classes=4, steps=8 if device == "cuda" else 4,
                                  warmup=2 if device == "cuda" else 1, device=device, variant=variant)
        stage = stage_runs(project, device)
    step_rate = step["full_stage1_step_images_per_s"]
    return {
        "config": {"images": images, "train_images": train_images, "image_size": image_size, "input_size": input_size,
                   "backbone": backbone, "batch_size": batch_size, "epochs": epochs, "rounds": rounds, "device": device},
        "loader": loader,
        "step": {"full_stage1_step_images_per_s": step_rate},
        "stage": stage,
        "loader_over_step": {k.removesuffix("_images_per_s"): v / step_rate for k, v in loader.items() if k.startswith("stream")},
        "stage_seconds_over_memory": {k: v["stage_seconds"] / stage["memory"]["stage_seconds"] for k, v in stage.items()},
        "loop_rate_over_memory": {k: v["loop_images_per_s"] / stage["memory"]["loop_images_per_s"] for k, v in stage.items()},
        # the training loop (pixels from the pipeline, augmentation, step, progress) over the step alone
        "loop_over_step": {k: v["loop_images_per_s"] / step_rate for k, v in stage.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=160)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--backbone", default="efficientnet_lite0")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the step and the stage run")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args()
    result = {"benchmark": "stream", "args": {k: str(v) for k, v in vars(a).items()}, "machine": machine_info()}
    result |= run(a.images, a.image_size, a.input_size, a.backbone, a.batch_size, a.epochs, a.rounds, a.device)
    emit(result, a.out)


if __name__ == "__main__":
    main()
