"""The package's layering: its modules import one another without a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "pneumoscan"


def _imported_modules(path: Path) -> set[str]:
    """The package modules `path` imports with `from . import x` or `from .x import y`, function-local ones too."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.ImportFrom) or node.level != 1:
            continue
        if node.module:
            found.add(node.module.split(".")[0])
        else:
            found.update(alias.name for alias in node.names)
    return {name for name in found if (PACKAGE / f"{name}.py").is_file()}


def module_graph() -> dict[str, set[str]]:
    """Each module of src/pneumoscan and the package modules it imports."""
    return {p.stem: _imported_modules(p) - {p.stem} for p in sorted(PACKAGE.glob("*.py"))}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_counting_function_local_imports():
    cycle = find_cycle(module_graph())
    if cycle:
        print("import cycle:", " -> ".join(cycle))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500


def test_functions_and_modules_stay_within_the_style_limits():
    """No function of src/pneumoscan over 60 lines (decorators and docstring included), no module over 500."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        text = path.read_text()
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            offenders.append(f"{path.name}: module of {lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (length := node.end_lineno - start + 1) > MAX_FUNCTION_LINES:
                    offenders.append(f"{path.name}:{node.lineno}: {node.name} has {length} lines "
                                     f"(limit {MAX_FUNCTION_LINES})")
    for offender in offenders:
        print(offender)
    assert not offenders, "over the style limits:\n" + "\n".join(offenders)
