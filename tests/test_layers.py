"""The method layer's architecture as a contract: imports point down only, no circles, no hidden imports."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import smat

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
PACKAGE = Path(smat.__file__).resolve().parent
# optional or slow-to-load dependencies imported where they are needed, each with its reason in a comment
LAZY_IMPORTS = {"peft", "psutil", "torch.utils.tensorboard"}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = (path, ast.parse(path.read_text()))
    return found


def test_import_linter_layers_hold():
    lint = pytest.importorskip("importlinter.cli")
    assert PYPROJECT.is_file(), "run the tests from a checkout: the contract lives in pyproject.toml"
    assert lint.lint_imports(config_filename=str(PYPROJECT)) == 0, "an import points up a layer (run lint-imports)"


def test_no_import_inside_a_function_but_the_lazy_optional_ones():
    hidden = []
    for name, (_, tree) in modules().items():
        for function in ast.walk(tree):
            if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(function):
                if isinstance(node, ast.Import):
                    targets = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    targets = ["." * node.level + (node.module or "")]
                else:
                    continue
                hidden += [f"{name}.{function.name}: {t}" for t in targets if t not in LAZY_IMPORTS]
    assert not hidden, "imports inside functions: " + ", ".join(hidden)


def test_no_import_circle():
    found = modules()
    edges: dict[str, set[str]] = {name: set() for name in found}
    for name, (path, tree) in found.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
                for alias in node.names:
                    for target in (f"{base}.{alias.name}", base):
                        while target and target not in found:
                            target = target.rpartition(".")[0]
                        if target and target != name and not target.startswith(name + "."):
                            edges[name].add(target)
                            break
    circles = []

    def visit(module: str, path: list[str], done: set[str]) -> None:
        if module in path:
            circles.append(" -> ".join(path[path.index(module):] + [module]))
            return
        if module in done:
            return
        done.add(module)
        for target in sorted(edges[module]):
            visit(target, path + [module], done)

    done: set[str] = set()
    for module in sorted(edges):
        visit(module, [], done)
    assert not circles, "import circles: " + "; ".join(circles)
