"""Stage `evaluate`: raw, object, parts and joint predictions on test (METHODS.md section 6).

Reads:  data/NAME/manifest.csv, data/NAME/dataset.json, the images (from data/NAME/images.h5 when prepare
        built it), data/NAME/stage1/best.pt, data/NAME/refine/best.pt, data/NAME/crops.h5,
        metrics/NAME/extract_crops.json and extract_crops.provenance.json; params `evaluate`. Each is checked by
        SHA-256 against what it was made from (:mod:`fgpipe.lineage`; crops.h5 against attention.h5 and its
        stage-1 checkpoint too).
Writes: metrics/NAME/evaluate.json, metrics/NAME/evaluate.provenance.json, metrics/NAME/per_class.csv,
        metrics/NAME/confusion.csv, metrics/NAME/predictions.csv, data/NAME/confusion.png.

Branches, each a softmax over the classes:
- raw: the stage-1 network on the whole image, exactly as stage-1 evaluates (resize to input_size *
  resize_ratio, centre crop), without test-time refinement;
- object / parts: the refinement branches on the object crop and on the MPALM patches (mean of the patch
  logits), cut from crops.h5's boxes as train-refine evaluates them.

Each branch's logits are first divided by its temperature: with ``evaluate.calibrate`` (the default) the one
that gives the branch alone the lowest val log-loss (temperature scaling, :func:`fit_temperature`), else 1. A
branch trained with label smoothing is never very sure even where it is right, one that overfits is too sure;
the temperatures put the branches on one scale of confidence before their probabilities are weighed. They do
not change any branch's own ranking, so its top-1 and top-k are the same with or without.

The joint prediction is the weighted mean of the three probability vectors. ``evaluate.combine: val``
searches the weights on the grid of step ``evaluate.weight_step`` (non-negative, summing to 1) for the best
fit to val: by default (``select_by: nll``) the lowest negative log-likelihood of the true class under the
joint probabilities, which uses every val image's confidence and so varies less on a small val split than
top-1 does; ``select_by: top1`` takes the highest val top-1 (ties: the lowest NLL). Remaining ties go to the
most uniform weighting (the smallest sum of squared weights), then grid order;
``fixed`` uses ``evaluate.weights`` normalised to sum 1. ``evaluate.branches`` lists the branches the joint
prediction combines (all three by default; ``[raw, object]`` is the ablation without parts): the others get
weight 0 in both modes, and are still reported alone. The test split is loaded only once the temperatures and weights
are fixed (see :func:`run`): nothing is ever selected on test.

evaluate.json is exactly ``{"images", "raw", "object", "parts", "joint", "weights", "temperatures"[, "val"][,
"localization"]}``, each branch ``{"top1", "top{k}"}`` with k = min(evaluate.top_k, number of classes), accuracies
on test in [0, 1]; ``temperatures`` each branch's (1 without ``calibrate``); ``val`` (whenever val was read:
``combine: val`` or ``calibrate``) holds the figures the temperatures were fitted and the weights chosen (or,
``fixed``, applied) on: ``images`` and, for each branch (at its temperature) and the joint prediction, ``{"top1", "nll"}`` on the val split (the NLL, a mean over the val
images, is the finer of the two for comparing settings on a small val split); ``localization`` (accuracy, mean_iou,
fallback_rate) is carried from extract_crops.json (checked to describe this crops.h5) and left out when that is
null (a dataset without boxes). evaluate.provenance.json's
``sources``: the SHA-256 of the manifest, stage1/best.pt, refine/best.pt and crops.h5 the figures and weights were
computed from, and ``params``, the `evaluate` params they were chosen with (:func:`fgpipe.lineage.params_record`:
``fgpipe predict`` takes the weights only for those checkpoints and while those params are unchanged).
predictions.csv names classes by their class names.
Every output is renamed into place together at the end (:func:`fgpipe.store.replaced_together`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgpipe.branch_data import read_crops, split_data
from fgpipe.config import EvaluateConfig, Settings, TrainBackboneConfig
from fgpipe.console import console
from fgpipe.errors import ArtifactError, ConfigError
from fgpipe.figures import confusion_image
from fgpipe.h5schema import CropsReader
from fgpipe.imagecache import ImageCache, open_image_cache
from fgpipe.layout import Layout
from fgpipe.lineage import (
    check_crops,
    check_crops_params,
    check_params,
    check_recorded,
    check_refine,
    params_record,
    read_dataset_inputs,
    rerun,
)
from fgpipe.branch_inference import BRANCHES, Branches, joint_probabilities, load_refine, probabilities, refine_config
from fgpipe.loader import check_image_files, whole_image_requests
from fgpipe.manifest import ManifestRow
from fgpipe.runtime import configure_threads
from fgpipe.sharding import ranks
from fgpipe.stage1_network import load_checked_stage1
from fgpipe.streaming import FeedOptions, whole_image_feed
from fgpipe.store import (
    FileHashes,
    StageRecord,
    atomic_path,
    check_output_paths,
    read_json_artifact,
    replaced_together,
    write_record,
    write_text,
)
from fgpipe.training import Runtime, feed_options

STAGE = "evaluate"
LOCALIZATION_KEYS = ("accuracy", "mean_iou", "fallback_rate")


@dataclass
class Inputs:
    """Everything evaluation needs except the images, checked against each other."""

    root: Path
    cache: ImageCache | None  # the decoded image cache (None: the image files are decoded)
    rows: dict[str, list[ManifestRow]]  # split -> rows
    classes: list[str]
    crops: Path
    manifest_sha256: str
    sources: dict[str, str]  # SHA-256 of the manifest, both checkpoints and crops.h5: evaluate.json's ``sources``
    branches: Branches
    batch_size: int
    options: FeedOptions  # how the images are read: streamed by workers, or each split held in memory


@dataclass
class SplitProbabilities:
    """Per-branch class probabilities of one split (and the logits they came from)."""

    image_ids: list[str]
    labels: np.ndarray  # (N,) int64
    probs: dict[str, np.ndarray]  # branch -> (N, K) float64
    logits: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)  # branch -> (N, K): before any temperature

    def tempered(self, temperatures: dict[str, float]) -> SplitProbabilities:
        """The same split with each branch's probabilities at its temperature (softmax of logits / T); itself when every
        temperature is 1 (no calibration)."""
        if all(temperatures.get(b, 1.0) == 1.0 for b in BRANCHES):
            return self
        probs = probabilities(*(self.logits[b] for b in BRANCHES), temperatures=temperatures)
        return dataclasses.replace(self, probs=probs)


def val_summary(cfg: EvaluateConfig, temperatures: dict[str, float], weights: dict[str, float], joint: dict[str, float]) -> str:
    """The console line of what val chose: the temperatures (when fitted), the weights and the joint's val figures."""
    parts = []
    if cfg.calibrate:
        parts.append("temperatures fitted on val: " + ", ".join(f"{b} {t:.3f}" for b, t in temperatures.items()))
    how = f"chosen on val ({cfg.select_by})" if cfg.combine == "val" else "fixed"
    parts.append(f"weights {how}: " + ", ".join(f"{b} {w:.3f}" for b, w in weights.items()))
    return "; ".join(parts) + f" (val joint top-1 {joint['top1']:.4f}, NLL {joint['nll']:.4f})"


