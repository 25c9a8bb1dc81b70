"""extract-attention, extract-crops and evaluate under torchrun (fgpipe.sharding): two gloo processes on the CPU write
exactly what one process writes (every HDF5 file's datasets and attributes, every CSV and picture byte for byte; the metrics but for their timings;
the provenance records but for ``world_size``), and the helpers hand every rank all results in order and the same
error."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from test_extract import write_colour_cub
from typer.testing import CliRunner

from fgpipe.cli import app
from fgpipe.errors import ArtifactError, BadImagesError, DatasetError
from fgpipe.sharding import gather_chunks, in_order, share
from fgpipe.training import Runtime

SPEED = ("seconds", "images_per_s")  # the only figures allowed to differ between two runs

PARAMS: dict[str, Any] = {
    "run": {},
    "datasets": {"toy": {"kind": "cub", "root": "raw/CUB_200_2011", "val_fraction": 0.2}},
    "prepare": {"data_dir": "data", "metrics_dir": "metrics"},
    "model": {"backbone": "tiny", "weights": "none", "num_attentions": 4, "lcam": "block", "logit_scale": 10.0},
    "train_backbone": {"input_size": 64, "epochs": 1, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0.0, "device": "cpu"},
    # batch sizes that leave the last round of batches to rank 0 alone (an odd number of batches per stage)
    "attention": {"batch_size": 5},
    "crops": {"batch_size": 7, "preview_images": 4},
    "train_refine": {"input_size": 48, "epochs": 1, "batch_size": 8, "lr": 0.05, "warmup_epochs": 0.0, "device": "cpu"},
    "evaluate": {"batch_size": 3},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def snapshot(project: Path) -> dict[str, Any]:
    """Every file under data/ and metrics/: JSON as objects (without timings and ``world_size``), the rest as bytes."""
    out: dict[str, Any] = {}
    for top in ("data", "metrics"):
        for path in sorted((project / top).rglob("*")):
            if not path.is_file():
                continue
            rel = str(path.relative_to(project))
            if path.suffix == ".h5":
                out[rel] = h5_contents(path)
            elif path.suffix == ".json":
                doc = json.loads(path.read_text())
                out[rel] = {k: v for k, v in doc.items() if k not in (*SPEED, "world_size")} if isinstance(doc, dict) else doc
            else:
                out[rel] = path.read_bytes()
    return out


def h5_contents(path: Path) -> dict[str, Any]:
    """Every dataset's values and every attribute of an HDF5 file (``name`` and ``name@attr``)."""
    out: dict[str, Any] = {}
    with h5py.File(path, "r") as f:
        out.update({f"@{k}": _value(v) for k, v in f.attrs.items()})

        def visit(name: str, obj: Any) -> None:
            out.update({f"{name}@{k}": _value(v) for k, v in obj.attrs.items()})
            if isinstance(obj, h5py.Dataset):
                values = obj[()]
                data = values.tobytes() if obj.dtype.kind in "biuf" and obj.shape != () else _value(values)
                out[name] = (obj.dtype.str, obj.shape, data)

        f.visititems(visit)
    return out


def _value(v: Any) -> Any:
    return v.tolist() if hasattr(v, "tolist") else v


def torchrun(project: Path, stage: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1"}
    env.pop("FGPIPE_THREADS", None)  # torchrun's LOCAL_WORLD_SIZE shares the cores out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
           "-m", "fgpipe", stage, "--dataset", "toy", "--params", "params.yaml"]
    return subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)


def single(project: Path, stage: str) -> None:
    result = CliRunner().invoke(app, [stage, "--dataset", "toy", "--params", "params.yaml"])  # as torchrun is given it
    assert result.exit_code == 0, f"{stage}: {result.output}"


