"""`fgpipe predict IMAGE...`: the whole chain on new image files, with the trained artefacts of a dataset.

Per image, as the pipeline does for the dataset's own images:

1. heatmap: the attention method recorded in data/NAME/attention.h5 (``attention.method`` when that file is
   absent), on the stage-1 checkpoint it was made from (``attention.checkpoint``), the whole image resized to
   the stage-1 input size (as extract-attention);
2. object box: ``crops.threshold`` of the heatmap's max, largest component (as extract-crops); with
   ``crops.threshold: auto``, the threshold extract-crops chose (recorded in data/NAME/crops.h5);
3. MPALM parts of the object crop with the ``crops`` settings (as extract-crops, same functions);
4. the raw stage-1 prediction (stage1/best.pt, as evaluate), the object branch on the object box and the part
   branch on the part patches (refine/best.pt, as evaluate);
5. joint: the weighted mean of the three probabilities (each branch's logits divided by its temperature) with the
   weights and temperatures in metrics/NAME/evaluate.json (used only for the checkpoints and params its record,
   metrics/NAME/evaluate.provenance.json, names).

Every artefact read is checked, by SHA-256, against what it was made from (:mod:`fgpipe.lineage`): attention.h5
against the manifest and its stage-1 checkpoint, crops.h5 (``auto``) against attention.h5 and that checkpoint,
refine/best.pt against the manifest, crops.h5 and stage1/best.pt, and evaluate.json's weights against both
checkpoints they were chosen for; and each against the params now (:func:`fgpipe.lineage.check_params`: a stage
whose params changed since it ran is named, to rerun). The manifest gives only the class names (the checkpoints are
checked against it), so prepare's params are not compared: ``prepare.max_pixels`` is predict's own limit too. evaluate.json's weights must be finite, non-negative
numbers summing to 1, its temperatures finite and positive. A network giving NaN or infinite heatmaps, features or logits (diverged) is refused, naming
the images and the checkpoint.

Output: a table per image with the top-k classes of every branch (``--json``: one JSON document on stdout).
An image that cannot be read (missing, corrupt, truncated, declaring more than ``prepare.max_pixels`` pixels, or
not a regular file: a folder, a FIFO or a device is never opened) is reported on stderr, naming the file, and skipped; :func:`run` returns how many failed (the CLI then exits
with 1 once every other image is done).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import Tensor

from fgpipe.attention import HeatmapMethod, create_method
from fgpipe.branch_data import image_boxes, load_branch_data
from fgpipe.branch_inference import BRANCHES, Branches, joint_probabilities, load_refine, probabilities, refine_config
from fgpipe.checkpoints import require_finite
from fgpipe.config import Settings, TrainBackboneConfig
from fgpipe.console import console
from fgpipe.crop_parts import parts_of
from fgpipe.errors import ArtifactError
from fgpipe.figures import save_png as write_png
from fgpipe.h5schema import AttentionReader, CropsReader
from fgpipe.images import DECODE_ERRORS, image_size
from fgpipe.lineage import check_attention, check_crops, check_evaluation, check_params, check_refine, checkpoint_of, rerun
from fgpipe.loader import LoadRequest, decode_batch, decode_region, normalize
from fgpipe.localize import object_boxes
from fgpipe.manifest import class_names, read_manifest
from fgpipe.models.wsdan import Stage1Net
from fgpipe.preview import COLOURS, TILE, colormap, safe_name
from fgpipe.runtime import configure_threads
from fgpipe.stage1_network import inference_runtime, load_checked_stage1, stage1_input_size
from fgpipe.store import FileHashes, read_json_artifact
from fgpipe.streaming import FeedOptions

@dataclass
class Chain:
    """The trained artefacts of a dataset, loaded once."""

    classes: list[str]
    method_name: str
    heat_model: Stage1Net  # the stage-1 network the heatmaps (and MPALM features) come from
    heat_method: HeatmapMethod  # on heat_model
    flip: bool  # heatmaps averaged with the mirrored image's (attention.flip, as recorded in attention.h5)
    heat_size: int  # the input size the heatmaps are computed at (attention.input_size, as attention.h5 records)
    heat_path: Path  # heat_model's checkpoint
    part_size: int  # the input size MPALM feeds object crops at (heat_model's stage-1 input size, as extract-crops)
    threshold: float  # the object threshold: crops.threshold, or (auto) the one crops.h5 records
    branches: Branches  # raw, object and parts, as evaluate runs them
    weights: dict[str, float]
    temperatures: dict[str, float]  # each branch's, from evaluate.json


@dataclass
class Prediction:
    """What the chain found for one image."""

    path: Path
    size: tuple[int, int]
    heatmap: np.ndarray  # (h, w) in [0, 1]
    box: np.ndarray  # (4,) object box, original pixels
    fallback: bool
    parts: np.ndarray  # (P, 4) MPALM parts, original pixels (P may be 0)
    probs: dict[str, np.ndarray]  # raw, object, parts, joint -> (K,)


def load_chain(settings: Settings, dataset: str) -> Chain:
    """Load the checkpoints, the attention method and the joint weights of ``dataset``; check they belong together."""
    settings.dataset(dataset)  # a clear error for an unknown dataset name
    data = settings.layout(dataset).data
    d = data.path
    manifest = data.manifest
    classes = class_names(read_manifest(manifest))
    sha = FileHashes()  # each input hashed once
    manifest_sha = sha(manifest)
    rt = inference_runtime()

    attention_path = data.attention
    if attention_path.is_file():
        with AttentionReader(attention_path) as attention:
            method_name = attention.meta.method
            score = str(attention.meta.provenance.get("score", "auto"))
            flip = bool(attention.meta.provenance.get("flip", False))
            heat_size: int | None = int(attention.meta.input_size)
            heat_path = checkpoint_of(attention, d, dataset)
    else:
        method_name = settings.params.attention.method
        score = settings.params.attention.score
        flip = settings.params.attention.flip
        heat_size = settings.params.attention.input_size or None
        heat_path = data.stage1(settings.params.attention.checkpoint)
    raw_path = data.stage1("best")
    stage1, s1_state = load_checked_stage1(raw_path, manifest_sha, dataset, rt.device, settings)
    if heat_path.resolve() == raw_path.resolve():
        heat_model, heat_state = stage1, s1_state
    else:
        heat_model, heat_state = load_checked_stage1(heat_path, manifest_sha, dataset, rt.device, settings)
    if attention_path.is_file():  # once the checkpoints loaded: a damaged one is named as such first
        with AttentionReader(attention_path) as attention:
            check_attention(attention, d, dataset, sha, required=True)
            check_params(attention_path, attention.meta.provenance.get("params"), settings, "extract-attention", dataset)

    refine_path = data.refine("best")
    if not refine_path.is_file():
        raise ArtifactError(f"checkpoint not found: {refine_path} (run `fgpipe train-refine --dataset {dataset}` first)")
    refine, r_state = load_refine(refine_path, rt.device, dataset)
    check_refine(r_state, refine_path, d, dataset, sha)
    if data.crops.is_file():  # the crops the branches were trained on: cut with the `crops` params predict uses
        with CropsReader(data.crops) as crops:
            check_params(crops.path, crops.meta.provenance.get("params"), settings, "extract-crops", dataset)
    check_params(refine_path, r_state.get("params"), settings, "train-refine", dataset)
    if list(r_state["class_names"]) != classes or list(s1_state["class_names"]) != classes:
        raise ArtifactError(f"{refine_path} was trained on another class list than {manifest}: rerun `fgpipe train-refine --dataset {dataset}`")

    metrics = settings.layout(dataset).metrics
    metrics_path, made_path = metrics.stage("evaluate"), metrics.provenance("evaluate")
    for path, why in ((metrics_path, "the joint weights come from it"), (made_path, "it names the checkpoints the joint weights were chosen for")):
        if not os.path.lexists(path):
            raise ArtifactError(f"{path} not found: {why} (run `fgpipe evaluate --dataset {dataset}` first)")
    evaluation = read_json_artifact(metrics_path, rerun(dataset, "evaluate"))
    made = read_json_artifact(made_path, rerun(dataset, "evaluate"))
    check_evaluation(metrics_path, made, d, dataset, sha)  # the weights were chosen for these checkpoints
    weights = joint_weights(metrics_path, evaluation, dataset)
    temperatures = branch_temperatures(metrics_path, evaluation, dataset)
    sources = made.get("sources")
    check_params(metrics_path, sources.get("params") if isinstance(sources, dict) else None, settings, "evaluate", dataset)
    s1_cfg = TrainBackboneConfig(**s1_state["config"]["train_backbone"])
    branches = Branches(
        stage1=stage1, stage1_cfg=dataclasses.replace(s1_cfg, test_refine=False), stage1_path=raw_path, refine=refine,
        refine_cfg=refine_config(r_state), refine_path=refine_path, rt=rt, dataset=dataset,
    )
    return Chain(
        classes=classes, method_name=method_name, heat_model=heat_model, heat_method=create_method(method_name, heat_model, score=score),
        flip=flip, heat_size=heat_size or stage1_input_size(heat_state), heat_path=heat_path, part_size=stage1_input_size(heat_state),
        threshold=object_threshold(settings, dataset, sha), branches=branches, weights=weights,
        temperatures=temperatures,
    )


def branch_numbers(path: Path, evaluation: dict[str, Any], key: str, dataset: str, positive: bool) -> dict[str, float]:
    """evaluate.json's ``key``: a number for each of raw, object and parts, finite and > 0 (``positive``) or >= 0;
    anything else (missing, NaN, a bool, a string, a missing branch) names the file, the key and evaluate."""
    numbers = evaluation.get(key)
    fix = rerun(dataset, "evaluate")
    if not isinstance(numbers, dict) or set(numbers) != set(BRANCHES):
        shown = sorted(numbers) if isinstance(numbers, dict) else type(numbers).__name__
        raise ArtifactError(f"{path}: `{key}` must give raw, object and parts, got {shown}; {fix}")
    for b in BRANCHES:
        v = numbers[b]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise ArtifactError(f"{path}: `{key}.{b}` must be a finite number {'>' if positive else '>='} 0, got {v!r}; {fix}")
    return {b: float(numbers[b]) for b in BRANCHES}


def joint_weights(path: Path, evaluation: dict[str, Any], dataset: str) -> dict[str, float]:
    """evaluate.json's ``weights``: each >= 0 (:func:`branch_numbers`), summing to 1 (as evaluate writes them)."""
    weights = branch_numbers(path, evaluation, "weights", dataset, positive=False)
    total = sum(weights.values())
    if abs(total - 1.0) > 1e-6:
        raise ArtifactError(f"{path}: `weights` must sum to 1 (as evaluate chooses them), got {total:g}; {rerun(dataset, 'evaluate')}")
    return weights