def open_inputs(settings: Settings, dataset: str, rt: Runtime) -> Inputs:
    """Load and cross-check the manifest, both checkpoints and crops.h5 (no image is read here); the networks run on
    ``rt`` (:func:`fgpipe.sharding.ranks`)."""
    inputs = read_dataset_inputs(settings, dataset)
    data = settings.layout(dataset).data
    info, root, classes, by_split = inputs.info, inputs.root, inputs.classes, inputs.by_split
    sha = FileHashes()  # each input hashed once
    manifest_sha = sha(data.manifest)
    stage1_path, refine_path = data.stage1("best"), data.refine("best")
    stage1, s1_state = load_checked_stage1(stage1_path, manifest_sha, dataset, rt.device, settings)
    if not refine_path.is_file():
        raise ArtifactError(f"checkpoint not found: {refine_path} (run `fgpipe train-refine --dataset {dataset}` first)")
    refine, r_state = load_refine(refine_path, rt.device, dataset)
    if not data.crops.is_file():
        raise ArtifactError(f"{data.crops} not found (run `fgpipe extract-crops --dataset {dataset}` first)")
    check_refine(r_state, refine_path, data.path, dataset, sha)
    if list(r_state["class_names"]) != classes or list(s1_state["class_names"]) != classes:
        raise ArtifactError(f"{refine_path} was trained from another class list: {rerun(dataset, 'train-refine')}")
    with CropsReader(data.crops) as crops:  # made from this manifest, attention.h5 and stage-1 checkpoint
        check_crops(crops, data.path, dataset, sha)
        check_crops_params(crops, data.path, settings, dataset)  # and with the params now
    check_params(refine_path, r_state.get("params"), settings, "train-refine", dataset)
    sources = {
        "manifest_sha256": manifest_sha, "stage1_sha256": sha(stage1_path), "refine_sha256": sha(refine_path),
        "crops_sha256": sha(data.crops),
    }
    if rt.channels_last:
        stage1 = stage1.to(memory_format=torch.channels_last)
        refine = refine.to(memory_format=torch.channels_last)
    s1_cfg = dataclasses.replace(TrainBackboneConfig(**s1_state["config"]["train_backbone"]), test_refine=False)
    cache = open_image_cache(data.images, root, manifest_sha, dataset)
    # before any report is written; train images are never decoded here, so only val's and test's are checked
    check_image_files(info, by_split["val"] + by_split["test"], cache, dataset, data.manifest)
    branches = Branches(
        stage1=stage1, stage1_cfg=s1_cfg, stage1_path=stage1_path, refine=refine, refine_cfg=refine_config(r_state),
        refine_path=refine_path, rt=rt, dataset=dataset,
    )
    return Inputs(
        root=root, cache=cache, rows=by_split, classes=classes, crops=data.crops, manifest_sha256=manifest_sha,
        sources=sources, branches=branches, batch_size=settings.params.evaluate.batch_size,
        options=feed_options(settings.params.evaluate),
    )


