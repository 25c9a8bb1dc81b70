"""A/B of glibc allocator settings on the training-step benchmark: CPU time, page faults, images/s.

Runs bench/train_step.py in a child process three ways, alternating, and prints the child's user/sys CPU
seconds and minor page faults next to its images/s:

- ``default``: glibc's own settings (``FGPIPE_MALLOC_TUNING=0``, no ``MALLOC_*`` variable);
- ``mallopt``: what the fgpipe CLI does now: the process sets ``M_MMAP_MAX`` 0 and ``M_TRIM_THRESHOLD`` -1 with
  mallopt(3) once it runs (``fgpipe.runtime.tune_malloc``, which train_step.py calls as the CLI's root callback does);
- ``env``: the same knobs as environment variables glibc reads at process start (``MALLOC_MMAP_MAX_=0
  MALLOC_TRIM_THRESHOLD_=2^40``), as the CLI had them by re-executing itself until issue 15;
- ``threshold``: mmap kept for blocks of ``--mmap-threshold`` bytes and more (``MALLOC_MMAP_THRESHOLD_``, glibc's
  largest allowed value 32 MiB by default; ``MALLOC_MMAP_MAX_`` at glibc's default 65536), trimming still off (the
  CLI's mallopt for the knob the environment leaves unset): large blocks go back to the kernel when freed, so
  batches of varying sizes cannot fragment the heap (bench/RESULTS.md, issue 16), at the cost of their page faults.

Each line also says which settings the child recorded (``machine.malloc``), so a mislabelled arm shows.

    uv run python bench/malloc_ab.py --rounds 2
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from fgpipe.runtime import MALLOC_ENV, MALLOC_KNOBS  # noqa: E402

ARMS = ("default", "mallopt", "env", "threshold")
MMAP_MAX_DEFAULT = "65536"  # glibc's own M_MMAP_MAX


def arm_env(arm: str, mmap_threshold: int = 32 << 20) -> dict[str, str]:
    """The child's environment for ``arm``: this one without any allocator variable, then the arm's."""
    drop = {*MALLOC_KNOBS, "MALLOC_MMAP_THRESHOLD_", "FGPIPE_MALLOC_TUNING"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    if arm == "default":
        env["FGPIPE_MALLOC_TUNING"] = "0"
    elif arm == "env":
        env.update(MALLOC_ENV)  # tune_malloc leaves knobs the environment set alone
    elif arm == "threshold":
        env.update(MALLOC_MMAP_MAX_=MMAP_MAX_DEFAULT, MALLOC_MMAP_THRESHOLD_=str(mmap_threshold))
    elif arm != "mallopt":
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    return env


def one(arm: str, args: list[str], mmap_threshold: int = 32 << 20) -> dict[str, object]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, str(HERE / "train_step.py"), *args], env=arm_env(arm, mmap_threshold), capture_output=True,
                         text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = json.loads(out.stdout)
    return {
        "malloc": arm,
        "user_s": round(after.ru_utime - before.ru_utime, 1),
        "sys_s": round(after.ru_stime - before.ru_stime, 1),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        **result["fp32"],
        "settings": result["machine"]["malloc"],
        **({"mmap_threshold": mmap_threshold} if arm == "threshold" else {}),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="which settings, in this order each round")
    p.add_argument("train_step_args", nargs="*", default=["--backbone", "resnet18", "--input-size", "224", "--batch-size", "16", "--steps", "4", "--warmup", "1"])
    p.add_argument("--mmap-threshold", type=int, default=32 << 20, help="the threshold arm's MALLOC_MMAP_THRESHOLD_ (bytes)")
    a = p.parse_args()
    for _ in range(a.rounds):
        for arm in a.arms:
            print(json.dumps(one(arm, a.train_step_args, a.mmap_threshold)), flush=True)


if __name__ == "__main__":
    main()
