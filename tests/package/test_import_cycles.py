"""No two modules of the package import each other, even through an import inside a function or a relative one;
and the floors import downwards only."""

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


def _imports(name: str, file: Path, modules) -> set[str]:
    """The package's modules that `name` imports, absolute or relative, at any depth of its code."""
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    imported = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(p for p in (base, node.module) if p)
            imported |= {module} | {f"{module}.{a.name}" for a in node.names}
    return (imported & modules.keys()) - {name}


def _graph():
    modules = _modules()
    return {name: _imports(name, file, modules) for name, file in modules.items()}


def test_the_package_has_no_import_cycle():
    graphlib.TopologicalSorter(_graph()).prepare()  # raises CycleError naming the cycle


def test_relative_imports_are_seen():
    assert "qwen3dbg.candidates.mine.numerics" in _graph()["qwen3dbg.candidates.mine.engine"]


#: the floors by level: a floor imports its own level and those before it, never a later one (the two readers of
#: files share a level: the scan recognises a tap store, validate-store reads safetensors with the scan's reader)
LEVELS = [{"util"}, {"model"}, {"tapstore", "scan"}, {"run"}, {"diff"}]
LEVEL = {floor: i for i, floors in enumerate(LEVELS) for floor in floors}


def test_floors_import_downwards_only():
    def floor(module: str) -> str | None:
        parts = module.split(".")
        return parts[1] if len(parts) > 2 and parts[1] in LEVEL else None

    upward = sorted(
        f"{name} imports {dep}"
        for name, deps in _graph().items()
        for dep in deps
        if floor(name) and floor(dep) and LEVEL[floor(dep)] > LEVEL[floor(name)]
    )
    assert not upward, upward
