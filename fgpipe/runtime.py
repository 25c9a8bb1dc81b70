"""Process-wide runtime settings: CPU threads and glibc's allocator."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping, Sequence

from fgpipe.errors import ConfigError

# Keep freed memory in the process instead of handing it back to the kernel and faulting fresh
# zeroed pages in again on the next batch: every allocation from the heap (no mmap), and no trimming.
# glibc reads these only at process start, so the CLI re-executes itself once with them set.
MALLOC_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def available_cores() -> int:
    """Cores this process may run on (respects affinity masks and cgroup-limited CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def env_int(name: str, default: int, minimum: int, accepted: str, environ: Mapping[str, str] | None = None) -> int:
    """The integer environment variable ``name`` (``default`` when unset or empty); ConfigError naming it and
    ``accepted`` (what it may hold) when it is not an integer >= ``minimum``."""
    text = (os.environ if environ is None else environ).get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = minimum - 1
    if value < minimum:
        raise ConfigError(f"environment variable {name}={text!r} is invalid: it must be {accepted}; fix or unset it")
    return value


def configure_threads() -> int:
    """Give torch one intra-op thread per available core (``FGPIPE_THREADS`` overrides); return it."""
    n = env_int("FGPIPE_THREADS", 0, 0, "an integer >= 0 (the number of CPU threads; 0 or unset: one per available core)")
    n = n or available_cores()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return n
    torch.set_num_threads(n)
    return n


def malloc_tuning_wanted(environ: dict[str, str] | os._Environ[str]) -> bool:
    """True when the allocator settings should be applied: glibc Linux, not disabled, not yet set.

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
    return any(k not in environ for k in MALLOC_ENV)


def reexec_with_malloc_tuning(argv: Sequence[str]) -> None:
    """Replace this process by ``python -m fgpipe ARGV`` with :data:`MALLOC_ENV` set (same pid)."""
    env = {**os.environ, **{k: v for k, v in MALLOC_ENV.items() if k not in os.environ}}
    os.execve(sys.executable, [sys.executable, "-m", "fgpipe", *argv], env)
