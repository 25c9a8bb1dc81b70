"""The chain on the real CUB development set (dev20) for one seed, as README "Results on real birds" reports it.

    uv run python bench/dev20.py --seed 1                   # the default chain (WS-DAN stage 1, OAAM crops)
    uv run python bench/dev20.py --seed 1 --head plain --until train-backbone   # the plain baseline's stage 1
    uv run python bench/dev20.py --seed 0 --set model.lcam=none                 # an ablation

It reads params.yaml, changes only what the command line says (the seed: `datasets.cub.split_seed`,
`train_backbone.seed`, `train_refine.seed`; the stage-1 head; any `--set KEY=VALUE`, a YAML value), and writes
the result as a params file of its own in the run's folder (`data/dev20/NAME/params.yaml`, paths made
absolute), so the run's data and metrics stay apart from the project's. Then it runs `fgpipe STAGE --dataset cub
--params THAT_FILE` for every stage in order and writes `data/dev20/NAME/summary.json`: the figures of every
stage's metrics that the README tables show (and the heatmap method, from extract-crops' provenance record), and
each stage's wall time.

`--base RUN --from STAGE` continues another run: the outputs, metrics and plots that dvc.yaml names for every stage
before STAGE are taken from data/dev20/RUN (data files linked, metrics and plots copied), so only STAGE onwards runs:

    uv run python bench/dev20.py --seed 0 --name wsdan-s0-r10 --base wsdan-s0 --from train-refine \
        --set train_refine.augment.resize_ratio=1.0
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate")
DEV20 = "../shared/realdata/cub200_2011_dev20/CUB_200_2011"


def set_key(params: dict, dotted: str, value: object) -> None:
    node = params
    *parents, leaf = dotted.split(".")
    for key in parents:
        node = node.setdefault(key, {})
    node[leaf] = value


def run_params(seed: int, head: str, sets: list[str], folder: Path) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    root = str((REPO / DEV20).resolve())
    params["run"] = {"cub": root}
    params["datasets"]["cub"]["root"] = root
    params["datasets"]["cub"]["split_seed"] = seed
    params["train_backbone"]["seed"] = seed
    params["train_refine"]["seed"] = seed
    params["model"]["head"] = head
    params["prepare"]["data_dir"] = str(folder / "data")
    params["prepare"]["metrics_dir"] = str(folder / "metrics")
    for item in sets:
        key, _, value = item.partition("=")
        set_key(params, key, yaml.safe_load(value))
    return params


def stage_paths(stage: str, dataset: str = "cub") -> list[str]:
    """Every output, metric and plot dvc.yaml names for ``stage`` of ``dataset``, relative to a run folder."""
    do = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"][stage]["do"]
    entries = [e for key in ("outs", "metrics", "plots") for e in do.get(key) or []]
    return [(next(iter(e)) if isinstance(e, dict) else e).replace("${key}", dataset) for e in entries]


def take_from(base: Path, folder: Path, start: str) -> None:
    """Give ``folder`` what every stage before ``start`` made in the run ``base``: data files as links (to their
    final targets), metrics and plots as copies (the later stages add theirs beside them). A missing data file
    stops it; a missing metrics file (a run made before fgpipe wrote it, e.g. a provenance record) is left out."""
    for stage in STAGES[: STAGES.index(start)]:
        for rel in stage_paths(stage):
            src, dst = base / rel, folder / rel
            if not src.exists():
                if rel.startswith("data/"):
                    raise SystemExit(f"dev20: --base {base}: {rel} ({stage}'s) is missing; run that stage there first")
                print(f"dev20: --base {base.name} has no {rel}; left out", file=sys.stderr)
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            if dst.is_dir() and not dst.is_symlink():
                shutil.rmtree(dst)
            elif dst.exists() or dst.is_symlink():
                dst.unlink()
            if src.is_dir():
                shutil.copytree(src, dst)
            elif rel.startswith("data/"):
                dst.symlink_to(src.resolve())
            else:
                shutil.copyfile(src, dst)


def summary(folder: Path, seconds: dict[str, float]) -> dict:
    metrics = folder / "metrics" / "cub"

    def read(name: str) -> dict:
        path = metrics / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def made(name: str) -> dict:
        """The stage's provenance record (method, device, ...); a run of an fgpipe before the split kept it in the
        metrics file."""
        return read(f"{name}.provenance") or read(name)

    stage1, crops, evaluate, loc = read("train_backbone"), read("extract_crops"), read("evaluate"), read("localization")
    out: dict = {"seconds": seconds, "total_seconds": round(sum(seconds.values()), 1)}
    if stage1:
        out["stage1"] = {"test_top1": stage1["test"]["top1"], "test_top1_raw": stage1["test"]["top1_raw"],
                         "val_top1": stage1["val"]["top1"], "best_epoch": stage1["best_epoch"]}
    if crops:
        method = made("extract_crops")["method"]
        out["crops"] = {"method": method, "threshold": crops["threshold"], "localization": crops["localization"]}
    if loc:
        chosen = loc.get("threshold")
        out["localization_test"] = {
            m: (s["test"].get("any") or s["test"].get(str(chosen)) or s["test"].get(f"{chosen}")) for m, s in loc["methods"].items()
        }
        out["localization_at"] = chosen
    if evaluate:
        out["evaluate"] = {b: evaluate[b]["top1"] for b in ("raw", "object", "parts", "joint")}
        out["evaluate"]["weights"] = evaluate["weights"]
        if "temperatures" in evaluate:  # evaluate.calibrate (an evaluate.json from before it has none)
            out["evaluate"]["temperatures"] = evaluate["temperatures"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--head", choices=("wsdan", "plain"), default="wsdan")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any params key, e.g. model.lcam=none")
    ap.add_argument("--name", default="", help="run folder under data/dev20 (default: HEAD-sSEED)")
    ap.add_argument("--from", dest="start", choices=STAGES, default="prepare", help="first stage to run")
    ap.add_argument("--until", choices=STAGES, default="evaluate", help="last stage to run")
    ap.add_argument("--base", default="", help="a run under data/dev20 whose stages before --from this run continues")
    args = ap.parse_args()
    if args.base and args.start == "prepare":
        ap.error("--base needs --from a stage after prepare")

    folder = REPO / "data" / "dev20" / (args.name or f"{args.head}-s{args.seed}")
    folder.mkdir(parents=True, exist_ok=True)
    if args.base:
        take_from(REPO / "data" / "dev20" / args.base, folder, args.start)
    params_file = folder / "params.yaml"
    params_file.write_text(yaml.safe_dump(run_params(args.seed, args.head, args.set, folder), sort_keys=False))
    fgpipe = Path(sys.executable).parent / "fgpipe"
    summary_file = folder / "summary.json"
    seconds = json.loads(summary_file.read_text()).get("seconds", {}) if summary_file.is_file() else {}
    for stage in STAGES[STAGES.index(args.start) : STAGES.index(args.until) + 1]:
        t0 = time.perf_counter()
        proc = subprocess.run([str(fgpipe), stage, "--dataset", "cub", "--params", str(params_file)], cwd=REPO)
        seconds[stage] = round(time.perf_counter() - t0, 1)
        if proc.returncode != 0:
            print(f"dev20: `fgpipe {stage}` failed ({proc.returncode})", file=sys.stderr)
            return proc.returncode
        summary_file.write_text(json.dumps(summary(folder, seconds), indent=2))
    print(json.dumps(summary(folder, seconds), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