def split_probabilities(inputs: Inputs, split: str) -> SplitProbabilities:
    """Read the images and boxes of ``split`` (streamed, or each held in memory in turn) and return the three branches'
    probabilities."""
    rows = inputs.rows[split]
    boxes = read_crops(inputs.crops, inputs.manifest_sha256, rows)
    branches, ids = inputs.branches, [r.image_id for r in rows]
    whole = whole_image_feed(whole_image_requests(inputs.root, rows, inputs.cache), branches.whole_side, inputs.options, split)
    raw = branches.raw_logits(whole, ids, inputs.batch_size)
    whole.close()  # one pass each: its workers stop here
    data = split_data(inputs.root, rows, boxes, branches.refine_cfg, 0.0, split, inputs.options, inputs.cache)
    obj, parts = branches.region_logits(data, ids, inputs.batch_size)
    data.feed.close()
    labels = np.array([r.label for r in rows], dtype=np.int64)
    return SplitProbabilities(ids, labels, probabilities(raw, obj, parts), dict(zip(BRANCHES, (raw, obj, parts))))


# --------------------------------------------------------------------------- temperatures
TEMPERATURE_RANGE = (0.25, 4.0)  # the temperatures searched: a quarter to four times the logits' own scale


def branch_nll(logits: torch.Tensor, labels: np.ndarray, temperature: float) -> float:
    """Mean negative log-likelihood of the true classes under softmax(logits / temperature), in float64."""
    return float(torch.nn.functional.cross_entropy(logits.double() / temperature, torch.as_tensor(labels)))


