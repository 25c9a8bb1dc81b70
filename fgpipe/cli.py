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


def _settings(params: Path, overrides: dict[str, Any]) -> Settings:
    return load_params(params, overrides)


def _report(stage: str, dataset: str, metrics: dict[str, Any]) -> None:
    shown = {k: v for k, v in metrics.items() if k not in ("params_file", "overrides", "dataset")}
    console.print(f"[green]{stage}[/] {dataset}: " + json.dumps(shown, sort_keys=True), highlight=False)


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
) -> None:
    """Weakly supervised fine-grained classification as a cached DVC pipeline."""


@app.command()
def prepare(
    dataset: DatasetOpt = "synthetic",
    params: ParamsOpt = Path("params.yaml"),
    root: Annotated[str | None, typer.Option(help="Override datasets.NAME.root (recorded with the outputs).")] = None,
    download: Annotated[bool, typer.Option("--download", help="Fetch the official archive if root is missing.")] = False,
) -> None:
    """Read a dataset in its official layout and write data/NAME/manifest.csv."""
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


def main() -> None:
    """Console-script entry point."""
    app()
