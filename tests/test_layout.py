"""The package's shape: commands on top, libraries below in declared layers, no import cycle, modules
short enough to read, and docs/design.md's module table equal to the tree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mtft"
# `python -m mtft` is the only module at the top; everything else lives in a subpackage.
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py"}
MAX_LINES = 320  # "about 300"
# The package order, top to bottom: a package imports only packages of the layers below its own, never
# one above or beside it.
LAYERS = [
    {"commands"},
    {"recipe"},
    {"eval", "launch"},
    {"engine"},
    {"balancers", "data", "loggers", "models", "report"},
    {"core"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """mtft modules imported anywhere in the file (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mtft"):
            found |= {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            if node.module in modules:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names} & modules.keys()
    return found


def test_top_level_is_subpackages_plus_the_entry_points():
    files = {p.name for p in PACKAGE.iterdir() if p.is_file() and p.suffix == ".py"}
    assert files == TOP_LEVEL_MODULES
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert packages == set().union(*LAYERS)


def _package(module: str) -> str | None:
    """`mtft.<package>.x` -> package; None for the top-level modules."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else None


def _layer(package: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if package in layer)


def test_packages_import_only_the_layers_below():
    modules = _modules()
    wrong = sorted(
        f"{name} imports {target}"
        for name, path in modules.items()
        if (source := _package(name))
        for target in _imports(path, modules)
        if (imported := _package(target)) and imported != source and _layer(imported) <= _layer(source)
    )
    assert not wrong, wrong


def test_import_graph_has_no_cycle():
    modules = _modules()
    graph = {name: _imports(path, modules) - {name} for name, path in modules.items()}
    # A package's __init__ importing its own modules is not a cycle through the package.
    for name in graph:
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in graph[node]:
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack)
        stack.pop()
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])
    assert not cycles, cycles


def test_modules_are_short():
    long = {
        name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_design_doc_module_table_is_the_tree():
    """docs/design.md's module table names every module of every package, and no module that is gone."""
    rows = {}
    for line in (ROOT / "docs" / "design.md").read_text().splitlines():
        if match := re.match(r"\| `mtft/(\w+)/` \| (.*) \|$", line):
            rows[match[1]] = set(re.findall(r"`(\w+\.py)`", match[2]))
    tree = {
        p.name: {m.name for m in p.glob("*.py") if m.name != "__init__.py"}
        for p in PACKAGE.iterdir()
        if (p / "__init__.py").is_file()
    }
    assert rows == tree
