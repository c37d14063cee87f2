"""The package's shape: subpackages at the top, no import cycle, modules short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "mtft"
# The entry points are the only modules at the top; everything else lives in a subpackage.
TOP_LEVEL_MODULES = {"__init__.py", "__main__.py", "cli.py"}
MAX_LINES = 320  # "about 300"; the training loop is the one module allowed to be longer
LONG_ALLOWED = {"mtft.engine.loop"}


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
    assert packages >= {
        "core",
        "launch",
        "recipe",
        "data",
        "models",
        "engine",
        "balancers",
        "loggers",
        "report",
    }


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
        name: n
        for name, path in _modules().items()
        if (n := len(path.read_text().splitlines())) > MAX_LINES and name not in LONG_ALLOWED
    }
    assert not long, long
