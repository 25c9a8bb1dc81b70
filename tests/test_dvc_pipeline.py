"""The real dvc.yaml on a tiny project: the whole chain runs, and an ablation reruns only what it changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

TINY = {
    "run": {"synthetic": "fgpipe/datasets/synthetic.py"},
    "datasets": {
        "synthetic": {
            "kind": "synthetic",
            "root": "data/synthetic/raw",
            "val_fraction": 0.2,
            "synthetic": {"num_classes": 3, "train_per_class": 6, "test_per_class": 2, "image_size": 64, "distractors": 2},
        }
    },
    "prepare": {"data_dir": "data", "metrics_dir": "metrics"},
    "model": {"backbone": "tiny", "weights": "none", "lcam": "block", "num_attentions": 4, "logit_scale": 10.0},
    "train_backbone": {"input_size": 64, "epochs": 1, "batch_size": 8, "lr": 0.05},
    "attention": {"method": "oaam", "batch_size": 16},
    "crops": {"threshold": 0.2, "batch_size": 16, "preview_images": 2},
    "train_refine": {"input_size": 32, "epochs": 1, "batch_size": 8, "lr": 0.05},
    "evaluate": {"combine": "val", "weight_step": 0.5},
}


def dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "FGPIPE_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    """Stage names from DVC's "Running stage 'NAME':" lines."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def lock_hash(project: Path, stage: str, path: str) -> str:
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = lock["stages"][stage]["outs"]
    return next(o["md5"] for o in outs if o["path"] == path)


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DVC project with the repo's dvc.yaml and code, a tiny params.yaml, after one full `dvc repro`."""
    root = tmp_path_factory.mktemp("dvcproj")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "fgpipe").symlink_to(REPO / "fgpipe", target_is_directory=True)
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    dvc(root, "init", "--no-scm", "-q")
    out = dvc(root, "repro")
    stages = ["prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate"]
    assert ran(out) == {f"{s}@synthetic" for s in stages}
    return root


def test_the_whole_chain_runs_and_writes_every_artefact(project: Path) -> None:
    for rel in ("manifest.csv", "stage1/best.pt", "attention.h5", "crops.h5", "crops_preview.png", "refine/best.pt"):
        assert (project / "data/synthetic" / rel).is_file(), rel
    metrics = json.loads((project / "metrics/synthetic/evaluate.json").read_text())
    assert {"images", "raw", "object", "parts", "joint", "weights", "localization"} <= metrics.keys()
    assert "up to date" in dvc(project, "status")


def test_threshold_ablation_reruns_only_crops_and_what_follows(project: Path) -> None:
    stage1 = lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt")
    attention = lock_hash(project, "extract-attention@synthetic", "data/synthetic/attention.h5")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["crops"]["threshold"] = 0.3
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro")
    assert ran(out) == {"extract-crops@synthetic", "train-refine@synthetic", "evaluate@synthetic"}
    assert lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt") == stage1
    assert lock_hash(project, "extract-attention@synthetic", "data/synthetic/attention.h5") == attention
    assert json.loads((project / "metrics/synthetic/extract_crops.json").read_text())["threshold"] == 0.3


def test_method_ablation_reruns_from_extract_attention(project: Path) -> None:
    stage1 = lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["attention"]["method"] = "bap"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = dvc(project, "repro")
    assert ran(out) == {f"{s}@synthetic" for s in ("extract-attention", "extract-crops", "train-refine", "evaluate")}
    assert lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt") == stage1
