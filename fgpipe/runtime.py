"""Process-wide runtime settings: CPU threads."""

from __future__ import annotations

import os


def available_cores() -> int:
    """Cores this process may run on (respects affinity masks and cgroup-limited CPU sets)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def configure_threads() -> int:
    """Give torch one intra-op thread per available core (``FGPIPE_THREADS`` overrides); return it."""
    n = int(os.environ.get("FGPIPE_THREADS", "0")) or available_cores()
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return n
    torch.set_num_threads(n)
    return n
