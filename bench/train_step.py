"""Benchmark: images/s of the full stage-1 training step vs the bare backbone forward/backward.

Both on the same batch, same model, in one run, so the ratio says what the WS-DAN machinery
(attention head, BAP, center loss, crop/drop and the second forward) costs on top of the backbone.

    uv run python bench/train_step.py --backbone resnet50 --input-size 448 --batch-size 8
    uv run python bench/train_step.py --backbone resnet50 --input-size 448 --batch-size 16 --device cuda --precision both --compile

``run()`` returns the same figures for the suite (bench/suite.py). Run as a script, it sets glibc's allocator as the
fgpipe CLI does (``FGPIPE_MALLOC_TUNING=0``: glibc's defaults; bench/malloc_ab.py compares the two).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, timed  # noqa: E402

from fgpipe.config import ModelConfig, TrainBackboneConfig  # noqa: E402
from fgpipe.models import build_stage1  # noqa: E402
from fgpipe.models.wsdan import CenterLoss  # noqa: E402
from fgpipe.errors import ConfigError  # noqa: E402
from fgpipe.runtime import configure_threads, tune_malloc  # noqa: E402
from fgpipe.stages.train_backbone import train_step  # noqa: E402
from fgpipe.training import Runtime, build_optimizer  # noqa: E402

VARIANTS = ("fp32", "bf16_channels_last", "bf16_channels_last_compile")


def measure(
    backbone: str = "resnet50", lcam: str = "block", input_size: int = 448, batch_size: int = 8, classes: int = 200,
    steps: int = 5, warmup: int = 2, device: str | torch.device = "cpu", variant: str = "fp32", compile_backend: str = "inductor",
) -> dict[str, float]:
    """Seconds per step (median) and images/s of the bare backbone step and the full stage-1 step, one variant.

    ``variant``: ``fp32``; ``bf16_channels_last`` (bf16 autocast, model and input channels_last);
    ``bf16_channels_last_compile`` (the same, the model's forward and the bare step under ``torch.compile``
    with ``compile_backend``; compilation happens in the warm-up steps, so give it ``warmup >= 2``: the
    second view of the full step has twice the batch).
    """
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    device = torch.device(device)
    bf16 = variant != "fp32"
    rt = Runtime(device=device, amp_dtype=torch.bfloat16 if bf16 else None, channels_last=bf16)
    torch.manual_seed(0)
    mcfg = ModelConfig(backbone=backbone, lcam=lcam, num_attentions=32)
    cfg = TrainBackboneConfig(input_size=input_size, batch_size=batch_size)
    model = build_stage1(mcfg, classes).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    center = CenterLoss(classes, model.embedding_dim).to(device)
    opt = build_optimizer(model.parameters(), "sgd", 1e-3, 0.9, 1e-4)
    x = rt.to_input(torch.randn(batch_size, 3, input_size, input_size))
    y = torch.randint(0, classes, (batch_size,)).to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    model.train()

    def features_loss(t: torch.Tensor) -> torch.Tensor:
        return model.backbone.forward_features(t)[model.backbone.last_stage].float().mean()

    if variant.endswith("_compile"):
        model.compile(backend=compile_backend)  # in place: model(x) in train_step runs the compiled forward
        features_loss = torch.compile(features_loss, backend=compile_backend)

    def full() -> None:
        train_step(model, center, opt, x, y, cfg, rt, gen)

    def bare() -> None:
        with rt.autocast():
            loss = features_loss(x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_bare = timed(bare, steps, warmup, device)
    t_full = timed(full, steps, warmup, device)
    return {
        "bare_s_per_step": t_bare,
        "full_s_per_step": t_full,
        "bare_backbone_images_per_s": round(batch_size / t_bare, 2),
        "full_stage1_step_images_per_s": round(batch_size / t_full, 2),
        "full_over_bare_time": round(t_full / t_bare, 3),
    }


def run(
    backbone: str = "resnet50", lcam: str = "block", input_size: int = 448, batch_size: int = 8, classes: int = 200,
    steps: int = 5, warmup: int = 2, device: str | None = None, variants: tuple[str, ...] = ("fp32",),
    compile_backend: str = "inductor",
) -> dict[str, dict[str, float]]:
    """:func:`measure` for each of ``variants`` in turn on the same device (CUDA when there is one)."""
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    common = dict(backbone=backbone, lcam=lcam, input_size=input_size, batch_size=batch_size, classes=classes,
                  steps=steps, warmup=warmup, device=dev, compile_backend=compile_backend)
    return {v: measure(variant=v, **common) for v in variants}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--lcam", default="block", choices=["none", "block", "stage"])
    p.add_argument("--input-size", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"],
                   help="bf16 means bf16 autocast with channels_last model and input")
    p.add_argument("--compile", action="store_true", help="also bf16 + channels_last + torch.compile")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    try:
        tune_malloc()  # as the fgpipe CLI does (bench/RESULTS.md, malloc); FGPIPE_MALLOC_TUNING=0: glibc's defaults
    except ConfigError as exc:
        p.error(str(exc))
    configure_threads()
    variants = [v for v, on in (("fp32", args.precision in ("fp32", "both")),
                                ("bf16_channels_last", args.precision in ("bf16", "both")),
                                ("bf16_channels_last_compile", args.compile)) if on]
    result = {"benchmark": "train_step", "args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info()}
    result |= run(args.backbone, args.lcam, args.input_size, args.batch_size, args.classes, args.steps, args.warmup,
                  args.device, tuple(variants), args.compile_backend)
    emit(result, args.out)


if __name__ == "__main__":
    main()
