"""Benchmark: heatmaps/s of fgpipe's batched OAAM (Grad-CAM++) vs the `grad-cam` package, and box extraction.

In one run, on the same stage-1 model, target layer and batch:

- ``oaam_fgpipe``: fgpipe's implementation: the backbone under no_grad, a gradient only through the head,
  one forward and one backward per batch (``fgpipe.attention.OAAM``);
- ``oaam_grad_cam_package``: ``pytorch_grad_cam.GradCAMPlusPlus`` on the Stage1Net wrapped to return the scores
  fgpipe's OAAM explains (the CAM head's when the model has one, else the WS-DAN logits),
  target layer = the module whose output is the feature layer's stage output (the last block's LCAM module
  with ``lcam: block``); the package backpropagates through the whole network and resizes the maps to the
  input size. The two heatmaps are compared (correlation after bringing ours to the input size);
- box extraction from a cached attention.h5 written here (heatmaps of ``--images`` generated JPEGs):
  object boxes only (read + section 4), and object boxes + MPALM (decode the object crops from the JPEGs,
  backbone forward, section 5), through the same functions the extract-crops stage runs.

Random-init weights (no download); the speed does not depend on them.

    uv run --group bench python bench/extract.py --backbone resnet50 --input-size 448 --batch-size 8

``run()`` returns the same figures for the suite (bench/suite.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import emit, machine_info, timed  # noqa: E402

from fgpipe.attention import create_method  # noqa: E402
from fgpipe.config import CropsConfig, ModelConfig  # noqa: E402
from fgpipe.crop_parts import parts_of  # noqa: E402
from fgpipe.h5schema import AttentionMeta, AttentionReader, AttentionWriter  # noqa: E402
from fgpipe.loader import LoadRequest, batched, decode_batch, normalize, prefetched  # noqa: E402
from fgpipe.manifest import ManifestRow  # noqa: E402
from fgpipe.models import build_stage1  # noqa: E402
from fgpipe.models.staged import lcam_key  # noqa: E402
from fgpipe.models.wsdan import Stage1Net  # noqa: E402
from fgpipe.runtime import configure_threads  # noqa: E402
from fgpipe.stages.extract_crops import batches_with_boxes  # noqa: E402


class LogitsOnly(nn.Module):
    """Stage1Net as the grad-cam package expects a classifier: input -> the class scores fgpipe's OAAM explains
    (``score``: ``cam``, the CAM head's, or ``wsdan``, the BAP classifier's; see fgpipe.attention.base)."""

    def __init__(self, net: Stage1Net, score: str) -> None:
        super().__init__()
        self.net = net
        self.score = score

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return out.cam_logits if self.score == "cam" else out.logits


def stage_output_module(net: Stage1Net) -> nn.Module:
    """The module whose output is ``features(x)[feature_layer]`` (checked by a hook in :func:`run`)."""
    bb = net.backbone
    stage = next(s for s in bb._stages if s.name == net.feature_layer)
    last = stage.blocks[-1]
    if bb.lcam_placement == "block" and last.lcam:
        return bb.lcam[lcam_key(last.path)]
    if bb.lcam_placement == "stage":
        return bb.lcam[lcam_key(stage.name)]
    return bb.get_submodule(last.path)


def write_images(folder: Path, n: int, seed: int = 0) -> list[ManifestRow]:
    """``n`` 500 x 375 JPEGs (CUB-like size): smooth noise with a bright ellipse, as manifest rows."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        w, h = 500, 375
        small = rng.integers(40, 200, size=(h // 25, w // 25, 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BICUBIC)
        arr = np.asarray(img).copy()
        cx, cy = rng.integers(120, 380), rng.integers(100, 275)
        yy, xx = np.mgrid[0:h, 0:w]
        arr[((xx - cx) / 90.0) ** 2 + ((yy - cy) / 60.0) ** 2 <= 1] = (230, 200, 60)
        rel = f"{i:04d}.jpg"
        Image.fromarray(arr).save(folder / rel, quality=90)
        rows.append(ManifestRow(str(i), rel, 0, "c", "test", w, h, None))
    return rows


def run(
    backbone: str = "resnet50", lcam: str = "block", input_size: int = 448, batch_size: int = 8, classes: int = 200,
    images: int = 32, steps: int = 2, warmup: int = 1, device: str | None = None,
) -> dict[str, Any]:
    """Every measure of the module docstring on ``device`` (CUDA when there is one); raw medians under ``seconds``."""
    from pytorch_grad_cam import GradCAMPlusPlus

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    net = build_stage1(ModelConfig(backbone=backbone, lcam=lcam), classes).to(device).eval()
    x = torch.randn(batch_size, 3, input_size, input_size, device=device)
    ours = create_method("oaam", net)
    target = stage_output_module(net)

    captured: list[torch.Tensor] = []
    handle = target.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
    with torch.no_grad():
        feats = net.features(x)[net.feature_layer]
    handle.remove()
    if not torch.equal(captured[-1], feats):
        raise RuntimeError(f"{type(target).__name__} does not output the feature layer {net.feature_layer}")

    package = GradCAMPlusPlus(model=LogitsOnly(net, ours.score), target_layers=[target])
    t_ours = timed(lambda: ours(x), steps, warmup, device)
    t_pkg = timed(lambda: package(input_tensor=x, targets=None), steps, warmup, device)

    # agreement: package maps are min-max scaled and resized (bilinear) to the input size; do the same to ours
    two = x[:2]  # two images are enough to compare, and cheaper
    ref = torch.as_tensor(package(input_tensor=two, targets=None))  # (2, S, S)
    mine = F.interpolate(ours(two).heatmaps[:, None].cpu(), size=ref.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    lo = mine.amin(dim=(1, 2), keepdim=True)
    mine = (mine - lo) / (mine.amax(dim=(1, 2), keepdim=True) - lo + 1e-7)
    corr = float(np.corrcoef(mine.flatten().numpy(), ref.flatten().numpy())[0, 1])
    package.activations_and_grads.release()

    cfg = CropsConfig(batch_size=batch_size, threshold=0.2)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        rows = write_images(root, images)
        att_path = root / "attention.h5"
        meta = AttentionMeta("oaam", net.feature_layer, input_size, "0" * 64, "0" * 64)
        size = (input_size, input_size)
        jobs = ((b, [LoadRequest(root / r.path, (0.0, 0.0, float(r.width), float(r.height))) for r in b])
                for b in batched(rows, batch_size))
        t0 = time.perf_counter()
        with AttentionWriter(att_path, meta, tuple(feats.shape[-2:]), classes) as writer:
            for b, decoded in prefetched(jobs, size):
                out = ours(normalize(decoded.to(device)))
                writer.append([r.image_id for r in b], [r.label for r in b], out.heatmaps, out.logits, out.predictions)
        t_attention_stage = time.perf_counter() - t0

        def boxes_only() -> None:
            with AttentionReader(att_path) as att:
                for _ in batches_with_boxes(att, rows, root, cfg):
                    pass

        def with_mpalm() -> None:
            with AttentionReader(att_path) as att:
                for (_, _, obj), crops in prefetched(batches_with_boxes(att, rows, root, cfg), size):
                    parts_of(net, crops, obj.boxes, input_size, cfg, device)

        t_boxes = timed(boxes_only, 3, 1, device)
        t_mpalm = timed(with_mpalm, 1, 0, device)
        t_decode = timed(
            lambda: decode_batch([LoadRequest(root / r.path, (0.0, 0.0, 500.0, 375.0)) for r in rows[: batch_size]], size),
            3, 1, device,
        )

    return {
        "oaam_heatmaps_per_s": {
            "fgpipe_batched": round(batch_size / t_ours, 2),
            "grad_cam_package": round(batch_size / t_pkg, 2),
            "speedup": round(t_pkg / t_ours, 2),
            "agreement_correlation": round(corr, 4),
            "target_layer": f"{net.feature_layer} ({type(target).__name__})",
            "score": ours.score,
        },
        "attention_stage_images_per_s": round(images / t_attention_stage, 2),
        "box_extraction_images_per_s": {
            "object_boxes_only": round(images / t_boxes, 1),
            "object_boxes_and_mpalm": round(images / t_mpalm, 2),
        },
        f"decode_{input_size}_images_per_s": round(batch_size / t_decode, 1),
        "seconds": {
            "oaam_fgpipe_batch": t_ours, "oaam_grad_cam_package_batch": t_pkg, "attention_stage": t_attention_stage,
            "object_boxes_only": t_boxes, "object_boxes_and_mpalm": t_mpalm, "decode_batch": t_decode,
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="resnet50")
    p.add_argument("--lcam", default="block", choices=["none", "block", "stage"])
    p.add_argument("--input-size", type=int, default=448)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--classes", type=int, default=200)
    p.add_argument("--images", type=int, default=32, help="images in the cached attention.h5 for box extraction")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    args = p.parse_args()
    configure_threads()
    result = {"benchmark": "extract", "args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info()}
    result |= run(args.backbone, args.lcam, args.input_size, args.batch_size, args.classes, args.images,
                  args.steps, args.warmup, args.device)
    emit(result, args.out)


if __name__ == "__main__":
    main()
