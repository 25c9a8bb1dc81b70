"""Refinement branches and the train-refine stage: pooling, box jitter, learning, exact resume, input checks.

``make_refine_project`` (imported by the evaluate and predict tests) writes a prepared toy dataset whose
classes are coloured squares, a stage-1 checkpoint of the tiny backbone, crops.h5 with the squares as object
boxes and two part boxes inside (none for some images), and metrics/toy/extract_crops.json with its provenance record.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from fgpipe.branch_data import BranchData, padded_positions
from fgpipe.branch_inference import load_refine
from fgpipe.checkpoints import config_dict, save_checkpoint
from fgpipe.cli import app
from fgpipe.config import ModelConfig, TrainBackboneConfig, TrainRefineConfig, load_params
from fgpipe.errors import ArtifactError
from fgpipe.h5schema import CropsMeta, CropsWriter
from fgpipe.manifest import read_manifest
from fgpipe.models import build_stage1
from fgpipe.models.branches import ClassifierHead, build_refine_net, pool_patch_logits
from fgpipe.stages import prepare, train_refine
from fgpipe.stages.train_refine import train_inputs
from fgpipe.store import file_sha256, write_json

COLOURS = [(210, 40, 40), (40, 190, 40), (40, 60, 210)]
SIDE = 48  # image side
OBJ = 20  # object square side
MODEL = {"backbone": "tiny", "num_attentions": 4, "lcam": "block", "logit_scale": 10.0}
REFINE = {
    "input_size": 32, "part_size": 16, "epochs": 3, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0.5,
    "box_jitter": 0.1, "dropout": 0.1, "augment": {"resize_ratio": 1.1, "hflip": True, "color_jitter": 0.1},
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_squares(root: Path, train_per_class: int = 8, test_per_class: int = 3) -> dict[str, tuple[int, int]]:
    """root/{train,test}/classC/NNN.png: a noisy square of class C's colour on grey noise; returns rel path -> (x, y)."""
    rng = np.random.default_rng(0)
    where: dict[str, tuple[int, int]] = {}
    for split, n in (("train", train_per_class), ("test", test_per_class)):
        for c, colour in enumerate(COLOURS):
            for i in range(n):
                img = rng.integers(90, 150, size=(SIDE, SIDE, 3)).astype(np.uint8)
                x, y = (int(v) for v in rng.integers(0, SIDE - OBJ, size=2))
                img[y : y + OBJ, x : x + OBJ] = np.clip(np.array(colour) + rng.integers(-30, 30, size=(OBJ, OBJ, 3)), 0, 255)
                rel = f"{split}/class{c}/{i:03d}.png"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(root / rel)
                where[rel] = (x, y)
    return where


def write_stage1(path: Path, classes: list[str], manifest_sha: str) -> None:
    """An (untrained) stage-1 checkpoint of the tiny backbone, in train-backbone's format."""
    torch.manual_seed(0)
    mcfg = ModelConfig(**MODEL)
    tcfg = TrainBackboneConfig(input_size=32, augment={"resize_ratio": 1.1, "hflip": True, "color_jitter": 0.1})
    model = build_stage1(mcfg, len(classes), weights="none")
    save_checkpoint(path, {
        "kind": "stage1", "model": model.state_dict(), "epoch": 1, "class_names": classes,
        "manifest_sha256": manifest_sha, "dataset": "toy",
        "config": {"model": config_dict(mcfg), "train_backbone": config_dict(tcfg)},
    })


def write_crops(path: Path, manifest: Path, where: dict[str, tuple[int, int]]) -> None:
    """crops.h5: the true square (+-1 pixel) as the object box; two part boxes inside it, none for every 4th image.
    Made, it says, from stage1/best.pt (no attention.h5 is written: that source is then not checked)."""
    rows = read_manifest(manifest)
    meta = CropsMeta(
        method="oaam", threshold=0.2, attention_sha256="0" * 64, manifest_sha256=file_sha256(manifest),
        checkpoint_sha256=file_sha256(path.parent / "stage1/best.pt"), provenance={"checkpoint": "best"},
    )
    boxes, parts, counts = [], [], []
    for k, r in enumerate(rows):
        x, y = where[r.path]
        boxes.append([max(x - 1, 0), max(y - 1, 0), x + OBJ + 1, y + OBJ + 1])
        p = np.zeros((3, 4))
        n = 0 if k % 4 == 0 else 2
        if n:
            p[0] = [x, y, x + OBJ / 2, y + OBJ / 2]
            p[1] = [x + OBJ / 2, y + OBJ / 2, x + OBJ, y + OBJ]
        parts.append(p)
        counts.append(n)
    with CropsWriter(path, meta, max_parts=3) as w:
        w.append([r.image_id for r in rows], np.array(boxes), np.ones(len(rows)), np.zeros(len(rows), bool),
                 np.stack(parts), np.ones((len(rows), 3)), np.array(counts))


