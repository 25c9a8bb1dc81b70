"""Process set-up: glibc's allocator settings (tune_malloc, applied by the CLI in its own process) and the thread count."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from fgpipe import runtime
from fgpipe.errors import ConfigError

MIB = 1 << 20
GLIBC = sys.platform == "linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the allocator settings apply to glibc Linux only")

# Run in a fresh interpreter: what glibc's allocator does with a 64 MiB block, and with 6 MiB of small heap blocks,
# before and after tune_malloc(), as glibc's own statistics (mallinfo2) say. Prints one JSON object.
_PROBE = """
import ctypes, json, os
from fgpipe import runtime

class Mallinfo2(ctypes.Structure):  # struct mallinfo2 (malloc.h, glibc >= 2.33): ten size_t fields
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
if not hasattr(libc, "mallinfo2"):
    print(json.dumps({"skip": "glibc without mallinfo2 (before 2.33)"}))
    raise SystemExit
libc.mallinfo2.restype = Mallinfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MIB = 1 << 20

def big_block():
    # one 64 MiB malloc: mmapped blocks (hblks, hblkhd) and the heap (arena) while it lives, the heap after its free
    before = libc.mallinfo2()
    p = libc.malloc(64 * MIB)
    during = libc.mallinfo2()
    libc.free(p)
    after = libc.mallinfo2()
    return {"hblks": during.hblks - before.hblks, "hblkhd": during.hblkhd - before.hblkhd,
            "heap_grew": during.arena - before.arena, "heap_kept": after.arena - before.arena}

def small_blocks():
    # 64 blocks of 96 KiB, under glibc's default mmap threshold (128 KiB): heap grown, then given back on free?
    before = libc.mallinfo2()
    ps = [libc.malloc(96 << 10) for _ in range(64)]
    during = libc.mallinfo2()
    for p in reversed(ps):
        libc.free(p)
    after = libc.mallinfo2()
    return {"heap_grew": during.arena - before.arena, "heap_given_back": during.arena - after.arena}

out = {"before": {"small": small_blocks(), "big": big_block()}}
out["set"] = runtime.tune_malloc()
out["after"] = {"big": big_block(), "small": small_blocks()}

def released():
    # 64 MiB of 96 KiB blocks freed onto the heap's top, then release_free_memory(): how much of the heap goes back
    ps = [libc.malloc(96 << 10) for _ in range(682)]
    for p in reversed(ps):
        libc.free(p)
    before = libc.mallinfo2()
    ran = runtime.release_free_memory()
    return {"ran": ran, "heap_given_back": before.arena - libc.mallinfo2().arena}

