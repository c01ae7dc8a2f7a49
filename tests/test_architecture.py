"""The package layering of ARCHITECTURE.md, checked on the source: which part may import which.

Every ``import tdabench.X`` / ``from tdabench.X import`` in ``src/tdabench`` counts, also inside
functions (lazy imports are still dependencies); only ``if TYPE_CHECKING:`` blocks are ignored.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "tdabench"

# part -> parts it may import (besides itself). Keep in sync with ARCHITECTURE.md.
CORE = {"errors", "memory", "_validate", "_io", "_compat"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "memory": {"errors"},
    "_validate": {"errors"},
    "_io": {"errors"},
    "_compat": set(),
    "_sample_mode": {"errors"},
    "func": {"errors", "memory", "_validate", "_compat", "_io"},
    "task": {"errors", "func", "_task_compat", "_compat", "_sample_mode"},
    "_task_compat": {"errors", "func"},
    "algorithm": CORE | {"func", "task", "_task_compat"},
    "groundtruth": CORE | {"func"},
    "model_util": CORE | {"func", "groundtruth"},
    "metric": CORE | {"groundtruth", "model_util", "func"},
    "benchmark": CORE | {"func", "task", "_task_compat", "groundtruth", "model_util", "metric"},
    "pipeline": CORE
    | {
        "func",
        "task",
        "_task_compat",
        "algorithm",
        "groundtruth",
        "model_util",
        "metric",
        "benchmark",
    },
    "__init__": {"errors"},
}


def _part(path: Path) -> str:
    rel = path.relative_to(SRC)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    skip = _type_checking_lines(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "tdabench" and len(parts) > 1:
                found.add(parts[1])
    return found


def _graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        part = _part(path)
        graph.setdefault(part, set()).update(_imports(path) - {part})
    return graph


def test_every_part_is_declared():
    assert set(_graph()) <= set(ALLOWED), set(_graph()) - set(ALLOWED)


def test_parts_import_only_what_the_architecture_allows():
    bad = {p: sorted(deps - ALLOWED[p]) for p, deps in _graph().items() if deps - ALLOWED[p]}
    assert not bad, f"imports against ARCHITECTURE.md's layering: {bad}"


def test_no_import_cycle_between_parts():
    graph = _graph()
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                raise AssertionError(f"import cycle: {' -> '.join([*stack, node, nxt])}")
            if not state.get(nxt):
                visit(nxt, [*stack, node])
        state[node] = 2

    for node in graph:
        if not state.get(node):
            visit(node, [])


def test_library_never_imports_the_pipeline_tools():
    for path in SRC.rglob("*.py"):
        if _part(path) == "pipeline":
            continue
        text = path.read_text()
        for tool in ("snakemake", "submitit", "dvc"):
            assert f"import {tool}" not in text, (path, tool)
