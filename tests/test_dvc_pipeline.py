"""The real dvc.yaml on a tiny project: the whole chain runs, and an ablation reruns only what it changes."""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from tinyproject import REPO, TINY, dvc, lock_hash, make_project, ran, read_params, write_params

from fgpipe.datasets import GENERATORS, READERS
from fgpipe.lineage import LOCATION_PARAMS, STAGE_PARAMS, TRACKED_LOCATIONS, dvc_params


def git(project: Path, *args: str) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=project, env=env, check=True, capture_output=True, text=True).stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A git + DVC project with the repo's dvc.yaml and code, a tiny params.yaml, after one full `dvc repro`
    (committed, so `dvc exp run` can start from it)."""
    root = make_project(tmp_path_factory.mktemp("dvcproj"), TINY, dvc_init=False)
    git(root, "init", "-q")
    dvc(root, "init", "-q")
    (root / ".dvcignore").write_text("__pycache__/\n*.pyc\n")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny project")  # dvclive reads the HEAD revision: the repo needs one
    out = dvc(root, "repro")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "tiny pipeline")
    stages = ["prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate"]
    assert ran(out) == {f"{s}@synthetic" for s in stages}
    return root


def test_the_whole_chain_runs_and_writes_every_artefact(project: Path) -> None:
    for rel in ("manifest.csv", "stage1/best.pt", "attention.h5", "crops.h5", "crops_preview.png", "refine/best.pt"):
        assert (project / "data/synthetic" / rel).is_file(), rel
    metrics = json.loads((project / "metrics/synthetic/evaluate.json").read_text())
    assert {"images", "raw", "object", "parts", "joint", "weights", "localization"} <= metrics.keys()
    assert "up to date" in dvc(project, "status")


# --------------------------------------------------------------------------- metrics files and provenance records
def declared(key: str, dataset: str = "synthetic") -> dict[str, list[str]]:
    """stage -> the paths dvc.yaml declares under ``key`` (outs, metrics or plots) for ``dataset``."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    out: dict[str, list[str]] = {}
    for name, stage in stages.items():
        entries = stage["do"].get(key, [])
        out[name] = [(e if isinstance(e, str) else next(iter(e))).replace("${key}", dataset) for e in entries]
    return out


def non_numbers(doc: object, where: str = "") -> list[str]:
    """The dotted keys of ``doc`` whose value is not a number, a bool or null (nested objects are walked; a list, a
    string or anything else is not a figure)."""
    if isinstance(doc, dict):
        return [k for key, value in doc.items() for k in non_numbers(value, f"{where}{key}.")]
    return [] if doc is None or isinstance(doc, (bool, int, float)) else [where.rstrip(".")]


def absolute_paths(doc: object, where: str = "") -> list[str]:
    """The dotted keys of ``doc`` holding a string that names an absolute path (``/...``, ``~...``, ``C:\\...``)."""
    if isinstance(doc, dict):
        return [k for key, value in doc.items() for k in absolute_paths(value, f"{where}{key}.")]
    if isinstance(doc, list):
        return [k for i, value in enumerate(doc) for k in absolute_paths(value, f"{where}{i}.")]
    if isinstance(doc, str) and (doc.startswith(("/", "~", "\\")) or (len(doc) > 2 and doc[1:3] in (":/", ":\\"))):
        return [where.rstrip(".")]
    return []


def test_every_stage_declares_its_metrics_file_and_its_provenance_record() -> None:
    """metrics/NAME/STAGE.json under `metrics:` (what `dvc metrics show` reads) and STAGE.provenance.json beside it as
    an out in DVC's cache (so the stage keeps its run cache), both named as fgpipe.layout names them."""
    from fgpipe.layout import MetricsDir

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    names = MetricsDir(Path("metrics/${key}"))
    for name, stage in stages.items():
        spec, key = stage["do"], name.replace("-", "_")
        assert [next(iter(e)) for e in spec["metrics"]] == [names.stage(key).as_posix()], name
        assert all(e[next(iter(e))] == {"cache": False} for e in spec["metrics"]), name
        assert names.provenance(key).as_posix() in spec["outs"], name  # a plain (cached) out
    # evaluate reads extract-crops' figures and the record of which crops.h5 they describe
    assert {"metrics/${key}/extract_crops.json", "metrics/${key}/extract_crops.provenance.json"} <= set(stages["evaluate"]["do"]["deps"])


