"""Sanity check of the synthetic dataset's fine-grained property (CPU, a few minutes).

Generates the dataset (params defaults unless overridden), then trains the same small CNN from
scratch twice, for the same epochs: (a) on whole images and (b) on ground-truth object crops, both
resized to the same input size, and reports their test top-1. A fine-grained dataset gives (b)
clearly above (a). It also reports how well Grad-CAM++ of the whole-image model localises the
object (METHODS.md 3-4: threshold 0.2, largest 8-connected component, cell edges) at two feature
resolutions, and saves a grid of sample images per class (ground-truth boxes drawn on the first
two columns).

    uv run python bench/synthetic_check.py [--epochs 10] [--size 224] [--grid /tmp/synthetic_grid.png]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from skimage.measure import label as cc_label
from torch import Tensor, nn

from fgpipe.config import DatasetConfig, SyntheticOptions
from fgpipe.datasets import synthetic, synthetic_reader


def small_cnn(num_classes: int, width: int = 32) -> nn.Sequential:
    """A VGG-like CNN with stride-32 output: stem /2, then four stages /2 each (channels w..8w)."""

    def stage(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        )

    w = width
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, w // 2, 3, 2, 1, bias=False), nn.BatchNorm2d(w // 2), nn.ReLU(inplace=True)),
        stage(w // 2, w), stage(w, 2 * w), stage(2 * w, 4 * w), stage(4 * w, 8 * w),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8 * w, num_classes),
    )


def load(root: Path, size: int) -> dict[str, dict[str, Tensor]]:
    """split -> {"whole": (N,3,S,S) uint8, "crop": (N,3,S,S) uint8, "y": (N,), "box": (N,4) original pixels}."""
    listing = synthetic_reader.read(root, DatasetConfig(kind="synthetic", root=str(root)))
    label_of = {c: i for i, c in enumerate(listing.classes)}
    out: dict[str, dict[str, list]] = {s: {"whole": [], "crop": [], "y": [], "box": []} for s in ("train", "test")}
    for r in listing.records:
        img = Image.open(root / r.path).convert("RGB")
        box = tuple(int(v) for v in r.box)  # type: ignore[union-attr]
        d = out[r.split]
        d["whole"].append(np.asarray(img.resize((size, size), Image.Resampling.BILINEAR)))
        d["crop"].append(np.asarray(img.crop(box).resize((size, size), Image.Resampling.BILINEAR)))
        d["y"].append(label_of[r.class_name])
        d["box"].append(box)
    return {
        s: {
            "whole": torch.from_numpy(np.stack(d["whole"])).permute(0, 3, 1, 2).contiguous(),
            "crop": torch.from_numpy(np.stack(d["crop"])).permute(0, 3, 1, 2).contiguous(),
            "y": torch.tensor(d["y"]),
            "box": torch.tensor(d["box"], dtype=torch.float32),
        }
        for s, d in out.items()
    }


def to_float(x: Tensor) -> Tensor:
    return (x.float() / 255.0 - 0.5) / 0.25


def augment(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random horizontal flip and a random shift of up to 1/16 of the side (reflect padding)."""
    n, _, s, _ = x.shape
    flip = torch.rand(n, generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(3), x)
    p = s // 16
    padded = F.pad(x, (p, p, p, p), mode="reflect")
    dx, dy = torch.randint(0, 2 * p + 1, (2,), generator=gen).tolist()
    return padded[:, :, dy : dy + s, dx : dx + s]