def fit_temperature(logits: torch.Tensor, labels: np.ndarray, tol: float = 1e-5) -> float:
    """The temperature T in TEMPERATURE_RANGE with the lowest mean log-loss of softmax(logits / T) on ``labels``
    (temperature scaling, Guo et al. 2017): a golden-section search on log T to within ``tol``; the log-loss is
    convex in 1/T, so it has one minimum in log T (unimodal there), which the search brackets. A branch that is right on every image with a margin keeps sharpening:
    it ends at the range's lower end."""
    def nll(log_t: float) -> float:
        return branch_nll(logits, labels, math.exp(log_t))

    a, b = (math.log(t) for t in TEMPERATURE_RANGE)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    while b - a > tol:
        if fc <= fd:  # the minimum is in [a, d]
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:  # in [c, b]
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    return math.exp((a + b) / 2)


def fit_temperatures(val: SplitProbabilities) -> dict[str, float]:
    """Each branch's temperature, fitted on val alone (:func:`fit_temperature`)."""
    return {b: fit_temperature(val.logits[b], val.labels) for b in BRANCHES}


# --------------------------------------------------------------------------- combination weights
def weight_grid(step: float, branches: tuple[str, ...] = BRANCHES) -> list[tuple[int, int, int]]:
    """Grid points (i, j, k), i + j + k = n = 1 / step: the weights (i, j, k) / n of (raw, object, parts);
    a branch not in ``branches`` keeps 0."""
    n = round(1 / step)
    if n < 1 or abs(n * step - 1) > 1e-9:
        raise ConfigError(f"evaluate.weight_step must divide 1 (e.g. 0.05, 0.1, 0.125, 0.25, 0.5), got {step}")
    grid = [(i, j, n - i - j) for i in range(n + 1) for j in range(n + 1 - i)]
    return [p for p in grid if all(v == 0 for b, v in zip(BRANCHES, p) if b not in branches)]


NLL_FLOOR = 1e-12  # probabilities are floored here before the log: a confident miss costs 27.6, not infinity


def joint_nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true classes under probabilities (N, K)."""
    picked = probs[np.arange(len(labels)), labels]
    return float(-np.log(np.maximum(picked, NLL_FLOOR)).mean())


def select_weights(
    val: SplitProbabilities, step: float, select_by: str = "nll", branches: tuple[str, ...] = BRANCHES
) -> dict[str, float]:
    """Grid weights of ``branches`` (the others 0) that fit val best: the lowest NLL of the joint prediction
    (``nll``) or the highest top-1 (``top1``, ties -> the lowest NLL); remaining ties -> the most uniform (then
    grid order)."""
    grid = weight_grid(step, branches)
    n = sum(grid[0])
    best_key: tuple[float, ...] | None = None
    best = grid[0]
    for point in grid:
        weights = dict(zip(BRANCHES, (v / n for v in point)))
        joint = joint_probabilities(val.probs, weights)
        correct = int((joint.argmax(1) == val.labels).sum())
        nll = round(joint_nll(joint, val.labels), 9)  # rounded: float noise must not break a tie
        uniformity = sum(v * v for v in point)
        key = (nll, uniformity) if select_by == "nll" else (-correct, nll, uniformity)
        if best_key is None or key < best_key:
            best_key, best = key, point
    return dict(zip(BRANCHES, (v / n for v in best)))


def fixed_weights(cfg: EvaluateConfig) -> dict[str, float]:
    """``evaluate.weights`` of the branches in ``evaluate.branches`` (the others 0), normalised to sum 1."""
    raw = {b: float(getattr(cfg.weights, b)) if b in cfg.branches else 0.0 for b in BRANCHES}
    total = sum(raw.values())
    if total <= 0:
        raise ConfigError(f"evaluate.weights: at least one of {', '.join(cfg.branches)} (evaluate.branches) must be > 0 (combine: fixed)")
    return {b: v / total for b, v in raw.items()}


# --------------------------------------------------------------------------- figures
def accuracy(probs: np.ndarray, labels: np.ndarray, k: int) -> dict[str, float]:
    """Top-1 (argmax) and top-k accuracy of (N, K) probabilities."""
    top1 = float((probs.argmax(1) == labels).mean())
    topk_idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (N, k)
    topk = float((topk_idx == labels[:, None]).any(axis=1).mean())
    return {"top1": top1, f"top{k}": topk}


def split_figures(split: SplitProbabilities, weights: dict[str, float]) -> dict[str, Any]:
    """``images`` and each branch's and the joint prediction's ``{"top1", "nll"}`` on one split (evaluate.json's
    ``val``)."""
    probs = {**split.probs, "joint": joint_probabilities(split.probs, weights)}
    figures: dict[str, Any] = {"images": len(split.labels)}
    for name in (*BRANCHES, "joint"):
        figures[name] = {"top1": accuracy(probs[name], split.labels, 1)["top1"], "nll": joint_nll(probs[name], split.labels)}
    return figures


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts (K, K): rows the true class, columns the predicted one."""
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (labels, predictions), 1)
    return out


