"""qwen3dbg: numerical debugging and parity diffing for Qwen3 implementations."""

from pathlib import Path as _Path

# pyproject maps reference/, candidates/ and reports/ in as qwen3dbg.reference, .candidates, .reports.
# When a source checkout itself is on sys.path (python -c / -m from its root, PYTHONPATH=checkout),
# that mapping is bypassed: let the subpackages be found beside this package too.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "candidates" / "__init__.py").is_file():
    __path__.append(str(_checkout))
