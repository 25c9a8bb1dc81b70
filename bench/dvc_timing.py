"""Benchmark: what DVC's caching saves. A full `dvc repro`, a no-op `dvc repro`, and a threshold ablation.

On a throw-away project with the repo's dvc.yaml and a snapshot of its code (tests/tinyproject.py; edits
to the repo during the run change nothing): time `dvc repro` from nothing, then `dvc repro` again with
nothing changed, then `dvc repro` after changing `crops.threshold` (what `dvc exp run -S
crops.threshold=...` runs; `exp run` needs a Git repository, the throw-away project has none). Records
which stages each run executed: the no-op must run none, the ablation only extract-crops, train-refine and
evaluate. Params: the repo's params.yaml (the default run, about 8 minutes on 2 CPU cores) or, with
``--tiny``, the tests' toy params (seconds per stage).

    uv run python bench/dvc_timing.py            # the default run
    uv run python bench/dvc_timing.py --tiny
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import emit, machine_info  # noqa: E402
from tinyproject import REPO, TINY, dvc, make_project, ran, read_params, write_params  # noqa: E402

ABLATION_THRESHOLD = 0.3


def timed_repro(project: Path) -> tuple[float, list[str]]:
    """Seconds of one `dvc repro` in ``project`` and the stages it ran (sorted)."""
    t0 = time.perf_counter()
    out = dvc(project, "repro", threads=None, timeout=3 * 3600)
    return time.perf_counter() - t0, sorted(ran(out))


def run(tiny: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    """Full, no-op and threshold-ablation `dvc repro` times (seconds) and the stages each ran."""
    params = TINY if tiny else yaml.safe_load((REPO / "params.yaml").read_text())
    with tempfile.TemporaryDirectory(prefix="fgpipe-bench-dvc-", dir=workdir) as tmp:
        project = make_project(Path(tmp) / "project", params, copy_code=True)
        full_s, full_ran = timed_repro(project)
        noop_s, noop_ran = timed_repro(project)
        changed = read_params(project)
        old = changed["crops"].get("threshold")
        new = ABLATION_THRESHOLD if old != ABLATION_THRESHOLD else ABLATION_THRESHOLD + 0.05
        changed["crops"]["threshold"] = new
        write_params(project, changed)
        ablation_s, ablation_ran = timed_repro(project)
    return {
        "params": "tests/tinyproject.py TINY" if tiny else "params.yaml",
        "threshold_change": [old, new],
        "seconds": {"full_repro": full_s, "noop_repro": noop_s, "threshold_ablation_repro": ablation_s},
        "stages_ran": {"full_repro": full_ran, "noop_repro": noop_ran, "threshold_ablation_repro": ablation_ran},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tests' toy params instead of params.yaml")
    p.add_argument("--out", type=Path, help="also write the JSON here")
    a = p.parse_args()
    result = {"benchmark": "dvc_timing", "args": {k: str(v) for k, v in vars(a).items()}, "machine": machine_info()}
    result |= run(a.tiny)
    emit(result, a.out)


if __name__ == "__main__":
    main()
