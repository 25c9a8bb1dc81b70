"""The `fgpipe` command: one thin Typer command per pipeline stage.

Each command parses its options, loads params.yaml (with CLI overrides recorded), calls the stage's
``run()`` and reports. Errors of the FgpipeError family become a one-paragraph message and exit code 1; Ctrl-C
becomes one line saying what was kept and how to go on, and exit code 130.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape

from fgpipe.config import Settings, load_params
from fgpipe.console import console
from fgpipe.errors import FgpipeError, Interrupted

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
    """Run ``fn``; turn fgpipe's own errors into a clean message and exit code 1, and Ctrl-C into one line saying what
    was kept and how to go on (a training stage says it, else: nothing replaced, ``rerun``) and exit code 130."""
    try:
        return fn()
    except FgpipeError as exc:
        _print_error(exc)
        raise typer.Exit(1) from None
    except KeyboardInterrupt as exc:
        if isinstance(exc, Interrupted):
            said = str(exc)
        elif rerun:
            said = f"interrupted (Ctrl-C): nothing was replaced, the previous outputs are unchanged; rerun `{rerun}`"
        else:
            said = "interrupted (Ctrl-C)"
        console.print(f"[bold yellow]{escape(said)}", highlight=False, soft_wrap=True)
        raise typer.Exit(130) from None


def _print_error(exc: FgpipeError) -> None:
    console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)


_PRESET: dict[str, str] = {}  # `fgpipe --preset NAME`: applied to every command's settings


def _settings(params: Path, overrides: dict[str, Any], dataset: str) -> Settings:
    """params.yaml for ``dataset``: its per_dataset blocks merged into the stage sections, then the preset and options."""
    return load_params(params, {**_PRESET, **overrides}, dataset=dataset)


def _report(stage: str, dataset: str, metrics: dict[str, Any]) -> None:
    shown = {k: v for k, v in metrics.items() if k not in ("params_file", "overrides", "per_dataset", "dataset", "sources")}
    console.print(f"[green]{stage}[/] {dataset}: " + json.dumps(shown, sort_keys=True), highlight=False, soft_wrap=True)


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
    from fgpipe.stages import prepare as stage

    overrides: dict[str, Any] = {f"datasets.{dataset}.root": root}
    if download:
        overrides[f"datasets.{dataset}.download"] = True
    metrics = _guard(lambda: stage.run(_settings(params, overrides, dataset), dataset), f"fgpipe prepare --dataset {dataset}")
    _report("prepare", dataset, metrics)


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
    from fgpipe.stages import train_backbone as stage

    overrides = {"train_backbone.epochs": epochs, "model.backbone": backbone, "model.weights": weights}
    metrics = _guard(
        lambda: stage.run(_settings(params, overrides, dataset), dataset, resume=resume), f"fgpipe train-backbone --dataset {dataset}"
    )
    _report("train-backbone", dataset, metrics)


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
    from fgpipe.stages import extract_attention as stage

    overrides = {"attention.method": method, "attention.input_size": input_size}
    metrics = _guard(lambda: stage.run(_settings(params, overrides, dataset), dataset), f"fgpipe extract-attention --dataset {dataset}")
    _report("extract-attention", dataset, metrics)


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
    from fgpipe.stages import extract_crops as stage

    value = None if threshold is None else _threshold(threshold)
    metrics = _guard(lambda: stage.run(_settings(params, {"crops.threshold": value}, dataset), dataset), f"fgpipe extract-crops --dataset {dataset}")
    _report("extract-crops", dataset, metrics)


def _threshold(text: str) -> float | str:
    """``--threshold``: auto or a number."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise typer.BadParameter(f"`{text}` is neither auto nor a number", param_hint="--threshold") from None


def _thresholds(text: str | None) -> list[float] | None:
    """``--thresholds``: comma-separated numbers."""
    if text is None:
        return None
    try:
        return [float(v) for v in text.replace(" ", "").split(",") if v]
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

    from fgpipe.stages import localize as stage

    grid = _thresholds(thresholds)
    report = _guard(lambda: stage.run(_settings(params, {}, dataset), dataset, grid), f"fgpipe localize --dataset {dataset}")
    stage.print_table(Console(file=sys.stdout), report)


@app.command()
def show(
    image: Annotated[str, typer.Option("--image", "-i", help="image_id of the image, as in data/NAME/manifest.csv.")],
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: data/NAME/show_<ID>.png).", dir_okay=False)] = None,
) -> None:
    """Draw one image's heatmap, object box, ground-truth box and parts; print the PNG's path."""
    from fgpipe.preview import show as draw

    path = _guard(lambda: draw(_settings(params, {}, dataset), dataset, image, out), f"fgpipe show --image {image} --dataset {dataset}")
    typer.echo(str(path))


@app.command("train-refine")
def train_refine(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    resume: Annotated[bool, typer.Option("--resume", help="Continue from data/NAME/refine/last.pt.")] = False,
    epochs: Annotated[int | None, typer.Option(help="Override train_refine.epochs.")] = None,
) -> None:
    """Train the object branch on object crops and the part branch on MPALM patches; select on val."""
    from fgpipe.stages import train_refine as stage

    overrides = {"train_refine.epochs": epochs}
    metrics = _guard(
        lambda: stage.run(_settings(params, overrides, dataset), dataset, resume=resume), f"fgpipe train-refine --dataset {dataset}"
    )
    _report("train-refine", dataset, metrics)


@app.command()
def evaluate(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    combine: Annotated[
        str | None, typer.Option(help="Override evaluate.combine: val (grid search on val) or fixed (evaluate.weights).")
    ] = None,
) -> None:
    """Top-1/top-k of the raw, object, parts and joint predictions on test; joint weights chosen on val or fixed."""
    from fgpipe.stages import evaluate as stage

    metrics = _guard(lambda: stage.run(_settings(params, {"evaluate.combine": combine}, dataset), dataset), f"fgpipe evaluate --dataset {dataset}")
    _report("evaluate", dataset, metrics)


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
    from fgpipe.stages import predict as stage

    failed = _guard(lambda: stage.run(_settings(params, {}, dataset), dataset, images, top_k=top_k, as_json=as_json, save_png=save_png))
    if failed:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point (re-executes once with glibc allocator settings, see fgpipe.runtime)."""
    import os
    import sys

    from fgpipe.runtime import malloc_tuning_wanted, reexec_with_malloc_tuning

    try:
        wanted = malloc_tuning_wanted(os.environ)
    except FgpipeError as exc:  # a malformed FGPIPE_MALLOC_TUNING, before any command runs
        _print_error(exc)
        raise SystemExit(1) from None
    if wanted:
        reexec_with_malloc_tuning(sys.argv[1:])
    app()
