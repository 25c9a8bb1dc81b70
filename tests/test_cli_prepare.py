"""`fgpipe prepare` through Typer's CliRunner: help, error paths, overrides, and the real CUB subset."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from conftest import write_fake_cub, write_params
from typer.testing import CliRunner

from fgpipe.cli import app
from fgpipe.manifest import read_manifest
from fgpipe.store import read_json

REAL_CUB = Path(__file__).resolve().parents[2] / "shared/realdata/cub200_2011_subset10/CUB_200_2011"


def _invoke(*args: str):
    return CliRunner().invoke(app, list(args))


def test_app_help_lists_prepare() -> None:
    result = _invoke("--help")
    assert result.exit_code == 0
    assert "prepare" in result.output and "Read a dataset in its official layout" in result.output


def test_prepare_help() -> None:
    result = _invoke("prepare", "--help")
    assert result.exit_code == 0
    for option in ("--dataset", "--params", "--root", "--download"):
        assert option in result.output


def test_prepare_missing_root_fails_cleanly(tmp_path: Path) -> None:
    root = tmp_path / "no" / "CUB_200_2011"
    params = write_params(tmp_path, {"cub": {"kind": "cub", "root": str(root)}})
    result = _invoke("prepare", "-d", "cub", "-p", str(params))
    assert result.exit_code == 1
    assert "error:" in result.output and f"dataset root not found: {root}" in result.output
    assert "Traceback" not in result.output


def test_prepare_unknown_dataset_and_bad_params(tmp_path: Path) -> None:
    params = write_params(tmp_path, {"cub": {"kind": "cub", "root": "raw"}})
    result = _invoke("prepare", "-d", "dogs", "-p", str(params))
    assert result.exit_code == 1 and "error:" in result.output and "no dataset `dogs`" in result.output
    params.write_text(params.read_text().replace("kind: cub", "kind: cub\n    val_fraction: 2"))
    result = _invoke("prepare", "-d", "cub", "-p", str(params))
    assert result.exit_code == 1 and "datasets.cub.val_fraction" in result.output
    result = _invoke("prepare", "-d", "cub", "-p", str(tmp_path / "missing.yaml"))
    assert result.exit_code == 1 and "missing.yaml" in result.output


def test_global_preset_option(tmp_path: Path) -> None:
    """`fgpipe --preset NAME CMD` applies the preset to the command's settings; an unknown one is named."""
    root = tmp_path / "CUB_200_2011"
    write_fake_cub(root)
    params = write_params(tmp_path, {"cub": {"kind": "cub", "root": str(root)}})
    result = _invoke("--preset", "paper-vgg", "prepare", "-d", "cub", "-p", str(params))
    assert result.exit_code == 1 and "unknown preset `paper-vgg`" in result.output
    result = _invoke("--preset", "paper-resnet50", "prepare", "-d", "cub", "-p", str(params))
    assert result.exit_code == 0, result.output
    assert read_json(tmp_path / "metrics/cub/prepare.provenance.json")["preset"] == "paper-resnet50"
    result = _invoke("prepare", "-d", "cub", "-p", str(params))  # the option does not stick to later calls
    assert result.exit_code == 0 and read_json(tmp_path / "metrics/cub/prepare.provenance.json")["preset"] == "none"


def test_prepare_bad_image_names_the_file(tmp_path: Path) -> None:
    root = tmp_path / "CUB_200_2011"
    info = write_fake_cub(root)
    rel = info["ids"]["4"][0]
    (root / "images" / rel).write_bytes(b"")
    params = write_params(tmp_path, {"cub": {"kind": "cub", "root": str(root)}})
    result = _invoke("prepare", "-d", "cub", "-p", str(params))
    assert result.exit_code == 1 and "error:" in result.output and f"images/{rel}" in result.output


def test_prepare_root_override_recorded(tmp_path: Path) -> None:
    root = tmp_path / "elsewhere" / "CUB_200_2011"
    write_fake_cub(root)
    params = write_params(tmp_path, {"cub": {"kind": "cub", "root": "raw/does-not-exist"}})
    result = _invoke("prepare", "-d", "cub", "-p", str(params), "--root", str(root))
    assert result.exit_code == 0, result.output
    assert "prepare" in result.output and '"total": 18' in result.output
    made = read_json(tmp_path / "metrics/cub/prepare.provenance.json")
    # paths relative to the project root (the params file's folder): the record reads the same on every machine
    assert made["overrides"] == {"datasets.cub.root": "elsewhere/CUB_200_2011"}
    assert made["params_file"] == params.name and made["dataset"] == "cub" and made["kind"] == "cub"
    assert 'made with: {"kind": "cub", "preset": "none"}' in result.output  # the summary: figures, then how


@pytest.mark.skipif(not REAL_CUB.is_dir(), reason=f"real CUB subset not found at {REAL_CUB}")
def test_prepare_real_cub_subset(tmp_path: Path) -> None:
    params = write_params(tmp_path, {"cub": {"kind": "cub", "root": str(REAL_CUB), "val_fraction": 0.1}})
    result = _invoke("prepare", "-d", "cub", "-p", str(params))
    assert result.exit_code == 0, result.output
    rows = read_manifest(tmp_path / "data/cub/manifest.csv")
    splits = Counter(r.split for r in rows)
    assert len(rows) == 543 and len({r.label for r in rows}) == 10
    assert splits["train"] + splits["val"] == 300 and splits["test"] == 243 and splits["val"] > 0
    assert all(r.box is not None and 0 <= r.box[0] < r.box[2] <= r.width for r in rows)
    metrics = read_json(tmp_path / "metrics/cub/prepare.json")
    assert metrics["images"]["total"] == 543 and metrics["classes"] == 10 and metrics["skipped"] == 0
