"""This checkout's `fgpipe evaluate` on the outputs of a DVC experiment made in another clone (README "Ablations
through DVC": the arms ran at an earlier commit; their joint prediction is scored again with today's evaluate).

    uv run python bench/dvc_exp_evaluate.py /tmp/abl caf6591 crops-aolm     # CLONE GIT-REF NAME

Every stage output the experiment's dvc.lock names (all but evaluate's) is copied from the clone's DVC cache (a
metric or plot, which DVC does not cache, from the experiment's Git commit) into data/dvc-exp/NAME/, images.h5
(uncached, rebuilt by prepare byte for byte) linked from the clone's workspace; a params file there is the
experiment's params.yaml with `prepare.data_dir` and `metrics_dir` pointing to that folder and the dataset root made
absolute. Then `fgpipe evaluate --dataset DATASET --params THAT_FILE` runs, and the figures are printed. Nothing in
the clone changes (an experiment may be running in it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def git_show(clone: Path, ref: str, path: str) -> bytes:
    return subprocess.run(["git", "-C", str(clone), "show", f"{ref}:{path}"], check=True, capture_output=True).stdout


def restore(clone: Path, ref: str, dataset: str, out: Path) -> dict:
    """Copy the experiment's stage outputs into ``out``; return its params with the paths moved there."""
    lock = yaml.safe_load(git_show(clone, ref, "dvc.lock"))
    params = yaml.safe_load(git_show(clone, ref, "params.yaml"))

    def cached(md5: str) -> Path:
        return clone / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]

    def place(rel: str) -> Path:
        dst = out / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        return dst

    for stage, entry in lock["stages"].items():
        if not stage.endswith(f"@{dataset}") or stage.startswith("evaluate@"):
            continue
        for o in entry.get("outs", []):
            path, md5 = o["path"], o.get("md5", "")
            if path.endswith("images.h5"):  # cache: false
                if not place(path).is_symlink():
                    place(path).symlink_to(clone / path)
            elif md5.endswith(".dir"):
                for f in json.loads(cached(md5).read_text()):
                    shutil.copyfile(cached(f["md5"]), place(f"{path}/{f['relpath']}"))
            elif cached(md5).is_file():
                shutil.copyfile(cached(md5), place(path))
            else:  # a metric or plot: committed to Git with the experiment
                place(path).write_bytes(git_show(clone, ref, path))
    root = (clone / params["datasets"][dataset]["root"]).resolve()
    params["datasets"][dataset]["root"] = str(root)
    params["run"] = {dataset: str(root)}
    params["prepare"]["data_dir"] = str(out / "data")
    params["prepare"]["metrics_dir"] = str(out / "metrics")
    return params


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clone", type=Path, help="the clone the experiment ran in")
    ap.add_argument("ref", help="the experiment's Git commit or ref (`dvc exp show --sha`), or HEAD for the baseline")
    ap.add_argument("name", help="folder under data/dvc-exp/")
    ap.add_argument("--dataset", default="cub")
    args = ap.parse_args()
    out = REPO / "data" / "dvc-exp" / args.name
    shutil.rmtree(out, ignore_errors=True)
    params = restore(args.clone.resolve(), args.ref, args.dataset, out)
    params_file = out / "params.yaml"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    fgpipe = Path(sys.executable).parent / "fgpipe"
    proc = subprocess.run([str(fgpipe), "evaluate", "--dataset", args.dataset, "--params", str(params_file)], cwd=REPO)
    if proc.returncode:
        return proc.returncode
    doc = json.loads((out / "metrics" / args.dataset / "evaluate.json").read_text())
    figures = {b: round(doc[b]["top1"], 4) for b in ("raw", "object", "parts", "joint")}
    print(json.dumps({"name": args.name, "ref": args.ref, **figures, "weights": doc["weights"], "temperatures": doc["temperatures"]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