def make_refine_project(tmp_path: Path, refine: dict[str, Any] | None = None, evaluate: dict[str, Any] | None = None) -> Path:
    """Everything train-refine reads, for dataset `toy`; returns the params file."""
    root = tmp_path / "toy_raw"
    where = write_squares(root)
    params = {
        "run": {},
        "datasets": {"toy": {"kind": "imagefolder", "root": str(root), "val_fraction": 0.25}},
        "prepare": {"data_dir": str(tmp_path / "data"), "metrics_dir": str(tmp_path / "metrics")},
        "model": MODEL,
        "train_refine": {**REFINE, **(refine or {})},
        "evaluate": {"batch_size": 8, **(evaluate or {})},
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    settings = load_params(path)
    prepare.run(settings, "toy")
    data = tmp_path / "data/toy"
    manifest = data / "manifest.csv"
    classes = json.loads((data / "dataset.json").read_text())["classes"]
    write_stage1(data / "stage1/best.pt", classes, file_sha256(manifest))
    write_crops(data / "crops.h5", manifest, where)
    write_json(tmp_path / "metrics/toy/extract_crops.json",
               {"localization": {"accuracy": 0.75, "mean_iou": 0.61, "fallback_rate": 0.0}, "images": len(where)})
    write_json(tmp_path / "metrics/toy/extract_crops.provenance.json", {"sources": {"crops_sha256": file_sha256(data / "crops.h5")}})
    return path


_TRAINED: dict[str, Path] = {}


def trained_project(factory: pytest.TempPathFactory) -> Path:
    """A toy project with the branches trained for 3 epochs, made once per test session (treat it as read-only)."""
    if "toy" not in _TRAINED:
        base = factory.mktemp("trained")
        train_refine.run(load_params(make_refine_project(base)), "toy")
        _TRAINED["toy"] = base
    return _TRAINED["toy"]


def copy_project(source: Path, target: Path) -> Path:
    """A private copy of a project (paths in its params file rewritten); returns the copy's params file."""
    shutil.copytree(source, target, dirs_exist_ok=True)
    params = target / "params.yaml"
    params.write_text(params.read_text().replace(str(source), str(target)))
    return params


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


# --------------------------------------------------------------------------- units
def test_pool_patch_logits_is_the_mean_per_image() -> None:
    logits = torch.tensor([[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 1.0]])
    owner = torch.tensor([0, 0, 1, 0])
    pooled = pool_patch_logits(logits, owner, 2)
    assert torch.allclose(pooled, torch.tensor([[4 / 3, 1.0], [5.0, 5.0]]))
    with pytest.raises(ValueError, match="at least one patch"):
        pool_patch_logits(logits, owner, 3)


def test_head_dropout_zeroes_and_rescales_pooled_features_in_training_only() -> None:
    torch.manual_seed(0)
    p, channels = 0.3, 64
    head = ClassifierHead(channels, channels, dropout=p)
    with torch.no_grad():  # an identity classifier: the logits are the (dropped) pooled features
        head.fc.weight.copy_(torch.eye(channels))
        head.fc.bias.zero_()
    feat = torch.rand(256, channels, 3, 3) + 0.5  # (B, C, h, w), every pooled value > 0
    pooled = feat.mean(dim=(2, 3))
    assert torch.allclose(head.eval()(feat), pooled, atol=1e-6)
    out = head.train()(feat)
    dropped = out == 0
    assert torch.allclose(out[~dropped], pooled[~dropped] / (1 - p), atol=1e-5)  # the kept ones rescaled by 1 / (1 - p)
    assert abs(float(dropped.float().mean()) - p) < 0.02  # 16,384 draws: the dropped share is p within 4.4 sigma
    assert ClassifierHead(channels, 3).drop.p == 0.0


def test_padded_positions_repeat_each_images_own_patches() -> None:
    counts = torch.tensor([1, 3, 2])
    positions, keep = padded_positions(counts, 3)
    # by hand: image b's patches are rows first_b .. first_b + count_b - 1 of the batch; slot j holds j mod count_b
    expected, kept, first = [], [], 0
    for c in counts.tolist():
        expected += [first + j % c for j in range(3)]
        kept += [j < c for j in range(3)]
        first += c
    assert positions.tolist() == expected == [0, 0, 0, 1, 2, 3, 4, 5, 4]
    assert keep.tolist() == kept
    assert padded_positions(torch.tensor([2, 2]), 2)[1].all()  # nothing to pad
    for bad in ([0, 2], [4, 1]):
        with pytest.raises(ValueError, match=r"patches per image must be in \[1, 3\]"):
            padded_positions(torch.tensor(bad), 3)


def test_padded_part_batch_draws_the_same_and_pools_as_the_unpadded_one() -> None:
    """Padding the part batch changes no random draw, copies patches exactly, and (batch norm in eval mode) gives
    every image the pooled logits of its own patches."""
    torch.manual_seed(0)
    counts = torch.tensor([2, 1, 3])  # patches of each image
    n, t = len(counts), int(counts.sum())
    start = torch.cumsum(counts, 0) - counts
    region = torch.tensor([0.0, 0.0, 40.0, 40.0])
    data = BranchData(
        object_regions=region.repeat(n, 1), object_boxes=torch.tensor([4.0, 4.0, 36.0, 36.0]).repeat(n, 1),
        patch_regions=region.repeat(t, 1), patch_boxes=torch.tensor([8.0, 6.0, 30.0, 28.0]).repeat(t, 1),
        patch_start=start, patch_count=counts, labels=torch.tensor([0, 1, 2]), feed=None,  # type: ignore[arg-type]
    )
    cfg = TrainRefineConfig(**{k: v for k, v in REFINE.items() if k != "epochs"})
    stored = (torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8), torch.randint(0, 256, (t, 3, 20, 20), dtype=torch.uint8))
    idx = torch.arange(n)
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    obj_a, patches_a, owner_a, keep_a = train_inputs(data, idx, stored, cfg, gen_a)
    obj_b, patches_b, owner_b, keep_b = train_inputs(data, idx, stored, cfg, gen_b, pad_to=3)
    assert keep_a is None and keep_b is not None
    assert torch.equal(torch.rand(4, generator=gen_a), torch.rand(4, generator=gen_b))  # the same draws, no more
    assert torch.equal(obj_a, obj_b)
    assert patches_b.shape[0] == owner_b.shape[0] == 9
    assert torch.equal(patches_b[keep_b], patches_a) and torch.equal(owner_b[keep_b], owner_a)
    positions, _ = padded_positions(counts, 3)
    assert torch.equal(patches_b, patches_a[positions])  # every copy is its patch
    net, _ = build_refine_net(ModelConfig(**MODEL), 3, True)
    net.eval()
    with torch.no_grad():
        plain = net(obj_a, patches_a, owner_a).part_logits
        padded = net(obj_b, patches_b, owner_b, keep_b.nonzero().squeeze(1)).part_logits
        by_hand = torch.stack([net.patch_logits(patches_a[owner_a == b]).mean(0) for b in range(n)])
    assert torch.allclose(padded, plain, atol=1e-5) and torch.allclose(padded, by_hand, atol=1e-5)


