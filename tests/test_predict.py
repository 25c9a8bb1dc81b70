"""`fgpipe predict`: the whole chain on image files, bad files reported without stopping the others."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from fgpipe.cli import app
from fgpipe.config import load_params
from fgpipe.h5schema import AttentionMeta, AttentionWriter
from fgpipe.stages import evaluate
from fgpipe.store import file_sha256
from test_refine import copy_project, trained_project


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def project(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> Path:
    """A private copy of the trained toy project, evaluated with fixed weights; returns its params file."""
    params = copy_project(trained_project(tmp_path_factory), tmp_path)
    overrides = {"evaluate.combine": "fixed", "evaluate.weights": {"raw": 1.0, "object": 2.0, "parts": 1.0}}
    evaluate.run(load_params(params, overrides), "toy")
    return params


def test_good_and_bad_files(project: Path, tmp_path: Path) -> None:
    good = tmp_path / "toy_raw/test/class1/000.png"
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 definitely not a JPEG")
    missing = tmp_path / "missing.png"
    result = CliRunner().invoke(
        app, ["predict", str(good), str(corrupt), str(missing), "--dataset", "toy", "--params", str(project), "--top-k", "2"]
    )
    assert result.exit_code == 1, result.output
    assert "corrupt.jpg: cannot read image" in result.stderr and "missing.png: cannot read image" in result.stderr
    assert "000.png" in result.stdout and "joint" in result.stdout and "class" in result.stdout


def test_json_matches_evaluate_and_the_joint_weights(project: Path, tmp_path: Path) -> None:
    tests = sorted((tmp_path / "toy_raw/test").rglob("*.png"))
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    out = tmp_path / "annotated"
    args = ["predict", *map(str, tests), str(corrupt), "--dataset", "toy", "--params", str(project), "--json", "--save-png", str(out)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["weights"] == {"raw": 0.25, "object": 0.5, "parts": 0.25} and doc["method"] == "oaam"
    assert doc["temperatures"] == json.loads((tmp_path / "metrics/toy/evaluate.json").read_text())["temperatures"]
    assert [e["image"] for e in doc["errors"]] == [str(corrupt)]
    assert len(doc["predictions"]) == len(tests) == 9

    # the raw branch is stage-1 exactly as evaluate computes it
    with open(tmp_path / "metrics/toy/predictions.csv", newline="") as fh:
        raw_top1 = {r["image_id"]: r["raw_top1"] for r in csv.DictReader(fh)}
    for rec in doc["predictions"]:
        image_id = str(Path(rec["image"]).relative_to(tmp_path / "toy_raw").with_suffix(""))
        assert rec["top"]["raw"][0]["class"] == raw_top1[image_id]
        # top-k = min(5, 3 classes): every class listed, so the joint can be recomputed from the branches
        probs = {b: {c["class"]: c["prob"] for c in rec["top"][b]} for b in ("raw", "object", "parts", "joint")}
        for name, p in probs["joint"].items():
            mix = sum(doc["weights"][b] * probs[b][name] for b in ("raw", "object", "parts"))
            assert p == pytest.approx(mix, abs=2e-6)
        x0, y0, x1, y1 = rec["box"]
        assert 0 <= x0 < x1 <= rec["size"][0] and 0 <= y0 < y1 <= rec["size"][1]
        with Image.open(rec["png"]) as png:
            assert png.size[0] > 100
    assert len(list(out.glob("*.png"))) == 9  # names made unique (000.png exists in every class folder)


def numeric_threshold(params: Path) -> None:
    """crops.threshold 0.2: predict then reads no crops.h5 (the one on disk was not made from the attention.h5 these
    tests write, a stale pairing predict refuses when it reads crops.h5 for an ``auto`` threshold)."""
    raw = yaml.safe_load(params.read_text())
    raw.setdefault("crops", {})["threshold"] = 0.2
    params.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_uses_the_method_recorded_in_attention_h5(project: Path, tmp_path: Path) -> None:
    numeric_threshold(project)
    data = tmp_path / "data/toy"
    meta = AttentionMeta(
        method="bap", layer="layer3", input_size=32, checkpoint_sha256=file_sha256(data / "stage1/best.pt"),
        manifest_sha256=file_sha256(data / "manifest.csv"), provenance={"checkpoint": "best"},
    )
    with AttentionWriter(data / "attention.h5", meta, (2, 2), 3) as w:
        w.append(["x"], [0], np.zeros((1, 2, 2)), np.zeros((1, 3)), [0])
    good = tmp_path / "toy_raw/test/class0/001.png"
    result = CliRunner().invoke(app, ["predict", str(good), "--dataset", "toy", "--params", str(project), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["method"] == "bap"


def test_missing_evaluate_json_names_the_file_and_the_fix(project: Path, tmp_path: Path) -> None:
    (tmp_path / "metrics/toy/evaluate.json").unlink()
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "x.png"), "--dataset", "toy", "--params", str(project)])
    assert result.exit_code == 1 and "evaluate.json" in result.output and "fgpipe evaluate --dataset toy" in result.output


def test_help() -> None:
    result = CliRunner().invoke(app, ["predict", "--help"])
    assert result.exit_code == 0 and "--save-png" in result.output and "--json" in result.output


def test_heatmaps_at_the_recorded_input_size_parts_at_stage_1s(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """attention.h5 made at 48 px (stage 1 trained at 32): predict decodes the whole image at 48 for the heatmap
    and the object crop at stage 1's 32 for MPALM, as extract-attention and extract-crops do."""
    from fgpipe.commands import predict as stage

    numeric_threshold(project)
    data = tmp_path / "data/toy"
    meta = AttentionMeta(
        method="oaam", layer="layer3", input_size=48, checkpoint_sha256=file_sha256(data / "stage1/best.pt"),
        manifest_sha256=file_sha256(data / "manifest.csv"), provenance={"checkpoint": "best", "score": "cam"},
    )
    with AttentionWriter(data / "attention.h5", meta, (3, 3), 3) as w:
        w.append(["x"], [0], np.zeros((1, 3, 3)), np.zeros((1, 3)), [0])
    sizes: list[tuple[int, int]] = []
    real = stage.decode_batch

    def recording(requests, out_wh, pool=None):
        sizes.append(tuple(out_wh))
        return real(requests, out_wh, pool)

    monkeypatch.setattr(stage, "decode_batch", recording)
    good = tmp_path / "toy_raw/test/class0/001.png"
    result = CliRunner().invoke(app, ["predict", str(good), "--dataset", "toy", "--params", str(project), "--json"])
    assert result.exit_code == 0, result.output
    assert sizes[:2] == [(48, 48), (32, 32)]  # heatmap input, then the object crop MPALM reads


