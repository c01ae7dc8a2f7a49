"""No function in ``src/`` is longer than 60 lines (issue #15: short functions).

A function's length is its ``def`` line to its last line, docstring included, decorators
not. Exempt: argument parsers (functions named ``build_parser`` or ending in ``_parser``, or
annotated to return an ``argparse.ArgumentParser``) and the functions in :data:`ALLOWED`, each
with the reason it is still long. ``ALLOWED`` may only shrink: an entry whose function is
now short (or gone) fails the test, so it is deleted when its function is shortened.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
MAX_LINES = 60

ALLOWED: dict[str, str] = {}
"""``"path::qualname": reason`` for the functions still over the limit (shrinks over time)."""


def _is_parser(node: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    if node.name == "build_parser" or node.name.endswith("_parser"):
        return True
    returns = ast.unparse(node.returns) if node.returns is not None else ""
    return returns.split(".")[-1].strip("'\"") == "ArgumentParser"


def long_functions(source: str, max_lines: int = MAX_LINES) -> dict[str, int]:
    """``{qualname: lines}`` of the functions in ``source`` longer than ``max_lines``.

    Args:
        source: Python source text.
        max_lines: the limit.

    Returns:
        Qualified names (``Class.method``, ``outer.inner``) of the long, non-parser functions.
    """
    found: dict[str, int] = {}

    def visit(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    lines = (child.end_lineno or child.lineno) - child.lineno + 1
                    if lines > max_lines and not _is_parser(child):
                        found[name] = lines
                visit(child, name + ".")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return found


def _tree_long_functions() -> dict[str, int]:
    out: dict[str, int] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for name, lines in long_functions(path.read_text(encoding="utf-8")).items():
            out[f"{rel}::{name}"] = lines
    return out


def test_no_new_long_function():
    found = _tree_long_functions()
    new = {k: v for k, v in found.items() if k not in ALLOWED}
    assert not new, (
        f"functions over {MAX_LINES} lines (split them into named helpers): "
        + ", ".join(f"{k} ({v} lines)" for k, v in sorted(new.items()))
    )


def test_allowlist_only_names_long_functions():
    found = _tree_long_functions()
    stale = sorted(k for k in ALLOWED if k not in found)
    assert not stale, f"now short or gone; delete from ALLOWED: {stale}"
    assert all(reason.strip() for reason in ALLOWED.values())


def _function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{indent}def {name}() -> None:\n{body}"


@pytest.mark.parametrize("body_lines, expected", [(59, {}), (60, {"f": 61})])
def test_checker_counts_def_line_to_last_line(body_lines, expected):
    assert long_functions(_function("f", body_lines)) == expected


def test_checker_finds_methods_and_nested_functions_and_exempts_parsers():
    source = (
        "import argparse\n"
        + "class A:\n"
        + _function("method", 70, "    ")
        + "def outer() -> None:\n"
        + _function("inner", 70, "    ")
        + _function("build_parser", 80)
        + _function("short", 3)
        + "def make() -> argparse.ArgumentParser:\n"
        + "".join(f"    x{i} = {i}\n" for i in range(80))
    )
    assert long_functions(source) == {"A.method": 71, "outer": 72, "outer.inner": 71}