def test_branches_start_from_the_stage1_backbone() -> None:
    mcfg = ModelConfig(**MODEL)
    stage1 = build_stage1(mcfg, 3, weights="none")
    for shared in (True, False):
        net, report = build_refine_net(mcfg, 3, shared, stage1.state_dict())
        assert report is not None and report.loaded > 0
        own = net.state_dict()
        for k, v in stage1.backbone.state_dict().items():
            assert torch.equal(own[f"object_backbone.{k}"], v)
            if not shared:
                assert torch.equal(own[f"part_backbone.{k}"], v)
        assert net.shared == shared
        out = net(torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16), torch.tensor([0, 1, 1]))
        assert out.object_logits.shape == out.part_logits.shape == (2, 3)
    # an inner feature layer: the branches are cut there too, like the stage-1 trunk
    inner = ModelConfig(**{**MODEL, "feature_layer": "layer2"})
    net, _ = build_refine_net(inner, 3, False, build_stage1(inner, 3, weights="none").state_dict())
    assert net.object_backbone.stage_names[-1] == net.part_backbone.stage_names[-1] == "layer2"  # type: ignore[union-attr]


def test_jittered_crop_without_jitter_is_the_box() -> None:
    stored = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8).to(torch.uint8)
    regions = torch.tensor([[10.0, 20.0, 26.0, 36.0], [0.0, 0.0, 8.0, 8.0]])  # 2 original px per stored px, and 1
    out = train_refine.jittered_crops(stored, regions, regions.clone(), torch.zeros(2, 4), 0.2, 8)
    assert torch.allclose(out, stored.float())


