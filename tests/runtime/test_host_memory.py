"""runtime/host_memory.py: malloc keeps freed memory in pcpc's own processes only.

Each case loads a CPU module in a fresh Python process and then asks glibc
(mallinfo2) whether a 64 MiB malloc was served by a fresh mmap (malloc as
it came) or from the heap (pcpc's tuning, mmap off for malloc), and whether
3 GiB freed at the top of the heap stay there (pcpc's tuning: trimming off;
never touched, so they cost address space only) or go back to the system.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from conftest import tiny_target
from pcpc.mlir.build import build

PROBE = textwrap.dedent("""
    import ctypes, sys
    from pcpc.runtime import host_memory
    if sys.argv[2] == "pcpc":
        host_memory.use_in_this_process()
    from pcpc.runtime.module import CompiledModule
    CompiledModule(sys.argv[1], threads=1)

    class MallInfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
    libc.free.argtypes = (ctypes.c_void_p,)
    before = libc.mallinfo2().hblks
    block = libc.malloc(64 << 20)
    where = "mmap" if libc.mallinfo2().hblks > before else "heap"
    big = libc.malloc(3 << 30)
    libc.free(big)
    kept = "kept" if libc.mallinfo2().arena >= 3 << 30 else "returned"
    print(where, bool(host_memory._configured), kept)
""")


@pytest.fixture(scope="module")
def vmfb(tmp_path_factory):
    return str(build(tiny_target("hostmem"), tmp_path_factory.mktemp("hostmem")).vmfb)


@pytest.mark.parametrize("who, env, want", [
    ("user", None, "mmap False returned"),  # a program that imports pcpc keeps its malloc
    ("user", "1", "heap True kept"),  # ... unless it opts in
    ("pcpc", None, "heap True kept"),  # pcpc's own processes (the CLI, its workers)
    ("pcpc", "0", "mmap False returned"),  # PCPC_KEEP_FREED_MEMORY=0 turns it off everywhere
])
def test_malloc_is_tuned_only_in_pcpcs_own_processes(vmfb, who, env, want):
    environ = {k: v for k, v in os.environ.items() if k != "PCPC_KEEP_FREED_MEMORY"}
    if env is not None:
        environ["PCPC_KEEP_FREED_MEMORY"] = env
    out = subprocess.run([sys.executable, "-c", PROBE, vmfb, who], capture_output=True, text=True, env=environ,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == want
