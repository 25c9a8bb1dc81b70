"""The real dvc.yaml on a tiny project: the whole chain runs, and an ablation reruns only what it changes."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from tinyproject import TINY, dvc, lock_hash, make_project, ran, read_params, write_params


def git(project: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=project, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project with the repo's dvc.yaml and code, a tiny params.yaml, after one full `dvc repro`
    (committed, so `dvc exp run` can start from it)."""
    root = make_project(tmp_path_factory.mktemp("dvcproj"), TINY, dvc_init=False)
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    (root / ".dvcignore").write_text("__pycache__/\n*.pyc\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny project")  # dvclive reads the HEAD revision: the repo needs one
    out = dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny pipeline")
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
    """`dvc exp run -S crops.threshold=0.3`: the README's ablation line, as a user runs it."""
    stage1 = lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt")
    attention = lock_hash(project, "extract-attention@synthetic", "data/synthetic/attention.h5")
    out = dvc(project, "exp", "run", "-S", "crops.threshold=0.3")
    assert ran(out) == {"extract-crops@synthetic", "train-refine@synthetic", "evaluate@synthetic"}
    assert lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt") == stage1
    assert lock_hash(project, "extract-attention@synthetic", "data/synthetic/attention.h5") == attention
    assert json.loads((project / "metrics/synthetic/extract_crops.json").read_text())["threshold"] == 0.3


def test_method_ablation_reruns_from_extract_attention(project: Path) -> None:
    stage1 = lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt")
    params = read_params(project)
    params["attention"]["method"] = "bap"
    write_params(project, params)
    out = dvc(project, "repro")
    assert ran(out) == {f"{s}@synthetic" for s in ("extract-attention", "extract-crops", "train-refine", "evaluate")}
    assert lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt") == stage1


def test_a_second_dataset_runs_its_own_chain_only(project: Path) -> None:
    """Adding a dataset under `run` runs its six stages; the synthetic chain is not rerun."""
    before = {s: lock_hash(project, f"train-backbone@{s}", f"data/{s}/stage1/best.pt") for s in ("synthetic",)}
    params = read_params(project)
    params["datasets"]["birds"] = {**params["datasets"]["synthetic"], "root": "data/birds/raw"}
    params["datasets"]["birds"]["synthetic"] = {**params["datasets"]["synthetic"]["synthetic"], "seed": 3}
    params["run"]["birds"] = "fgpipe/datasets/synthetic.py"
    params["per_dataset"]["birds"] = {section: {} for section in params["per_dataset"]["synthetic"]}  # tracked by dvc.yaml
    write_params(project, params)
    out = dvc(project, "repro")
    stages = ["prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate"]
    assert ran(out) == {f"{s}@birds" for s in stages}
    assert lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt") == before["synthetic"]
    assert "joint" in json.loads((project / "metrics/birds/evaluate.json").read_text())
    assert "up to date" in dvc(project, "status")


def test_a_datasets_own_values_rerun_its_chain_only(project: Path) -> None:
    """per_dataset.birds.crops.threshold reruns birds' extract-crops onwards with that value; synthetic and
    birds' prepare stay up to date. per_dataset.birds.train_backbone would rerun birds from train-backbone."""
    params = read_params(project)
    assert "birds" in params["run"], "runs after test_a_second_dataset_runs_its_own_chain_only"
    synthetic = lock_hash(project, "extract-crops@synthetic", "data/synthetic/crops.h5")
    params["per_dataset"]["birds"]["train_backbone"] = {"epochs": 2}
    write_params(project, params)
    status = dvc(project, "status")
    assert "train-backbone@birds" in status and "per_dataset.birds.train_backbone" in status
    assert "@synthetic" not in status and "prepare@birds" not in status
    params["per_dataset"]["birds"]["train_backbone"] = {}
    params["per_dataset"]["birds"]["crops"] = {"threshold": 0.25}  # the shared value is 0.2 or 0.3 (the ablation above)
    write_params(project, params)
    out = dvc(project, "repro")
    assert ran(out) == {"extract-crops@birds", "train-refine@birds", "evaluate@birds"}
    assert json.loads((project / "metrics/birds/extract_crops.json").read_text())["threshold"] == 0.25
    assert json.loads((project / "metrics/synthetic/extract_crops.json").read_text())["threshold"] == params["crops"]["threshold"]
    assert lock_hash(project, "extract-crops@synthetic", "data/synthetic/crops.h5") == synthetic
    assert "up to date" in dvc(project, "status")
