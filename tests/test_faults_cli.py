"""Fault suite, part 4 (issue 14): faults of the command line itself, listed in docs/FAULTS.md section 17.

Same rules as tests/test_faults.py, whose chain, helpers and assertions this file reuses: a command run through
the CLI prints one clean paragraph (``error: ...`` and exit code 1; one ``interrupted (...)`` line and 130 for
Ctrl-C, 143 for SIGTERM), never a traceback, names the culprit, and leaves every file under data/ and metrics/
byte-identical with no temporary file.

1. an environment variable holding a count too large for the machine (or for a C int);
2. Ctrl-C or SIGTERM while fgpipe is still importing its libraries (real processes: ``python -m fgpipe`` and the
   console script's entry point as pyproject.toml declares it), and the program name in usage errors;
3. SIGTERM during a stage (real processes forked from the fork server of tests/test_faults.py, the signal sent by
   the process to itself at a chosen moment): handled as Ctrl-C is, exit code 143;
4. a command-line option whose value params.yaml's rules refuse is named as the culprit (not params.yaml, never
   pydantic's union members), and ``localize --thresholds`` with no threshold is refused.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import signal
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from test_faults import (  # noqa: F401  (chain, project and fork_server are fixtures)
    NAME,
    REPO,
    assert_refused,
    chain,
    edit_params,
    flat,
    fork_server,
    invoke,
    project,
    snapshot,
    temp_files,
)

from fgpipe import h5schema, runtime
from fgpipe.checkpoints import load_checkpoint
from fgpipe.cli import app
from fgpipe.stages import train_backbone

D = f"data/{NAME}"
M = f"metrics/{NAME}"
PYTHON = sys.executable


# =========================================================================== 1. environment variables
def thread_cases() -> list[Any]:
    limit = runtime.THREADS_PER_CORE * runtime.available_cores()
    return [
        pytest.param("100000", f"at most {limit}", id="FGPIPE_THREADS=100000"),  # libgomp aborted: out of memory
        pytest.param("99999999999999999999", f"at most {limit}", id="FGPIPE_THREADS=99999999999999999999"),  # OverflowError
        pytest.param(str(limit + 1), f"at most {limit}", id="FGPIPE_THREADS=limit+1"),
        pytest.param("1_0", "an integer >= 0", id="FGPIPE_THREADS=1_0"),  # int() reads it as 10
    ]


@pytest.mark.parametrize("value, said", thread_cases())
def test_a_thread_count_beyond_the_machine_is_refused_naming_the_variable(
    project: Path, monkeypatch: pytest.MonkeyPatch, value: str, said: str
) -> None:
    monkeypatch.setenv("FGPIPE_THREADS", value)
    before = snapshot(project)
    out = assert_refused(invoke("extract-attention", "-d", NAME, "-p", project / "params.yaml"),
                         f"environment variable FGPIPE_THREADS={value!r} is invalid", said, "fix or unset it")
    if said.startswith("at most"):
        assert f"{runtime.THREADS_PER_CORE} x the {runtime.available_cores()} core(s)" in out
    assert snapshot(project) == before and not temp_files(project)


def test_a_process_count_beyond_a_c_int_is_refused_naming_the_variable(project: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """WORLD_SIZE (torchrun's) is read with the same reader: a count no C int holds never reaches torch.distributed."""
    monkeypatch.setenv("WORLD_SIZE", "99999999999999999999")
    before = snapshot(project)
    assert_refused(invoke("train-backbone", "-d", NAME, "-p", project / "params.yaml"),
                   "environment variable WORLD_SIZE='99999999999999999999' is invalid", "at most 2147483647")
    assert snapshot(project) == before and not temp_files(project)


# =========================================================================== 2. interrupted while starting
# A meta-path finder that sends this process SIGNAL when MODULE starts to be imported: the signal arrives inside the
# import, as a user's Ctrl-C in the first second does (and nothing of MODULE is loaded: each run costs little).
HOOK = """
import os, signal, sys
class _Hook:
    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.{signal})
        return None
sys.meta_path.insert(0, _Hook())
"""
# `python -m fgpipe`, or the console script's entry point
AS_MODULE = "import runpy; runpy.run_module('fgpipe', run_name='__main__', alter_sys=True)"


def console_script() -> str:
    """What the `fgpipe` script pip or uv writes from pyproject.toml does: import the entry point, call it."""
    spec = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]["fgpipe"]
    module, func = spec.split(":")
    return f"import sys; from {module} import {func} as main; sys.exit(main())"