@pytest.mark.usefixtures("one_torch_thread")
def test_two_gloo_ranks_write_what_one_process_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the params' relative paths
    write_colour_cub(tmp_path / "raw/CUB_200_2011")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(PARAMS, sort_keys=False))
    single(tmp_path, "prepare")
    single(tmp_path, "train-backbone")
    for stage in ("extract-attention", "extract-crops", "train-refine", "evaluate"):
        single(tmp_path, stage)
        if stage == "train-refine":
            continue
        one = snapshot(tmp_path)
        made = json.loads((tmp_path / f"metrics/toy/{stage.replace('-', '_')}.provenance.json").read_text())
        assert made["world_size"] == 1
        proc = torchrun(tmp_path, stage)
        assert proc.returncode == 0, f"{stage}: {proc.stdout[-2000:]}{proc.stderr[-3000:]}"
        two = snapshot(tmp_path)
        assert two.keys() == one.keys(), stage
        differ = [name for name in one if one[name] != two[name]]
        differ += [f"{name}: {key}" for name in differ if name.endswith(".h5") for key in one[name] if one[name][key] != two[name].get(key)]
        assert not differ, f"{stage}: {differ} " + str([(one[n].get("@provenance"), two[n].get("@provenance")) for n in differ if n.endswith(".h5")])
        made = json.loads((tmp_path / f"metrics/toy/{stage.replace('-', '_')}.provenance.json").read_text())
        assert made["world_size"] == 2, stage


# --------------------------------------------------------------------------- the helpers, on two gloo processes
def _helpers(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False, rank=rank, world_size=world)
    items = list(range(7))

    def computed(fail_at: int | None) -> Any:
        for i in share(items, rt):
            if i == fail_at:
                raise ArtifactError(f"item {i} is broken")
            yield {"item": i, "rank": rank}

    whole = list(in_order(computed(None), len(items), rt))
    got: list[Any] = []
    try:
        for value in in_order(computed(5), len(items), rt):
            got.append(value["item"])
        error = None
    except ArtifactError as exc:
        error = str(exc)
    sizes = [3, 3, 2, 0]  # chunks of rows 0-2, 3-5, 6-7 and an empty one: rank 0 has chunks 0 and 2, rank 1 chunks 1 and 3
    chunks = [torch.arange(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(len(sizes))]

    def local() -> list[torch.Tensor]:
        mine = torch.cat(list(share(chunks, rt)))
        return [mine, mine.double() * 2]

    rows, doubled = gather_chunks(local, sizes, rt)

    def failing() -> list[torch.Tensor]:
        if rank == 1:
            raise BadImagesError("raw", [("images/a.jpg", "truncated")])  # its own __init__: sent as a DatasetError
        return local()

    try:
        gather_chunks(failing, sizes, rt)
        chunk_error = None
    except DatasetError as exc:
        chunk_error = str(exc)
    Path(out, f"{rank}.json").write_text(json.dumps({
        "whole": whole, "got": got, "error": error, "rows": rows.tolist(), "doubled": doubled.tolist(),
        "chunk_error": chunk_error,
    }))
    dist.destroy_process_group()


def test_helpers_give_every_rank_all_results_in_order_and_the_same_error(tmp_path: Path) -> None:
    mp.spawn(_helpers, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        doc = json.loads((tmp_path / f"{rank}.json").read_text())
        assert doc["whole"] == [{"item": i, "rank": i % 2} for i in range(7)]  # each item computed by its rank
        assert doc["got"] == [0, 1, 2, 3]  # the rounds before the failing one (items 4 and 5)
        assert doc["error"] == "item 5 is broken"  # raised on rank 1, reported on both
        assert doc["rows"] == list(range(8)) and doc["doubled"] == [2.0 * i for i in range(8)]
        assert doc["chunk_error"] is not None and "images/a.jpg: truncated" in doc["chunk_error"]


def test_one_process_computes_everything() -> None:
    rt = Runtime(device=torch.device("cpu"), amp_dtype=None, channels_last=False)
    assert list(share([1, 2, 3], rt)) == [1, 2, 3]
    assert list(in_order(iter("abc"), 3, rt)) == ["a", "b", "c"]
    (t,) = gather_chunks(lambda: [torch.arange(5)], [2, 3], rt)
    assert t.tolist() == [0, 1, 2, 3, 4]
