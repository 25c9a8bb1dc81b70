"""A/B of glibc allocator settings on the training-step benchmark: CPU time, page faults, images/s.

Runs bench/train_step.py in a child process with and without MALLOC_MMAP_MAX_=0 and a huge
MALLOC_TRIM_THRESHOLD_ (what the fgpipe CLI sets by re-executing itself), alternating, and prints
the child's user/sys CPU seconds and minor page faults next to its images/s.

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
from fgpipe.runtime import MALLOC_ENV  # noqa: E402


def one(tuned: bool, args: list[str]) -> dict[str, object]:
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    if tuned:
        env.update(MALLOC_ENV)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = subprocess.run([sys.executable, str(HERE / "train_step.py"), *args], env=env, capture_output=True, text=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {
        "malloc": "tuned" if tuned else "default",
        "user_s": round(after.ru_utime - before.ru_utime, 1),
        "sys_s": round(after.ru_stime - before.ru_stime, 1),
        "minor_faults": after.ru_minflt - before.ru_minflt,
        **json.loads(out.stdout)["fp32"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("train_step_args", nargs="*", default=["--backbone", "resnet18", "--input-size", "224", "--batch-size", "16", "--steps", "4", "--warmup", "1"])
    a = p.parse_args()
    for _ in range(a.rounds):
        for tuned in (False, True):
            print(json.dumps(one(tuned, a.train_step_args)), flush=True)


if __name__ == "__main__":
    main()
