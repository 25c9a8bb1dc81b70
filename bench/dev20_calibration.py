"""Does fitting a temperature per branch on val help the joint prediction? Cross-validated on val alone.

    uv run python bench/dev20_calibration.py --runs wsdan-s{seed}-ls          # seeds 0 1 2, data/dev20/RUN

For each run (a bench/dev20.py folder with its refine checkpoint and crops), the val split's logits of the three
branches are computed with evaluate's own code (test is never read). Then, in `--splits` random half/half splits
of val, stratified by class, each half in turn fits (a) the joint weights alone (evaluate.calibrate false) or
(b) a temperature per branch and then the weights (calibrate true), on that half, and the joint prediction is
scored on the other half: held-out top-1 and log-loss, mean over the splits, per seed and pooled. This is the
rule README "Real birds" states for `evaluate.calibrate`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from fgpipe.branch_inference import BRANCHES
from fgpipe.config import load_params
from fgpipe.runtime import configure_threads
from fgpipe.sharding import ranks
from fgpipe.stages.evaluate import (
    SplitProbabilities,
    fit_temperatures,
    joint_nll,
    joint_probabilities,
    open_inputs,
    select_weights,
    split_probabilities,
)

REPO = Path(__file__).resolve().parents[1]


def val_split(folder: Path) -> SplitProbabilities:
    settings = load_params(folder / "params.yaml", dataset="cub")
    with ranks() as rt:
        return split_probabilities(open_inputs(settings, "cub", rt), "val")


def subset(split: SplitProbabilities, mask: np.ndarray) -> SplitProbabilities:
    logits = {b: split.logits[b][torch.from_numpy(mask)] for b in BRANCHES}
    return SplitProbabilities([], split.labels[mask], {b: split.probs[b][mask] for b in BRANCHES}, logits)


def fitted(split: SplitProbabilities, calibrate: bool, step: float) -> tuple[dict[str, float], dict[str, float]]:
    temperatures = fit_temperatures(split) if calibrate else {b: 1.0 for b in BRANCHES}
    return temperatures, select_weights(split.tempered(temperatures), step)


def scored(split: SplitProbabilities, temperatures: dict[str, float], weights: dict[str, float]) -> tuple[float, float]:
    joint = joint_probabilities(split.tempered(temperatures).probs, weights)
    return float((joint.argmax(1) == split.labels).mean()), joint_nll(joint, split.labels)


def halves(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random half of each class's images (an odd count: the extra one on a random side)."""
    mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        mask[idx[: len(idx) // 2 + int(rng.random() < 0.5) * (len(idx) % 2)]] = True
    return mask


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="wsdan-s{seed}-ls", help="run folder under data/dev20, {seed} filled in")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--splits", type=int, default=200)
    ap.add_argument("--step", type=float, default=0.25, help="evaluate.weight_step")
    args = ap.parse_args()
    configure_threads()
    rng = np.random.default_rng(0)
    pooled: dict[bool, list[np.ndarray]] = {False: [], True: []}
    print("| seed | val images | held-out joint top-1: weights only / with temperatures | held-out joint log-loss: weights only / with temperatures | temperatures fitted on all of val (raw / object / parts) |")
    print("|---|---|---|---|---|")
    for seed in args.seeds:
        val = val_split(REPO / "data" / "dev20" / args.runs.format(seed=seed))
        scores: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
        for _ in range(args.splits):
            mask = halves(val.labels, rng)
            for fit_on, score_on in ((mask, ~mask), (~mask, mask)):
                for calibrate in (False, True):
                    scores[calibrate].append(scored(subset(val, score_on), *fitted(subset(val, fit_on), calibrate, args.step)))
        means = {c: np.array(s).mean(0) for c, s in scores.items()}
        for c in (False, True):
            pooled[c].append(means[c])
        t = fit_temperatures(val)
        print(f"| {seed} | {len(val.labels)} | {means[False][0]:.3f} / {means[True][0]:.3f} | {means[False][1]:.3f} / {means[True][1]:.3f} "
              f"| {t['raw']:.2f} / {t['object']:.2f} / {t['parts']:.2f} |")
    mean = {c: np.mean(v, axis=0) for c, v in pooled.items()}
    print(f"| mean | | {mean[False][0]:.3f} / {mean[True][0]:.3f} | {mean[False][1]:.3f} / {mean[True][1]:.3f} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