def branch_temperatures(path: Path, evaluation: dict[str, Any], dataset: str) -> dict[str, float]:
    """evaluate.json's ``temperatures``: each > 0 (:func:`branch_numbers`); an evaluate.json from before them has
    none and is refused, naming evaluate."""
    return branch_numbers(path, evaluation, "temperatures", dataset, positive=True)


def object_threshold(settings: Settings, dataset: str, hashes: FileHashes | None = None) -> float:
    """``crops.threshold``; for ``auto``, the threshold extract-crops chose on train+val (crops.h5's ``threshold``, the
    file checked against what it was made from)."""
    param = settings.params.crops.threshold
    if param != "auto":
        return float(param)
    path = settings.layout(dataset).data.crops
    if not path.is_file():
        raise ArtifactError(
            f"crops.threshold is auto and {path} (which records the threshold chosen) is not there: "
            f"run `fgpipe extract-crops --dataset {dataset}` first, or set crops.threshold to a number"
        )
    with CropsReader(path) as crops:
        check_crops(crops, path.parent, dataset, hashes or FileHashes())
        return float(crops.meta.threshold)


def _quiet_load(requests: list[LoadRequest], out_wh: tuple[int, int], desc: str = "") -> Tensor:
    return decode_batch(requests, out_wh)


def predict_batch(chain: Chain, paths: list[Path], sizes: list[tuple[int, int]], settings: Settings) -> list[Prediction]:
    """Run the whole chain on a batch of readable images."""
    cfg = settings.params.crops
    branches = chain.branches
    rt, dataset = branches.rt, branches.dataset
    whole = [LoadRequest(p, (0.0, 0.0, float(w), float(h))) for p, (w, h) in zip(paths, sizes)]
    # 1-3: heatmap, object box, MPALM parts (as extract-attention and extract-crops)
    heat_in = decode_batch(whole, (chain.heat_size, chain.heat_size))
    heat = chain.heat_method(normalize(heat_in.to(rt.device)), flip=chain.flip)
    names = [str(p) for p in paths]
    require_finite(heat.heatmaps, names, f"`{chain.method_name}` heatmaps", chain.heat_path, "stage1", dataset)
    heatmaps = heat.heatmaps.cpu().numpy()  # (B, h, w)
    found = object_boxes(heatmaps, chain.threshold, np.array(sizes, dtype=np.float64))
    crops = decode_batch([LoadRequest(p, tuple(float(v) for v in b)) for p, b in zip(paths, found.boxes)], (chain.part_size, chain.part_size))
    parts = parts_of(
        chain.heat_model, crops, found.boxes, chain.part_size, cfg, rt.device, names=names, checkpoint=chain.heat_path,
        dataset=dataset,
    )
    # 4: the three branches (as evaluate)
    raw = branches.raw_logits(decode_batch(whole, (branches.whole_side,) * 2), names)
    boxes = [image_boxes(found.boxes[i], parts.boxes[i], int(parts.counts[i]), bool(found.fallback[i]), sizes[i]) for i in range(len(paths))]
    data = load_branch_data(
        paths, sizes, boxes, [0] * len(paths), *branches.region_sides, 0.0, "predict", FeedOptions(in_memory=True),
        load=_quiet_load,
    )
    obj, part_logits = branches.region_logits(data, names)
    probs: dict[str, np.ndarray] = probabilities(raw, obj, part_logits, chain.temperatures)
    probs["joint"] = joint_probabilities(probs, chain.weights)
    return [
        Prediction(
            path=p, size=sizes[i], heatmap=heatmaps[i], box=found.boxes[i], fallback=bool(found.fallback[i]),
            parts=parts.boxes[i, : int(parts.counts[i])], probs={b: v[i] for b, v in probs.items()},
        )
        for i, p in enumerate(paths)
    ]


