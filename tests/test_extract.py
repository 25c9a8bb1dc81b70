"""Stages extract-attention and extract-crops, and `fgpipe show`, on a tiny CUB-layout dataset with boxes.

One project is prepared and its tiny stage-1 network trained once per module; each test works on a copy
of it (params use relative paths, so the copy is self-contained). The formulas themselves (Grad-CAM++,
boxes, MPALM) are tested in test_attention.py and test_localize.py; these tests check the stages' wiring:
one row per image, attrs and provenance, refusals of stale inputs, batch-by-batch decoding, metrics, PNGs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from conftest import write_fake_cub
from PIL import Image
from typer.testing import CliRunner

from fgpipe import loader
from fgpipe.attention import create_method
from fgpipe.checkpoints import load_checkpoint, save_checkpoint
from fgpipe.cli import app
from fgpipe.config import load_params
from fgpipe.errors import ArtifactError
from fgpipe.h5schema import AttentionReader, CropsReader
from fgpipe.loader import load_regions, normalize, whole_image_requests
from fgpipe.localize import box_iou, object_box, paired_iou
from fgpipe.manifest import ManifestRow, read_manifest
from fgpipe.stage1_network import load_stage1
from fgpipe.stages import extract_attention, extract_crops, prepare, train_backbone
from fgpipe.store import file_sha256, read_json

SIZE = (56, 44)  # (W, H) of the fake images: not square, so x and y scales differ
COLOURS = [(210, 40, 40), (40, 200, 40), (40, 40, 210)]
INPUT = 64  # stage-1 input size: the tiny backbone's last stage (stride 16) gives 4 x 4 heatmaps


def write_colour_cub(root: Path) -> None:
    """CUB_200_2011 layout (conftest's writer) with images redrawn: a coloured patch per class, its box the GT."""
    info = write_fake_cub(root, train_per_class=6, test_per_class=2, size=SIZE)
    rng = np.random.default_rng(0)
    lines = []
    classes = sorted({c for _, c, _ in info["ids"].values()})
    for image_id, (rel, cname, _) in sorted(info["ids"].items(), key=lambda kv: int(kv[0])):
        w, h = SIZE
        img = rng.integers(90, 140, size=(h, w, 3)).astype(np.uint8)
        pw, ph = int(rng.integers(16, 28)), int(rng.integers(14, 24))
        x, y = int(rng.integers(0, w - pw)), int(rng.integers(0, h - ph))
        colour = np.array(COLOURS[classes.index(cname)])
        img[y : y + ph, x : x + pw] = np.clip(colour + rng.integers(-30, 30, size=(ph, pw, 3)), 0, 255)
        Image.fromarray(img).save(root / "images" / rel, quality=95)
        lines.append(f"{image_id} {x} {y} {pw} {ph}")
    (root / "bounding_boxes.txt").write_text("\n".join(lines) + "\n")


def write_project_params(base: Path, **sections: Any) -> Path:
    params = {
        "run": {},
        "datasets": {"toy": {"kind": "cub", "root": "raw/CUB_200_2011", "val_fraction": 0.2}},
        "prepare": {"data_dir": "data", "metrics_dir": "metrics"},
        "model": {"backbone": "tiny", "num_attentions": 4, "lcam": "block", "logit_scale": 10.0},
        "train_backbone": {
            "input_size": INPUT, "epochs": 1, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0.0,
            "augment": {"resize_ratio": 1.1, "hflip": True, "color_jitter": 0.1}, "device": "cpu",
        },
        "attention": {"batch_size": 5},
        "crops": {"batch_size": 7, "preview_images": 4},
    }
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    path = base / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, one_thread_module: None) -> Path:
    """A prepared dataset and a trained stage-1 checkpoint (1 epoch), built once for the module."""
    base = tmp_path_factory.mktemp("extract")
    write_colour_cub(base / "raw" / "CUB_200_2011")
    params = write_project_params(base)
    prepare.run(load_params(params), "toy")
    train_backbone.run(load_params(params), "toy")
    return base


