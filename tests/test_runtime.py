"""Process set-up: the allocator re-exec of the CLI and the thread count."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from fgpipe import runtime


def test_malloc_tuning_is_wanted_once_and_can_be_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    assert runtime.malloc_tuning_wanted({})
    assert not runtime.malloc_tuning_wanted(dict(runtime.MALLOC_ENV))  # already applied: no loop
    assert not runtime.malloc_tuning_wanted({"FGPIPE_MALLOC_TUNING": "0"})
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))
    assert not runtime.malloc_tuning_wanted({})  # musl / other libc: the variables mean nothing


def test_reexec_keeps_the_arguments_and_adds_only_missing_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(runtime.os, "execve", lambda exe, argv, env: calls.append((exe, argv, env)))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    runtime.reexec_with_malloc_tuning(["train-backbone", "--dataset", "cub"])
    exe, argv, env = calls[0]
    assert exe == sys.executable
    assert argv == [sys.executable, "-m", "fgpipe", "train-backbone", "--dataset", "cub"]
    assert env["MALLOC_MMAP_MAX_"] == "0"
    assert env["MALLOC_TRIM_THRESHOLD_"] == "12345"  # a user's own setting wins


def test_the_console_script_reexecutes_and_still_works() -> None:
    """End to end: without the variables, `python -m fgpipe` re-executes itself and answers."""
    env = {k: v for k, v in os.environ.items() if k not in runtime.MALLOC_ENV and k != "FGPIPE_MALLOC_TUNING"}
    version = subprocess.run([sys.executable, "-m", "fgpipe", "--version"], env=env, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("fgpipe ")


def test_configure_threads_honours_the_override(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("FGPIPE_THREADS", "1")
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.delenv("FGPIPE_THREADS")
        assert runtime.configure_threads() == runtime.available_cores()
    finally:
        torch.set_num_threads(before)


def test_help_lists_the_stages_in_pipeline_order() -> None:
    from typer.testing import CliRunner

    from fgpipe.cli import app

    out = CliRunner().invoke(app, ["--help"]).output
    stages = ["prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate"]
    positions = [out.index(f" {s} ") for s in stages]
    assert positions == sorted(positions)