def top_classes(probs: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """The ``k`` most probable classes, best first: ``[{"class": name, "prob": p}, ...]``."""
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"class": classes[i], "prob": round(float(probs[i]), 6)} for i in order]


def as_record(pred: Prediction, classes: list[str], k: int) -> dict[str, Any]:
    """The JSON form of one image's prediction."""
    return {
        "image": str(pred.path),
        "size": list(pred.size),
        "box": [round(float(v), 2) for v in pred.box],
        "fallback": pred.fallback,
        "part_boxes": [[round(float(v), 2) for v in b] for b in pred.parts],
        "top": {b: top_classes(p, classes, k) for b, p in pred.probs.items()},
    }


def print_table(out: Console, record: dict[str, Any], weights: dict[str, float]) -> None:
    """One image's top-k classes per branch as a rich table."""
    box = ", ".join(f"{v:g}" for v in record["box"])
    caption = f"object box ({box}){' FALLBACK: empty heatmap' if record['fallback'] else ''}, {len(record['part_boxes'])} parts"
    table = Table(title=escape(record["image"]), caption=escape(caption), title_justify="left")
    table.add_column("#", justify="right")
    for b in (*BRANCHES, "joint"):
        table.add_column(f"{b} ({weights[b]:.2f})" if b in weights else b)
    for rank in range(len(record["top"]["joint"])):
        table.add_row(
            str(rank + 1),
            *(f"{escape(record['top'][b][rank]['class'])} {record['top'][b][rank]['prob']:.3f}" for b in (*BRANCHES, "joint")),
        )
    out.print(table)


