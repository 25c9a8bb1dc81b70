"""The evaluate stage: figures equal a plain recomputation, weights never see test, documented output shape."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fgpipe.cli import app
from fgpipe.config import load_params
from fgpipe.errors import ArtifactError, ConfigError
from fgpipe.stages import evaluate
from fgpipe.store import file_sha256
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
    made = json.loads((tmp_path / "metrics/toy/evaluate.provenance.json").read_text())

    # exactly the documented shape (3 classes: top-k is top-3), the hashes and params in the record beside it
    assert set(metrics) == {"images", "raw", "object", "parts", "joint", "weights", "temperatures", "val", "localization"}
    assert set(made["sources"]) == {"manifest_sha256", "stage1_sha256", "refine_sha256", "crops_sha256", "params"}
    assert made["sources"]["crops_sha256"] == file_sha256(tmp_path / "data/toy/crops.h5") and made["dataset"] == "toy"
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

    fitted: dict[str, float] = {}

    def select(val: evaluate.SplitProbabilities, step: float, select_by: str, branches: tuple[str, ...]) -> dict[str, float]:
        events.append(f"select by {select_by}")
        assert len(val.labels) == 6  # the val split only
        for b in ("raw", "object", "parts"):  # at the temperatures just fitted
            tempered = torch.softmax(val.logits[b].double() / fitted[b], dim=1).numpy()
            assert np.allclose(val.probs[b], tempered, rtol=0, atol=1e-12), b
        return real_select(val, step, select_by, branches)

    def fit(val: evaluate.SplitProbabilities) -> dict[str, float]:
        events.append("temperatures")
        assert len(val.labels) == 6
        fitted.update(real_fit(val))
        return fitted

    real_fit = evaluate.fit_temperatures
    monkeypatch.setattr(evaluate, "split_probabilities", split)
    monkeypatch.setattr(evaluate, "select_weights", select)
    monkeypatch.setattr(evaluate, "fit_temperatures", fit)
    evaluate.run(load_params(params), "toy")
    assert events == ["val", "temperatures", "select by nll", "test"]


def test_val_figures_equal_a_recomputation_from_the_val_probabilities(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = project(trained, tmp_path)
    seen: dict[str, evaluate.SplitProbabilities] = {}
    real_split = evaluate.split_probabilities
    monkeypatch.setattr(evaluate, "split_probabilities", lambda inputs, name: seen.setdefault(name, real_split(inputs, name)))
    metrics = evaluate.run(load_params(params), "toy").metrics
    val, weights, temperatures = seen["val"], metrics["weights"], metrics["temperatures"]
    assert set(metrics["val"]) == {"images", "raw", "object", "parts", "joint"} and metrics["val"]["images"] == 6
    labels = torch.from_numpy(val.labels)
    # each branch at its temperature, by hand from its logits
    branch = {b: torch.softmax(val.logits[b].double() / temperatures[b], dim=1) for b in ("raw", "object", "parts")}
    assert any(abs(t - 1.0) > 1e-3 for t in temperatures.values())  # fitted, not left at 1
    for name in ("raw", "object", "parts", "joint"):
        if name == "joint":  # the weighted mean of the three probability vectors, by hand
            probs = sum(weights[b] * branch[b] for b in ("raw", "object", "parts"))
        else:
            probs = branch[name]
        expected_nll = torch.nn.functional.nll_loss(probs.clamp_min(1e-12).log(), labels).item()
        assert metrics["val"][name]["nll"] == pytest.approx(expected_nll, rel=1e-9)
        assert metrics["val"][name]["top1"] == pytest.approx((probs.argmax(1) == labels).double().mean().item())


def test_fixed_weights_are_honoured_and_val_is_not_read(trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    params = project(trained, tmp_path)
    overrides = {"evaluate.combine": "fixed", "evaluate.weights": {"raw": 0.0, "object": 3.0, "parts": 1.0}, "evaluate.calibrate": False}
    read: list[str] = []
    real_split = evaluate.split_probabilities
    monkeypatch.setattr(evaluate, "split_probabilities", lambda inputs, name: read.append(name) or real_split(inputs, name))
    metrics = evaluate.run(load_params(params, overrides), "toy").metrics
    assert read == ["test"] and "val" not in metrics
    assert metrics["weights"] == {"raw": 0.0, "object": 0.75, "parts": 0.25}
    assert metrics["temperatures"] == {"raw": 1.0, "object": 1.0, "parts": 1.0}
    # calibrated (the default): val is read for the temperatures only, the weights stay the fixed ones
    read.clear()
    calibrated = evaluate.run(load_params(params, {**overrides, "evaluate.calibrate": True}), "toy").metrics
    assert read == ["val", "test"] and calibrated["weights"] == metrics["weights"]
    assert calibrated["temperatures"] != metrics["temperatures"] and calibrated["val"]["images"] == 6
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


def _brute_force_weights(probs: dict[str, np.ndarray], labels: np.ndarray, n: int, select_by: str) -> tuple[float, ...]:
    """The grid point (i, j, k) / n an independent loop picks: lowest mean -log p(true) (nll), or the most
    correct images with that log-loss breaking ties (top1); sums in plain Python, probabilities floored at 1e-12."""
    best: tuple[tuple[float, ...], tuple[float, ...]] | None = None
    for i in range(n + 1):
        for j in range(n + 1 - i):
            k = n - i - j
            correct, nll = 0, 0.0
            for row, label in enumerate(labels):
                joint = [(i * probs["raw"][row, c] + j * probs["object"][row, c] + k * probs["parts"][row, c]) / n
                         for c in range(probs["raw"].shape[1])]
                correct += int(max(range(len(joint)), key=joint.__getitem__) == label)
                nll -= math.log(max(joint[label], 1e-12)) / len(labels)
            key = (0, nll) if select_by == "nll" else (-correct, nll)
            if best is None or key[0] < best[0][0] or (key[0] == best[0][0] and key[1] < best[0][1] - 1e-9):
                best = (key, (i / n, j / n, k / n))
    assert best is not None
    return best[1]


@pytest.mark.parametrize("select_by", ["nll", "top1"])
def test_weights_are_chosen_by_val_log_loss_or_top1(select_by: str) -> None:
    """select_by nll: the grid point with the lowest val log-loss of the joint probabilities; top1: the most
    accurate point, its ties broken by that log-loss. Both checked against a brute-force loop on random branches."""
    rng = np.random.default_rng(3)
    for trial in range(6):
        labels = rng.integers(0, 5, size=40)
        probs = {b: rng.dirichlet(np.ones(5) * 0.7, size=40) for b in evaluate.BRANCHES}
        for b, boost in zip(evaluate.BRANCHES, rng.uniform(0.0, 1.5, size=3)):  # branches of unequal skill
            probs[b][np.arange(40), labels] += boost
            probs[b] /= probs[b].sum(axis=1, keepdims=True)
        val = evaluate.SplitProbabilities([str(i) for i in range(40)], labels, probs)
        chosen = evaluate.select_weights(val, 0.125, select_by)
        assert tuple(chosen.values()) == _brute_force_weights(probs, labels, 8, select_by), trial


def test_branches_left_out_of_the_joint_get_weight_zero() -> None:
    """evaluate.branches [raw, object] (the ablation without parts): the search runs over the grid points whose
    parts weight is 0, the same choice as a brute-force loop over those points only, even where parts is the
    best branch on val."""
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 4, size=30)
    probs = {b: rng.dirichlet(np.ones(4), size=30) for b in evaluate.BRANCHES}
    probs["parts"][np.arange(30), labels] += 3.0  # parts alone would win
    probs["parts"] /= probs["parts"].sum(axis=1, keepdims=True)
    val = evaluate.SplitProbabilities([str(i) for i in range(30)], labels, probs)
    assert evaluate.select_weights(val, 0.25)["parts"] > 0.5
    assert len(evaluate.weight_grid(0.25, ("raw", "object"))) == 5
    assert evaluate.weight_grid(0.5, ("object",)) == [(0, 2, 0)]
    for select_by in ("nll", "top1"):
        chosen = evaluate.select_weights(val, 0.125, select_by, ("raw", "object"))
        assert chosen["parts"] == 0.0
        two = {"raw": probs["raw"], "object": probs["object"], "parts": np.zeros_like(probs["parts"])}
        best = min(
            ((i / 8, (8 - i) / 8) for i in range(9)),
            key=lambda w: (0 if select_by == "nll" else -int(((w[0] * two["raw"] + w[1] * two["object"]).argmax(1) == labels).sum()),
                           round(evaluate.joint_nll(w[0] * two["raw"] + w[1] * two["object"], labels), 9)),
        )
        assert (chosen["raw"], chosen["object"]) == best, select_by


def test_the_branches_option_in_params(trained: Path, tmp_path: Path) -> None:
    params = project(trained, tmp_path)
    metrics = evaluate.run(load_params(params, {"evaluate.branches": ["raw", "object"]}), "toy").metrics
    assert metrics["weights"]["parts"] == 0.0 and sum(metrics["weights"].values()) == pytest.approx(1.0)
    assert set(metrics) >= {"raw", "object", "parts", "joint"}  # parts is still reported alone
    fixed = {"evaluate.combine": "fixed", "evaluate.weights": {"raw": 1.0, "object": 1.0, "parts": 2.0}, "evaluate.branches": ["object", "parts"]}
    assert evaluate.run(load_params(params, fixed), "toy").metrics["weights"] == {"raw": 0.0, "object": pytest.approx(1 / 3), "parts": pytest.approx(2 / 3)}
    for bad in ([], ["raw", "raw"], ["joint"]):
        with pytest.raises(ConfigError, match="evaluate.branches|branches"):
            load_params(params, {"evaluate.branches": bad})


def test_log_loss_tells_apart_weightings_top1_ties_on() -> None:
    """Both weightings get both val images right; the object branch is the more confident, so nll (and top1's
    tie-break) pick it alone, where the old tie rule (the most uniform weighting) would have mixed in raw."""
    labels = np.array([0, 1])
    raw = np.array([[0.55, 0.45], [0.45, 0.55]])
    sure = np.array([[0.95, 0.05], [0.05, 0.95]])
    val = evaluate.SplitProbabilities(["a", "b"], labels, {"raw": raw, "object": sure, "parts": raw})
    for select_by in ("nll", "top1"):
        assert evaluate.select_weights(val, 0.5, select_by) == {"raw": 0.0, "object": 1.0, "parts": 0.0}
    assert evaluate.joint_nll(sure, labels) == pytest.approx(-math.log(0.95))
    assert evaluate.joint_nll(np.array([[1.0, 0.0]]), np.array([1])) == pytest.approx(-math.log(1e-12))


def test_localization_is_left_out_when_null(trained: Path, tmp_path: Path) -> None:
    params = project(trained, tmp_path)
    crops = {"crops_sha256": file_sha256(tmp_path / "data/toy/crops.h5")}
    (tmp_path / "metrics/toy/extract_crops.json").write_text(json.dumps({"localization": None}))
    (tmp_path / "metrics/toy/extract_crops.provenance.json").write_text(json.dumps({"sources": crops}))
    record = evaluate.run(load_params(params, {"evaluate.combine": "fixed"}), "toy")
    assert set(record.metrics) == {"images", "raw", "object", "parts", "joint", "weights", "temperatures", "val"}
    assert "sources" in record.provenance


def test_help() -> None:
    result = CliRunner().invoke(app, ["evaluate", "--help"])
    assert result.exit_code == 0 and "--combine" in result.output and "--no-calibrate" in result.output


def test_no_calibrate_option(trained: Path, tmp_path: Path) -> None:
    """`--no-calibrate` overrides evaluate.calibrate: every temperature 1, recorded in the provenance's params."""
    params = project(trained, tmp_path)
    result = CliRunner().invoke(app, ["evaluate", "--dataset", "toy", "--params", str(params), "--no-calibrate"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "metrics/toy/evaluate.json").read_text())
    made = json.loads((tmp_path / "metrics/toy/evaluate.provenance.json").read_text())
    assert metrics["temperatures"] == {"raw": 1.0, "object": 1.0, "parts": 1.0}
    assert made["sources"]["params"]["values"]["evaluate.calibrate"] is False