def _csv(rows: list[list[Any]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def run(settings: Settings, dataset: str) -> StageRecord:
    """Evaluate on test with temperatures and weights fixed beforehand (on val or from params); return the content of evaluate.json and
    evaluate.provenance.json. Under torchrun each rank computes its share of every split's batches, every rank gets
    all the probabilities (so all choose the same weights) and rank 0 writes (:mod:`fgpipe.sharding`)."""
    configure_threads()
    with ranks() as rt, replaced_together():  # the reports and evaluate.json change together, or not at all
        return _run(settings, dataset, rt)


def _run(settings: Settings, dataset: str, rt: Runtime) -> StageRecord:
    cfg = settings.params.evaluate
    layout = settings.layout(dataset)
    data, out = layout.data, layout.metrics
    if cfg.combine == "val":
        weight_grid(cfg.weight_step)  # a bad step fails before any work
    check_output_paths([out.stage(STAGE), out.provenance(STAGE), out.per_class, out.confusion, out.predictions, data.confusion_png])
    inputs = open_inputs(settings, dataset, rt)
    crops_json, crops_made = out.stage("extract_crops"), out.provenance("extract_crops")
    for path in (crops_json, crops_made):
        if not os.path.lexists(path):
            raise ArtifactError(f"{path} not found (run `fgpipe extract-crops --dataset {dataset}` first)")
    crops_figures = read_json_artifact(crops_json, rerun(dataset, "extract-crops"))
    made = read_json_artifact(crops_made, rerun(dataset, "extract-crops"))
    recorded = made.get("sources") if isinstance(made.get("sources"), dict) else {}
    check_recorded(  # its localisation figures describe this crops.h5 (the record beside them says which)
        crops_json, recorded.get("crops_sha256"), data.crops, inputs.sources["crops_sha256"], "crops.h5",
        rerun(dataset, "extract-crops"), "crops_sha256", made="computed",
    )
    located = localization_figures(crops_json, crops_figures, dataset)
    if not inputs.rows["test"]:
        raise ArtifactError(f"{data.manifest}: the test split is empty: nothing to evaluate")

    # 1. the temperatures and the weights: fitted on val or fixed; the test split is not touched before this is done
    temperatures = {b: 1.0 for b in BRANCHES}
    weights, val_figures = (fixed_weights(cfg) if cfg.combine == "fixed" else {}), None
    if cfg.combine == "val" or cfg.calibrate:
        if not inputs.rows["val"]:
            raise ArtifactError(
                f"{data.manifest}: the val split is empty; use evaluate.combine: fixed and evaluate.calibrate: false"
            )
        val = split_probabilities(inputs, "val")
        if cfg.calibrate:
            temperatures = fit_temperatures(val)
            val = val.tempered(temperatures)
        if cfg.combine == "val":
            weights = select_weights(val, cfg.weight_step, cfg.select_by, cfg.branches)
        val_figures = split_figures(val, weights)
        if rt.is_main:
            console.print(val_summary(cfg, temperatures, weights, val_figures["joint"]), highlight=False)

    # 2. test, once
    test = split_probabilities(inputs, "test").tempered(temperatures)
    k = min(cfg.top_k, len(inputs.classes))
    probs = {**test.probs, "joint": joint_probabilities(test.probs, weights)}
    metrics: dict[str, Any] = {"images": len(test.labels)}
    for name in (*BRANCHES, "joint"):
        metrics[name] = accuracy(probs[name], test.labels, k)
    metrics["weights"] = weights
    metrics["temperatures"] = temperatures
    if val_figures is not None:
        metrics["val"] = val_figures
    if located is not None:
        metrics["localization"] = located
    # the params too: predict takes the weights only while the `evaluate` params are still these
    provenance = {
        "sources": {**inputs.sources, "params": params_record(settings, "evaluate", dataset)}, **inputs.options.describe(),
        "world_size": rt.world_size,  # processes (torchrun ranks) that computed the probabilities
    }
    record = settings.record(dataset, metrics, provenance)
    if rt.is_main:  # rank 0 writes
        write_reports(layout, dataset, inputs.classes, test, probs)
        write_record(out, STAGE, record)
    return record


def localization_figures(path: Path, doc: dict[str, Any], dataset: str) -> dict[str, float] | None:
    """extract_crops.json's ``localization`` as evaluate.json carries it: null (a dataset without boxes), or
    accuracy, mean_iou and fallback_rate, each a number in [0, 1]; anything else names the file and extract-crops."""
    located = doc.get("localization")
    if located is None:
        return None
    fix = rerun(dataset, "extract-crops")
    if not isinstance(located, dict):
        raise ArtifactError(f"{path}: `localization` must be an object or null, got {type(located).__name__}; {fix}")
    missing = [key for key in LOCALIZATION_KEYS if key not in located]
    if missing:
        raise ArtifactError(f"{path}: `localization` lacks {', '.join(missing)}; {fix}")
    for key in LOCALIZATION_KEYS:
        value = located[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ArtifactError(f"{path}: `localization.{key}` must be a number in [0, 1], got {value!r}; {fix}")
    return {key: float(located[key]) for key in LOCALIZATION_KEYS}


def write_reports(
    layout: Layout, dataset: str, classes: list[str], test: SplitProbabilities, probs: dict[str, np.ndarray]
) -> None:
    """predictions.csv, per_class.csv, confusion.csv and confusion.png of the test split."""
    top1 = {name: p.argmax(1) for name, p in probs.items()}  # (N,) each
    joint_prob = probs["joint"][np.arange(len(test.labels)), top1["joint"]]
    rows = [["image_id", "label", "raw_top1", "object_top1", "parts_top1", "joint_top1", "joint_prob"]]
    for i, image_id in enumerate(test.image_ids):
        rows.append([image_id, classes[test.labels[i]], *(classes[top1[b][i]] for b in (*BRANCHES, "joint")), f"{joint_prob[i]:.6f}"])
    write_text(layout.metrics.predictions, _csv(rows))

    per_class = [["class", "images", *BRANCHES, "joint"]]
    for c, name in enumerate(classes):
        mask = test.labels == c
        n = int(mask.sum())
        accs = [f"{float((top1[b][mask] == c).mean()):.6f}" if n else "" for b in (*BRANCHES, "joint")]
        per_class.append([name, n, *accs])
    write_text(layout.metrics.per_class, _csv(per_class))

    matrix = confusion_matrix(test.labels, top1["joint"], len(classes))
    write_text(layout.metrics.confusion, _csv([["true \\ predicted", *classes], *([name, *row] for name, row in zip(classes, matrix.tolist()))]))
    title = f"{dataset}: joint prediction on test ({len(test.labels)} images)"
    with atomic_path(layout.data.confusion_png) as tmp:
        confusion_image(matrix, classes, title).save(tmp, format="PNG")
