"""Process-wide runtime settings: CPU threads, glibc's allocator, and SIGTERM handled like Ctrl-C."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from types import FrameType

from fgpipe.errors import ConfigError, Interrupted, Terminated

# Keep freed memory in the process instead of handing it back to the kernel and faulting fresh
# zeroed pages in again on the next batch: every allocation from the heap (no mmap), and no trimming.
# The CLI sets both with glibc's mallopt(3) when a command starts (tune_malloc); each knob is named by the
# environment variable glibc reads for it at process start, and a user who sets that variable keeps their value.
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt's parameter numbers (malloc.h)
MALLOC_KNOBS = {  # environment variable -> (mallopt parameter, value); a trim threshold of -1 turns trimming off
    "MALLOC_MMAP_MAX_": (M_MMAP_MAX, 0),
    "MALLOC_TRIM_THRESHOLD_": (M_TRIM_THRESHOLD, -1),
}
# The same settings as environment variables, for a child process started with them (bench/malloc_ab.py's "env" arm)
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
_MALLOC_SET: dict[str, int] = {}  # what tune_malloc set in this process (variable -> value)

C_INT_MAX = 2**31 - 1  # the largest count a C int holds: what torch, OpenMP and NCCL take counts as
THREADS_PER_CORE = 4  # FGPIPE_THREADS may ask for at most this many threads per available core
_INTEGER = re.compile(r"[+-]?[0-9]+")  # ASCII digits only: int() would also take `1_000` and `１２`

# Exit codes of an interrupted command: 128 + the signal's number, as a shell reports a process the signal killed
EXIT_CTRL_C = 130  # SIGINT
EXIT_SIGTERM = 143  # SIGTERM


def available_cores() -> int:
    """Cores this process may run on (respects affinity masks and cgroup-limited CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def env_int(
    name: str,
    default: int,
    minimum: int,
    accepted: str,
    environ: Mapping[str, str] | None = None,
    maximum: int = C_INT_MAX,
    why_maximum: str = "",
) -> int:
    """The integer environment variable ``name`` (``default`` when unset or empty); ConfigError naming it and
    ``accepted`` (what it may hold) when it is not an integer from ``minimum`` to ``maximum`` (by default the
    largest a C int holds: a larger count would overflow inside torch or the OpenMP runtime; ``why_maximum``
    says where a lower one comes from)."""
    text = (os.environ if environ is None else environ).get(name, "").strip()
    if not text:
        return default
    if not _INTEGER.fullmatch(text):
        value = minimum - 1
    else:
        try:
            value = int(text)
        except ValueError:  # more digits than Python converts (4,300): far above any maximum
            value = minimum - 1 if text.startswith("-") else maximum + 1
    if value < minimum:
        raise ConfigError(f"environment variable {name}={text!r} is invalid: it must be {accepted}; fix or unset it")
    if value > maximum:
        raise ConfigError(
            f"environment variable {name}={text!r} is invalid: it must be {accepted}, at most {maximum}{why_maximum}; "
            "fix or unset it"
        )
    return value


def process_cores() -> int:
    """The cores this process may count on: the available ones shared out among the processes torchrun started on
    this machine (``LOCAL_WORLD_SIZE``; torchrun itself would give each one thread), at least one."""
    local = env_int(
        "LOCAL_WORLD_SIZE", 1, 1,
        "an integer >= 1, the processes torchrun started on this machine (set by torchrun; leave it unset for a single process)",
    )
    return max(1, available_cores() // local)


def configure_threads() -> int:
    """Give torch one intra-op thread per available core, shared out among torchrun's processes on this machine
    (``LOCAL_WORLD_SIZE``); ``FGPIPE_THREADS`` overrides, up to :data:`THREADS_PER_CORE` per core (more only slows
    torch down, and a huge count exhausts memory); return it."""
    cores = available_cores()
    n = env_int(
        "FGPIPE_THREADS",
        0,
        0,
        "an integer >= 0 (the number of CPU threads; 0 or unset: one per available core, shared out among torchrun's processes)",
        maximum=THREADS_PER_CORE * cores,
        why_maximum=f" ({THREADS_PER_CORE} x the {cores} core(s) this process may use)",
    )
    n = n or process_cores()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return n
    torch.set_num_threads(n)
    return n


def malloc_tuning_wanted(environ: Mapping[str, str]) -> bool:
    """True when the allocator settings should be applied: glibc Linux, not disabled, not every knob set by the
    environment already.

    ``FGPIPE_MALLOC_TUNING`` is 1 (the default) or 0 (off); any other value is a ConfigError naming it."""
    tuning = environ.get("FGPIPE_MALLOC_TUNING", "1").strip() or "1"
    if tuning not in ("0", "1"):
        raise ConfigError(
            f"environment variable FGPIPE_MALLOC_TUNING={tuning!r} is invalid: it must be 1 (tune glibc's allocator, "
            "the default) or 0 (leave it alone); fix or unset it"
        )
    if tuning == "0":
        return False
    if sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
        return False
    return any(k not in environ for k in MALLOC_KNOBS)


def tune_malloc(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """Apply :data:`MALLOC_KNOBS` to this process with glibc's ``mallopt`` (each knob whose environment variable is
    unset: a user's own setting, which glibc read at start, wins); return what is set now (variable -> value).

    Nothing on other platforms or with ``FGPIPE_MALLOC_TUNING=0`` (see :func:`malloc_tuning_wanted`); calling it
    again changes nothing. A knob ``mallopt`` refuses (returns 0; glibc never does for these two) stays as it was
    and is left out of the result: the settings only speed training up, so no command stops for them."""
    if not malloc_tuning_wanted(environ):
        return dict(_MALLOC_SET)
    import ctypes

    libc = ctypes.CDLL(None)  # the running process's own C library
    for name, (param, value) in MALLOC_KNOBS.items():
        if name in environ or name in _MALLOC_SET:
            continue
        if libc.mallopt(ctypes.c_int(param), ctypes.c_int(value)) == 1:
            _MALLOC_SET[name] = value
    return dict(_MALLOC_SET)


HEAP_GROWTH = 0.05  # HeapTrimmer's threshold over the working set (bench/RESULTS.md: 10% let train-refine grow 1.14x)


def release_free_memory() -> bool:
    """Hand the free pages of glibc's heap back to the kernel (``malloc_trim(0)``: the heap's top and every whole
    free page inside it, in every arena) when :func:`tune_malloc` turned trimming off in this process; return
    whether it ran. Nothing where the tuning is off: glibc trims by itself there."""
    if "MALLOC_TRIM_THRESHOLD_" not in _MALLOC_SET:
        return False
    import ctypes

    ctypes.CDLL(None).malloc_trim(ctypes.c_size_t(0))
    return True


def resident_bytes() -> int:
    """This process's resident set size now (``/proc/self/statm``; 0 where there is none)."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class HeapTrimmer:
    """Keeps the tuned heap from growing with the number of training steps, at no cost while it does not grow.

    With trimming off (:func:`tune_malloc`) glibc's heap keeps every page it ever touched, and batches of varying
    sizes (a varying number of part patches per image, the validation batches) leave it fragmented, so its peak
    would grow with the steps. :meth:`after_step` reads the resident size after each step: the smallest since the
    last hand-back is the working set; once the size exceeds it by :data:`HEAP_GROWTH` (5%), the free pages go back
    (:func:`release_free_memory`) and the working set is measured again. A hand-back costs about a second of page
    faults on a CPU step (each page comes back once), so it runs only when the heap grew; a run whose steps reuse
    the same memory never pays it."""

    def __init__(self, growth: float = HEAP_GROWTH, rss: Callable[[], int] = resident_bytes,
                 release: Callable[[], bool] = release_free_memory) -> None:
        self.growth, self.rss, self.release = growth, rss, release
        self.floor: int | None = None  # the smallest resident size after a step since the last hand-back
        self.released = 0  # hand-backs so far

    def after_step(self) -> None:
        now = self.rss()
        if self.floor is None or now < self.floor:
            self.floor = now
        elif now > self.floor * (1 + self.growth) and self.release():
            self.released += 1
            self.floor = None


def malloc_settings() -> dict[str, str]:
    """The allocator settings in force, for a benchmark's record: each knob set by :func:`tune_malloc` (``mallopt``)
    or by its environment variable."""
    settings = {k: f"env {os.environ[k]}" for k in MALLOC_KNOBS if k in os.environ}
    settings.update({k: f"mallopt {v}" for k, v in _MALLOC_SET.items()})
    return settings


# --------------------------------------------------------------------------- SIGTERM and Ctrl-C
def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def raise_on_sigterm() -> None:
    """From now on SIGTERM raises :class:`Terminated` in the main thread, as Ctrl-C raises KeyboardInterrupt."""
    signal.signal(signal.SIGTERM, _raise_terminated)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises :class:`Terminated` (a KeyboardInterrupt), so it takes Ctrl-C's path: the
    block's cleanup runs and the CLI says what was kept. The previous handler is restored afterwards. Outside the
    main thread (only it may set handlers, and only it receives signals) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _terminated(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised while handling, a SIGTERM (an :class:`Interrupted` a training run raises
    from the Terminated it caught keeps it as its context)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        if isinstance(e, Terminated):
            return True
        seen.add(id(e))
        todo += [e.__cause__, e.__context__]
    return False


def interruption(exc: BaseException, rerun: str | None = None, starting: bool = False) -> tuple[str, int]:
    """The one line the CLI prints for a Ctrl-C or SIGTERM, and its exit code (130 or 143).

    An :class:`Interrupted` says what its stage kept; otherwise a stage (``rerun``: its command) replaced nothing;
    ``starting``: the interruption came while fgpipe was starting, before any command ran."""
    term = _terminated(exc)
    cause = "SIGTERM" if term else "Ctrl-C"
    code = EXIT_SIGTERM if term else EXIT_CTRL_C
    if isinstance(exc, Interrupted):
        text = str(exc).replace("interrupted (Ctrl-C)", f"interrupted ({cause})", 1)
    elif rerun:
        text = f"interrupted ({cause}): nothing was replaced, the previous outputs are unchanged; rerun `{rerun}`"
    elif starting:
        text = f"interrupted ({cause}) while fgpipe was starting: nothing was read or written"
    else:
        text = f"interrupted ({cause})"
    return text, code