@pytest.fixture
def project(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained project; returns its folder (params.yaml inside)."""
    dest = tmp_path / "proj"
    shutil.copytree(trained, dest)
    return dest


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def _rows(project: Path) -> list[ManifestRow]:
    return read_manifest(project / "data/toy/manifest.csv")


def _edit_manifest(project: Path) -> None:
    """Move one ground-truth box edge up a pixel: a valid manifest with another hash."""
    manifest = project / "data/toy/manifest.csv"
    lines = manifest.read_text().splitlines()
    fields = lines[1].split(",")
    fields[-1] = str(float(fields[-1]) - 1)
    lines[1] = ",".join(fields)
    manifest.write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- extract-attention
def test_attention_has_one_row_per_image_and_the_right_attrs(project: Path) -> None:
    params = project / "params.yaml"
    record = extract_attention.run(load_params(params), "toy")
    metrics = record.metrics
    rows = _rows(project)
    with AttentionReader(project / "data/toy/attention.h5") as att:
        assert len(att) == len(rows) == 24
        assert att.image_ids() == [r.image_id for r in rows]  # every split, manifest order
        rec = att.read()
        assert rec.labels.tolist() == [r.label for r in rows]
        assert att.heatmap_hw == (INPUT // 16, INPUT // 16) and att.num_classes == 3
        assert rec.heatmaps.min() >= 0 and rec.heatmaps.max() <= 1
        np.testing.assert_array_equal(rec.predictions, rec.logits.argmax(1))
        meta = att.meta
        assert (meta.method, meta.layer, meta.input_size) == ("oaam", "layer3", INPUT)
        assert meta.checkpoint_sha256 == file_sha256(project / "data/toy/stage1/best.pt")
        assert meta.manifest_sha256 == file_sha256(project / "data/toy/manifest.csv")
        assert meta.provenance["overrides"] == {} and meta.provenance["checkpoint"] == "best"
    assert read_json(project / "metrics/toy/extract_attention.json") == metrics
    assert read_json(project / "metrics/toy/extract_attention.provenance.json") == record.provenance
    assert {"images", "images_per_s", "seconds", "stage1_test_top1"} <= metrics.keys()
    assert {"method", "layer", "device", "heatmap_size"} <= record.provenance.keys()
    assert metrics["images"] == 24 and metrics["images_per_s"] > 0 and record.provenance["layer"] == "layer3"
    assert record.provenance["heatmap_size"] == [INPUT // 16, INPUT // 16] and record.provenance["checkpoint"] == "best"
    assert 0.0 <= metrics["stage1_test_top1"] <= 1.0
    test = [i for i, r in enumerate(rows) if r.split == "test"]
    expected = float(np.mean([rec.predictions[i] == rows[i].label for i in test]))
    assert metrics["stage1_test_top1"] == pytest.approx(expected)


def test_true_target_heatmaps_equal_a_direct_computation(project: Path) -> None:
    params = project / "params.yaml"
    extract_attention.run(load_params(params, {"attention.target": "true", "attention.method": "gradcam"}), "toy")
    rows = _rows(project)
    root = Path(read_json(project / "data/toy/dataset.json")["root"])
    model, _ = load_stage1(project / "data/toy/stage1/best.pt")
    x = normalize(load_regions(whole_image_requests(root, rows), (INPUT, INPUT)))
    ref = create_method("gradcam", model)(x, torch.tensor([r.label for r in rows]))
    with AttentionReader(project / "data/toy/attention.h5") as att:
        rec = att.read()
        assert att.meta.provenance["target"] == "true"
    np.testing.assert_allclose(rec.heatmaps, ref.heatmaps.numpy(), atol=2e-3)  # stored as float16
    np.testing.assert_allclose(rec.logits, ref.logits.numpy(), rtol=1e-4, atol=1e-4)


def test_images_are_decoded_batch_by_batch(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = loader.decode_batch

    def counting(requests, out_wh, pool=None):
        calls.append(len(requests))
        return real(requests, out_wh, pool)

    monkeypatch.setattr(loader, "decode_batch", counting)
    settings = load_params(project / "params.yaml")
    extract_attention.run(settings, "toy")
    assert calls == [5, 5, 5, 5, 4]  # attention.batch_size 5, 24 images: one decode per batch, never the dataset
    calls.clear()
    extract_crops.run(settings, "toy")
    assert calls == [7, 7, 7, 3]  # crops.batch_size 7


def test_cli_method_override_is_recorded(project: Path) -> None:
    params = project / "params.yaml"
    result = _invoke("extract-attention", "-d", "toy", "-p", str(params), "--method", "bap")
    assert result.exit_code == 0, result.output
    with AttentionReader(project / "data/toy/attention.h5") as att:
        assert att.meta.method == "bap"
        assert att.meta.provenance["overrides"] == {"attention.method": "bap"}
    made = read_json(project / "metrics/toy/extract_attention.provenance.json")
    assert made["method"] == "bap" and made["overrides"] == {"attention.method": "bap"}
    extract_attention.run(load_params(params, {"attention.method": "aolm"}), "toy")
    with AttentionReader(project / "data/toy/attention.h5") as att:
        assert (att.meta.method, att.meta.layer) == ("aolm", "layer3")
        assert set(np.unique(att.read().heatmaps).tolist()) <= {0.0, 1.0}  # AOLM stores its box's indicator
    result = _invoke("extract-attention", "-d", "toy", "-p", str(params), "--method", "cam")
    assert result.exit_code == 1 and "attention.method" in result.output and "Traceback" not in result.output


def test_attention_refuses_a_checkpoint_from_another_manifest(project: Path) -> None:
    _edit_manifest(project)
    result = _invoke("extract-attention", "-d", "toy", "-p", str(project / "params.yaml"))
    assert result.exit_code == 1
    assert "another manifest" in result.output and "fgpipe train-backbone --dataset toy" in result.output


# --------------------------------------------------------------------------- extract-crops
def test_crops_boxes_parts_metrics_and_threshold_override(project: Path) -> None:
    params = project / "params.yaml"
    assert _invoke("extract-attention", "-d", "toy", "-p", str(params)).exit_code == 0
    result = _invoke("extract-crops", "-d", "toy", "-p", str(params), "--threshold", "0.35")
    assert result.exit_code == 0, result.output
    rows = _rows(project)
    with CropsReader(project / "data/toy/crops.h5") as crops:
        assert crops.image_ids() == [r.image_id for r in rows] and crops.max_parts == 6
        rec = crops.read()
        meta = crops.meta
    assert meta.threshold == pytest.approx(0.35) and meta.method == "oaam"
    assert meta.provenance["overrides"] == {"crops.threshold": 0.35}
    assert meta.attention_sha256 == file_sha256(project / "data/toy/attention.h5")
    wh = np.array([[r.width, r.height] for r in rows], dtype=np.float32)
    b = rec.boxes
    assert (b[:, :2] >= 0).all() and (b[:, 2:] <= wh).all() and (b[:, 2:] > b[:, :2]).all()
    assert ((rec.part_counts >= 1) & (rec.part_counts <= 6)).all()
    eps = 1e-3
    for i in range(len(rows)):
        parts = rec.parts[i, : rec.part_counts[i]]
        assert (parts[:, :2] >= b[i, :2] - eps).all() and (parts[:, 2:] <= b[i, 2:] + eps).all()
        assert (parts[:, 2:] > parts[:, :2]).all()
        assert not rec.parts[i, rec.part_counts[i] :].any()
    assert (rec.fallback == (rec.scores == 0)).all()

    metrics = read_json(project / "metrics/toy/extract_crops.json")
    made = read_json(project / "metrics/toy/extract_crops.provenance.json")
    assert {"threshold", "localization", "images", "parts_per_image", "images_per_s", "seconds"} <= metrics.keys()
    assert metrics["threshold"] == 0.35 and made["overrides"] == {"crops.threshold": 0.35} and made["method"] == "oaam"
    assert made["threshold_source"] == "params" and made["sources"]["crops_sha256"] == file_sha256(project / "data/toy/crops.h5")
    assert metrics["images"] == 24 and 1 <= metrics["parts_per_image"] <= 6 and metrics["images_per_s"] > 0
    loc = metrics["localization"]
    assert set(loc) >= {"accuracy", "mean_iou", "fallback_rate"}
    assert 0 <= loc["accuracy"] <= 1 and 0 <= loc["mean_iou"] <= 1 and 0 <= loc["fallback_rate"] <= 1
    test = [i for i, r in enumerate(rows) if r.split == "test"]
    assert loc["images"] == len(test) == 6
    assert loc["fallback_rate"] == pytest.approx(float(rec.fallback.mean()))

    preview = project / "data/toy/crops_preview.png"
    with Image.open(preview) as img:
        assert img.format == "PNG" and img.size[0] > 400 and img.size[1] > 2 * 224


def test_crops_threshold_changes_boxes_and_records_params(project: Path) -> None:
    settings = load_params(project / "params.yaml")
    extract_attention.run(settings, "toy")
    low = extract_crops.run(load_params(project / "params.yaml", {"crops.threshold": 0.05}), "toy")
    with CropsReader(project / "data/toy/crops.h5") as crops:
        boxes_low = crops.read().boxes
    high = extract_crops.run(load_params(project / "params.yaml", {"crops.threshold": 0.95}), "toy")
    with CropsReader(project / "data/toy/crops.h5") as crops:
        boxes_high = crops.read().boxes
    area = lambda b: (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])  # noqa: E731
    assert (area(boxes_high) <= area(boxes_low) + 1e-3).all()  # a higher threshold never grows the box
    assert low.metrics["threshold"] == 0.05 and high.metrics["threshold"] == 0.95


def test_crops_refuse_attention_from_another_manifest(project: Path) -> None:
    settings = load_params(project / "params.yaml")
    extract_attention.run(settings, "toy")
    _edit_manifest(project)
    with pytest.raises(ArtifactError, match=r"another manifest.*rerun `fgpipe extract-attention --dataset toy`"):
        extract_crops.run(settings, "toy")
    assert not (project / "data/toy/crops.h5").exists()


def test_crops_refuse_attention_from_another_checkpoint(project: Path) -> None:
    settings = load_params(project / "params.yaml")
    extract_attention.run(settings, "toy")
    best = project / "data/toy/stage1/best.pt"
    state = load_checkpoint(best)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    save_checkpoint(best, {k: v for k, v in state.items() if k != "format"})
    with pytest.raises(ArtifactError, match=r"another checkpoint.*rerun `fgpipe extract-attention --dataset toy`"):
        extract_crops.run(settings, "toy")


def test_crops_without_attention_names_the_file_and_the_command(project: Path) -> None:
    result = _invoke("extract-crops", "-d", "toy", "-p", str(project / "params.yaml"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    out = " ".join(result.output.split())  # rich may wrap long lines
    assert "attention.h5" in out and "fgpipe extract-attention --dataset toy" in out


def test_localization_null_without_boxes_and_by_hand_with_them() -> None:
    def row(i: int, split: str, box: tuple[float, float, float, float] | None) -> ManifestRow:
        return ManifestRow(str(i), f"{i}.jpg", 0, "a", split, 100, 80, box)

    no_boxes = [row(0, "test", None), row(1, "train", None)]
    assert extract_crops.localization(no_boxes, np.zeros((2, 4))) is None
    rows = [row(0, "test", (0, 0, 10, 10)), row(1, "test", (0, 0, 10, 10)), row(2, "train", (0, 0, 10, 10))]
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 5], [50, 50, 60, 60]], dtype=np.float64)  # IoU 1, 0.5, (train)
    loc = extract_crops.localization(rows, boxes)
    assert loc == {"accuracy": 1.0, "mean_iou": 0.75, "images": 2}
    rng = np.random.default_rng(0)

    def random_boxes(n: int) -> np.ndarray:
        xs, ys = np.sort(rng.uniform(0, 50, (n, 2)), axis=1), np.sort(rng.uniform(0, 50, (n, 2)), axis=1)
        return np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)  # (n, 4) x0 y0 x1 y1

    a, b = random_boxes(20), random_boxes(20)
    np.testing.assert_allclose(paired_iou(a, b), np.diag(box_iou(a, b)))  # pairwise, then its diagonal


# --------------------------------------------------------------------------- show and --help
def test_show_writes_a_png(project: Path) -> None:
    params = project / "params.yaml"
    settings = load_params(params)
    extract_attention.run(settings, "toy")
    extract_crops.run(settings, "toy")
    image_id = next(r.image_id for r in _rows(project) if r.split == "test")
    result = _invoke("show", "-d", "toy", "-p", str(params), "--image", image_id)
    assert result.exit_code == 0, result.output
    path = Path(result.stdout.strip().splitlines()[-1])
    assert path == project / "data/toy" / f"show_{image_id}.png"
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] >= 2 * 224
    custom = project / "one.png"
    assert _invoke("show", "-d", "toy", "-p", str(params), "-i", image_id, "--out", str(custom)).exit_code == 0
    assert custom.is_file()
    result = _invoke("show", "-d", "toy", "-p", str(params), "-i", "no-such-id")
    assert result.exit_code == 1 and "no image with id `no-such-id`" in result.output


def test_show_without_crops_says_what_to_run(project: Path) -> None:
    result = _invoke("show", "-d", "toy", "-p", str(project / "params.yaml"), "-i", "1")
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "fgpipe extract-attention --dataset toy" in out


@pytest.mark.parametrize(
    ("command", "options"),
    [
        ("extract-attention", ("--dataset", "--params", "--method", "--input-size")),
        ("extract-crops", ("--dataset", "--params", "--threshold")),
        ("show", ("--dataset", "--params", "--image", "--out")),
        ("localize", ("--dataset", "--params", "--thresholds")),
    ],
)
def test_help(command: str, options: tuple[str, ...]) -> None:
    result = _invoke(command, "--help")
    assert result.exit_code == 0
    for option in options:
        assert option in result.output


def test_preview_order_names_and_empty_grid() -> None:
    from fgpipe import preview

    ids = (("10", "test"), ("9", "test"), ("2", "train"), ("img_2", "test"))
    rows = [ManifestRow(i, f"{i}.jpg", 0, "a", split, 10, 10, None) for i, split in ids]
    assert preview.preview_indices(rows, 2) == [1, 0]  # "9" before "10": digit runs compare by value
    # class by class: the first test image of every class, then the second, ...; train images never
    labels = (2, 0, 2, 1, 0, 2, 0)
    rows = [ManifestRow(f"t{k}", f"t{k}.jpg", c, f"c{c}", "test", 10, 10, None) for k, c in enumerate(labels)]
    rows.append(ManifestRow("t0a", "t0a.jpg", 1, "c1", "train", 10, 10, None))
    expected = [1, 3, 0, 4, 2, 6, 5]  # round 1: t1 (0), t3 (1), t0 (2); round 2: t4 (0), t2 (2); round 3: t6, t5
    assert preview.preview_indices(rows, 10) == expected and preview.preview_indices(rows, 4) == expected[:4]
    assert preview.preview_indices(rows, 0) == []
    assert preview.safe_name("test/class0/000") == "test_class0_000"
    empty = preview.render([], "nothing")  # crops.preview_images: 0 still gives a (small) picture for DVC
    assert empty.size[0] > 0 and empty.size[1] > 0
    np.testing.assert_array_equal(preview.colormap(np.array([[0.0, 1.0]]))[0], [[0, 0, 128], [128, 0, 0]])


# --------------------------------------------------------------------------- every method stored; localisation per split
def test_attention_stores_every_supported_method_and_the_explained_logits(project: Path) -> None:
    extract_attention.run(load_params(project / "params.yaml"), "toy")
    rows = _rows(project)
    root = Path(read_json(project / "data/toy/dataset.json")["root"])
    model, _ = load_stage1(project / "data/toy/stage1/best.pt")
    x = normalize(load_regions(whole_image_requests(root, rows), (INPUT, INPUT)))
    with AttentionReader(project / "data/toy/attention.h5") as att:
        assert att.meta.method == "oaam" and att.methods == ("oaam", "gradcam", "aolm", "bap")
        rec = att.read()
        assert att.meta.provenance["score"] == "cam"
    for m, name in enumerate(att.methods):
        ref = create_method(name, model)(x)
        np.testing.assert_allclose(rec.all_heatmaps[:, m], ref.heatmaps.numpy(), atol=2e-3)  # stored as float16
    np.testing.assert_array_equal(rec.heatmaps, rec.all_heatmaps[:, 0])
    with torch.no_grad():
        head = model(x)
    # the stored prediction is the class OAAM explained: the CAM head's, not the WS-DAN head's
    np.testing.assert_allclose(rec.logits, head.cam_logits.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(rec.predictions, head.cam_logits.argmax(1).numpy())
    made = read_json(project / "metrics/toy/extract_attention.provenance.json")
    assert made["methods"] == ["oaam", "gradcam", "aolm", "bap"] and made["score"] == "cam"


def _localization_by_hand(rows: list[ManifestRow], maps: np.ndarray, t: float, splits: set[str]) -> tuple[float, float]:
    """(accuracy, mean IoU) of the section-4 boxes at ``t`` over the images of ``splits``, one image at a time."""
    ious = []
    for i, r in enumerate(rows):
        if r.split in splits and r.box is not None:
            box, _ = object_box(maps[i], t, (r.width, r.height))
            ious.append(float(box_iou(box[None], np.array([r.box]))[0, 0]))
    return float(np.mean([v >= 0.5 for v in ious])), float(np.mean(ious))


def test_crops_auto_threshold_localization_json_and_curves(project: Path) -> None:
    settings = load_params(project / "params.yaml", {"crops.thresholds": [0.1, 0.2, 0.3, 0.5, 0.7]})
    extract_attention.run(settings, "toy")
    record = extract_crops.run(settings, "toy")
    metrics = record.metrics
    rows = _rows(project)
    with AttentionReader(project / "data/toy/attention.h5") as att:
        maps = {m: att.method_heatmaps(m) for m in att.methods}
    grid = (0.1, 0.2, 0.3, 0.5, 0.7)
    # auto: the best train+val localisation of the selected method (ties: mean IoU, then the lower threshold)
    pooled = [_localization_by_hand(rows, maps["oaam"], t, {"train", "val"}) for t in grid]
    best = grid[max(range(len(grid)), key=lambda i: (pooled[i], -i))]
    assert metrics["threshold"] == best and record.provenance["threshold_source"] == "auto"
    with CropsReader(project / "data/toy/crops.h5") as crops:
        assert crops.meta.threshold == best and crops.meta.provenance["threshold_param"] == "auto"
    report = read_json(project / "metrics/toy/localization.json")
    assert report["method"] == "oaam" and report["threshold"] == best and report["chosen_on"] == ["train", "val"]
    assert set(report["methods"]) == {"oaam", "gradcam", "aolm", "bap"} and report["thresholds"] == list(grid)
    for method in ("oaam", "bap"):
        for split in ("train", "val", "test"):
            for t in grid:
                fig = report["methods"][method][split][f"{t:g}"]
                acc, miou = _localization_by_hand(rows, maps[method], t, {split})
                assert fig["accuracy"] == pytest.approx(acc) and fig["mean_iou"] == pytest.approx(miou)
    assert list(report["methods"]["aolm"]["test"]) == ["any"]
    # extract_crops.json's test localisation is the chosen threshold's test row
    test = report["methods"]["oaam"]["test"][f"{best:g}"]
    loc = metrics["localization"]
    assert (loc["accuracy"], loc["images"]) == (test["accuracy"], test["images"])
    assert loc["mean_iou"] == pytest.approx(test["mean_iou"])
    curves = project / "metrics/toy/localization"
    assert sorted(p.name for p in curves.iterdir()) == ["aolm.csv", "bap.csv", "gradcam.csv", "oaam.csv"]
    assert (curves / "oaam.csv").read_text().splitlines()[0] == "threshold,train,val,test"
    # a fixed threshold is used as given, and recorded as such
    fixed = extract_crops.run(load_params(project / "params.yaml", {"crops.threshold": 0.3}), "toy")
    assert fixed.metrics["threshold"] == 0.3 and fixed.provenance["threshold_source"] == "params"
    assert read_json(project / "metrics/toy/localization.json")["threshold_source"] == "params"


def test_predict_uses_the_threshold_extract_crops_chose(project: Path) -> None:
    from fgpipe.commands import predict

    settings = load_params(project / "params.yaml")
    with pytest.raises(ArtifactError, match="crops.threshold is auto.*fgpipe extract-crops --dataset toy"):
        predict.object_threshold(settings, "toy")
    extract_attention.run(settings, "toy")
    chosen = extract_crops.run(settings, "toy").metrics["threshold"]
    assert predict.object_threshold(settings, "toy") == chosen
    assert predict.object_threshold(load_params(project / "params.yaml", {"crops.threshold": 0.45}), "toy") == 0.45


def test_localize_prints_the_table_without_a_network(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = str(project / "params.yaml")
    result = _invoke("localize", "-d", "toy", "-p", params)
    assert result.exit_code == 1 and "fgpipe extract-attention --dataset toy" in " ".join(result.output.split())
    extract_attention.run(load_params(project / "params.yaml"), "toy")

    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fgpipe localize must not load a checkpoint")

    monkeypatch.setattr(torch, "load", no_network)
    result = CliRunner().invoke(app, ["localize", "-d", "toy", "-p", params, "--thresholds", "0.2,0.4"], terminal_width=200)
    assert result.exit_code == 0, result.output
    out = result.stdout
    for name in ("oaam", "gradcam", "aolm", "bap", "train", "val", "test", "0.2", "0.4", "any"):
        assert name in out
    from fgpipe.commands import localize

    report = localize.run(load_params(project / "params.yaml"), "toy", [0.2, 0.4])
    fig = report["methods"]["gradcam"]["val"]["0.4"]
    assert f"{fig['accuracy']:.3f} ({fig['mean_iou']:.2f})" in out
    result = _invoke("localize", "-d", "toy", "-p", params, "--thresholds", "0.4,0.2")
    assert result.exit_code == 1 and "--thresholds must be increasing" in result.output
    result = _invoke("localize", "-d", "toy", "-p", params, "--thresholds", "a,b")
    assert result.exit_code != 0 and "comma-separated" in result.output


def test_attention_input_size_computes_every_method_at_that_size(project: Path) -> None:
    """attention.input_size 96 on a network trained at 64: a 6 x 6 grid, maps and logits of the 96-px input."""
    size = 96
    extract_attention.run(load_params(project / "params.yaml", {"attention.input_size": size}), "toy")
    rows = _rows(project)
    root = Path(read_json(project / "data/toy/dataset.json")["root"])
    model, _ = load_stage1(project / "data/toy/stage1/best.pt")
    x = normalize(load_regions(whole_image_requests(root, rows), (size, size)))
    with AttentionReader(project / "data/toy/attention.h5") as att:
        assert att.meta.input_size == size and att.heatmap_hw == (size // 16, size // 16)
        rec = att.read()
        for m, name in enumerate(att.methods):
            ref = create_method(name, model)(x)
            np.testing.assert_allclose(rec.all_heatmaps[:, m], ref.heatmaps.numpy(), atol=2e-3)
            if name == "oaam":
                np.testing.assert_allclose(rec.logits, ref.logits.numpy(), rtol=1e-4, atol=1e-4)
    assert read_json(project / "metrics/toy/extract_attention.json")["input_size"] == size
    # 0 is stage 1's own size; 1..31 is refused, naming the key
    extract_attention.run(load_params(project / "params.yaml", {"attention.input_size": 0}), "toy")
    with AttentionReader(project / "data/toy/attention.h5") as att:
        assert att.meta.input_size == INPUT
    result = _invoke("extract-attention", "-d", "toy", "-p", str(project / "params.yaml"), "--input-size", "16")
    assert result.exit_code == 1 and "attention.input_size" in result.output and "Traceback" not in result.output
