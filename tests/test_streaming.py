"""The input pipeline (fgpipe.streaming): streamed batches are the pixels load_regions decodes, and a run is the same
whichever path read its pixels: train-backbone and train-refine give torch.equal weights streamed with 0 and 2 workers
and held in memory, and evaluate the same figures; the provenance records say which path ran."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import yaml

from fgpipe.config import load_params
from fgpipe.errors import DatasetError
from fgpipe.imagecache import ImageCache
from fgpipe.loader import load_regions, whole_image_requests
from fgpipe.manifest import read_dataset_json, read_manifest
from fgpipe.stages import evaluate, train_backbone, train_refine
from fgpipe.streaming import FeedOptions, feeds_closed, whole_image_feed, worker_context
from test_refine import make_refine_project
from test_train_backbone import make_project

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PATHS = {"stream0": {"num_workers": 0}, "stream2": {"num_workers": 2}, "memory": {"in_memory": True}}
SPEED = ("seconds", "images_per_s")  # the only figures allowed to differ between two runs


def set_section(params: Path, section: str, values: dict[str, Any]) -> None:
    doc = yaml.safe_load(params.read_text())
    doc[section] = {**doc.get(section, {}), **values}
    params.write_text(yaml.safe_dump(doc))


def figures(path: Path) -> dict[str, Any]:
    return {k: v for k, v in json.loads(path.read_text()).items() if k not in SPEED}


def assert_same_weights(a: Path, b: Path) -> None:
    sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    for key in ("model", "optimizer"):
        flat_a, flat_b = _tensors(sa[key]), _tensors(sb[key])
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{key}: {k}"


def _tensors(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return {prefix: obj}
    if isinstance(obj, dict):
        return {k: v for key, item in obj.items() for k, v in _tensors(item, f"{prefix}.{key}").items()}
    if isinstance(obj, (list, tuple)):
        return {k: v for i, item in enumerate(obj) for k, v in _tensors(item, f"{prefix}.{i}").items()}
    return {}


@pytest.mark.parametrize("cached", [True, False])
def test_streamed_batches_are_the_pixels_load_regions_decodes(tmp_path: Path, cached: bool) -> None:
    """Any order of batches, an empty one included, with 0 and 2 workers, from images.h5 and from the files."""
    make_project(tmp_path)
    data = tmp_path / "data/toy"
    root = read_dataset_json(data / "dataset.json", "toy").root
    rows = read_manifest(data / "manifest.csv")
    cache = ImageCache(data / "images.h5", root) if cached else None
    requests = whole_image_requests(root, rows, cache)
    whole = load_regions(requests, (36, 36))  # (N, 3, 36, 36): what the in-memory path holds
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(3))
    chunks = [*order[:10].split(4), order[:0], order[10:].split(5)[0]]
    for workers in (0, 2):
        feed = whole_image_feed(requests, 36, FeedOptions(num_workers=workers), "train")
        got = list(feed.batches(chunks))
        assert [idx.tolist() for idx, _ in got] == [c.tolist() for c in chunks]
        for idx, (images,) in got:
            assert images.dtype == torch.uint8 and images.shape == (len(idx), 3, 36, 36)
            assert torch.equal(images, whole[idx])
        feed.close()


def test_train_backbone_weights_and_figures_do_not_depend_on_the_input_path(tmp_path: Path) -> None:
    """3 epochs of the tiny stage-1 network (test accuracy after them included) per path: identical checkpoints."""
    base = tmp_path / "base"
    params = make_project(base)
    runs = {}
    for name, values in PATHS.items():
        project = tmp_path / name
        shutil.copytree(base, project)
        p = project / "params.yaml"
        p.write_text(params.read_text().replace(str(base), str(project)))
        set_section(p, "train_backbone", {**yaml.safe_load(p.read_text())["train_backbone"], **values})
        train_backbone.run(load_params(p), "toy")
        runs[name] = project
    for name in ("stream0", "stream2"):
        for which in ("best", "last"):
            assert_same_weights(runs["memory"] / f"data/toy/stage1/{which}.pt", runs[name] / f"data/toy/stage1/{which}.pt")
        assert figures(runs[name] / "metrics/toy/train_backbone.json") == figures(runs["memory"] / "metrics/toy/train_backbone.json")
    made = {n: json.loads((p / "metrics/toy/train_backbone.provenance.json").read_text()) for n, p in runs.items()}
    assert made["memory"]["loader"] == "memory" and "num_workers" not in made["memory"]
    assert (made["stream2"]["loader"], made["stream2"]["num_workers"]) == ("stream", 2)


def test_train_refine_and_evaluate_do_not_depend_on_the_input_path(tmp_path: Path) -> None:
    """3 epochs of both branches per path: identical checkpoints; then evaluate streamed and in memory: the same
    figures."""
    runs = {}
    for name, values in PATHS.items():
        project = tmp_path / name
        params = make_refine_project(project, refine=values, evaluate=values)
        train_refine.run(load_params(params), "toy")
        runs[name] = (project, params)
    memory = runs["memory"][0]
    for name in ("stream0", "stream2"):
        project = runs[name][0]
        for which in ("best", "last"):
            assert_same_weights(memory / f"data/toy/refine/{which}.pt", project / f"data/toy/refine/{which}.pt")
        assert figures(project / "metrics/toy/train_refine.json") == figures(memory / "metrics/toy/train_refine.json")
    evaluated = {}
    for name in ("memory", "stream2"):
        project, params = runs[name]
        evaluate.run(load_params(params), "toy")
        evaluated[name] = figures(project / "metrics/toy/evaluate.json")
        assert (project / "metrics/toy/predictions.csv").is_file()
    assert evaluated["stream2"] == evaluated["memory"]
    assert (runs["stream2"][0] / "metrics/toy/predictions.csv").read_text() == (memory / "metrics/toy/predictions.csv").read_text()
    made = json.loads((runs["stream2"][0] / "metrics/toy/evaluate.provenance.json").read_text())
    assert (made["loader"], made["num_workers"]) == ("stream", 2)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_pass_draws_nothing_from_torch_global_generator(tmp_path: Path, workers: int) -> None:
    """The stages reseed torch's global generator every epoch (stochastic depth replays from it): a feed that drew
    from it (a DataLoader's worker seed) would change the weights, and a resumed run's."""
    make_project(tmp_path)
    data = tmp_path / "data/toy"
    rows = read_manifest(data / "manifest.csv")
    requests = whole_image_requests(read_dataset_json(data / "dataset.json", "toy").root, rows, None)
    feed = whole_image_feed(requests, 36, FeedOptions(num_workers=workers), "train")
    torch.manual_seed(5)
    before = torch.get_rng_state()
    for _ in range(2):  # the first pass starts the workers, the second reuses them
        assert len(list(feed.batches(list(torch.arange(len(rows)).split(4))))) > 0
        assert torch.equal(torch.get_rng_state(), before)
    feed.close()


def test_a_worker_that_cannot_read_an_image_raises_its_own_message_in_the_stage(tmp_path: Path) -> None:
    make_project(tmp_path)
    data = tmp_path / "data/toy"
    rows = read_manifest(data / "manifest.csv")
    root = read_dataset_json(data / "dataset.json", "toy").root
    requests = whole_image_requests(root, rows, None)
    (root / rows[5].path).write_bytes(b"not an image")
    feed = whole_image_feed(requests, 36, FeedOptions(num_workers=2), "train")
    with pytest.raises(DatasetError, match=f"cannot read image {re.escape(str(root / rows[5].path))}") as info:
        list(feed.batches(list(torch.arange(len(rows)).split(4))))
    assert "DataLoader worker" not in str(info.value)
    feed.close()


def test_feeds_closed_stops_the_workers_of_every_feed_made_in_it(tmp_path: Path) -> None:
    make_project(tmp_path)
    data = tmp_path / "data/toy"
    rows = read_manifest(data / "manifest.csv")
    requests = whole_image_requests(read_dataset_json(data / "dataset.json", "toy").root, rows, None)
    me = psutil.Process()
    before = {c.pid for c in me.children(recursive=True)}  # other tests' processes, if any

    def workers_now() -> list[psutil.Process]:  # the feeds' workers (children of the fork server, where there is one)
        return [c for c in me.children(recursive=True) if c.pid not in before and (c.ppid() != me.pid or worker_context() is None)]

    feeds = []
    with feeds_closed():
        for _ in range(2):
            feeds.append(whole_image_feed(requests, 36, FeedOptions(num_workers=2), "train"))
            list(feeds[-1].batches(list(torch.arange(len(rows)).split(4))))
        workers = workers_now()
        assert len(workers) == 4  # two persistent workers each, alive while the feeds are referenced
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [] and len(gone) == 4
