"""The evaluate stage: figures equal a plain recomputation, weights never see test, documented output shape."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from fgpipe.cli import app
from fgpipe.config import load_params
from fgpipe.errors import ConfigError
from fgpipe.stages import evaluate
from test_refine import copy_project, trained_project


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy project with trained branches (made once per session, read-only)."""
    return trained_project(tmp_path_factory)


def project(trained: Path, tmp_path: Path) -> Path:
    """A private copy of the trained project."""
    return copy_project(trained, tmp_path)


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_figures_equal_a_recomputation_from_predictions_csv(trained: Path, tmp_path: Path) -> None:
    params = project(trained, tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "toy", "--params", str(params)])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics/toy/evaluate.json").read_text())

    # exactly the documented shape (3 classes: top-k is top-3)
    assert set(metrics) == {"images", "raw", "object", "parts", "joint", "weights", "localization"}
    for branch in ("raw", "object", "parts", "joint"):
        assert set(metrics[branch]) == {"top1", "top3"}
    assert set(metrics["weights"]) == {"raw", "object", "parts"}
    assert sum(metrics["weights"].values()) == pytest.approx(1.0)
    assert metrics["localization"] == {"accuracy": 0.75, "mean_iou": 0.61, "fallback_rate": 0.0}

    preds = read_csv(tmp_path / "metrics/toy/predictions.csv")
    assert list(preds[0]) == ["image_id", "label", "raw_top1", "object_top1", "parts_top1", "joint_top1", "joint_prob"]
    assert metrics["images"] == len(preds) == 9
    for branch in ("raw", "object", "parts", "joint"):
        assert metrics[branch]["top1"] == pytest.approx(np.mean([p["label"] == p[f"{branch}_top1"] for p in preds]))
        assert metrics[branch]["top3"] == 1.0  # every class is in the top 3 of 3

    per_class = read_csv(tmp_path / "metrics/toy/per_class.csv")
    assert [r["class"] for r in per_class] == ["class0", "class1", "class2"]
    for r in per_class:
        mine = [p for p in preds if p["label"] == r["class"]]
        assert int(r["images"]) == len(mine)
        assert float(r["joint"]) == pytest.approx(np.mean([p["joint_top1"] == r["class"] for p in mine]))

    with open(tmp_path / "metrics/toy/confusion.csv", newline="") as fh:
        table = list(csv.reader(fh))
    assert table[0][1:] == ["class0", "class1", "class2"]
    for row in table[1:]:
        for j, count in enumerate(row[1:]):
            expected = sum(p["label"] == row[0] and p["joint_top1"] == table[0][j + 1] for p in preds)
            assert int(count) == expected
    with Image.open(tmp_path / "data/toy/confusion.png") as png:
        assert png.size[0] > 100 and png.size[1] > 100


def test_weights_are_selected_before_test_is_read(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = project(trained, tmp_path)
    events: list[str] = []
    real_split, real_select = evaluate.split_probabilities, evaluate.select_weights

    def split(inputs: evaluate.Inputs, name: str) -> evaluate.SplitProbabilities:
        events.append(name)
        return real_split(inputs, name)

    def select(val: evaluate.SplitProbabilities, step: float) -> dict[str, float]:
        events.append("select")
        assert len(val.labels) == 6  # the val split only
        return real_select(val, step)

    monkeypatch.setattr(evaluate, "split_probabilities", split)
    monkeypatch.setattr(evaluate, "select_weights", select)
    evaluate.run(load_params(params), "toy")
    assert events == ["val", "select", "test"]


def test_fixed_weights_are_honoured_and_val_is_not_read(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = project(trained, tmp_path)
    overrides = {"evaluate.combine": "fixed", "evaluate.weights": {"raw": 0.0, "object": 3.0, "parts": 1.0}}
    read: list[str] = []
    real_split = evaluate.split_probabilities
    monkeypatch.setattr(evaluate, "split_probabilities", lambda inputs, name: read.append(name) or real_split(inputs, name))
    metrics = evaluate.run(load_params(params, overrides), "toy")
    assert read == ["test"]
    assert metrics["weights"] == {"raw": 0.0, "object": 0.75, "parts": 0.25}
    with pytest.raises(ConfigError, match="evaluate.weights"):
        evaluate.run(load_params(params, {**overrides, "evaluate.weights": {"raw": 0.0, "object": 0.0, "parts": 0.0}}), "toy")


def test_grid_search_prefers_the_more_uniform_weighting_on_ties() -> None:
    labels = np.array([0, 1])
    same = np.array([[0.9, 0.1], [0.2, 0.8]])
    val = evaluate.SplitProbabilities(["a", "b"], labels, {"raw": same, "object": same, "parts": same})
    # every point ties on val top-1: the most uniform points (sum of squares 2 of 4) win, then grid order
    assert evaluate.select_weights(val, 0.5) == {"raw": 0.0, "object": 0.5, "parts": 0.5}
    assert len(evaluate.weight_grid(0.25)) == 15
    wrong = np.array([[0.1, 0.9], [0.8, 0.2]])
    val = evaluate.SplitProbabilities(["a", "b"], labels, {"raw": wrong, "object": same, "parts": wrong})
    assert evaluate.select_weights(val, 0.25)["object"] > 0.5
    with pytest.raises(ConfigError, match="weight_step must divide 1"):
        evaluate.weight_grid(0.3)


def test_localization_is_left_out_when_null(trained: Path, tmp_path: Path) -> None:
    params = project(trained, tmp_path)
    (tmp_path / "metrics/toy/extract_crops.json").write_text(json.dumps({"localization": None}))
    metrics = evaluate.run(load_params(params, {"evaluate.combine": "fixed"}), "toy")
    assert set(metrics) == {"images", "raw", "object", "parts", "joint", "weights"}


def test_help() -> None:
    result = CliRunner().invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0 and "--combine" in result.output