def test_each_branch_at_the_temperature_in_evaluate_json(project: Path, tmp_path: Path) -> None:
    """predict divides each branch's logits by evaluate.json's temperature: its probabilities with temperature 1
    (evaluate.json edited), raised to 1 / T and renormalised by hand, are the ones it gives with T."""
    image = str(tmp_path / "toy_raw/test/class1/000.png")
    args = ["predict", image, "--dataset", "toy", "--params", str(project), "--json"]
    path = tmp_path / "metrics/toy/evaluate.json"
    doc = json.loads(path.read_text())
    temperatures = {"raw": 0.5, "object": 2.0, "parts": 0.25}  # parts sharpened: the toy part branch is near uniform

    def branch_probs(t: dict[str, float]) -> dict[str, dict[str, float]]:
        path.write_text(json.dumps({**doc, "temperatures": t}))
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        rec = json.loads(result.stdout)["predictions"][0]
        return {b: {c["class"]: c["prob"] for c in rec["top"][b]} for b in ("raw", "object", "parts")}

    plain = branch_probs({"raw": 1.0, "object": 1.0, "parts": 1.0})
    tempered = branch_probs(temperatures)
    for b, t in temperatures.items():
        powered = {c: p ** (1 / t) for c, p in plain[b].items()}
        total = sum(powered.values())
        for c, p in tempered[b].items():  # predict rounds to 6 decimals: a tiny probability's power magnifies that
            assert p == pytest.approx(powered[c] / total, rel=1e-3, abs=1e-5 if plain[b][c] > 1e-3 else 1e-3), (b, c)
        assert any(abs(p - plain[b][c]) > 1e-3 for c, p in tempered[b].items()), (b, plain[b], tempered[b])  # the temperature did change them