def _coordinate_image(n: int, side: int) -> torch.Tensor:
    """(n, 3, side, side) uint8 whose channel 0 holds 10 x and channel 1 10 y of each pixel's centre (stored pixels),
    so that a bilinear sample at any point reads back 10 times that point's coordinates."""
    centre = torch.arange(side, dtype=torch.float32) * 10 + 5  # (side,)
    img = torch.zeros(n, 3, side, side)
    img[:, 0] = centre[None, None, :]
    img[:, 1] = centre[None, :, None]
    return img.to(torch.uint8)


@pytest.mark.parametrize("u", [1.0, -1.0, 0.5, -0.3])
def test_jittered_crop_moves_each_edge_by_at_most_jitter_times_the_side_inside_the_region(u: float) -> None:
    """Every sample roi_align reads lies in the box the promise allows: each edge moved by at most jitter x the box's
    side, clipped to the stored region; and the samples span the box computed by hand, so the crop is that box."""
    side, out_side, jitter = 8, 4, 0.5
    stored = _coordinate_image(2, side)
    regions = torch.tensor([[10.0, 20.0, 26.0, 36.0], [0.0, 0.0, 8.0, 8.0]])  # 2 original px per stored px, and 1
    boxes = torch.tensor([[12.0, 22.0, 24.0, 34.0], [2.0, 2.0, 6.0, 6.0]])
    crops = train_refine.jittered_crops(stored, regions, boxes, torch.full((2, 4), u), jitter, out_side)  # (2, 3, 4, 4)
    scale = side / (regions[:, 2:] - regions[:, :2])  # (2, 2) stored px per original px
    xs = crops[:, 0] / 10 / scale[:, 0, None, None] + regions[:, 0, None, None]  # (2, 4, 4) in original px
    ys = crops[:, 1] / 10 / scale[:, 1, None, None] + regions[:, 1, None, None]
    wh = boxes[:, 2:] - boxes[:, :2]  # (2, 2)
    for i in range(2):
        (x0, y0, x1, y1), (w, h), (rx0, ry0, rx1, ry1) = boxes[i].tolist(), wh[i].tolist(), regions[i].tolist()
        allowed = (max(x0 - jitter * w, rx0), max(y0 - jitter * h, ry0), min(x1 + jitter * w, rx1), min(y1 + jitter * h, ry1))
        eps = 1e-3
        assert allowed[0] - eps <= xs[i].min() and xs[i].max() <= allowed[2] + eps, (i, xs[i])
        assert allowed[1] - eps <= ys[i].min() and ys[i].max() <= allowed[3] + eps, (i, ys[i])
        # the box by hand: every edge moved by u * jitter * side, clipped to the region (never shrunk below half)
        jb = [min(max(x0 + u * jitter * w, rx0), rx1), min(max(y0 + u * jitter * h, ry0), ry1),
              min(max(x1 + u * jitter * w, rx0), rx1), min(max(y1 + u * jitter * h, ry0), ry1)]
        assert jb[2] - jb[0] >= 0.5 * w and jb[3] - jb[1] >= 0.5 * h  # no fallback to the box in these cases
        bin_w, bin_h = (jb[2] - jb[0]) / out_side, (jb[3] - jb[1]) / out_side
        assert jb[0] - eps <= xs[i].min() <= jb[0] + bin_w and jb[2] - bin_w <= xs[i].max() <= jb[2] + eps, (i, jb, xs[i])
        assert jb[1] - eps <= ys[i].min() <= jb[1] + bin_h and jb[3] - bin_h <= ys[i].max() <= jb[3] + eps, (i, jb, ys[i])