def test_every_out_but_the_image_cache_is_cached_or_a_metric_or_plot() -> None:
    """DVC keeps no run cache for a stage with an uncached out that is neither a metric nor a plot: only prepare's
    images.h5 (large, rebuilt byte for byte) is one."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    uncached = [
        (name, next(iter(e))) for name, stage in stages.items() for e in stage["do"].get("outs", [])
        if isinstance(e, dict) and e[next(iter(e))].get("cache") is False
    ]
    assert uncached == [("prepare", "data/${key}/images.h5")]


def assert_split(metrics: Path, project: Path, provenance: bool = True) -> None:
    """``metrics`` (a declared metrics file) holds numbers only; the provenance record beside it (if ``provenance``)
    no absolute path."""
    figures = json.loads(metrics.read_text())
    assert figures and not non_numbers(figures), f"{metrics}: not figures: {non_numbers(figures)}"
    if not provenance:
        return
    made = metrics.with_name(metrics.stem + ".provenance.json")
    record = json.loads(made.read_text())
    assert record["dataset"] == metrics.parent.name and record["params_file"] == "params.yaml", made
    assert not absolute_paths(record), f"{made}: absolute paths at {absolute_paths(record)}"
    assert str(project) not in made.read_text() and str(project.resolve()) not in made.read_text(), made


def test_metrics_hold_figures_only_and_provenance_records_no_absolute_path(project: Path) -> None:
    """Every declared metrics file the tiny synthetic chain wrote: numbers (in nested objects) only; its provenance
    record: no absolute path, the project's own folder nowhere."""
    for stage, paths in declared("metrics").items():
        assert len(paths) == 1, stage
        assert_split(project / paths[0], project)
    refine = json.loads((project / "metrics/synthetic/train_refine.provenance.json").read_text())
    assert refine["initialised_from"]["checkpoint"] == "data/synthetic/stage1/best.pt"


# the plots dvc.yaml declares that only a run makes (data/ is not committed); README "The pipeline" says so
PLOTS_AFTER_A_RUN = ("data/synthetic/confusion.png",)


