"""Every way the project is run keeps working, each in a fresh interpreter: pytest, python -m pytest, the bench
scripts, gpu_check.sh; and the package imports only the way pyproject installs it."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[2]
BENCH_SCRIPTS = sorted((CHECKOUT / "bench").glob("bench_*.py"))
SMALL_TEST_FILE = "tests/model/test_config.py"
# The `pytest` command beside this interpreter (a venv's), else the one on PATH (a venv made with
# --system-site-packages has none of its own).
_BESIDE = Path(sys.executable).with_name("pytest")
PYTEST = str(_BESIDE) if _BESIDE.is_file() else shutil.which("pytest")


def run(*args: str, cwd: Path = CHECKOUT) -> subprocess.CompletedProcess:
    return subprocess.run(list(args), cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("runner", [[PYTEST], [sys.executable, "-m", "pytest"]], ids=["pytest", "python -m pytest"])
def test_pytest_collects_from_the_checkout_root(runner):
    if runner[0] is None:
        pytest.skip("no pytest command on PATH")
    out = run(*runner, "--collect-only", "-q", "-p", "no:cacheprovider", SMALL_TEST_FILE)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_config.py::" in out.stdout


def test_pytest_collects_a_test_file_given_by_path_from_another_directory(tmp_path):
    out = run(
        sys.executable,
        "-m",
        "pytest",
        "--collect-only",
        "-q",
        "-p",
        "no:cacheprovider",
        str(CHECKOUT / SMALL_TEST_FILE),
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "test_config.py::" in out.stdout


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=[p.name for p in BENCH_SCRIPTS])
def test_bench_script_imports_and_shows_its_help(script, tmp_path):
    out = run(sys.executable, str(script), "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:")


def test_gpu_check_parses_and_installs_the_checkout_offline_without_a_path_hack():
    """A lent GPU's minutes are few: the script cannot be run here, so its form is checked."""
    script = CHECKOUT / "bench" / "gpu_check.sh"
    assert run("bash", "-n", str(script)).returncode == 0
    text = script.read_text()
    assert "PYTHONPATH" not in text
    assert 'pip install -q --no-deps --no-build-isolation -e "$repo"' in text


@pytest.mark.parametrize("name", ["qwen3dbg.bench", "qwen3dbg.docs", "qwen3dbg.qwen3dbg.tapstore.schema"])
def test_checkout_folders_outside_the_package_do_not_import_as_subpackages(name):
    """One name per file: from the checkout's root too, only pyproject's mapping makes subpackages."""
    out = run(sys.executable, "-c", f"import {name}")
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr


def test_mapped_subpackages_import_from_the_checkout(tmp_path):
    out = run(
        sys.executable,
        "-c",
        "import qwen3dbg.reference, qwen3dbg.candidates, qwen3dbg.reports; print(qwen3dbg.reference.__file__)",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == CHECKOUT / "reference" / "__init__.py"
