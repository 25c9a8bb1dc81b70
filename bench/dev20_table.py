"""README's dev20 tables from the runs of bench/dev20.py: one row per seed, then the mean and spread.

    uv run python bench/dev20_table.py                      # data/dev20/wsdan-sN and plain-sN, seeds 0 1 2
    uv run python bench/dev20_table.py --wsdan wsdan-s{seed}-a448 --stage1 wsdan-s{seed} --plain plain-s{seed}-a448

Each run folder holds the summary.json that bench/dev20.py writes. `--stage1` names the folder whose stage 1
(prepare, train-backbone) a run continued from with `--from extract-attention` (the same network: stage 1 reads
no attention/crops/refine parameter), so its wall time is added to the chain's. `--stock` adds the plain baseline on the stock trunk (stride 32, no LCAM). `--at224` adds OAAM and AOLM
localisation from a run that made the heatmaps at stage 1's 224 px. Only test figures are printed: every
choice they rest on (checkpoints, joint weights, thresholds) was made on train/val: each heatmap method is
shown at the threshold that localises the train+val boxes best for it (extract-crops' rule for `auto`; for
OAAM that is the threshold its crops were cut at), in brackets.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHAIN = ("prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate")


def load(pattern: str, seed: int) -> dict | None:
    if not pattern:
        return None
    path = REPO / "data" / "dev20" / pattern.format(seed=seed) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def loc(folder: str, seed: int, method: str) -> tuple[float, str] | None:
    """Test localisation of ``method`` at the threshold that method localises the train+val boxes best with
    (extract-crops' own rule for `crops.threshold: auto`: most hits, then the higher mean IoU, then the lower
    threshold), read from the run's metrics/cub/localization.json; and that threshold ("-" for AOLM)."""
    if not folder:
        return None
    path = REPO / "data" / "dev20" / folder.format(seed=seed) / "metrics" / "cub" / "localization.json"
    if not path.is_file():
        return None
    splits = json.loads(path.read_text())["methods"].get(method)
    if splits is None:
        return None

    def pooled(key: str) -> tuple[float, float, float]:
        figs = [splits[s][key] for s in ("train", "val") if splits[s].get(key) and splits[s][key]["images"]]
        n = sum(f["images"] for f in figs)
        hits = round(sum(f["accuracy"] * f["images"] for f in figs))
        iou = sum(f["mean_iou"] * f["images"] for f in figs) / n if n else 0.0
        return hits, iou, -float("inf") if key == "any" else -float(key)

    best = max(splits["train"], key=pooled)
    return splits["test"][best]["accuracy"], ("-" if best == "any" else best)


def fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--wsdan", default="wsdan-s{seed}", help="folder of the whole chain ({seed} is replaced)")
    ap.add_argument("--stage1", default="", help="folder whose stage 1 the chain continued from")
    ap.add_argument("--plain", default="plain-s{seed}", help="folder of the plain baseline (--head plain)")
    ap.add_argument("--at224", default="", help="folder with the heatmaps at stage 1's 224 px")
    ap.add_argument("--stock", default="", help="folder of the plain baseline on the stock trunk "
                    "(--head plain --set model.output_stride=0 --set model.lcam=none)")
    args = ap.parse_args()

    cols = {k: [] for k in ("plain", "stock", "raw", "object", "gain", "parts", "joint", "oaam", "aolm", "gradcam", "bap",
                            "oaam224", "aolm224", "plain_oaam", "plain_aolm", "minutes")}
    print("| seed | plain | plain, stock trunk | raw | object (- raw) | parts | joint (weights raw / object / parts) | OAAM (T) | AOLM "
          "| Grad-CAM | BAP | OAAM, AOLM at 224 px | plain: OAAM, AOLM | chain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for seed in args.seeds:
        w, s1, p, st = (load(x, seed) for x in (args.wsdan, args.stage1, args.plain, args.stock))
        a224 = args.at224 and load(args.at224, seed)
        if not w or "evaluate" not in w:
            print(f"| {seed} | (no finished run of {args.wsdan.format(seed=seed)}) |")
            continue
        e = w["evaluate"]
        seconds = {**(s1 or {}).get("seconds", {}), **w["seconds"]}
        minutes = sum(seconds.get(stage, 0.0) for stage in CHAIN) / 60 if all(st in seconds for st in CHAIN) else None
        row = {
            "plain": p["stage1"]["test_top1"] if p and "stage1" in p else None,
            "stock": st["stage1"]["test_top1"] if st and "stage1" in st else None,
            "raw": e["raw"], "object": e["object"], "gain": 100 * (e["object"] - e["raw"]), "parts": e["parts"],
            "joint": e["joint"], "minutes": minutes,
        }
        chosen = {}
        for key, folder, method in (("oaam", args.wsdan, "oaam"), ("aolm", args.wsdan, "aolm"), ("gradcam", args.wsdan, "gradcam"),
                                    ("bap", args.wsdan, "bap"), ("oaam224", args.at224, "oaam"), ("aolm224", args.at224, "aolm"),
                                    ("plain_oaam", args.plain, "oaam"), ("plain_aolm", args.plain, "aolm")):
            found = loc(folder, seed, method)
            row[key], chosen[key] = (found[0], found[1]) if found else (None, "-")
        for k, v in row.items():
            if v is not None:
                cols[k].append(v)
        wt = e["weights"]
        at224 = f"{fmt(row['oaam224'])}, {fmt(row['aolm224'])}" if a224 else "-"
        plain_loc = f"{fmt(row['plain_oaam'])}, {fmt(row['plain_aolm'])}" if p else "-"
        print(
            f"| {seed} | {fmt(row['plain'])} | {fmt(row['stock'])} | {fmt(e['raw'])} | {fmt(e['object'])} ({row['gain']:+.1f}) | {fmt(e['parts'])} "
            f"| {fmt(e['joint'])} ({wt['raw']:g} / {wt['object']:g} / {wt['parts']:g}) | {fmt(row['oaam'])} "
            f"({chosen['oaam']}) | {fmt(row['aolm'])} | {fmt(row['gradcam'])} ({chosen['gradcam']}) | {fmt(row['bap'])} "
            f"({chosen['bap']}) | {at224} "
            f"| {plain_loc} | {'-' if minutes is None else f'{minutes:.1f} min'} |"
        )
    m = {k: spread(v) for k, v in cols.items()}
    gain = f"{statistics.mean(cols['gain']):+.1f}" if cols["gain"] else "-"
    print(
        f"| mean ± sd | {m['plain']} | {m['stock']} | {m['raw']} | {m['object']} ({gain}) | {m['parts']} | {m['joint']} | {m['oaam']} "
        f"| {m['aolm']} | {m['gradcam']} | {m['bap']} | {m['oaam224']}, {m['aolm224']} | {m['plain_oaam']}, "
        f"{m['plain_aolm']} | - |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
