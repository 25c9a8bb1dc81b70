"""The import rule of docs/ARCHITECTURE.md, checked on the code: each module imports only from its own layer or the
layers below (the layers are read from the document's table); no stage imports another stage and no command imports a
stage or another command; no import cycle.

Imports are read from the source (``import fgpipe.x`` and ``from fgpipe.x import y``, at the top, inside functions
and under ``TYPE_CHECKING`` alike), so the rule holds for every import a reader sees.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fgpipe"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


@cache
def imports_of(module: str) -> frozenset[str]:
    """The fgpipe modules ``module`` imports (``from fgpipe.x import y``: fgpipe.x.y where that is a module, else fgpipe.x)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(MODULES[module].read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "fgpipe"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and node.module.split(".")[0] == "fgpipe":
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in MODULES else node.module)
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            pytest.fail(f"{module}: relative import (fgpipe imports by absolute name)")
    return frozenset(found - {module})


def read_layers(doc: Path = REPO / "docs" / "ARCHITECTURE.md") -> list[tuple[str, tuple[str, ...]]]:
    """The layer table of docs/ARCHITECTURE.md, bottom to top: (name, modules); a module is named relative to fgpipe/
    (`errors`, `datasets/` for a whole package; `fgpipe` is the package itself)."""
    layers = []
    for line in doc.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        match = re.fullmatch(r"(\d+)\. (.+)", cells[0]) if len(cells) == 3 else None
        if match is None:
            continue
        assert int(match.group(1)) == len(layers) + 1, f"layer {match.group(1)} out of order in {doc}"
        names = [n.rstrip("/") for n in re.findall(r"`([^`]+)`", cells[1])]
        layers.append((match.group(2), tuple(n if n == "fgpipe" else f"fgpipe.{n}" for n in names)))
    assert len(layers) >= 2, f"no layer table in {doc}"
    return layers


# bottom to top: a module may import its own layer and those below; a name stands for the module and, for a package,
# everything in it
LAYERS = read_layers()
# within these packages no module imports a sibling: each stage (each command) stands on the layers below alone
ISOLATED = ("fgpipe.stages", "fgpipe.commands")
# the one cycle allowed: fgpipe.__main__ runs the CLI, and cli.main (kept for installs whose script names it) hands
# back to __main__.main
ENTRY_POINTS = frozenset({("fgpipe.cli", "fgpipe.__main__"), ("fgpipe.__main__", "fgpipe.cli")})


def layer_of(module: str) -> int:
    """The index of the layer holding ``module`` (the longest name in LAYERS that is the module or a package above it)."""
    best: tuple[int, int] | None = None
    for index, (_, names) in enumerate(LAYERS):
        for name in names:
            if module == name or module.startswith(name + "."):
                if best is None or len(name) > best[1]:
                    best = (index, len(name))
    if best is None:
        pytest.fail(f"{module} is in no layer: add it to docs/ARCHITECTURE.md and to LAYERS in {Path(__file__).name}")
    return best[0]


def _package(module: str) -> str | None:
    return next((p for p in ISOLATED if module.startswith(p + ".")), None)


Imports = Callable[[str], frozenset[str]]


def upward_imports(imports: Imports) -> list[str]:
    """Every import of a module from a layer above its own."""
    return [
        f"{m} ({LAYERS[layer_of(m)][0]}) imports {i} ({LAYERS[layer_of(i)][0]})"
        for m in MODULES for i in sorted(imports(m)) if layer_of(i) > layer_of(m)
    ]


def sibling_imports(imports: Imports) -> list[str]:
    """Every import of a stage or command (or their package) by a stage or command."""
    return [
        f"{m} imports {i}"
        for m in MODULES if _package(m) is not None
        for i in sorted(imports(m)) if i in ISOLATED or _package(i) is not None
    ]


def import_cycles(imports: Imports) -> list[str]:
    """Depth-first search over the import graph; each back edge closes a cycle (ENTRY_POINTS aside)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        path.append(module)
        for imported in sorted(imports(module)):
            if (module, imported) in ENTRY_POINTS:
                continue
            if state.get(imported) == 1:
                cycles.append(" -> ".join([*path[path.index(imported):], imported]))
            elif imported not in state:
                visit(imported)
        path.pop()
        state[module] = 2

    for module in MODULES:
        if module not in state:
            visit(module)
    return cycles


def test_every_module_is_in_one_layer() -> None:
    for module in MODULES:
        layer_of(module)


def test_the_table_names_only_modules_that_exist() -> None:
    named = [name for _, names in LAYERS for name in names]
    assert len(named) == len(set(named))
    assert [n for n in named if n not in MODULES] == []


def test_modules_import_only_their_layer_and_those_below() -> None:
    wrong = upward_imports(imports_of)
    assert not wrong, "\n".join(wrong)


def test_no_stage_imports_another_stage_and_no_command_a_stage_or_command() -> None:
    wrong = sibling_imports(imports_of)
    assert not wrong, "\n".join(wrong)


def test_there_is_no_import_cycle() -> None:
    cycles = import_cycles(imports_of)
    assert not cycles, "\n".join(cycles)


def test_the_checks_fail_where_they_should() -> None:
    """A stage importing a stage, a basic module importing upwards and the cycle it closes are each caught."""
    extra = {"fgpipe.stages.evaluate": {"fgpipe.stages.train_refine"}, "fgpipe.store": {"fgpipe.training"}}

    def broken(module: str) -> frozenset[str]:
        return imports_of(module) | frozenset(extra.get(module, ()))

    assert sibling_imports(broken) == ["fgpipe.stages.evaluate imports fgpipe.stages.train_refine"]
    assert upward_imports(broken) == ["fgpipe.store (basics) imports fgpipe.training (shared by the stages)"]
    cycles = [c.split(" -> ") for c in import_cycles(broken)]
    assert cycles and all(c[0] == c[-1] and {"fgpipe.store", "fgpipe.training"} <= set(c) for c in cycles)
