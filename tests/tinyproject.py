"""A throw-away DVC project with the repo's real dvc.yaml and code and a tiny params.yaml.

Shared by tests/test_dvc_pipeline.py and the benchmarks (bench/dvc_timing.py, bench/extract_memory.py),
which put tests/ on ``sys.path`` to import it. Stage commands are the ``fgpipe`` of this interpreter's
environment importing the project's ``fgpipe/`` (a link to the repo's, or a copy), so DVC hashes exactly
the code that runs.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]

# The real pipeline at toy size: 3 classes, 24 images of 64 px, the `tiny` backbone, one epoch per trainer.
TINY: dict[str, Any] = {
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


def tiny_params(**sections: dict[str, Any]) -> dict[str, Any]:
    """A deep copy of :data:`TINY` with ``sections`` merged in one level deep (``crops={"threshold": 0.3}``)."""
    params = copy.deepcopy(TINY)
    for name, values in sections.items():
        params[name] = {**params.get(name, {}), **values}
    return params


def make_project(root: Path, params: dict[str, Any], dvc_init: bool = True, copy_code: bool = False) -> Path:
    """``root`` as a project: the repo's dvc.yaml, its fgpipe/, ``params`` as params.yaml; ``dvc init --no-scm``.

    fgpipe/ is a link to the repo's, or with ``copy_code`` a copy of it (a snapshot that later edits of the
    repo cannot change under DVC's feet). Either way the stage commands import the project's fgpipe/
    (:func:`project_env`), and DVC ignores ``__pycache__`` (written by the stages themselves).
    """
    root.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    if copy_code:
        shutil.copytree(REPO / "fgpipe", root / "fgpipe", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    else:
        (root / "fgpipe").symlink_to(REPO / "fgpipe", target_is_directory=True)
    write_params(root, with_dvc_params(params))
    if dvc_init:
        dvc(root, "init", "--no-scm", "-q")
        (root / ".dvcignore").write_text("__pycache__/\n*.pyc\n")
    return root


def with_dvc_params(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` plus every key dvc.yaml names that it lacks, with the repo's params.yaml value.

    DVC refuses to run a stage whose params key is missing from params.yaml, even where fgpipe has a
    default; so a key added to the pipeline (say ``prepare.cache_side``) does not break the tiny params.
    A per-dataset key (``per_dataset.${key}.crops``) missing for a dataset under ``run`` gets ``{}``.
    """
    real = yaml.safe_load((REPO / "params.yaml").read_text())
    out = copy.deepcopy(params)
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for key in stage.get("do", stage).get("params", []):
            if not isinstance(key, str):
                continue
            if "${key}" in key:
                for name in out.get("run", {}):
                    *parents, leaf = key.replace("${key}", name).split(".")
                    dst = out
                    for part in parents:
                        dst = dst.setdefault(part, {})
                    dst.setdefault(leaf, {})
                continue
            if "${" in key:
                continue
            *parents, leaf = key.split(".")
            src, dst = real, out
            for name in parents:
                src, dst = src[name], dst.setdefault(name, {})
            if leaf not in dst:
                dst[leaf] = copy.deepcopy(src[leaf])
    return out


def write_params(root: Path, params: dict[str, Any]) -> None:
    """Write ``params`` as ``root``/params.yaml."""
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def read_params(root: Path) -> dict[str, Any]:
    """``root``/params.yaml as a dict."""
    return yaml.safe_load((root / "params.yaml").read_text())


def project_env(project: Path, threads: int | None = 1) -> dict[str, str]:
    """The environment of commands run in ``project``: its fgpipe/ first on PYTHONPATH, this interpreter's
    bin/ first on PATH (for ``fgpipe``), and ``FGPIPE_THREADS`` (1 by default: toy models gain nothing from
    more; None leaves the variable as it is)."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env["PYTHONPATH"] = os.pathsep.join([str(project), *filter(None, [os.environ.get("PYTHONPATH")])])
    if threads is not None:
        env["FGPIPE_THREADS"] = str(threads)
    return env


def dvc(project: Path, *args: str, threads: int | None = 1, timeout: float = 600) -> str:
    """Run ``dvc ARGS`` in ``project``; return stdout + stderr, or raise with their tails if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=project, env=project_env(project, threads),
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"`dvc {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return proc.stdout + proc.stderr


def ran(output: str) -> set[str]:
    """Stage names from DVC's "Running stage 'NAME':" lines."""
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


def lock_hash(project: Path, stage: str, path: str) -> str:
    """The MD5 dvc.lock records for output ``path`` of ``stage``."""
    lock = yaml.safe_load((project / "dvc.lock").read_text())
    outs = lock["stages"][stage]["outs"]
    return next(o["md5"] for o in outs if o["path"] == path)
