"""What `pip install .` ships: every package folder listed in pyproject, and a built wheel that holds every module
and every C/CUDA source and mapping of the checkout, imports from itself and runs the CLI."""

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]
#: what a module needs beside its .py files at run time (kernel sources, headers, mappings, build scripts)
SHIPPED = {".py", ".c", ".h", ".cu", ".cuh", ".cpp", ".toml", ".sh"}
#: engines a module may need that a plain install lacks (vLLM has a venv of its own: .ci/install_vllm.sh)
OPTIONAL = ("vllm",)


def _tool() -> dict:
    return tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"]


def _source_files() -> dict[str, Path]:
    """Installed path (qwen3dbg/...) -> checkout file, for everything the package folders hold that ships."""
    files = {}
    for package, folder in _tool()["package-dir"].items():
        root = CHECKOUT / folder
        for f in root.rglob("*"):
            rel = f.relative_to(root)
            if f.is_file() and f.suffix in SHIPPED and "__pycache__" not in rel.parts:
                files["/".join((*package.split("."), *rel.parts))] = f
    return files


def test_every_folder_with_an_init_is_a_listed_package():
    listed = set(_tool()["packages"])
    found = {".".join(path.split("/")[:-1]) for path in _source_files() if path.endswith("/__init__.py")}
    assert found == listed, f"missing from pyproject: {found - listed}; listed but absent: {listed - found}"


def test_the_built_wheel_ships_every_source_imports_from_itself_and_runs(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools leaves build/ and egg-info in the tree it builds
    src.mkdir()
    for item in ["pyproject.toml", "README.md", *_tool()["package-dir"].values()]:
        copy = shutil.copytree if (CHECKOUT / item).is_dir() else shutil.copy
        copy(
            CHECKOUT / item,
            src / item,
            **({"ignore": shutil.ignore_patterns("__pycache__")} if copy is shutil.copytree else {}),
        )
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp_path, src],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("qwen3dbg-*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {n for n in z.namelist() if Path(n).suffix in SHIPPED}
        z.extractall(tmp_path / "site")
    source = set(_source_files())
    assert shipped == source, f"not in the wheel: {sorted(source - shipped)}; only in it: {sorted(shipped - source)}"
    modules = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in shipped if n.endswith(".py"))
    script = (
        "import importlib, sys; site = sys.argv[1]; sys.path.insert(0, site)\n"
        "for m in sys.argv[2:]:\n"
        "    try:\n"
        "        mod = importlib.import_module(m)\n"
        f"    except ModuleNotFoundError as e:  # an engine's own package, installed only with it\n"
        f"        assert e.name.split('.')[0] in {OPTIONAL!r}, (m, e)\n"
        "        continue\n"
        "    assert mod.__file__.startswith(site), (m, mod.__file__)\n"
        "from qwen3dbg.cli import main\n"
        "sys.argv = ['qwen3dbg', '--help']\n"
        "main()\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "site"), *modules], capture_output=True, text=True, cwd=tmp_path
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "scan-checkpoint" in run.stdout
