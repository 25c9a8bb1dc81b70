"""bench/suite.py: the --quick run writes the JSON it promises, and every ratio comes from its figures."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import common  # noqa: E402
import suite  # noqa: E402

from fgpipe import runtime  # noqa: E402

# what may be skipped, and why: anything else must have run
MAY_SKIP = {
    "gpu_stage1_precision": "no CUDA device",
    "gpu_extraction": "no CUDA device",
    "loader_cache": "bench/loader.py is missing",
    "oaam_vs_grad_cam": "grad-cam package is not installed",
}


def measured(record: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every part of a benchmark record with figures and ratios (the record itself, a ``cpu_check``)."""
    if "ratios" in record:
        yield record
    if "cpu_check" in record:
        yield from measured(record["cpu_check"])


def check_ratios(record: dict[str, Any]) -> None:
    figures, ratios = record["figures"], record["ratios"]
    assert ratios, "a benchmark that ran must report at least one ratio"
    for value in figures.values():
        assert isinstance(value, float) and math.isfinite(value), figures
    for name, ratio in ratios.items():
        value = ratio["value"]
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, ratio)
        expected = figures[ratio["numerator"]] / figures[ratio["denominator"]]
        assert value == pytest.approx(expected, rel=1e-3), (name, ratio, expected)


def test_entry_computes_each_ratio_from_the_stored_figures() -> None:
    e = suite.entry({"a": 3.0, "b": 1.5, "c": 2}, {"a_over_b": ("a", "b"), "c_over_a": ("c", "a")}, note="x")
    assert e["ratios"]["a_over_b"] == {"value": 2.0, "numerator": "a", "denominator": "b"}
    assert e["ratios"]["c_over_a"]["value"] == pytest.approx(2 / 3, rel=1e-3)
    assert e["note"] == "x"
    check_ratios(e)
    with pytest.raises(ValueError, match="positive finite"):
        suite.entry({"a": 0.0, "b": 1.0}, {"zero": ("a", "b")})


def test_the_machine_record_says_which_allocator_settings_are_in_force(monkeypatch: pytest.MonkeyPatch) -> None:
    """``machine.malloc``: each knob tune_malloc set (mallopt) or the environment set; nothing for glibc's defaults."""
    monkeypatch.setattr(runtime, "_MALLOC_SET", {})
    for name in runtime.MALLOC_KNOBS:
        monkeypatch.delenv(name, raising=False)
    assert common.machine_info()["malloc"] == {}
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "1099511627776")
    monkeypatch.setitem(runtime._MALLOC_SET, "MALLOC_MMAP_MAX_", 0)
    assert common.machine_info()["malloc"] == {"MALLOC_TRIM_THRESHOLD_": "env 1099511627776", "MALLOC_MMAP_MAX_": "mallopt 0"}


@pytest.mark.slow
def test_quick_suite_writes_every_benchmark_with_figures_and_ratios(tmp_path: Path) -> None:
    out = tmp_path / "suite.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench/suite.py"), "--quick", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    assert result["mode"] == "quick" and result["complete"] is True
    assert "bench/suite.py --quick" in result["command"]
    assert {"cpu", "cores", "torch", "python", "malloc"} <= result["machine"].keys()
    if runtime.malloc_tuning_wanted(os.environ) and not any(k in os.environ for k in runtime.MALLOC_KNOBS):
        assert result["machine"]["malloc"] == {"MALLOC_MMAP_MAX_": "mallopt 0", "MALLOC_TRIM_THRESHOLD_": "mallopt -1"}
    assert set(result["benchmarks"]) == set(suite.BENCHMARKS)
    for name, record in result["benchmarks"].items():
        if "skipped" in record:
            assert name in MAY_SKIP and MAY_SKIP[name] in record["skipped"], (name, record["skipped"])
            if name == "gpu_stage1_precision":  # its code still ran, on the CPU
                check_ratios(record["cpu_check"])
            continue
        parts = list(measured(record))
        assert parts, (name, record)
        for part in parts:
            check_ratios(part)

    dvc = result["benchmarks"]["dvc"]
    assert dvc["stages_ran"]["noop_repro"] == []
    assert dvc["stages_ran"]["threshold_ablation_repro"] == [
        "evaluate@synthetic", "extract-crops@synthetic", "train-refine@synthetic"
    ]
    assert len(dvc["stages_ran"]["full_repro"]) == 6
    memory = result["benchmarks"]["extract_peak_memory"]["figures"]
    assert memory["images_big"] == 4 * memory["images_small"]