def draw_prediction(pred: Prediction, record: dict[str, Any]) -> Image.Image:
    """The image with its object box (red) and parts (yellow), its heatmap overlay, and the joint top-1."""
    w, h = pred.size
    scale = TILE / max(w, h)
    tw, th = max(1, round(w * scale)), max(1, round(h * scale))
    image = Image.fromarray(decode_region(pred.path, (0.0, 0.0, float(w), float(h)), (tw, th)))

    def scaled(b: np.ndarray) -> list[float]:
        x0, y0, x1, y1 = (float(v) * scale for v in b)
        return [x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)]

    left = image.copy()
    d = ImageDraw.Draw(left)
    for part in pred.parts:
        d.rectangle(scaled(part), outline=COLOURS["parts"], width=1)
    d.rectangle(scaled(pred.box), outline=COLOURS["object box"], width=2)
    heat = Image.fromarray(pred.heatmap.astype(np.float32), mode="F").resize((tw, th), Image.BILINEAR)
    overlay = Image.blend(image, Image.fromarray(colormap(np.asarray(heat))), 0.55)
    ImageDraw.Draw(overlay).rectangle(scaled(pred.box), outline=COLOURS["object box"], width=2)

    font = ImageFont.load_default(size=12)
    canvas = Image.new("RGB", (2 * TILE + 8, TILE + 36), (255, 255, 255))
    canvas.paste(left, ((TILE - tw) // 2, (TILE - th) // 2))
    canvas.paste(overlay, (TILE + 8 + (TILE - tw) // 2, (TILE - th) // 2))
    d = ImageDraw.Draw(canvas)
    best = record["top"]["joint"][0]
    d.text((2, TILE + 2), f"{pred.path.name}: {best['class']} ({best['prob']:.3f}, joint)", fill=(20, 20, 20), font=font)
    d.text((2, TILE + 18), f"red: object box{' (fallback)' if pred.fallback else ''}, yellow: {len(pred.parts)} parts",
           fill=(20, 20, 20), font=font)
    return canvas


def run(
    settings: Settings, dataset: str, images: list[Path], top_k: int = 5, as_json: bool = False, save_png: Path | None = None
) -> int:
    """Classify ``images``; print tables (or JSON on stdout); return the number of images that could not be read."""
    configure_threads()
    chain = load_chain(settings, dataset)
    k = min(top_k, len(chain.classes))
    errors: list[dict[str, str]] = []
    good: list[tuple[Path, tuple[int, int]]] = []
    for path in images:
        try:
            good.append((path, image_size(path, verify=True, max_pixels=settings.params.prepare.max_pixels)))
        except DECODE_ERRORS as exc:  # missing, corrupt, truncated or over prepare.max_pixels (a bug is not caught)
            reason = exc.strerror if isinstance(exc, FileNotFoundError) and exc.strerror else str(exc)
            errors.append({"image": str(path), "error": reason})
            console.print(f"[bold red]error:[/] {escape(str(path))}: cannot read image: {escape(reason)}", highlight=False, soft_wrap=True)

    stdout = Console(file=sys.stdout) if not as_json else None
    records: list[dict[str, Any]] = []
    used: set[str] = set()
    batch = settings.params.evaluate.batch_size
    for start in range(0, len(good), batch):
        chunk = good[start : start + batch]
        preds = predict_batch(chain, [p for p, _ in chunk], [s for _, s in chunk], settings)
        for pred in preds:
            record = as_record(pred, chain.classes, k)
            if save_png is not None:
                name = safe_name(pred.path.stem)
                stem, n = name, 1
                while name in used:
                    n += 1
                    name = f"{stem}_{n}"
                used.add(name)
                record["png"] = str(write_png(draw_prediction(pred, record), save_png / f"{name}.png"))
            records.append(record)
            if stdout is not None:
                print_table(stdout, record, chain.weights)
    if as_json:
        doc = {"dataset": dataset, "method": chain.method_name, "weights": chain.weights, "temperatures": chain.temperatures, "predictions": records, "errors": errors}
        sys.stdout.write(json.dumps(doc, indent=2) + "\n")
        sys.stdout.flush()
    return len(errors)