out["release"] = released()
print(json.dumps(out))
"""


def _probe(extra_env: dict[str, str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in runtime.MALLOC_KNOBS and k != "FGPIPE_MALLOC_TUNING"}
    done = subprocess.run([sys.executable, "-c", _PROBE], env={**env, **extra_env}, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    if "skip" in out:
        pytest.skip(out["skip"])
    return out


@needs_glibc
def test_tune_malloc_keeps_big_blocks_on_the_heap_and_the_heap_in_the_process() -> None:
    """glibc's defaults: a 64 MiB malloc is mmapped, and a heap emptied by free is trimmed. After tune_malloc():
    the 64 MiB block comes from the heap (nothing mmapped), and freeing it keeps the heap (no trim)."""
    out = _probe({})
    before, after = out["before"], out["after"]
    assert before["big"]["hblks"] == 1 and before["big"]["hblkhd"] >= 64 * MIB, out  # mmapped
    assert before["small"]["heap_grew"] >= 4 * MIB and before["small"]["heap_given_back"] >= 4 * MIB, out  # trimmed
    assert out["set"] == {"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": -1}
    assert after["big"]["hblks"] == 0 and after["big"]["hblkhd"] == 0, out  # M_MMAP_MAX 0: from the heap
    assert after["big"]["heap_grew"] >= 64 * MIB - 8 * MIB, out  # (free space at the heap's top may serve a few MiB)
    assert after["big"]["heap_kept"] == after["big"]["heap_grew"], out  # trimming off: the freed block stays
    assert after["small"]["heap_given_back"] == 0, out
    # what the trainers call every few steps: the kept heap goes back to the kernel
    assert out["release"]["ran"] is True and out["release"]["heap_given_back"] >= 56 * MIB, out


@needs_glibc
def test_release_free_memory_does_nothing_where_glibc_trims_by_itself() -> None:
    """With FGPIPE_MALLOC_TUNING=0 tune_malloc sets nothing, glibc keeps trimming its heap on free, and
    release_free_memory() does not run."""
    out = _probe({"FGPIPE_MALLOC_TUNING": "0"})
    assert out["set"] == {} and out["release"]["ran"] is False, out
    assert out["after"]["small"]["heap_given_back"] >= 4 * MIB, out


@needs_glibc
def test_a_users_own_allocator_variable_wins() -> None:
    """MALLOC_TRIM_THRESHOLD_ set by the user (glibc read it at start): tune_malloc leaves trimming alone and sets
    only the other knob, so the 64 MiB block comes from the heap and goes back to the kernel when freed."""
    out = _probe({"MALLOC_TRIM_THRESHOLD_": str(1 * MIB)})
    assert out["set"] == {"MALLOC_MMAP_MAX_": 0}
    big = out["after"]["big"]
    assert big["hblks"] == 0 and big["heap_grew"] >= 56 * MIB, out
    assert big["heap_kept"] <= 2 * MIB, out  # trimmed down to the user's threshold


class _FakeLibc:
    """Records mallopt calls; answers ``answer`` (1: accepted, 0: refused)."""

    def __init__(self, answer: int = 1) -> None:
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

    def mallopt(self, param: object, value: object) -> int:
        self.calls.append((param.value, value.value))  # type: ignore[attr-defined]
        return self.answer


@pytest.fixture()
def fake_libc(monkeypatch: pytest.MonkeyPatch) -> _FakeLibc:
    """tune_malloc on a pretend glibc Linux whose C library is a :class:`_FakeLibc`, with nothing set yet."""
    import ctypes

    libc = _FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: libc)
    monkeypatch.setattr(runtime.sys, "platform", "linux")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime, "_MALLOC_SET", {})
    for name in [*runtime.MALLOC_KNOBS, "FGPIPE_MALLOC_TUNING"]:
        monkeypatch.delenv(name, raising=False)
    return libc


def test_tune_malloc_sets_each_knob_once(fake_libc: _FakeLibc) -> None:
    both = [(runtime.M_MMAP_MAX, 0), (runtime.M_TRIM_THRESHOLD, -1)]
    assert runtime.tune_malloc() == {"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": -1}
    assert fake_libc.calls == both
    assert runtime.tune_malloc() == {"MALLOC_MMAP_MAX_": 0, "MALLOC_TRIM_THRESHOLD_": -1}
    assert fake_libc.calls == both  # idempotent: no second mallopt
    assert runtime.malloc_settings() == {"MALLOC_MMAP_MAX_": "mallopt 0", "MALLOC_TRIM_THRESHOLD_": "mallopt -1"}


def test_tune_malloc_skips_a_knob_the_user_set(fake_libc: _FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "12345")
    assert runtime.tune_malloc() == {"MALLOC_MMAP_MAX_": 0}
    assert fake_libc.calls == [(runtime.M_MMAP_MAX, 0)]
    assert runtime.malloc_settings() == {"MALLOC_TRIM_THRESHOLD_": "env 12345", "MALLOC_MMAP_MAX_": "mallopt 0"}
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "65536")
    assert not runtime.malloc_tuning_wanted(os.environ)  # every knob the user's: nothing left to do


def test_tune_malloc_off_or_elsewhere_sets_nothing(fake_libc: _FakeLibc, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FGPIPE_MALLOC_TUNING", "0")
    assert runtime.tune_malloc() == {} and fake_libc.calls == []
    assert runtime.malloc_settings() == {}
    monkeypatch.setenv("FGPIPE_MALLOC_TUNING", "1")
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("", ""))  # musl / another libc: mallopt is not glibc's
    assert runtime.tune_malloc() == {} and fake_libc.calls == []
    monkeypatch.setattr(runtime.platform, "libc_ver", lambda: ("glibc", "2.36"))
    monkeypatch.setattr(runtime.sys, "platform", "darwin")
    assert runtime.tune_malloc() == {} and fake_libc.calls == []


def test_a_refused_mallopt_is_left_out_and_stops_nothing(fake_libc: _FakeLibc) -> None:
    fake_libc.answer = 0
    assert runtime.tune_malloc() == {} and len(fake_libc.calls) == 2
    assert runtime.malloc_settings() == {}


@pytest.mark.parametrize("value", ["yes", "2", "-1", "on"])
def test_a_malformed_tuning_variable_is_a_config_error(fake_libc: _FakeLibc, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("FGPIPE_MALLOC_TUNING", value)
    with pytest.raises(ConfigError, match=f"FGPIPE_MALLOC_TUNING='{value}' is invalid"):
        runtime.tune_malloc()
    assert fake_libc.calls == []


@needs_glibc
def test_a_command_run_in_process_applies_the_settings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """End to end through CliRunner (no subprocess, no re-exec): the root callback tunes this very process before
    the command runs, here one that fails at once on a missing params file."""
    from typer.testing import CliRunner

    from fgpipe.cli import app

    monkeypatch.setattr(runtime, "_MALLOC_SET", {})  # as in a fresh process
    for name in [*runtime.MALLOC_KNOBS, "FGPIPE_MALLOC_TUNING"]:
        monkeypatch.delenv(name, raising=False)
    result = CliRunner().invoke(app, ["prepare", "--params", str(tmp_path / "missing.yaml")])
    assert result.exit_code == 1 and "missing.yaml" in result.output, result.output
    assert runtime.malloc_settings() == {"MALLOC_MMAP_MAX_": "mallopt 0", "MALLOC_TRIM_THRESHOLD_": "mallopt -1"}


# run at every interpreter start (as sitecustomize): records its pid and its arguments
_RECORD_START = """
import json, os, sys
with open(os.environ["FGPIPE_TEST_STARTS"], "a") as fh:
    fh.write(json.dumps([os.getpid(), sys.argv]) + "\\n")