# --------------------------------------------------------------------------- the stage
def test_training_lowers_the_loss_and_writes_everything(tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp_path = trained_project(tmp_path_factory)
    metrics = json.loads((tmp_path / "metrics/toy/train_refine.json").read_text())
    last = torch.load(tmp_path / "data/toy/refine/last.pt", weights_only=True)
    history = last["history"]
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"]
    assert {"model", "optimizer", "scheduler", "rng", "config", "class_names", "manifest_sha256", "crops_sha256", "stage1_sha256"} <= last.keys()
    assert last["config"]["model"]["backbone"] == "tiny" and last["config"]["train_refine"]["part_size"] == 16
    best = torch.load(tmp_path / "data/toy/refine/best.pt", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"]
    assert best["best"]["val_top1"] == max(h["val_top1"] for h in history)
    saved = metrics
    # pad_parts (default): every step's part batch is the batch x the most patches an image has
    assert saved["padded_patches_per_image"] >= saved["patches_per_image"]
    assert saved["padding_share"] == pytest.approx(1 - saved["patches_per_image"] / saved["padded_patches_per_image"], abs=1e-3)
    assert set(saved["val"]) == {"object", "parts", "mean"}
    assert saved["val"]["mean"] == pytest.approx((saved["val"]["object"] + saved["val"]["parts"]) / 2)
    assert saved["seconds"] > 0 and saved["images_per_s"] > 0
    made = json.loads((tmp_path / "metrics/toy/train_refine.provenance.json").read_text())
    assert made["overrides"] == {} and made["dataset"] == "toy" and made["backbone"] == "tiny"
    # the stage-1 checkpoint named from the project root (the params file's folder), not as this machine's path
    assert made["initialised_from"] == {"checkpoint": "data/toy/stage1/best.pt", "tensors": made["initialised_from"]["tensors"]}
    assert made["initialised_from"]["tensors"] > 0
    curves = tmp_path / "metrics/toy/train_refine/plots/metrics"
    assert len((curves / "train/loss.tsv").read_text().strip().splitlines()) == 1 + 3
    assert (curves / "val/object_top1.tsv").is_file() and (curves / "val/parts_top1.tsv").is_file()
    model, state = load_refine(tmp_path / "data/toy/refine/best.pt")
    assert not model.training and state["class_names"] == ["class0", "class1", "class2"]
    assert model.object_head.drop.p == model.part_head.drop.p == state["config"]["train_refine"]["dropout"]


def test_run_killed_mid_epoch_and_resumed_ends_with_the_same_weights(tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), cut.mkdir()
    shared = {"shared_backbone": True, "epochs": 2, "dropout": 0.3}  # dropout draws from the global RNG: replayed too
    train_refine.run(load_params(make_refine_project(full, refine=shared)), "toy")

    def crash(epoch: int, step: int) -> None:
        if epoch == 1 and step == 1:
            raise KeyboardInterrupt  # as if the process were killed in the middle of epoch 2

    params = make_refine_project(cut, refine=shared)
    with pytest.raises(KeyboardInterrupt):
        train_refine.run(load_params(params), "toy", on_step=crash)
    assert torch.load(cut / "data/toy/refine/unfinished/last.pt", weights_only=True)["epoch"] == 1
    with pytest.raises(ArtifactError, match="train_refine.lr"):
        train_refine.run(load_params(params, {"train_refine.lr": 0.01}), "toy", resume=True)
    record = train_refine.run(load_params(params), "toy", resume=True)
    assert record.provenance["resumed_from_epoch"] == 1
    a, b = weights(full / "data/toy/refine/last.pt"), weights(cut / "data/toy/refine/last.pt")
    assert a.keys() == b.keys() and not any(k.startswith("part_backbone.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert not (cut / "data/toy/refine/unfinished").exists()


def test_refuses_crops_made_from_another_manifest(tmp_path: Path) -> None:
    params = make_refine_project(tmp_path)
    manifest = tmp_path / "data/toy/manifest.csv"
    header, *lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join([header, *reversed(lines)]) + "\n")  # same rows, another file
    (tmp_path / "data/toy/stage1/best.pt").unlink()
    write_stage1(tmp_path / "data/toy/stage1/best.pt", ["class0", "class1", "class2"], file_sha256(manifest))
    result = CliRunner().invoke(app, ["train-refine", "--dataset", "toy", "--params", str(params)])
    assert result.exit_code == 1
    assert "crops.h5 was made from another manifest" in result.output and "extract-crops" in result.output


def test_missing_stage1_checkpoint_names_the_file(tmp_path: Path) -> None:
    params = make_refine_project(tmp_path)
    (tmp_path / "data/toy/stage1/best.pt").unlink()
    result = CliRunner().invoke(app, ["train-refine", "--dataset", "toy", "--params", str(params)])
    assert result.exit_code == 1 and "stage1/best.pt" in result.output


def test_help() -> None:
    result = CliRunner().invoke(app, ["train-refine", "--help"])
    assert result.exit_code == 0 and "--resume" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_process_gloo_ddp_run_trains(tmp_path: Path) -> None:
    params = make_refine_project(tmp_path, refine={"epochs": 2})
    env = {**os.environ, "FGPIPE_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "fgpipe", "train-refine", "--dataset", "toy", "--params", str(params)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics/toy/train_refine.json").read_text())
    made = json.loads((tmp_path / "metrics/toy/train_refine.provenance.json").read_text())
    assert made["world_size"] == 2 and metrics["best_epoch"] >= 1
    ckpt = torch.load(tmp_path / "data/toy/refine/last.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())
