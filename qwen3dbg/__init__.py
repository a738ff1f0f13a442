"""qwen3dbg: numerical debugging and parity diffing for Qwen3 implementations."""

import os as _os
from pathlib import Path as _Path

# torch backs its buffers of 2 MB and more with huge pages when this is set before its first allocation: a
# diff maps and frees GBs of them (memory.for_prefill), at one page fault per 2 MB instead of per 4 KB.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# pyproject maps reference/, candidates/ and reports/ in as qwen3dbg.reference, .candidates, .reports.
# When a source checkout itself is on sys.path (python -c / -m from its root, PYTHONPATH=checkout),
# that mapping is bypassed: let the subpackages be found beside this package too.
_checkout = _Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "candidates" / "__init__.py").is_file():
    __path__.append(str(_checkout))
