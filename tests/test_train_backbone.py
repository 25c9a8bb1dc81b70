"""Stage-1 training: it learns, it is reproducible, it resumes exactly, it fails cleanly, it runs under DDP."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from fgpipe.cli import app
from fgpipe.config import TrainBackboneConfig, load_params
from fgpipe.errors import ArtifactError, TrainingError
from fgpipe.loader import load_regions, resized_side, whole_image_requests
from fgpipe.manifest import read_dataset_json, read_manifest
from fgpipe.stage1_network import load_stage1, predict_logits
from fgpipe.stages import prepare, train_backbone
from fgpipe.training import setup_runtime

COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200)]


def write_colour_dataset(root: Path, per_class: int = 10, test_per_class: int = 3, size: int = 40) -> None:
    """An ImageFolder where each class is a noisy patch of its own colour on a grey background."""
    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("test", test_per_class)):
        for c, colour in enumerate(COLOURS):
            for i in range(n):
                img = rng.integers(90, 140, size=(size, size, 3)).astype(np.uint8)
                x, y = rng.integers(0, size // 2, size=2)
                img[y : y + size // 2, x : x + size // 2] = np.clip(
                    np.array(colour) + rng.integers(-30, 30, size=(size // 2, size // 2, 3)), 0, 255
                )
                path = root / split / f"class{c}" / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)


def make_project(tmp_path: Path, **train: object) -> Path:
    """A prepared colour dataset `toy` and a params file training the tiny backbone on it."""
    root = tmp_path / "toy_raw"
    if not root.exists():
        write_colour_dataset(root)
    params = {
        "run": {},
        "datasets": {"toy": {"kind": "imagefolder", "root": str(root), "val_fraction": 0.2}},
        "prepare": {"data_dir": str(tmp_path / "data"), "metrics_dir": str(tmp_path / "metrics")},
        "model": {"backbone": "tiny", "num_attentions": 4, "lcam": "block", "logit_scale": 10.0},
        "train_backbone": {
            "input_size": 32, "epochs": 3, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0.5,
            "augment": {"resize_ratio": 1.1, "hflip": True, "color_jitter": 0.1}, **train,
        },
    }
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    prepare.run(load_params(path), "toy")
    return path


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["model"]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def val_top1_of(checkpoint: Path, data: Path) -> float:
    """Top-1 on the val split of ``checkpoint``'s network, as stage 1 predicts (the manifest area resized, centre-cropped,
    test-time refinement per its config), on the device and memory format training used."""
    model, state = load_stage1(checkpoint)
    cfg = TrainBackboneConfig(**state["config"]["train_backbone"])
    rows = [r for r in read_manifest(data / "manifest.csv") if r.split == "val"]
    side = resized_side(cfg.input_size, cfg.augment)
    images = load_regions(whole_image_requests(read_dataset_json(data / "dataset.json", "toy").root, rows), (side, side))
    rt = setup_runtime(cfg.device, cfg.amp, cfg.channels_last)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    _, refined = predict_logits(model, images, cfg, rt)
    return int((refined.argmax(1) == torch.tensor([r.label for r in rows])).sum()) / len(rows)


def test_training_lowers_loss_and_writes_checkpoints(tmp_path: Path) -> None:
    params = make_project(tmp_path, epochs=4)
    record = train_backbone.run(load_params(params), "toy")
    metrics = record.metrics
    ckpt = torch.load(tmp_path / "data/toy/stage1/last.pt", weights_only=True)
    history = ckpt["history"]
    assert len(history) == 4
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["train_top1"] > 0.5  # well above chance (1/3) on an easy task
    # val has 6 images here, too few to assert learning on; but the figure is the best epoch's (the last of the
    # highest, ties going to the longer-trained epoch), and what best.pt's network scores on val, recomputed here
    vals = [h["val_top1"] for h in history]
    assert metrics["best_epoch"] == max(range(len(vals)), key=lambda e: (vals[e], e)) + 1
    assert metrics["val"]["top1"] == vals[metrics["best_epoch"] - 1]
    assert metrics["val"]["top1"] == val_top1_of(tmp_path / "data/toy/stage1/best.pt", tmp_path / "data/toy")
    assert ckpt["class_names"] == ["class0", "class1", "class2"]
    assert ckpt["center"]["centers"].shape[0] == 3
    assert {"model", "optimizer", "scheduler", "rng", "config", "epoch", "best"} <= ckpt.keys()
    assert ckpt["config"]["model"]["backbone"] == "tiny"
    best = torch.load(tmp_path / "data/toy/stage1/best.pt", weights_only=True)
    assert best["epoch"] == metrics["best_epoch"]
    saved = yaml.safe_load((tmp_path / "metrics/toy/train_backbone.json").read_text())
    assert saved == metrics and saved["test"]["images"] == 9
    made = yaml.safe_load((tmp_path / "metrics/toy/train_backbone.provenance.json").read_text())
    assert made == record.provenance and made["backbone"] == "tiny" and made["world_size"] == 1 and made["resumed_from_epoch"] is None
    curves = tmp_path / "metrics/toy/train_backbone/plots/metrics"
    assert (curves / "train/loss.tsv").is_file() and (curves / "val/top1.tsv").is_file()
    assert len((curves / "train/loss.tsv").read_text().strip().splitlines()) == 1 + 4


def test_same_seed_gives_identical_weights(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    train_backbone.run(load_params(make_project(a, epochs=2)), "toy")
    train_backbone.run(load_params(make_project(b, epochs=2)), "toy")
    assert_same_weights(weights(a / "data/toy/stage1/last.pt"), weights(b / "data/toy/stage1/last.pt"))


def test_run_killed_mid_epoch_and_resumed_ends_with_the_same_weights(tmp_path: Path) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    full.mkdir(), cut.mkdir()
    train_backbone.run(load_params(make_project(full)), "toy")

    def crash(epoch: int, step: int) -> None:
        if epoch == 1 and step == 1:
            raise KeyboardInterrupt  # as if the process were killed in the middle of epoch 2

    params = make_project(cut)
    with pytest.raises(KeyboardInterrupt):
        train_backbone.run(load_params(params), "toy", on_step=crash)
    assert torch.load(cut / "data/toy/stage1/unfinished/last.pt", weights_only=True)["epoch"] == 1
    assert not (cut / "data/toy/stage1/last.pt").exists()  # nothing finished yet
    record = train_backbone.run(load_params(params), "toy", resume=True)
    assert not (cut / "data/toy/stage1/unfinished").exists()
    assert record.provenance["resumed_from_epoch"] == 1
    assert_same_weights(weights(full / "data/toy/stage1/last.pt"), weights(cut / "data/toy/stage1/last.pt"))
    full_ckpt = torch.load(full / "data/toy/stage1/last.pt", weights_only=True)
    cut_ckpt = torch.load(cut / "data/toy/stage1/last.pt", weights_only=True)
    assert torch.equal(full_ckpt["center"]["centers"], cut_ckpt["center"]["centers"])


def stop_in_epoch_2(epoch: int, step: int) -> None:
    if epoch == 1:
        raise KeyboardInterrupt


def test_resume_refuses_a_checkpoint_made_with_other_params(tmp_path: Path) -> None:
    params = make_project(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train_backbone.run(load_params(params), "toy", on_step=stop_in_epoch_2)
    with pytest.raises(ArtifactError, match="unfinished/last.pt was made with other params .*train_backbone.lr"):
        train_backbone.run(load_params(params, {"train_backbone.lr": 0.01}), "toy", resume=True)


def test_an_unfinished_run_leaves_the_finished_one_and_a_fresh_run_discards_it(tmp_path: Path) -> None:
    """The rule of a failed run: the previous finished checkpoints, metrics and curves stay byte-identical while a
    new run is interrupted; a later run without --resume empties the unfinished folder and starts from scratch."""
    params = make_project(tmp_path, epochs=2)
    train_backbone.run(load_params(params), "toy")
    files = [p for top in ("data/toy/stage1", "metrics/toy") for p in sorted((tmp_path / top).rglob("*")) if p.is_file()]
    before = {p: p.read_bytes() for p in files}
    assert any("train_backbone" in p.parent.as_posix() for p in files)  # the dvclive curves are among them
    with pytest.raises(KeyboardInterrupt):
        train_backbone.run(load_params(params, {"train_backbone.seed": 1}), "toy", on_step=stop_in_epoch_2)
    assert {p: p.read_bytes() for p in files} == before
    unfinished = tmp_path / "data/toy/stage1/unfinished"
    assert sorted(p.name for p in unfinished.iterdir()) == ["best.pt", "curves", "last.pt"]
    record = train_backbone.run(load_params(params, {"train_backbone.seed": 2}), "toy")  # no --resume: from scratch
    assert record.provenance["resumed_from_epoch"] is None and not unfinished.exists()
    assert torch.load(tmp_path / "data/toy/stage1/last.pt", weights_only=True)["config"]["train_backbone"]["seed"] == 2
    steps = (tmp_path / "metrics/toy/train_backbone/plots/metrics/train/loss.tsv").read_text().strip().splitlines()
    assert len(steps) == 1 + 2  # the header and this run's two epochs, the interrupted run's epoch gone


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path: Path) -> None:
    params = make_project(tmp_path, epochs=3)
    holder: dict[str, torch.nn.Module] = {}
    real_build = train_backbone.build_stage1

    def build(*args: object, **kwargs: object) -> torch.nn.Module:
        holder["model"] = real_build(*args, **kwargs)
        return holder["model"]

    def poison(epoch: int, step: int) -> None:
        if epoch == 1 and step == 0:
            with torch.no_grad():
                next(holder["model"].parameters()).fill_(float("nan"))

    train_backbone.build_stage1 = build  # type: ignore[assignment]
    try:
        with pytest.raises(TrainingError, match=r"loss became nan at epoch 2, step 2"):
            train_backbone.run(load_params(params), "toy", on_step=poison)
    finally:
        train_backbone.build_stage1 = real_build  # type: ignore[assignment]
    last = torch.load(tmp_path / "data/toy/stage1/unfinished/last.pt", weights_only=True)
    assert last["epoch"] == 1
    assert all(torch.isfinite(t).all() for t in last["model"].values() if t.is_floating_point())


def test_missing_manifest_names_the_file_and_the_fix(tmp_path: Path) -> None:
    params = make_project(tmp_path)
    (tmp_path / "data/toy/manifest.csv").unlink()
    result = CliRunner().invoke(app, ["train-backbone", "--dataset", "toy", "--params", str(params)])
    assert result.exit_code == 1
    assert "manifest.csv" in result.output and "fgpipe prepare --dataset" in result.output


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_gloo_ddp_run_trains(tmp_path: Path) -> None:
    params = make_project(tmp_path, epochs=2)
    env = {**os.environ, "FGPIPE_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "fgpipe", "train-backbone", "--dataset", "toy", "--params", str(params)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    made = yaml.safe_load((tmp_path / "metrics/toy/train_backbone.provenance.json").read_text())
    assert made["world_size"] == 2
    ckpt = torch.load(tmp_path / "data/toy/stage1/last.pt", weights_only=True)
    assert ckpt["history"][-1]["train_loss"] < ckpt["history"][0]["train_loss"]


def test_param_groups_give_each_head_its_own_rate() -> None:
    from fgpipe.config import ModelConfig, TrainBackboneConfig
    from fgpipe.models import build_stage1

    cfg = TrainBackboneConfig(lr=0.01, wsdan_lr=0.002, cam_lr=0.3)
    net = build_stage1(ModelConfig(backbone="tiny", num_attentions=4, cam_channels=8), 3)
    groups = train_backbone.param_groups(net, cfg)
    ids = [{id(p) for p in g["params"]} for g in groups]
    assert [g.get("lr") for g in groups] == [None, 0.002, 0.3]  # None: the optimiser's lr (the trunk's)
    assert ids[1] == {id(p) for m in (net.attention, net.fc) for p in m.parameters()}
    assert ids[2] == {id(p) for m in (net.cam_conv, net.cam_fc) for p in m.parameters()}
    assert ids[0] == {id(p) for p in net.backbone.parameters()}
    plain = build_stage1(ModelConfig(backbone="tiny", head="plain"), 3)
    groups = train_backbone.param_groups(plain, cfg)
    assert [g.get("lr") for g in groups] == [None, 0.3]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in plain.cam_fc.parameters()}


def test_plain_head_trains_with_cross_entropy_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = make_project(tmp_path, epochs=4)
    raw = yaml.safe_load(params.read_text())
    raw["model"]["head"] = "plain"
    params.write_text(yaml.safe_dump(raw))

    def no_crop_drop(*args: object, **kwargs: object) -> None:
        raise AssertionError("the plain head must not use attention crop and drop")

    monkeypatch.setattr(train_backbone, "attention_crop_drop", no_crop_drop)
    metrics = train_backbone.run(load_params(params), "toy").metrics
    ckpt = torch.load(tmp_path / "data/toy/stage1/last.pt", weights_only=True)
    assert ckpt["config"]["model"]["head"] == "plain"
    assert "cam_fc.weight" in ckpt["model"] and "fc.weight" not in ckpt["model"]
    assert ckpt["history"][-1]["train_loss"] < ckpt["history"][0]["train_loss"]
    assert ckpt["history"][-1]["train_top1"] > 0.5
    assert metrics["test"]["top1"] == metrics["test"]["top1_raw"]  # no test-time refinement without attention maps


def test_the_trainer_reports_every_step_to_one_heap_trimmer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One HeapTrimmer for the whole run, told after every training step (so the heap it hands back when it has grown,
    validation's batches included, is measured across epochs)."""
    from fgpipe import training

    events: list[str] = []
    made: list[object] = []

    class Recorder:
        def __init__(self) -> None:
            made.append(self)

        def after_step(self) -> None:
            events.append(f"trim check {len(made)}")

    monkeypatch.setattr(training, "HeapTrimmer", Recorder)
    params = make_project(tmp_path, epochs=2)
    train_backbone.run(load_params(params), "toy", on_step=lambda epoch, step: events.append("step"))
    assert len(made) == 1 and events.count("step") >= 4
    assert events == ["step", "trim check 1"] * events.count("step")
