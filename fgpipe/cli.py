"""The `fgpipe` command: one thin Typer command per pipeline stage (:mod:`fgpipe.stages`) and per other command
(:mod:`fgpipe.commands`: predict, show, localize).

Each command parses its options, loads params.yaml (with CLI overrides recorded), calls the stage's (or command's)
``run()`` and reports. Errors of the FgpipeError family become a one-paragraph message and exit code 1; Ctrl-C
(SIGTERM likewise) becomes one line saying what was kept and how to go on, and exit code 130 (143 for SIGTERM).
A value an option cannot be parsed as is Typer's usage error: its usage line and message, exit code 2.
The console script's entry point is :func:`fgpipe.__main__.main`, which handles Ctrl-C during these imports.
Before any command runs, the root callback sets glibc's allocator for training (:func:`fgpipe.runtime.tune_malloc`).
"""

from __future__ import annotations

import importlib
import json
import shlex
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from fgpipe.config import Settings, load_params
from fgpipe.console import console
from fgpipe.errors import FgpipeError
from fgpipe.runtime import interruption, sigterm_raises, tune_malloc
from fgpipe.store import StageRecord

app = typer.Typer(
    help="Weakly supervised fine-grained classification as a cached DVC pipeline.\n\n"
    "Stages, in order: prepare, train-backbone, extract-attention, extract-crops, train-refine, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

T = TypeVar("T")

DatasetOpt = Annotated[str, typer.Option("--dataset", "-d", help="Dataset name, a key under `datasets` in params.yaml.")]
ParamsOpt = Annotated[Path, typer.Option("--params", "-p", help="Params file.", dir_okay=False)]


def _guard(fn: Callable[[], T], rerun: str | None = None) -> T:
    """Run ``fn``; turn fgpipe's own errors into a clean message and exit code 1, and Ctrl-C (or SIGTERM, which
    raises like it while ``fn`` runs) into one line saying what was kept and how to go on (a training stage says
    it, else: nothing replaced, ``rerun``) and exit code 130 (143 for SIGTERM)."""
    try:
        with sigterm_raises():
            return fn()
    except FgpipeError as exc:
        _print_error(exc)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        said, code = interruption(exc, rerun)
        console.print(f"[bold yellow]{escape(said)}", highlight=False, soft_wrap=True)
        raise typer.Exit(code) from None


def _print_error(exc: FgpipeError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


def _stage(name: str) -> ModuleType:
    """``fgpipe.stages.NAME``; commands import it inside :func:`_guard`, so a Ctrl-C during torch's import is
    reported like one during the stage."""
    return importlib.import_module(f"fgpipe.stages.{name}")


def _command(name: str) -> ModuleType:
    """``fgpipe.commands.NAME``, a command that is not a pipeline stage (predict, show, localize); imported like
    :func:`_stage`."""
    return importlib.import_module(f"fgpipe.commands.{name}")


def _flag(option: str, value: object) -> str:
    """How the command line gave an override, for messages: ``--epochs 0``, ``--root ''``."""
    return f"{option} {shlex.quote(str(value))}"


_PRESET: dict[str, str] = {}  # `fgpipe --preset NAME`: applied to every command's settings


def _settings(params: Path, overrides: dict[str, Any], dataset: str, options: dict[str, str] | None = None) -> Settings:
    """params.yaml for ``dataset``: its per_dataset blocks merged into the stage sections, then the preset and options.
    ``options``: override key -> the option that gave it (``--epochs 0``), named when that value is refused."""
    given = {"preset": _flag("--preset", _PRESET["preset"])} if "preset" in _PRESET else {}
    return load_params(params, {**_PRESET, **overrides}, dataset=dataset, options={**given, **(options or {})})


# provenance keys left out of the console summary: said by the command line itself, or long (hashes, image ids)
_UNREPORTED = ("params_file", "overrides", "per_dataset", "dataset", "sources", "annotation_issues")


def _report(stage: str, dataset: str, record: StageRecord) -> None:
    """The stage's figures (its metrics file), then how they were made (its provenance record, the short keys)."""
    made = {k: v for k, v in record.provenance.items() if k not in _UNREPORTED}
    console.print(f"[green]{stage}[/] {dataset}: " + json.dumps(record.metrics, sort_keys=True), highlight=False, soft_wrap=True)
    console.print("  made with: " + json.dumps(made, sort_keys=True), highlight=False, soft_wrap=True)


def _version(value: bool) -> None:
    if value:
        from fgpipe import __version__

        typer.echo(f"fgpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
    preset: Annotated[
        str | None,
        typer.Option(help="Apply a parameter preset (paper-resnet50, paper-inception-v3, or a YAML file) over params.yaml."),
    ] = None,
) -> None:
    """Weakly supervised fine-grained classification as a cached DVC pipeline."""
    try:
        tune_malloc()  # glibc's allocator set for training (fgpipe.runtime), before any command
    except FgpipeError as exc:  # a malformed FGPIPE_MALLOC_TUNING
        _print_error(exc)
        raise typer.Exit(1) from None
    _PRESET.clear()
    if preset is not None:
        _PRESET["preset"] = preset


@app.command()
def prepare(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    root: Annotated[str | None, typer.Option(help="Override datasets.NAME.root (recorded with the outputs).")] = None,
    download: Annotated[bool, typer.Option("--download", help="Fetch the official archive if root is missing.")] = False,
) -> None:
    """Read a dataset in its official layout and write data/NAME/manifest.csv and the decoded image cache images.h5."""
    overrides: dict[str, Any] = {f"datasets.{dataset}.root": root}
    options = {f"datasets.{dataset}.root": _flag("--root", root)}
    if download:
        overrides[f"datasets.{dataset}.download"] = True
        options[f"datasets.{dataset}.download"] = "--download"
    record = _guard(
        lambda: _stage("prepare").run(_settings(params, overrides, dataset, options), dataset), f"fgpipe prepare --dataset {dataset}"
    )
    _report("prepare", dataset, record)


@app.command("train-backbone")
def train_backbone(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from data/NAME/stage1/last.pt.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Override train_backbone.epochs.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Override model.backbone.")] = None,
    weights: Annotated[
        str | None, typer.Option(help="Override model.weights: none, imagenet, or a state_dict FILE.")
    ] = None,
) -> None:
    """Train the stage-1 network (backbone + LCAM + WS-DAN head); select the best epoch on val."""
    overrides = {"train_backbone.epochs": epochs, "model.backbone": backbone, "model.weights": weights}
    options = {
        "train_backbone.epochs": _flag("--epochs", epochs),
        "model.backbone": _flag("--backbone", backbone),
        "model.weights": _flag("--weights", weights),
    }
    record = _guard(
        lambda: _stage("train_backbone").run(_settings(params, overrides, dataset, options), dataset, resume=resume),
        f"fgpipe train-backbone --dataset {dataset}",
    )
    _report("train-backbone", dataset, record)


@app.command("extract-attention")
def extract_attention(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    method: Annotated[
        str | None, typer.Option(help="Override attention.method: oaam, gradcam, aolm or bap (recorded with the outputs).")
    ] = None,
    input_size: Annotated[
        int | None,
        typer.Option(help="Override attention.input_size: the side heatmaps are computed at; 0 = stage 1's (recorded).", show_default=False),
    ] = None,
) -> None:
    """Heatmaps of the stage-1 network for every image: data/NAME/attention.h5."""
    overrides = {"attention.method": method, "attention.input_size": input_size}
    options = {"attention.method": _flag("--method", method), "attention.input_size": _flag("--input-size", input_size)}
    record = _guard(
        lambda: _stage("extract_attention").run(_settings(params, overrides, dataset, options), dataset),
        f"fgpipe extract-attention --dataset {dataset}",
    )
    _report("extract-attention", dataset, record)


@app.command("extract-crops")
def extract_crops(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    threshold: Annotated[
        str | None,
        typer.Option(
            help="Override crops.threshold: a fraction of each heatmap's max, or auto (the crops.thresholds value "
            "localising the train and val boxes best) (recorded).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Object boxes from the heatmaps and MPALM part boxes: data/NAME/crops.h5 and crops_preview.png.

    Also the localisation of every stored heatmap method x crops.thresholds x split: metrics/NAME/localization.json
    and metrics/NAME/localization/METHOD.csv.
    """
    value = None if threshold is None else _threshold(threshold)
    overrides = {"crops.threshold": value}
    options = {"crops.threshold": _flag("--threshold", threshold)}
    record = _guard(
        lambda: _stage("extract_crops").run(_settings(params, overrides, dataset, options), dataset),
        f"fgpipe extract-crops --dataset {dataset}",
    )
    _report("extract-crops", dataset, record)


def _threshold(text: str) -> float | str:
    """``--threshold``: auto or a number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"`{text}` is neither auto nor a number", param_hint="--threshold") from None


def _thresholds(text: str | None) -> list[float] | None:
    """``--thresholds``: comma-separated numbers; an empty list or an empty item between commas is refused (an
    empty list never means the default grid: leaving the option out does)."""
    if text is None:
        return None
    items = [v.strip() for v in text.split(",")]
    if not any(items):
        shown = f"`{text}`" if text.strip() else "an empty value"
        raise typer.BadParameter(
            f"{shown} holds no threshold: give one or more, e.g. 0.1,0.2,0.3 (leave --thresholds out for crops.thresholds)",
            param_hint="--thresholds",
        )
    if not all(items):
        raise typer.BadParameter(f"`{text}` has an empty item between its commas", param_hint="--thresholds")
    try:
        return [float(v) for v in items]
    except ValueError:
        raise typer.BadParameter(f"`{text}` is not a comma-separated list of numbers", param_hint="--thresholds") from None


@app.command()
def localize(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    thresholds: Annotated[
        str | None,
        typer.Option(help="Comma-separated object thresholds (default: crops.thresholds), e.g. 0.1,0.2,0.3.", show_default=False),
    ] = None,
) -> None:
    """Localisation of every heatmap method in attention.h5 x threshold x split (IoU >= 0.5 with the boxes); no network."""
    import sys

    from rich.console import Console

    grid = _thresholds(thresholds)

    def run() -> tuple[ModuleType, Any]:
        command = _command("localize")
        return command, command.run(_settings(params, {}, dataset), dataset, grid)

    command, report = _guard(run, f"fgpipe localize --dataset {dataset}")
    command.print_table(Console(file=sys.stdout), report)


@app.command()
def show(
    image: Annotated[str, typer.Option("--image", "-i", help="image_id of the image, as in data/NAME/manifest.csv.")],
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: data/NAME/show_<ID>.png).", dir_okay=False)] = None,
) -> None:
    """Draw one image's heatmap, object box, ground-truth box and parts; print the PNG's path."""

    def draw() -> Path:
        return _command("show").show(_settings(params, {}, dataset), dataset, image, out)

    path = _guard(draw, f"fgpipe show --image {image} --dataset {dataset}")
    typer.echo(str(path))


@app.command("train-refine")
def train_refine(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from data/NAME/refine/last.pt.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Override train_refine.epochs.")] = None,
) -> None:
    """Train the object branch on object crops and the part branch on MPALM patches; select on val."""
    overrides = {"train_refine.epochs": epochs}
    options = {"train_refine.epochs": _flag("--epochs", epochs)}
    record = _guard(
        lambda: _stage("train_refine").run(_settings(params, overrides, dataset, options), dataset, resume=resume),
        f"fgpipe train-refine --dataset {dataset}",
    )
    _report("train-refine", dataset, record)


@app.command()
def evaluate(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    combine: Annotated[
        str | None, typer.Option(help="Override evaluate.combine: val (grid search on val) or fixed (evaluate.weights).")
    ] = None,
    calibrate: Annotated[
        bool | None,
        typer.Option("--calibrate/--no-calibrate", help="Override evaluate.calibrate: a temperature per branch fitted on val.", show_default=False),
    ] = None,
) -> None:
    """Top-1/top-k of the raw, object, parts and joint predictions on test; temperatures and joint weights chosen on val or fixed."""
    overrides = {"evaluate.combine": combine, "evaluate.calibrate": calibrate}
    options = {"evaluate.combine": _flag("--combine", combine), "evaluate.calibrate": "--calibrate" if calibrate else "--no-calibrate"}
    record = _guard(
        lambda: _stage("evaluate").run(_settings(params, overrides, dataset, options), dataset), f"fgpipe evaluate --dataset {dataset}"
    )
    _report("evaluate", dataset, record)


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to classify.", show_default=False)],
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Classes shown per branch.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout instead of tables.")] = False,
    save_png: Annotated[
        Path | None,
        typer.Option("--save-png", file_okay=False, help="Write each image annotated with its object box and parts to DIR."),
    ] = None,
) -> None:
    """Classify image files with the whole chain: heatmap, object box, MPALM parts, three branches, joint.

    An unreadable image is reported and skipped; the exit code is then 1 once every other image is done.
    """
    failed = _guard(
        lambda: _command("predict").run(_settings(params, {}, dataset), dataset, images, top_k=top_k, as_json=as_json, save_png=save_png)
    )
    if failed:
        raise typer.Exit(1)


def main() -> None:
    """Entry point of installs whose `fgpipe` script still names ``fgpipe.cli:main``: see :func:`fgpipe.__main__.main`."""
    from fgpipe.__main__ import main as run

    run()
