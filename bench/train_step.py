"""Benchmark: images/s of the full stage-1 training step vs the bare backbone forward/backward.

Both on the same batch, same model, in one run, so the ratio says what the WS-DAN machinery
(attention head, BAP, center loss, crop/drop and the second forward) costs on top of the backbone.

    uv run python bench/train_step.py --backbone resnet50 --input-size 448 --batch-size 8
    uv run python bench/train_step.py --backbone resnet50 --input-size 448 --batch-size 16 --device cuda --precision both
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
from fgpipe.runtime import configure_threads  # noqa: E402
from fgpipe.stages.train_backbone import train_step  # noqa: E402
from fgpipe.training import Runtime, build_optimizer  # noqa: E402


def measure(args: argparse.Namespace, bf16: bool) -> dict[str, float]:
    device = torch.device(args.device)
    rt = Runtime(device=device, amp_dtype=torch.bfloat16 if bf16 else None, channels_last=bf16 and device.type == "cuda")
    torch.manual_seed(0)
    mcfg = ModelConfig(backbone=args.backbone, lcam=args.lcam, num_attentions=32)
    cfg = TrainBackboneConfig(input_size=args.input_size, batch_size=args.batch_size)
    model = build_stage1(mcfg, args.classes).to(device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    center = CenterLoss(args.classes, model.embedding_dim).to(device)
    opt = build_optimizer(model.parameters(), "sgd", 1e-3, 0.9, 1e-4)
    x = rt.to_input(torch.randn(args.batch_size, 3, args.input_size, args.input_size))
    y = torch.randint(0, args.classes, (args.batch_size,)).to(device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    model.train()

    def full() -> None:
        train_step(model, center, opt, x, y, cfg, rt, gen)

    def bare() -> None:
        with rt.autocast():
            feats = model.backbone.forward_features(x)
            loss = feats[model.backbone.last_stage].float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t_bare = timed(bare, args.steps, args.warmup, device)
    t_full = timed(full, args.steps, args.warmup, device)
    return {
        "bare_backbone_images_per_s": round(args.batch_size / t_bare, 2),
        "full_stage1_step_images_per_s": round(args.batch_size / t_full, 2),
        "full_over_bare_time": round(t_full / t_bare, 3),
    }


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
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "both"])
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    configure_threads()
    result = {"benchmark": "train_step", "args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info()}
    if args.precision in ("fp32", "both"):
        result["fp32"] = measure(args, bf16=False)
    if args.precision in ("bf16", "both"):
        result["bf16_channels_last"] = measure(args, bf16=True)
    emit(result, args.out)


if __name__ == "__main__":
    main()