"""


@pytest.mark.parametrize("args", [["--version"], ["prepare", "--params", "missing.yaml"]], ids=["version", "command"])
def test_the_console_script_starts_python_once(tmp_path: Path, args: list[str]) -> None:
    """`python -m fgpipe` starts one interpreter and answers from it, for an eager option as for a command (whose
    root callback tunes the allocator): nothing re-executes."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(_RECORD_START)
    starts = tmp_path / "starts.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in runtime.MALLOC_KNOBS and k != "FGPIPE_MALLOC_TUNING"}
    env["PYTHONPATH"] = os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["FGPIPE_TEST_STARTS"] = str(starts)
    done = subprocess.run([sys.executable, "-m", "fgpipe", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    if args == ["--version"]:
        assert done.returncode == 0 and done.stdout.startswith("fgpipe "), done.stderr
    else:
        assert done.returncode == 1 and "missing.yaml" in done.stderr, done.stderr
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


def test_torchruns_processes_share_the_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(runtime, "available_cores", lambda: 8)
    monkeypatch.delenv("FGPIPE_THREADS", raising=False)
    before = torch.get_num_threads()
    try:
        for local, share in (("1", 8), ("2", 4), ("3", 2), ("16", 1)):
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
            assert runtime.process_cores() == share and runtime.configure_threads() == share
        monkeypatch.setenv("FGPIPE_THREADS", "3")
        assert runtime.configure_threads() == 3  # the override wins
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")
        with pytest.raises(ConfigError, match="LOCAL_WORLD_SIZE"):
            runtime.process_cores()
    finally:
        torch.set_num_threads(before)


def test_an_error_crosses_processes_with_its_message() -> None:
    import pickle

    from fgpipe.errors import ArtifactError, BadImagesError, DatasetError, portable

    plain = ArtifactError("data/x.h5 is stale")
    assert portable(plain) is plain
    bad = BadImagesError("raw", [("a.jpg", "truncated")])
    sent = pickle.loads(pickle.dumps(portable(bad)))
    assert type(sent) is DatasetError and str(sent) == str(bad)


def test_help_lists_the_stages_in_pipeline_order() -> None:
    from typer.testing import CliRunner

    from fgpipe.cli import app

    out = CliRunner().invoke(app, ["--help"]).output
    stages = ["prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate"]
    positions = [out.index(f" {s} ") for s in stages]
    assert positions == sorted(positions)


def test_heap_trimmer_hands_back_only_once_the_heap_grew_past_the_working_set() -> None:
    """The smallest resident size after a step since the last hand-back is the working set; a step ending more than
    10% above it hands the heap back, and the working set is measured again from the next step."""
    sizes = iter([100, 105, 98, 107, 108, 110, 60, 101, 105, 112, 100])
    released: list[int] = []
    trimmer = runtime.HeapTrimmer(0.10, rss=lambda: next(sizes), release=lambda: released.append(1) or True)
    seen = []
    for _ in range(11):
        trimmer.after_step()
        seen.append((trimmer.floor, trimmer.released))
    # floor 100; 105 within 10%; 98 the new floor, so the bound is 107.8: 107 stays, 108 hands back; 110 is the new
    # floor, 60 lower still, 101 > 66 hands back; then 105 the floor, 112 within 115.5, 100 the floor
    assert seen == [(100, 0), (100, 0), (98, 0), (98, 0), (None, 1), (110, 1), (60, 1), (None, 2), (105, 2), (105, 2), (100, 2)]
    assert len(released) == 2


def test_heap_trimmer_never_hands_back_while_the_steps_reuse_the_same_memory() -> None:
    steady = iter([500, 520, 510, 530, 505] * 20)
    trimmer = runtime.HeapTrimmer(0.10, rss=lambda: next(steady), release=lambda: pytest.fail("handed back"))
    for _ in range(100):
        trimmer.after_step()
    assert trimmer.released == 0 and trimmer.floor == 500


def test_heap_trimmer_where_glibc_trims_by_itself_keeps_measuring() -> None:
    """release_free_memory() answers False where fgpipe did not turn trimming off: nothing is counted and the floor
    stays."""
    sizes = iter([100, 200, 300])
    trimmer = runtime.HeapTrimmer(0.10, rss=lambda: next(sizes), release=lambda: False)
    for _ in range(3):
        trimmer.after_step()
    assert trimmer.released == 0 and trimmer.floor == 100


def test_resident_bytes_is_this_process_rss() -> None:
    import resource

    now = runtime.resident_bytes()
    if not os.path.exists("/proc/self/statm"):
        assert now == 0
        return
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    assert 10 * MIB < now <= peak * 1.01
