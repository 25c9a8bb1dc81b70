"""Bare backbone forward/backward images/s, NCHW vs channels_last (NHWC), on the current device.

    uv run python bench/channels_last.py --backbones efficientnet_lite0 resnet18 --input-size 224 --batch-size 16
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine_info, timed  # noqa: E402

from fgpipe.models import create_backbone  # noqa: E402
from fgpipe.runtime import configure_threads  # noqa: E402


def rate(name: str, size: int, batch: int, channels_last: bool, device: torch.device, steps: int) -> float:
    torch.manual_seed(0)
    b = create_backbone(name).to(device).train()
    x = torch.randn(batch, 3, size, size, device=device)
    if channels_last:
        b, x = b.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)

    def step() -> None:
        feats = b.forward_features(x)
        feats[b.last_stage].float().mean().backward()

    return batch / timed(step, steps, 1, device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=["efficientnet_lite0", "resnet18"])
    p.add_argument("--input-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    configure_threads()
    device = torch.device(a.device)
    res = {n: {"nchw_images_per_s": round(rate(n, a.input_size, a.batch_size, False, device, a.steps), 2),
               "channels_last_images_per_s": round(rate(n, a.input_size, a.batch_size, True, device, a.steps), 2)}
           for n in a.backbones}
    print(json.dumps({"benchmark": "channels_last", "args": vars(a), "machine": machine_info(), "results": res}, indent=2))


if __name__ == "__main__":
    main()