def test_the_committed_synthetic_metrics_are_split_and_every_plot_loads_on_a_fresh_clone() -> None:
    """metrics/synthetic as committed: each declared metrics file holds figures only (the provenance records are in
    DVC's cache, not in Git); every plot dvc.yaml declares is committed, but those README names as made by a run."""
    tracked = subprocess.run(["git", "ls-files", "metrics/synthetic"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    for stage, paths in declared("metrics").items():
        assert paths[0] in tracked, paths[0]
        assert_split(REPO / paths[0], REPO, provenance=False)
    cached = [p for paths in declared("outs").values() for p in paths if p.startswith("metrics/")]
    assert cached and not set(cached) & set(tracked)  # DVC refuses an out that Git tracks
    plots = [p for paths in declared("plots").values() for p in paths]
    assert [p for p in plots if p.startswith("data/")] == list(PLOTS_AFTER_A_RUN)
    for plot in plots:
        if plot not in PLOTS_AFTER_A_RUN:
            path = REPO / plot
            assert path.is_file() or (path.is_dir() and any(path.rglob("*.tsv"))) or any(path.glob("*.csv")), plot
    pipeline = (REPO / "README.md").read_text().split("## The pipeline", 1)[1].split("\n## ", 1)[0]
    for plot in PLOTS_AFTER_A_RUN:
        assert plot.replace("synthetic", "NAME") in pipeline and "dvc plots show" in pipeline


def test_threshold_ablation_reruns_only_crops_and_what_follows(project: Path) -> None:
    """`dvc exp run -S crops.threshold=0.3`: the README's ablation line, as a user runs it."""
    stage1 = lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt")
    attention = lock_hash(project, "extract-attention@synthetic", "data/synthetic/attention.h5")
    out = dvc(project, "exp", "run", "-S", "crops.threshold=0.3")
    assert ran(out) == {"extract-crops@synthetic", "train-refine@synthetic", "evaluate@synthetic"}
    assert lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt") == stage1
    assert lock_hash(project, "extract-attention@synthetic", "data/synthetic/attention.h5") == attention
    assert json.loads((project / "metrics/synthetic/extract_crops.json").read_text())["threshold"] == 0.3


def test_going_back_to_a_setting_run_before_restores_its_stages_from_the_run_cache(project: Path) -> None:
    """After the threshold ablation above, `dvc exp run` with the committed threshold again runs nothing: DVC restores
    extract-crops, train-refine and evaluate from its run cache (every out of theirs cached, or a metric or plot)."""
    committed = yaml.safe_load(git(project, "show", "HEAD:params.yaml"))["crops"]["threshold"]
    assert read_params(project)["crops"]["threshold"] != committed, "runs after the threshold ablation"
    crops = yaml.safe_load(git(project, "show", "HEAD:dvc.lock"))["stages"]["extract-crops@synthetic"]["outs"]
    out = dvc(project, "exp", "run", "-S", f"crops.threshold={committed}")
    assert ran(out) == set(), out
    for stage in ("extract-crops", "train-refine", "evaluate"):
        assert f"Stage '{stage}@synthetic' is cached - skipping run, checking out outputs" in out, out
    restored = next(o["md5"] for o in crops if o["path"] == "data/synthetic/crops.h5")
    assert lock_hash(project, "extract-crops@synthetic", "data/synthetic/crops.h5") == restored
    assert "up to date" in dvc(project, "status")


def test_prepare_rebuilds_the_image_cache_byte_for_byte(project: Path) -> None:
    """images.h5 is prepare's one uncached out, so prepare has no run cache and reruns (in a queued experiment, or
    after the file is lost): the file it writes again is the same, so no later stage is out of date."""
    images = lock_hash(project, "prepare@synthetic", "data/synthetic/images.h5")
    (project / "data/synthetic/images.h5").unlink()
    out = dvc(project, "repro", "prepare@synthetic")
    assert ran(out) == {"prepare@synthetic"}
    assert lock_hash(project, "prepare@synthetic", "data/synthetic/images.h5") == images
    assert "up to date" in dvc(project, "status")


def test_method_ablation_reruns_from_extract_attention(project: Path) -> None:
    stage1 = lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt")
    params = read_params(project)
    params["attention"]["method"] = "bap"
    write_params(project, params)
    out = dvc(project, "repro")
    assert ran(out) == {f"{s}@synthetic" for s in ("extract-attention", "extract-crops", "train-refine", "evaluate")}
    assert lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt") == stage1


def test_a_second_dataset_runs_its_own_chain_only(project: Path) -> None:
    """Adding a dataset under `run` runs its six stages; the synthetic chain is not rerun."""
    before = {s: lock_hash(project, f"train-backbone@{s}", f"data/{s}/stage1/best.pt") for s in ("synthetic",)}
    params = read_params(project)
    params["datasets"]["birds"] = {**params["datasets"]["synthetic"], "root": "data/birds/raw"}
    params["datasets"]["birds"]["synthetic"] = {**params["datasets"]["synthetic"]["synthetic"], "seed": 3}
    params["run"]["birds"] = "fgpipe/datasets/synthetic.py"
    params["per_dataset"]["birds"] = {section: {} for section in params["per_dataset"]["synthetic"]}  # tracked by dvc.yaml
    write_params(project, params)
    out = dvc(project, "repro")
    stages = ["prepare", "train-backbone", "extract-attention", "extract-crops", "train-refine", "evaluate"]
    assert ran(out) == {f"{s}@birds" for s in stages}
    assert lock_hash(project, "train-backbone@synthetic", "data/synthetic/stage1/best.pt") == before["synthetic"]
    assert "joint" in json.loads((project / "metrics/birds/evaluate.json").read_text())
    assert "up to date" in dvc(project, "status")


def test_a_datasets_own_values_rerun_its_chain_only(project: Path) -> None:
    """per_dataset.birds.crops.threshold reruns birds' extract-crops onwards with that value; synthetic and
    birds' prepare stay up to date. per_dataset.birds.train_backbone would rerun birds from train-backbone."""
    params = read_params(project)
    assert "birds" in params["run"], "runs after test_a_second_dataset_runs_its_own_chain_only"
    synthetic = lock_hash(project, "extract-crops@synthetic", "data/synthetic/crops.h5")
    params["per_dataset"]["birds"]["train_backbone"] = {"epochs": 2}
    write_params(project, params)
    status = dvc(project, "status")
    assert "train-backbone@birds" in status and "per_dataset.birds.train_backbone" in status
    assert "@synthetic" not in status and "prepare@birds" not in status
    params["per_dataset"]["birds"]["train_backbone"] = {}
    params["per_dataset"]["birds"]["crops"] = {"threshold": 0.25}  # the shared value is 0.2 or 0.3 (the ablation above)
    write_params(project, params)
    out = dvc(project, "repro")
    assert ran(out) == {"extract-crops@birds", "train-refine@birds", "evaluate@birds"}
    assert json.loads((project / "metrics/birds/extract_crops.json").read_text())["threshold"] == 0.25
    assert json.loads((project / "metrics/synthetic/extract_crops.json").read_text())["threshold"] == params["crops"]["threshold"]
    assert lock_hash(project, "extract-crops@synthetic", "data/synthetic/crops.h5") == synthetic
    assert "up to date" in dvc(project, "status")


# --------------------------------------------------------------------------- the code each stage depends on
def _fgpipe_imports(path: Path) -> set[str]:
    """Every fgpipe module ``path`` imports, at the top or inside a function (``from fgpipe.x import y``: x and x.y)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
    return {n for n in names if n.split(".")[0] == "fgpipe"}


def _module_file(name: str) -> Path | None:
    path = REPO.joinpath(*name.split("."))
    return path / "__init__.py" if (path / "__init__.py").is_file() else path.with_suffix(".py") if path.with_suffix(".py").is_file() else None


def imported_code(module: str) -> set[str]:
    """The files of ``module`` and of every fgpipe module it imports, transitively (each package's __init__.py too;
    fgpipe.datasets loads its readers and generators by name, so they count as imported with it)."""
    seen: set[Path] = set()
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for k in range(1, len(parts) + 1):
            path = _module_file(".".join(parts[:k]))
            if path is None or path in seen:
                continue
            seen.add(path)
            todo += _fgpipe_imports(path)
            if path == REPO / "fgpipe/datasets/__init__.py":
                todo += [*READERS.values(), *GENERATORS.values()]
    return {p.relative_to(REPO).as_posix() for p in seen}


def as_deps(files: set[str]) -> set[str]:
    """``files`` as dvc.yaml lists them: a subpackage folder where every module of it is imported, else its files."""
    out = set(files)
    for init in [f for f in files if f.count("/") == 2 and f.endswith("/__init__.py")]:  # fgpipe/X/__init__.py
        folder = init.rsplit("/", 1)[0]
        modules = {p.relative_to(REPO).as_posix() for p in (REPO / folder).glob("*.py")}
        if modules <= files:
            out = (out - modules) | {folder}
    return out


def test_every_stage_depends_on_exactly_the_code_it_imports() -> None:
    """dvc.yaml's fgpipe/ deps of each stage are its module and every fgpipe module that imports, no more, no less
    (cli.py only parses the command line: left out), plus fgpipe/presets where the stage reads the `preset` param."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        spec = stage["do"]
        module = "fgpipe.stages." + spec["cmd"].split()[1].replace("-", "_")
        want = as_deps(imported_code(module)) | ({"fgpipe/presets"} if "preset" in spec["params"] else set())
        listed = [d for d in spec["deps"] if d.startswith("fgpipe/")]
        assert len(listed) == len(set(listed)), name
        assert set(listed) == want, f"{name}: missing {sorted(want - set(listed))}, not imported {sorted(set(listed) - want)}"


# --------------------------------------------------------------------------- the params each stage reads
def test_every_stage_tracks_exactly_the_params_it_reads() -> None:
    """dvc.yaml's params of each stage are those derived from lineage.STAGE_PARAMS, the table of what each stage reads
    and its artefacts record (lineage.dvc_params: plus the locations it tracks, preset and per_dataset blocks)."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert set(stages) == set(STAGE_PARAMS)
    for name, stage in stages.items():
        listed = stage["do"]["params"]
        assert len(listed) == len(set(listed)), name
        want = set(dvc_params(name))
        assert set(listed) == want, f"{name}: missing {sorted(want - set(listed))}, not read {sorted(set(listed) - want)}"


def _params_read(module: str) -> set[str]:
    """The params keys the source of ``module`` reads: every ``<...>.params.SECTION[.KEY]`` attribute chain, and
    ``datasets.{dataset}`` for ``settings.dataset(...)`` / ``settings.dataset_root(...)`` used for more than a check."""
    tree = ast.parse(_module_file(module).read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "params" and isinstance(node.ctx, ast.Load):
            chain, parent = [], _parents(tree).get(node)
            while isinstance(parent, ast.Attribute) and len(chain) < 2:
                chain.append(parent.attr)
                parent = _parents(tree).get(parent)
            if chain:
                found.add(".".join(chain))
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute):
            if node.value.func.attr in ("dataset", "dataset_root"):  # its value kept: the dataset's params are read
                found.add("datasets.{dataset}")
    return found


_PARENTS: dict[int, dict[ast.AST, ast.AST]] = {}


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    if id(tree) not in _PARENTS:
        _PARENTS[id(tree)] = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    return _PARENTS[id(tree)]


def _covered(key: str, specs: list[str]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in specs)


@pytest.mark.parametrize("stage", list(STAGE_PARAMS))
def test_each_stage_reads_the_params_of_its_table_and_no_other(stage: str) -> None:
    """The stage's own module reads every section (or key) STAGE_PARAMS lists for it and nothing else but the
    locations (prepare.data_dir, prepare.metrics_dir: where the files are, read by every stage, tracked by prepare)."""
    module = "fgpipe.stages." + stage.replace("-", "_")
    reads = _params_read(module)
    table = list(STAGE_PARAMS[stage])
    assert not [k for k in reads if not _covered(k, [*table, *LOCATION_PARAMS])], f"{module} reads params its table lacks"
    assert not [s for s in table if not any(_covered(k, [s]) or _covered(s, [k]) for k in reads)], f"{module} reads not all its table lists"
    assert set(TRACKED_LOCATIONS.get(stage, ())) <= set(LOCATION_PARAMS)
