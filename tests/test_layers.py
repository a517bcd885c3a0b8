"""The package's layers point one way (docs/architecture.md): no import cycle among `icd` modules, counting imports
inside functions; the model layer knows nothing of the shapes world; nothing below training imports it; source files
stay small; positional parameter lists stay short."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "icd"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Every icd module `path` imports, at module level or inside functions (TYPE_CHECKING blocks excluded)."""
    tree = ast.parse(path.read_text())
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in modules:  # `from icd.models import lora` -> icd.models.lora or icd.models
            name = name.rpartition(".")[0]
        if name and name != me:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = []
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("icd"):
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base
                                                                                                   else []))
            if not base.startswith("icd"):
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in modules else base)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    graph = _graph()
    # a package's __init__ re-exporting its own modules is not a cycle of the layers: drop edges parent -> child
    edges = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(edges.get(m, ())):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)


@pytest.mark.parametrize("layer, forbidden", [
    ("icd.models", "icd.world"),
    ("icd.models", "icd.train"),
    ("icd.models", "icd.bench"),
    ("icd.editing", "icd.train"),
    ("icd.bench", "icd.train"),
    ("icd.judge", "icd.train"),
    ("icd.samplers", "icd.editing"),
    ("icd.samplers", "icd.methods"),
    ("icd.models", "icd.methods"),
    ("icd.editing", "icd.methods"),  # methods sit between editing and the pipeline (docs/architecture.md)
    ("icd.methods", "icd.pipeline"),
    ("icd.methods", "icd.bench"),
    ("icd.methods", "icd.cli"),
    ("icd.methods", "icd.web"),
    ("icd.requests", "icd.cli"),  # the request layer the CLI and the web page share sits below both
    ("icd.requests", "icd.web"),
    ("icd.solver", "icd.models"),
    ("icd.schedule", "icd.models"),
])
def test_layers_point_one_way(layer, forbidden):
    bad = [f"{m} imports {d}" for m, deps in _graph().items() if m == layer or m.startswith(layer + ".")
           for d in deps if d == forbidden or d.startswith(forbidden + ".")]
    assert not bad, bad


def test_no_module_below_training_imports_it():
    above = ("icd.train", "icd.cli", "icd.web")
    bad = [f"{m} imports {d}" for m, deps in _graph().items() if not m.startswith(above)
           for d in deps if d.startswith("icd.train")]
    assert not bad, bad


def test_source_files_stay_small():
    big = {str(p.relative_to(SRC)): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not big, big


def test_function_level_imports_say_why():
    """An import inside a function is there for a heavy or optional dependency (or to keep `icd --help` fast) and
    says so in a comment on its line or the line above."""
    bad = []
    for path in SRC.rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, ast.Import | ast.ImportFrom):
                    if "#" not in lines[inner.lineno - 1] and "#" not in lines[inner.lineno - 2]:
                        bad.append(f"{path.relative_to(SRC)}:{inner.lineno} lacks a comment saying why")
    assert not bad, "\n".join(bad)


def test_long_positional_parameter_lists_are_keyword_only():
    bad = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name != "__call__":  # protocols
                positional = [a.arg for a in node.args.posonlyargs + node.args.args if a.arg not in ("self", "cls")]
                if len(positional) > 4:
                    bad.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}({', '.join(positional)})")
    assert not bad, "\n".join(bad)
