"""The embedded `codetasks` mixture, built offline from the Python standard library.

Every function of the interpreter's stdlib (tests skipped) becomes examples for several tasks:
code_completion, docstring_to_code, code_to_docstring, function_naming and returns_value (a yes/no
answer whose loss falls an order of magnitude below the others': the scale-imbalanced scenario,
conf/data/codetasks_scaled.yaml). A function belongs to the
train or the validation split by a hash of its module path and qualified name, so no function (and
so no text) is in both. Task sizes and difficulties differ on purpose: that is what balancers are for.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
import textwrap
import tokenize
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUILDER_VERSION = 2
TASKS = ("code_completion", "docstring_to_code", "code_to_docstring", "function_naming", "returns_value")
RETURNS_VALUE = re.compile(r"^\s*return\s+(?!None\s*$)\S", re.MULTILINE)
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}
MIN_LINES, MAX_LINES, MAX_CHARS = 3, 60, 2500

Example = dict[str, str]  # {"prompt": ..., "response": ...}


@dataclass(frozen=True)
class Function:
    module: str  # path relative to the stdlib root
    qualname: str
    name: str
    source: str  # dedented, decorators excluded
    docstring: str | None
    doc_span: tuple[int, int] | None  # 0-based [start, end) line span of the docstring in `source`


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _module_files(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if name.endswith(".py") and not name.startswith("test"):
                yield Path(dirpath) / name


def _functions_in(path: Path, root: Path) -> Iterator[Function]:
    try:
        with tokenize.open(path) as fh:
            source = fh.read()
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError, OSError):
        return
    lines = source.splitlines()
    module = path.relative_to(root).as_posix()

    def visit(node: ast.AST, prefix: str) -> Iterator[Function]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                qualname = f"{prefix}{child.name}"
                text = textwrap.dedent("\n".join(lines[child.lineno - 1 : child.end_lineno]))
                doc_span = None
                first = child.body[0]
                docstring = ast.get_docstring(child, clean=True)
                if docstring and isinstance(first, ast.Expr):
                    doc_span = (first.lineno - child.lineno, first.end_lineno - child.lineno + 1)
                yield Function(module, qualname, child.name, text, docstring, doc_span)
                yield from visit(child, f"{qualname}.<locals>.")

    yield from visit(tree, "")


def in_validation(fn: Function, val_percent: int, salt: str) -> bool:
    """Deterministic split: a hash of module path + qualified name, independent of run and machine."""
    digest = hashlib.sha1(f"{salt}:{fn.module}:{fn.qualname}".encode()).hexdigest()
    return int(digest[:8], 16) % 100 < val_percent


def _cut(fn: Function, n: int) -> int:
    """A deterministic position in [1, n) derived from the function's identity."""
    digest = hashlib.sha1(f"cut:{fn.module}:{fn.qualname}".encode()).hexdigest()
    return 1 + int(digest[:8], 16) % max(n - 1, 1)


def _first_paragraph(doc: str) -> str:
    return doc.strip().split("\n\n", 1)[0].strip()


def examples_for(fn: Function) -> dict[str, Example]:
    """The examples one function yields, by task (a function yields only the tasks it fits)."""
    lines = fn.source.splitlines()
    out: dict[str, Example] = {}
    if len(lines) >= MIN_LINES:
        cut = _cut(fn, len(lines))
        out["code_completion"] = {
            "prompt": "# complete the function\n" + "\n".join(lines[:cut]) + "\n",
            "response": "\n".join(lines[cut:]) + "\n",
        }
    if not fn.name.startswith("__") and len(fn.name) > 1:
        masked = re.sub(rf"\b{re.escape(fn.name)}\b", "___", fn.source)
        out["function_naming"] = {
            "prompt": "# name the function ___\n" + masked + "\n# name:",
            "response": " " + fn.name,
        }
    answer = "yes" if RETURNS_VALUE.search(fn.source) else "no"
    out["returns_value"] = {
        "prompt": "# does the function return a value?\n" + fn.source + "\n# answer:",
        "response": " " + answer,
    }
    if fn.docstring and fn.doc_span:
        start, end = fn.doc_span
        body = lines[end:]
        summary = _first_paragraph(fn.docstring)
        if body and summary:
            out["docstring_to_code"] = {
                "prompt": "# implement the function\n" + "\n".join(lines[:end]) + "\n",
                "response": "\n".join(body) + "\n",
            }
            undocumented = "\n".join(lines[:start] + body)
            out["code_to_docstring"] = {
                "prompt": "# document the function\n" + undocumented + "\n# docstring:",
                "response": " " + summary,
            }
    return out


def iter_functions(root: Path | None = None) -> Iterator[Function]:
    root = root or stdlib_root()
    for path in _module_files(root):
        for fn in _functions_in(path, root):
            n = len(fn.source.splitlines())
            if MIN_LINES <= n <= MAX_LINES and len(fn.source) <= MAX_CHARS:
                yield fn


def build(val_percent: int, salt: str) -> dict[str, dict[str, list[Example]]]:
    """task -> split ("train"/"validation") -> examples, from the running interpreter's stdlib."""
    data: dict[str, dict[str, list[Example]]] = {t: {"train": [], "validation": []} for t in TASKS}
    for fn in iter_functions():
        split = "validation" if in_validation(fn, val_percent, salt) else "train"
        for task, example in examples_for(fn).items():
            data[task][split].append(example)
    return data


def cache_key(val_percent: int, salt: str) -> str:
    """Identifies a build: the interpreter and its stdlib, and the split settings."""
    return hashlib.sha1(
        json.dumps([BUILDER_VERSION, sys.version, str(stdlib_root()), val_percent, salt]).encode()
    ).hexdigest()[:16]


def load_cached(cache_dir: Path, val_percent: int, salt: str) -> dict[str, dict[str, list[Example]]]:
    """Build once per interpreter/stdlib/settings and reuse; the file is written atomically."""
    path = cache_dir / "codetasks" / f"{cache_key(val_percent, salt)}.json"
    if path.exists():
        return json.loads(path.read_text())
    data = build(val_percent, salt)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as fh:
        json.dump(data, fh)
    os.replace(fh.name, path)
    return data
