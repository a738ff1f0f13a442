"""What README's commands write into the checkout is ignored by git: following README leaves `git status` clean."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _outputs() -> list[str]:
    """Paths README's commands write, relative to the checkout (placeholders are upper case): directories with
    a trailing slash."""
    text = (ROOT / "README.md").read_text()
    found = [f"{d}/" if not d.endswith(".gguf") else d for d in re.findall(r"qwen3dbg make-model ([a-z][\w.-]*)", text)]
    found += re.findall(r"--html ([a-z][\w.-]*)", text) + re.findall(r" -o ([a-z][\w.-]*)", text)
    return sorted(set(found))


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(), reason="not a git checkout")
def test_every_file_readmes_commands_write_into_the_checkout_is_ignored_by_git():
    outputs = _outputs()
    assert "report.html" in outputs and "q06/" in outputs  # the first command's report, the long run's model
    for path in outputs:
        ignored = subprocess.run(["git", "check-ignore", "--no-index", "-q", path], cwd=ROOT)
        assert ignored.returncode == 0, f"{path} is not ignored by .gitignore"