def train(x: Tensor, y: Tensor, num_classes: int, epochs: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = small_cnn(num_classes)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=5e-4)
    bs = 32
    steps = epochs * ((len(x) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.2)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), bs):
            idx = perm[i : i + bs]
            loss = F.cross_entropy(model(augment(to_float(x[idx]), gen)), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    pred = torch.cat([model(to_float(x[i : i + 64])).argmax(1) for i in range(0, len(x), 64)])
    return float((pred == y).float().mean())


def gradcampp_boxes(model: nn.Sequential, x: Tensor, layer: int, threshold: float = 0.2) -> tuple[Tensor, Tensor]:
    """Grad-CAM++ of the predicted class on model[layer]'s output -> object boxes (N, 4) and the centre
    of each map's peak cell (N, 2), both in input pixels."""
    boxes, peaks = [], []
    s = x.shape[-1]
    for i in range(0, len(x), 64):
        inp = to_float(x[i : i + 64])
        feats = model[: layer + 1](inp)  # (B, K, h, w)
        feats.retain_grad()
        scores = model[layer + 1 :](feats)  # (B, C)
        scores.gather(1, scores.argmax(1, keepdim=True)).sum().backward()
        a, g = feats.detach(), feats.grad
        denom = 2 * g**2 + (a * g**3).sum((2, 3), keepdim=True)
        alpha = torch.where(denom != 0, g**2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g))
        w = (alpha * F.relu(g)).sum((2, 3), keepdim=True)  # (B, K, 1, 1)
        cams = F.relu((w * a).sum(1)).numpy()  # (B, h, w)
        for cam in cams:
            h, wd = cam.shape
            py, px = np.unravel_index(cam.argmax(), cam.shape)
            peaks.append(((px + 0.5) * s / wd, (py + 0.5) * s / h))
            if cam.max() <= 0:
                boxes.append((0.0, 0.0, float(s), float(s)))
                continue
            lab = cc_label(cam / cam.max() >= threshold, connectivity=2)
            sizes = np.bincount(lab.ravel())
            sizes[0] = 0
            ys, xs = np.nonzero(lab == sizes.argmax())
            boxes.append((xs.min() * s / wd, ys.min() * s / h, (xs.max() + 1) * s / wd, (ys.max() + 1) * s / h))
    return torch.tensor(boxes), torch.tensor(peaks)


def iou(a: Tensor, b: Tensor) -> Tensor:
    lt = torch.maximum(a[:, :2], b[:, :2])
    rb = torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area = lambda t: (t[:, 2:] - t[:, :2]).prod(1)  # noqa: E731
    return inter / (area(a) + area(b) - inter)


def save_grid(root: Path, path: Path, per_class: int = 6) -> None:
    listing = synthetic_reader.read(root, DatasetConfig(kind="synthetic", root=str(root)))
    rows = []
    for c in listing.classes:
        recs = [r for r in listing.records if r.class_name == c and r.split == "train"][:per_class]
        tiles = []
        for j, r in enumerate(recs):
            img = Image.open(root / r.path).convert("RGB")
            if j < 2:
                ImageDraw.Draw(img).rectangle([r.box[0], r.box[1], r.box[2] - 1, r.box[3] - 1], outline=(255, 0, 255))  # type: ignore[index]
            tiles.append(np.asarray(img))
        rows.append(np.concatenate(tiles, axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None, help="dataset folder (default: a temporary one)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--size", type=int, default=224, help="network input side for both (a) and (b)")
    ap.add_argument("--grid", type=Path, default=Path("/tmp/synthetic_grid.png"))
    ap.add_argument("--options", default="{}", help='JSON overrides of SyntheticOptions, e.g. \'{"distractors": 8}\'')
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(2)
    opts = SyntheticOptions(**json.loads(args.options))

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root or Path(tmp) / "synthetic"
        t0 = time.perf_counter()
        synthetic.generate(root, opts)
        gen_s = time.perf_counter() - t0
        save_grid(root, args.grid)
        data = load(root, args.size)
    report: dict[str, object] = {
        "options": opts.__dict__, "generate_s": round(gen_s, 2), "input": args.size, "epochs": args.epochs,
    }
    n = opts.num_classes
    tr, te = data["train"], data["test"]
    for view in ("whole", "crop"):
        t0 = time.perf_counter()
        model = train(tr[view], tr["y"], n, args.epochs, args.seed)
        report[f"{view}_test_top1"] = round(100 * accuracy(model, te[view], te["y"]), 1)
        report[f"{view}_train_top1"] = round(100 * accuracy(model, tr[view], tr["y"]), 1)
        report[f"{view}_train_s"] = round(time.perf_counter() - t0, 1)
        if view == "whole":
            gt = te["box"] * (args.size / opts.image_size)
            for layer, name in ((3, "stride16"), (4, "stride32")):
                for t in (0.2, 0.4):
                    boxes, peaks = gradcampp_boxes(model, te["whole"], layer, t)
                    ious = iou(boxes, gt)
                    report[f"gradcampp_{name}_T{t}_iou>=0.5"] = round(100 * float((ious >= 0.5).float().mean()), 1)
                    report[f"gradcampp_{name}_T{t}_mean_iou"] = round(float(ious.mean()), 3)
                inside = (peaks >= gt[:, :2]).all(1) & (peaks <= gt[:, 2:]).all(1)
                report[f"gradcampp_{name}_peak_in_box"] = round(100 * float(inside.float().mean()), 1)
        print(json.dumps(report), flush=True)
    report["chance_top1"] = round(100 / n, 1)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
