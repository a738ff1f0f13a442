"""qwen3dbg: numerical debugging and parity diffing for Qwen3 implementations."""

import os as _os

# torch backs its buffers of 2 MB and more with huge pages when this is set before its first allocation: a
# diff maps and frees GBs of them (memory.for_prefill), at one page fault per 2 MB instead of per 4 KB.
_os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