def run_fgpipe(code: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``python -c CODE ARGS``, one process: the hook in CODE stays in force for the whole run. SIGINT is given its
    default action in the child, as in a terminal: a suite started in the background (``pytest &``, some CI
    runners) inherits it ignored, and Python then never raises KeyboardInterrupt."""
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [PYTHON, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


STARTING = "while fgpipe was starting: nothing was read or written"
RERUN = f"nothing was replaced, the previous outputs are unchanged; rerun `fgpipe extract-attention --dataset {NAME}`"
# (entry, module the signal comes in, signal, what the line says after `interrupted (CAUSE)`)
STARTUP_CASES = [
    ("python -m fgpipe", "numpy", "SIGINT", STARTING),  # the red-team's case: a traceback through numpy's import
    ("python -m fgpipe", "numpy", "SIGTERM", STARTING),  # killed silently before
    ("python -m fgpipe", "typer", "SIGINT", STARTING),
    ("console script", "numpy", "SIGINT", STARTING),  # pyproject's entry point imports nothing heavy first
    ("console script", "typer", "SIGTERM", STARTING),
    ("python -m fgpipe", "torch", "SIGINT", RERUN),  # inside the command, importing its stage: Typer's silent exit 130 before
    ("python -m fgpipe", "torch", "SIGTERM", RERUN),
    # while Typer converts the option values (Typer 0.29 imports typer._adapters then; pick another module it imports
    # there if that changes): Typer turned it into a silent exit 130 before
    ("python -m fgpipe", "typer._adapters", "SIGINT", ""),
    ("python -m fgpipe", "typer._adapters", "SIGTERM", ""),
]


def startup_id(entry: str, module: str, sig: str) -> str:
    return f"{'python-m' if entry == 'python -m fgpipe' else 'script'}:{module}:{sig}"


@pytest.mark.parametrize("entry, module, sig, said", STARTUP_CASES, ids=[startup_id(*c[:3]) for c in STARTUP_CASES])
def test_an_interrupt_while_fgpipe_imports_its_libraries_says_one_line(tmp_path: Path, entry: str, module: str, sig: str, said: str) -> None:
    code = HOOK.format(module=module, signal=sig) + (AS_MODULE if entry == "python -m fgpipe" else console_script())
    done = run_fgpipe(code, ["extract-attention", "-d", NAME], tmp_path)  # no params.yaml: nothing could be read
    out = done.stdout + done.stderr
    cause, code_ = ("Ctrl-C", 130) if sig == "SIGINT" else ("SIGTERM", 143)
    assert done.returncode == code_, f"exit code {done.returncode}:\n{out}"
    assert "Traceback" not in out and "Aborted" not in out, out
    line = f"interrupted ({cause})" + (f" {said}" if said == STARTING else f": {said}" if said else "")
    assert out.strip().splitlines() == [line], out
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_name_the_program_as_the_user_types_it(tmp_path: Path) -> None:
    """A value an option cannot be parsed as is Typer's usage error (exit code 2, its usage line and message);
    the program is `fgpipe` even when started as `python -m fgpipe`."""
    done = run_fgpipe(AS_MODULE, ["extract-crops", "--threshold", "abc"], tmp_path)
    out = flat(done.stdout + done.stderr)
    assert done.returncode == 2 and "Traceback" not in out, out
    assert "Usage: fgpipe extract-crops [OPTIONS]" in out and "python -m" not in out, out
    assert "Invalid value for --threshold: `abc` is neither auto nor a number" in out


# =========================================================================== 3. SIGTERM during a stage
def _arm_sigterm(where: tuple[Any, ...]) -> None:
    """In the child: send this process SIGTERM at ``where``: ("append", n) after the n-th batch written to an HDF5
    artefact's temp file; ("step", epoch, step) after that optimisation step of stage-1 training (0-based)."""
    term = functools.partial(os.kill, os.getpid(), signal.SIGTERM)
    if where[0] == "append":
        real_append, calls = h5schema._Writer._append, [0]

        def append(self: Any, columns: dict[str, Any]) -> None:
            real_append(self, columns)
            calls[0] += 1
            if calls[0] == where[1]:
                term()

        h5schema._Writer._append = append  # type: ignore[method-assign]
    elif where[0] == "step":

        def hook(epoch: int, step: int) -> None:
            if (epoch, step) == where[1:]:
                term()

        train_backbone.run = functools.partial(train_backbone.run, on_step=hook)  # the CLI looks run up at call time
    else:
        raise ValueError(where)


def _terminated_run(argv: list[str], cwd: str, where: tuple[Any, ...], log: str) -> None:
    """Body of the child process: ``fgpipe ARGV`` in ``cwd``, output to ``log``, SIGTERM at ``where``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    os.environ["FGPIPE_THREADS"] = "1"
    _arm_sigterm(where)
    app(argv, prog_name="fgpipe")


def terminated(fork_server: multiprocessing.context.BaseContext, project: Path, argv: list[str], where: tuple[Any, ...]) -> str:
    """Run ``fgpipe ARGV`` in a child sent SIGTERM at ``where``; assert exit code 143 and one clean line; return it."""
    log = project.parent / "terminated.log"
    child = fork_server.Process(target=_terminated_run, args=(argv, str(project), where, str(log)))
    child.start()
    child.join(timeout=240)
    out = log.read_text()
    assert child.exitcode == runtime.EXIT_SIGTERM, f"exit code {child.exitcode} (-15: killed by the signal):\n{out}"
    assert "Traceback" not in out and "Aborted" not in out, out
    lines = [line for line in out.splitlines() if "interrupted (" in line]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGTERM)"), out
    return flat(out)


def test_sigterm_mid_file_leaves_the_previous_outputs(project: Path, fork_server: multiprocessing.context.BaseContext) -> None:
    """The red-team's N4: extract-attention sent SIGTERM after its first batch left its temp file and said nothing."""
    before = snapshot(project)
    out = terminated(fork_server, project, ["extract-attention", "-d", NAME, "-p", str(project / "params.yaml"), "--method", "bap"],
                     ("append", 1))
    assert f"interrupted (SIGTERM): {RERUN}" in out
    assert snapshot(project) == before and not temp_files(project)


def test_sigterm_during_training_says_how_to_resume(project: Path, fork_server: multiprocessing.context.BaseContext) -> None:
    """The red-team's N5: train-backbone sent SIGTERM in epoch 2 (after step 1); --resume then completes."""
    params = edit_params(project, train_backbone__seed=1)
    before = snapshot(project)
    out = terminated(fork_server, project, ["train-backbone", "-d", NAME, "-p", str(params)], ("step", 1, 0))
    assert flat(f"interrupted (SIGTERM) after epoch 1 of 2: its checkpoints and curves are kept in "
                f"{project / D / 'stage1' / 'unfinished'}, the previous outputs are unchanged; "
                f"continue with `fgpipe train-backbone --dataset {NAME} --resume`") in out
    last = load_checkpoint(project / D / "stage1" / "unfinished" / "last.pt")
    assert last["epoch"] == 1 and last["finished"] is False
    after = snapshot(project)
    assert {rel: after.get(rel) for rel in before} == before and not temp_files(project)  # checkpoints and curves too
    resumed = invoke("train-backbone", "-d", NAME, "-p", params, "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert load_checkpoint(project / D / "stage1" / "best.pt")["finished"] is True
    assert not (project / D / "stage1" / "unfinished").exists()


def test_a_command_sets_the_sigterm_handler_only_while_it_runs(project: Path) -> None:
    """In-process callers (tests, notebooks) get their own SIGTERM handler back after a command."""
    before = signal.getsignal(signal.SIGTERM)
    seen: list[Any] = []

    def spy(*args: Any, **kwargs: Any) -> Any:
        seen.append(signal.getsignal(signal.SIGTERM))
        return real(*args, **kwargs)

    real = h5schema._Writer._append
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(h5schema._Writer, "_append", spy)
        result = invoke("extract-attention", "-d", NAME, "-p", project / "params.yaml", "--method", "bap")
    assert result.exit_code == 0, result.output
    assert seen and seen[0] is runtime._raise_terminated  # while the stage ran: SIGTERM raises Terminated
    assert signal.getsignal(signal.SIGTERM) == before


# =========================================================================== 4. options refused by params.yaml's rules
PYDANTIC_INTERNALS = ("constrained-float", "literal[", "function-after", "function-before", "union[")
# (id, command and options, the one line the message must be)
OPTION_CASES = [
    ("--epochs 0", ["train-backbone", "--epochs", "0"],
     "--epochs 0 (train_backbone.epochs): Input should be greater than or equal to 1 (got 0)"),
    ("train-refine --epochs 0", ["train-refine", "--epochs", "0"],
     "--epochs 0 (train_refine.epochs): Input should be greater than or equal to 1 (got 0)"),
    ("--threshold 0", ["extract-crops", "--threshold", "0"],
     "--threshold 0 (crops.threshold): Input should be greater than 0 or 'auto' (got 0.0)"),
    ("--threshold -1", ["extract-crops", "--threshold", "-1"],
     "--threshold -1 (crops.threshold): Input should be greater than 0 or 'auto' (got -1.0)"),
    ("--threshold 1e999", ["extract-crops", "--threshold", "1e999"],
     "--threshold 1e999 (crops.threshold): Input should be a finite number or 'auto' (got inf)"),
    ("--method cam", ["extract-attention", "--method", "cam"],
     "--method cam (attention.method): Input should be 'oaam', 'gradcam', 'aolm' or 'bap' (got 'cam')"),
    ("--input-size 16", ["extract-attention", "--input-size", "16"],
     "--input-size 16 (attention.input_size): must be 0 (stage 1's input size) or at least 32, got 16"),
    ("--combine best", ["evaluate", "--combine", "best"],
     "--combine best (evaluate.combine): Input should be 'val' or 'fixed' (got 'best')"),
    ("--preset nope", ["--preset", "nope", "train-backbone"], "--preset nope: unknown preset `nope`"),
]


@pytest.mark.parametrize("argv, line", [c[1:] for c in OPTION_CASES], ids=[c[0] for c in OPTION_CASES])
def test_a_refused_option_value_is_blamed_on_the_option(project: Path, argv: list[str], line: str) -> None:
    before = snapshot(project)
    result = invoke(*argv, "-d", NAME, "-p", project / "params.yaml")
    out = assert_refused(result, f"error: {line}")
    assert "params.yaml" not in out and "invalid setting" not in out, out
    assert not any(internal in out for internal in PYDANTIC_INTERNALS), out
    assert snapshot(project) == before and not temp_files(project)


def test_a_params_error_next_to_a_bad_option_names_both(project: Path) -> None:
    """The file's own error stays the file's; the option's is the option's; the header names both."""
    params = edit_params(project, model__lcam_kernel=4)
    out = assert_refused(invoke("train-backbone", "-d", NAME, "-p", params, "--epochs", "0"))
    assert f"error: {params} with the command-line option --epochs 0: 2 invalid settings:" in out, out
    assert "model: lcam_kernel must be 0 (adaptive) or an odd number >= 3, got 4" in out
    assert "--epochs 0 (train_backbone.epochs): Input should be greater than or equal to 1 (got 0)" in out


def test_a_union_valued_key_in_params_yaml_shows_no_pydantic_internals(project: Path) -> None:
    params = edit_params(project, crops__threshold=0)
    before = snapshot(project)
    out = assert_refused(invoke("extract-crops", "-d", NAME, "-p", params),
                         f"error: {params}: 1 invalid setting: crops.threshold: Input should be greater than 0 or 'auto' (got 0)")
    assert not any(internal in out for internal in PYDANTIC_INTERNALS), out
    assert snapshot(project) == before


@pytest.mark.parametrize("value, said", [
    ("", "an empty value holds no threshold"),
    (" ", "an empty value holds no threshold"),
    (",,", "`,,` holds no threshold"),
    ("0.1,,0.2", "`0.1,,0.2` has an empty item between its commas"),
    ("0.1,0.2,", "`0.1,0.2,` has an empty item between its commas"),
], ids=["empty", "blank", "commas-only", "empty-item", "trailing-comma"])
def test_localize_refuses_a_thresholds_list_without_a_threshold(project: Path, value: str, said: str) -> None:
    """Before, `--thresholds ""` silently swept the params grid instead, and `0.1,,0.2` dropped the empty item."""
    before = snapshot(project)
    result = invoke("localize", "-d", NAME, "-p", project / "params.yaml", "--thresholds", value)
    out = flat(result.output.translate({ord(c): " " for c in "│╭╮╰╯─"}))  # Typer's box around the message, wrapped
    assert result.exit_code == 2 and "Traceback" not in out, result.output  # a usage error: Typer's exit code
    assert "Invalid value for --thresholds:" in out and said in out, out
    assert snapshot(project) == before and not temp_files(project)


def dotted_dataset_params(tmp_path: Path) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text("run: {}\ndatasets:\n  my.set:\n    kind: imagefolder\n    root: raw\n")
    return path


def test_an_option_sets_the_dataset_whose_name_holds_a_dot(tmp_path: Path) -> None:
    """`--root` for dataset `my.set` sets datasets["my.set"].root; before, it was split at every dot and the
    run refused params.yaml for a dataset `my` it does not have."""
    params = dotted_dataset_params(tmp_path)
    out = assert_refused(invoke("prepare", "-d", "my.set", "-p", params, "--root", "elsewhere"),
                         f"dataset root not found: {tmp_path / 'elsewhere'} (datasets.my.set.root)")
    assert "invalid setting" not in out and not (tmp_path / "data").exists()


def test_an_option_for_a_dataset_params_yaml_lacks_says_so(tmp_path: Path) -> None:
    """`--root` for an unknown dataset: the message lists the known ones, as without the option (before: the
    option made a partial entry, refused as `datasets.nope.kind: required key is missing`)."""
    params = dotted_dataset_params(tmp_path)
    out = assert_refused(invoke("prepare", "-d", "nope", "-p", params, "--root", "elsewhere"),
                         f"error: {params}: no dataset `nope` under `datasets` (known: my.set)")
    assert "required key" not in out and not (tmp_path / "data").exists()
