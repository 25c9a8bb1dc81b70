"""The `fgpipe` command: one thin Typer command per pipeline stage.

Each command parses its options, loads params.yaml (with CLI overrides recorded), calls the stage's
``run()`` and reports. Errors of the FgpipeError family become a one-paragraph message and exit code 1.
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
from fgpipe.errors import FgpipeError

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


def _guard(fn: Callable[[], T]) -> T:
    """Run ``fn``; turn fgpipe's own errors into a clean message and exit code 1."""
    try:
        return fn()
    except FgpipeError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None


_PRESET: dict[str, str] = {}  # `fgpipe --preset NAME`: applied to every command's settings


def _settings(params: Path, overrides: dict[str, Any]) -> Settings:
    return load_params(params, {**_PRESET, **overrides})


def _report(stage: str, dataset: str, metrics: dict[str, Any]) -> None:
    shown = {k: v for k, v in metrics.items() if k not in ("params_file", "overrides", "dataset")}
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
    metrics = _guard(lambda: stage.run(_settings(params, overrides), dataset))
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
    metrics = _guard(lambda: stage.run(_settings(params, overrides), dataset, resume=resume))
    _report("train-backbone", dataset, metrics)


@app.command("extract-attention")
def extract_attention(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    method: Annotated[
        str | None, typer.Option(help="Override attention.method: oaam, gradcam, aolm or bap (recorded with the outputs).")
    ] = None,
) -> None:
    """Heatmaps of the stage-1 network for every image: data/NAME/attention.h5."""
    from fgpipe.stages import extract_attention as stage

    metrics = _guard(lambda: stage.run(_settings(params, {"attention.method": method}), dataset))
    _report("extract-attention", dataset, metrics)


@app.command("extract-crops")
def extract_crops(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    threshold: Annotated[
        float | None, typer.Option(help="Override crops.threshold, a fraction of each heatmap's max (recorded).")
    ] = None,
) -> None:
    """Object boxes from the heatmaps and MPALM part boxes: data/NAME/crops.h5 and crops_preview.png."""
    from fgpipe.stages import extract_crops as stage

    metrics = _guard(lambda: stage.run(_settings(params, {"crops.threshold": threshold}), dataset))
    _report("extract-crops", dataset, metrics)


@app.command()
def show(
    image: Annotated[str, typer.Option("--image", "-i", help="image_id of the image, as in data/NAME/manifest.csv.")],
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: data/NAME/show_<ID>.png).", dir_okay=False)] = None,
) -> None:
    """Draw one image's heatmap, object box, ground-truth box and parts; print the PNG's path."""
    from fgpipe.preview import show as draw

    path = _guard(lambda: draw(_settings(params, {}), dataset, image, out))
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
    metrics = _guard(lambda: stage.run(_settings(params, overrides), dataset, resume=resume))
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

    metrics = _guard(lambda: stage.run(_settings(params, {"evaluate.combine": combine}), dataset))
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

    failed = _guard(lambda: stage.run(_settings(params, {}), dataset, images, top_k=top_k, as_json=as_json, save_png=save_png))
    if failed:
        raise typer.Exit(1)


def main() -> None:
    """Console-script entry point (re-executes once with glibc allocator settings, see fgpipe.runtime)."""
    import os
    import sys

    from fgpipe.runtime import malloc_tuning_wanted, reexec_with_malloc_tuning

    if malloc_tuning_wanted(os.environ):
        reexec_with_malloc_tuning(sys.argv[1:])
    app()
