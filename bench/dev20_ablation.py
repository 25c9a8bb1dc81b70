"""README's dev20 ablation table: one row per arm (a run of bench/dev20.py that changes one thing), test figures.

    uv run python bench/dev20_ablation.py                   # the arms below, seed 0
    uv run python bench/dev20_ablation.py --seed 1 --arm "without parts=wsdan-s{seed}-noparts"

Each arm is a run folder under data/dev20 with the summary.json bench/dev20.py writes; an arm whose run has not
finished is printed as such. The runs (all on seed 0's split and seeds unless --seed says otherwise):

    reference           bench/dev20.py --seed 0 --set model.lcam=stage                (wsdan-s0-a448)
    LCAM none / block   bench/dev20.py --seed 0 --name wsdan-s0-lcam-none --set model.lcam=none     (whole chain;
                        none is cub's default in params.yaml now, so plain `bench/dev20.py --seed 0` makes it)
    without parts       bench/dev20.py --seed 0 --name wsdan-s0-noparts --from evaluate --set 'evaluate.branches=[raw, object]'
    crops from METHOD   bench/dev20.py --seed 0 --name wsdan-s0-hm-METHOD --from extract-attention --set attention.method=METHOD
                        (METHOD: aolm, gradcam, bap; stage 1 copied from the reference run: the same network)

Columns: stage-1 raw, object, parts and joint top-1 on test (joint weights chosen on val), and the test
localisation of the crops the object branch trained on (IoU >= 0.5 with the box) at the threshold extract-crops
chose on the train+val boxes. Every choice (checkpoints, threshold, weights) was made on train/val.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ARMS = (
    "reference: LCAM stage, OAAM crops, all branches=wsdan-s{seed}-a448",
    "LCAM none (cub's default since this table)=wsdan-s{seed}-lcam-none",
    "LCAM block=wsdan-s{seed}-lcam-block",
    "without parts (joint of raw and object)=wsdan-s{seed}-noparts",
    "crops from AOLM=wsdan-s{seed}-hm-aolm",
    "crops from Grad-CAM=wsdan-s{seed}-hm-gradcam",
    "crops from BAP=wsdan-s{seed}-hm-bap",
)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arm", action="append", default=[], metavar="LABEL=FOLDER", help="arms to print (default: the list above)")
    args = ap.parse_args()
    print("| arm | raw | object | parts | joint (weights raw / object / parts) | crops: method, localisation (T) |")
    print("|---|---|---|---|---|---|")
    for arm in args.arm or ARMS:
        label, _, folder = arm.rpartition("=")
        path = REPO / "data" / "dev20" / folder.format(seed=args.seed) / "summary.json"
        summary = json.loads(path.read_text()) if path.is_file() else {}
        e, c = summary.get("evaluate"), summary.get("crops")
        if not e:
            print(f"| {label} | (no finished run in data/dev20/{folder.format(seed=args.seed)}) | | | | |")
            continue
        w = e["weights"]
        threshold = "-" if c and c["method"] == "aolm" else c and c["threshold"]  # AOLM's mask has no threshold
        crops = f"{c['method']}, {fmt(c['localization']['accuracy'])} ({threshold})" if c else "-"
        print(f"| {label} | {fmt(e['raw'])} | {fmt(e['object'])} | {fmt(e['parts'])} | {fmt(e['joint'])} "
              f"({w['raw']:g} / {w['object']:g} / {w['parts']:g}) | {crops} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