def _numpy_nll(logits: np.ndarray, labels: np.ndarray, t: float) -> float:
    """Mean log-loss of softmax(logits / t), written out in numpy (log-sum-exp by hand)."""
    z = logits / t
    m = z.max(1, keepdims=True)
    lse = (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]
    return float((lse - z[np.arange(len(labels)), labels]).mean())


def test_fit_temperature_finds_the_lowest_val_log_loss() -> None:
    """Against a dense search of the same range in numpy, on logits that are too sure, too unsure and mixed."""
    rng = np.random.default_rng(3)
    grid = np.exp(np.linspace(np.log(0.25), np.log(4.0), 4001))
    for trial, scale in enumerate((0.3, 1.0, 6.0)):
        labels = rng.integers(0, 5, 40)
        logits = rng.normal(size=(40, 5)) * scale
        logits[np.arange(40), labels] += scale * rng.uniform(0, 2, 40)  # mostly right, with varying margins
        fitted = evaluate.fit_temperature(torch.from_numpy(logits), labels)
        dense = [_numpy_nll(logits, labels, t) for t in grid]
        best = grid[int(np.argmin(dense))]
        assert fitted == pytest.approx(best, rel=2e-3), trial
        assert _numpy_nll(logits, labels, fitted) <= min(dense) * (1 + 1e-5), trial


