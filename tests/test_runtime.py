"""Process set-up: the allocator re-exec of the CLI and the thread count."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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


# run at every interpreter start (as sitecustomize): records its pid, its arguments and the allocator variables
_RECORD_START = """
import json, os, sys
with open(os.environ["FGPIPE_TEST_STARTS"], "a") as fh:
    fh.write(json.dumps([os.getpid(), sys.argv, {k: os.environ.get(k) for k in %r}]) + "\\n")
"""


def test_the_console_script_reexecutes_and_still_works(tmp_path: Path) -> None:
    """End to end: without the variables, `python -m fgpipe` starts once without them, replaces itself (same pid,
    same arguments) by a start with every variable set, and answers."""
    if not runtime.malloc_tuning_wanted({}):
        pytest.skip("the allocator settings apply to glibc Linux only")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_RECORD_START % (sorted(runtime.MALLOC_ENV),))
    starts = tmp_path / "starts.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in runtime.MALLOC_ENV and k != "FGPIPE_MALLOC_TUNING"}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["FGPIPE_TEST_STARTS"] = str(starts)
    version = subprocess.run([sys.executable, "-m", "fgpipe", "--version"], env=env, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("fgpipe "), version.stderr
    (pid1, argv1, env1), (pid2, argv2, env2) = [json.loads(line) for line in starts.read_text().splitlines()]
    assert pid1 == pid2  # execve: the same process, not a child
    assert argv1[1:] == argv2[1:] == ["--version"]
    assert all(v is None for v in env1.values())
    assert env2 == runtime.MALLOC_ENV  # every variable, with fgpipe's values


def test_no_reexecution_once_the_variables_are_set(tmp_path: Path) -> None:
    """With the variables already there (as after the re-exec), fgpipe starts once: no loop."""
    if not runtime.malloc_tuning_wanted({}):
        pytest.skip("the allocator settings apply to glibc Linux only")
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_RECORD_START % (sorted(runtime.MALLOC_ENV),))
    starts = tmp_path / "starts.jsonl"
    env = {**{k: v for k, v in os.environ.items() if k != "FGPIPE_MALLOC_TUNING"}, **runtime.MALLOC_ENV}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["FGPIPE_TEST_STARTS"] = str(starts)
    version = subprocess.run([sys.executable, "-m", "fgpipe", "--version"], env=env, capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("fgpipe "), version.stderr
    assert len(starts.read_text().splitlines()) == 1


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
