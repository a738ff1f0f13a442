"""No two modules of the package import each other, even through an import inside a function."""

import ast
import graphlib
import importlib
from pathlib import Path

#: the packages whose folders hold the rest (pyproject's package-dir)
ROOTS = ("qwen3dbg", "qwen3dbg.reference", "qwen3dbg.candidates", "qwen3dbg.reports")


def _modules() -> dict[str, Path]:
    found = {}
    for package in ROOTS:
        root = Path(importlib.import_module(package).__file__).parent
        for file in root.rglob("*.py"):
            parts = file.relative_to(root).with_suffix("").parts
            found[".".join((package, *(parts[:-1] if parts[-1] == "__init__" else parts)))] = file
    return found


def test_the_package_has_no_import_cycle():
    modules = _modules()
    graph = {}
    for name, file in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
        graph[name] = (imported & modules.keys()) - {name}
    graphlib.TopologicalSorter(graph).prepare()  # raises CycleError naming the cycle
