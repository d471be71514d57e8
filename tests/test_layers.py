"""The package's layering: five floors (tests that the import-linter contract in pyproject.toml holds and can
break), no import cycle among modules, and the style limits on function and module length."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "pneumoscan"


def _module_name(path: Path) -> str:
    """`src/pneumoscan/tasks/predict.py` -> `pneumoscan.tasks.predict` (a package's __init__ by its package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The package modules `path` imports, relative or absolute, function-local ones too."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return found & modules


def module_graph() -> dict[str, set[str]]:
    """Each module of src/pneumoscan (subpackages included) and the package modules it imports."""
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(p) for p in paths}
    return {_module_name(p): _imported_modules(p, modules) - {_module_name(p)} for p in paths}


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


def test_the_graph_sees_relative_absolute_and_function_local_imports():
    graph = module_graph()
    assert "pneumoscan.tasks.predict" in graph["pneumoscan.tasks.scoring"]  # from ..tasks / from .predict
    assert "pneumoscan.networks.checkpoint" in graph["pneumoscan.tasks.predict"]  # from ..networks import checkpoint
    assert "pneumoscan.tasks.train" in graph["pneumoscan.apps.cli"]  # a function-local import


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
    for path in sorted(PACKAGE.rglob("*.py")):
        text = path.read_text()
        name = path.relative_to(PACKAGE)
        if (lines := len(text.splitlines())) > MAX_MODULE_LINES:
            offenders.append(f"{name}: module of {lines} lines (limit {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (length := node.end_lineno - start + 1) > MAX_FUNCTION_LINES:
                    offenders.append(f"{name}:{node.lineno}: {node.name} has {length} lines "
                                     f"(limit {MAX_FUNCTION_LINES})")
    for offender in offenders:
        print(offender)
    assert not offenders, "over the style limits:\n" + "\n".join(offenders)


def _lint_imports(package_parent: Path) -> subprocess.CompletedProcess:
    """import-linter's `lint-imports` on the contract in pyproject.toml, for the package under `package_parent`."""
    lint = Path(sys.executable).with_name("lint-imports")
    if not lint.exists():
        pytest.skip("needs import-linter (pip install -e '.[test]')")
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"], env=env, cwd=package_parent,
                          capture_output=True, text=True, timeout=120)


def test_the_layer_contract_holds():
    done = _lint_imports(PACKAGE.parent)
    assert done.returncode == 0 and "1 kept, 0 broken" in done.stdout, done.stdout + done.stderr


def test_the_layer_contract_breaks_on_a_function_local_import_upwards(tmp_path):
    """The contract is not vacuous: one function-local import from the core up into the apps breaks it."""
    shutil.copytree(PACKAGE, tmp_path / "pneumoscan", ignore=shutil.ignore_patterns("__pycache__"))
    metrics = tmp_path / "pneumoscan" / "core" / "metrics.py"
    metrics.write_text(metrics.read_text() + "\n\ndef _upwards():\n    from ..apps import cli\n    return cli\n")
    done = _lint_imports(tmp_path)
    assert done.returncode != 0 and "pneumoscan.core.metrics -> pneumoscan.apps.cli" in done.stdout, done.stdout


def test_the_flat_names_of_earlier_releases_import_with_a_deprecation_warning():
    """`pneumoscan.predict` (the flat layout) is `pneumoscan.tasks.predict`, announced as deprecated, in a fresh
    interpreter (an alias imported once stays in sys.modules, and warns no more)."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import pneumoscan.tasks.predict as new\n"
            "try:\n    import pneumoscan.predict\nexcept DeprecationWarning as w:\n    print(w)\n"
            "warnings.simplefilter('ignore')\n"
            "from pneumoscan.predict import Predictor\nfrom pneumoscan import config\n"
            "import pneumoscan.predict as old, pneumoscan.core.config as new_config\n"
            "assert old is new and Predictor is new.Predictor and config is new_config\n"
            "assert new.__spec__.name == 'pneumoscan.tasks.predict'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "pneumoscan.predict has moved to pneumoscan.tasks.predict" in done.stdout
