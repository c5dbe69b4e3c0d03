"""Keep freed host memory in the process for reuse (glibc malloc tuning for CPU modules).

A call into an IREE CPU module allocates its transient buffers and frees them
when it returns; for a nanogpt-medium train step that is a few hundred MB. glibc
serves blocks above its mmap threshold (32 MiB at most) with fresh mmap'd pages
and unmaps them on free, so every call page-faults its whole working set back
in: about 105k minor faults and 150-170 ms of kernel time per medium step
(bench/NOTES.md). With mmap off for malloc and a high trim threshold, a freed
block stays in the heap, already mapped, and the next call reuses it. The heap
then keeps its peak size (as a caching allocator would); torch's own tensors
are served the same way.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = 2**31 - 1
"""mallopt takes a C int: keep up to 2 GiB of free memory at the top of the heap."""
DISABLE_ENV = "PCPC_KEEP_FREED_MEMORY"
"""Set to 0 to leave malloc as it is (e.g. to measure the difference)."""

_configured: bool | None = None


def keep_freed_memory() -> bool:
    """Configure malloc once per process; False where it does not apply (not glibc, or disabled)."""
    global _configured
    if _configured is None:
        _configured = os.environ.get(DISABLE_ENV, "1") != "0" and _mallopt()
    return _configured


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
