"""The package layout: reference/, candidates/ and reports/ are importable as qwen3dbg subpackages."""

import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parent.parent


def test_subpackages_import_from_a_checkout_on_sys_path_without_any_install(tmp_path):
    """`python -c` from a checkout's root (or PYTHONPATH=checkout) bypasses pyproject's package-dir
    mapping; -S leaves out site-packages and so any installed copy."""
    code = "import qwen3dbg.candidates, qwen3dbg.reference, qwen3dbg.reports; print(qwen3dbg.candidates.__file__)"
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(CHECKOUT)},
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == CHECKOUT / "candidates" / "__init__.py"