def test_fit_temperature_recovers_the_temperature_labels_were_drawn_at() -> None:
    """Labels drawn from softmax(z / 2): the logits z are twice as sure as the truth, so the fit is about 2; and a
    branch right on every image with a wide margin sharpens to the range's lower end."""
    rng = np.random.default_rng(0)
    z = rng.normal(size=(20000, 6)) * 3.0
    p = torch.softmax(torch.from_numpy(z) / 2.0, dim=1).numpy()
    labels = np.array([rng.choice(6, p=row) for row in p])
    assert evaluate.fit_temperature(torch.from_numpy(z), labels) == pytest.approx(2.0, rel=0.05)
    separable = np.eye(4)[np.arange(8) % 4] * 3.0
    assert evaluate.fit_temperature(torch.from_numpy(separable), np.arange(8) % 4) == pytest.approx(evaluate.TEMPERATURE_RANGE[0], rel=1e-3)


def test_test_probabilities_are_tempered_and_uncalibrated_ones_are_the_softmax(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The joint prediction on test mixes each branch at the temperature fitted on val (predictions.csv's
    joint_prob recomputed by hand from the test logits); with calibrate false the temperatures are 1 and the
    probabilities are the plain softmax."""
    params = project(trained, tmp_path)
    seen: dict[str, evaluate.SplitProbabilities] = {}
    real_split = evaluate.split_probabilities
    monkeypatch.setattr(evaluate, "split_probabilities", lambda inputs, name: seen.setdefault(name, real_split(inputs, name)))
    joint_prob: dict[bool, np.ndarray] = {}
    # fixed weights, all three branches: the temperatures alone tell the two runs apart
    fixed = {"evaluate.combine": "fixed", "evaluate.weights": {"raw": 1.0, "object": 1.0, "parts": 1.0}}
    for calibrate in (True, False):
        seen.clear()
        metrics = evaluate.run(load_params(params, {**fixed, "evaluate.calibrate": calibrate}), "toy").metrics
        test, w, t = seen["test"], metrics["weights"], metrics["temperatures"]
        if not calibrate:
            assert t == {"raw": 1.0, "object": 1.0, "parts": 1.0}
        joint = sum(w[b] * torch.softmax(test.logits[b].double() / t[b], dim=1) for b in ("raw", "object", "parts"))
        rows = {r["image_id"]: r for r in read_csv(tmp_path / "metrics/toy/predictions.csv")}
        joint_prob[calibrate] = np.array([float(rows[i]["joint_prob"]) for i in test.image_ids])
        for i, image_id in enumerate(test.image_ids):
            assert joint_prob[calibrate][i] == pytest.approx(joint[i].max().item(), abs=2e-6), (calibrate, image_id)
    assert np.abs(joint_prob[True] - joint_prob[False]).max() > 1e-3  # the temperatures changed what was written


def test_an_empty_val_split_needs_fixed_weights_and_no_calibration(
    trained: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without val images, `combine: val` and `calibrate` stop before test is read, naming the manifest and both
    settings; `combine: fixed` with `calibrate: false` evaluates test alone."""
    params = project(trained, tmp_path)
    real_open = evaluate.open_inputs

    def without_val(*args: object) -> evaluate.Inputs:
        inputs = real_open(*args)  # type: ignore[arg-type]
        inputs.rows["val"] = []
        return inputs

    read: list[str] = []
    real_split = evaluate.split_probabilities
    monkeypatch.setattr(evaluate, "open_inputs", without_val)
    monkeypatch.setattr(evaluate, "split_probabilities", lambda inputs, name: read.append(name) or real_split(inputs, name))
    fixed = {"evaluate.combine": "fixed"}
    for overrides in ({}, {**fixed, "evaluate.calibrate": True}):
        with pytest.raises(ArtifactError, match=r"manifest.csv: the val split is empty; use evaluate.combine: fixed and evaluate.calibrate: false"):
            evaluate.run(load_params(params, overrides), "toy")
    assert read == []
    metrics = evaluate.run(load_params(params, {**fixed, "evaluate.calibrate": False}), "toy").metrics
    assert read == ["test"] and "val" not in metrics and metrics["temperatures"] == {"raw": 1.0, "object": 1.0, "parts": 1.0}


def test_tempered_at_temperature_one_is_the_split_itself_and_otherwise_the_softmax_of_scaled_logits() -> None:
    logits = {b: torch.tensor([[2.0, 0.0, -1.0], [0.5, 1.5, 0.0]]) * (i + 1) for i, b in enumerate(("raw", "object", "parts"))}
    probs = {b: torch.softmax(v.double(), dim=1).numpy() for b, v in logits.items()}
    split = evaluate.SplitProbabilities(["a", "b"], np.array([0, 1]), probs, logits)
    assert split.tempered({"raw": 1.0, "object": 1.0, "parts": 1.0}) is split
    hot = split.tempered({"raw": 1.0, "object": 2.0, "parts": 0.5})
    for b, t in (("raw", 1.0), ("object", 2.0), ("parts", 0.5)):
        assert np.allclose(hot.probs[b], torch.softmax(logits[b].double() / t, dim=1).numpy(), rtol=0, atol=1e-12), b


def test_val_summary_names_what_val_chose() -> None:
    weights, joint = {"raw": 0.25, "object": 0.5, "parts": 0.25}, {"top1": 0.9, "nll": 0.31}
    temperatures = {"raw": 1.5, "object": 0.75, "parts": 1.0}
    line = evaluate.val_summary(evaluate.EvaluateConfig(), temperatures, weights, joint)
    assert line == (
        "temperatures fitted on val: raw 1.500, object 0.750, parts 1.000; weights chosen on val (nll): "
        "raw 0.250, object 0.500, parts 0.250 (val joint top-1 0.9000, NLL 0.3100)"
    )
    fixed = evaluate.EvaluateConfig(combine="fixed", calibrate=False)
    assert evaluate.val_summary(fixed, temperatures, weights, joint) == (
        "weights fixed: raw 0.250, object 0.500, parts 0.250 (val joint top-1 0.9000, NLL 0.3100)"
    )
