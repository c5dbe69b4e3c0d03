"""Keep freed host memory in the process for reuse (glibc malloc tuning for CPU modules).

A call into an IREE CPU module allocates its transient buffers and frees them
when it returns; for a nanogpt-medium train step that is a few hundred MB. glibc
serves blocks above its mmap threshold (32 MiB at most) with fresh mmap'd pages
and unmaps them on free, so every call page-faults its whole working set back
in: about 105k minor faults and 150-170 ms of kernel time per medium step
(bench/NOTES.md). With mmap off for malloc and trimming off, a freed block
stays in the heap, already mapped, and the next call reuses it. The heap
then keeps its peak size (as a caching allocator would); torch's own tensors
are served the same way.

This changes malloc for the whole process, so pcpc does it only in its own
processes: the `pcpc` command and the workers it starts call
`use_in_this_process()`, and their CPU modules then configure malloc on
first load. A program of yours that imports pcpc and loads a CPU module
keeps its malloc as it is, unless it opts in (call `use_in_this_process()`,
or set PCPC_KEEP_FREED_MEMORY=1). PCPC_KEEP_FREED_MEMORY=0 turns it off
everywhere, pcpc's own processes included (e.g. to measure the difference).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
TRIM_THRESHOLD = -1
"""-1: never trim the heap (mallopt(3)). The 2 GiB cap it had (mallopt's largest int) still let glibc hand a
step's transients back when they topped 2 GiB, so every step faulted them in again: a Qwen2.5-0.5B LoRA
learner at 4 x 384 tokens took 2.1M minor faults and ~17 s of kernel time a step, 39-40 s a step against
30 s without (bench/NOTES.md)."""
ENV = "PCPC_KEEP_FREED_MEMORY"
"""1: keep freed memory in any process that loads a CPU module; 0: never; unset: in pcpc's own processes."""

_wanted = False
_configured: bool | None = None


def use_in_this_process() -> None:
    """Mark this process as pcpc's own: its CPU modules keep freed memory (unless the env var says 0)."""
    global _wanted
    _wanted = True


def keep_freed_memory() -> bool:
    """Configure malloc once, if this process wants it (see the module docstring); True when configured."""
    global _configured
    if _configured is None:
        setting = os.environ.get(ENV, "")
        wanted = setting == "1" or (_wanted and setting != "0")
        if not wanted:
            return False
        _configured = _mallopt()
    return _configured


def _mallopt() -> bool:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to tune
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    from the parent across fork + exec, so a child started by a large process reports the parent's size."""
    from pathlib import Path

    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
