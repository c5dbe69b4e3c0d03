"""Compile targets and flags for iree-compile.

`llvm-cpu` compiles for this host's CPU (`--iree-llvmcpu-target-cpu=host`,
2-3x faster than the generic target); such a module is not portable, so the
host CPU feature set is part of the cache key. `cuda`, `rocm` and `vulkan`
are selectable with their architecture flags.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from pcpc.errors import UserError

# Flags common to every llvm-cpu build. Each was measured in bench/NOTES.md.
LLVM_CPU_FLAGS = (
    "--iree-hal-target-backends=llvm-cpu",
    "--iree-llvmcpu-target-cpu=host",
)

DATA_TILING = "--iree-global-opt-data-tiling"
"""Data tiling (mmt4d operand layouts) through IREE's global-optimization path. The path that
`--iree-opt-data-tiling` picks in IREE 3.13 (dispatch creation) miscompiles a batch matmul whose
narrow, padded operand comes from a fused elementwise producer through a reshape: Qwen2.5-0.5B
decode (RoPE'd queries, 7 heads per KV head) got the second KV group's attention wrong, rel.
error 4e-2 (tests/test_qwen_compiled.py, the gqa7 case). Same speed on the benchmarked modules."""

# Extra llvm-cpu flags for training modules (forward + backward + optimizer in
# one call; a target opts in with Target.llvm_cpu_flags). Measured on the
# nanoGPT train steps in bench/NOTES.md:
TRAINING_CPU_FLAGS = (
    # Pack matmul operands into the CPU's register-tile layout (mmt4d): the
    # transposed weight-gradient matmuls of a backward pass run ~3x faster and
    # the whole medium step ~1.3x. Not a default: it re-packs weights that are
    # call arguments on every call, which costs decode-style modules 10x.
    # DATA_TILING picks IREE's global-optimization path; see its note.
    DATA_TILING,
    # Vectorize float reductions (softmax max/sum, layer-norm and loss sums)
    # instead of running them as scalar loops; sums change only in rounding order.
    "--iree-llvmcpu-reassociate-fp-reductions",
    # max/min without NaN-propagation bookkeeping (softmax's row max was a scalar
    # compare + unordered-check chain). A NaN may be dropped by a max instead of
    # propagated; it still reaches the loss through the matmuls.
    "--iree-llvmcpu-use-fast-min-max-ops",
)

DEFAULT_ARCH = {"cuda": "sm_80", "rocm": "gfx942", "vulkan": "rdna3"}
TARGETS = ("llvm-cpu", "cuda", "rocm", "vulkan")
DRIVERS = {"llvm-cpu": "local-task", "cuda": "cuda", "rocm": "hip", "vulkan": "vulkan"}


def detect_cuda_arch() -> str | None:
    """sm_XY of the first visible NVIDIA GPU, or None."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0 or not out.stdout.strip():
        return None
    return "sm_" + out.stdout.split()[0].replace(".", "")


# Highest CUDA architecture iree-base-compiler 3.13 has target details for: sm_90 and
# newer fail with "missing GPU target" (iree-org/iree#22147). PTX is forward
# compatible, so a detected newer GPU gets sm_89 PTX, which its driver JIT-compiles.
NEWEST_CUDA_ARCH = 89


def _compilable_cuda_arch(detected: str | None) -> str | None:
    if detected is None:
        return None
    number = int(detected.removeprefix("sm_").rstrip("a") or 0)
    return detected if number <= NEWEST_CUDA_ARCH else f"sm_{NEWEST_CUDA_ARCH}"


def compile_flags(target: str = "llvm-cpu", arch: str | None = None) -> tuple[str, ...]:
    """iree-compile flags for `target` (and GPU architecture `arch`, detected or defaulted)."""
    if target not in TARGETS:
        raise UserError(f"--target: unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if target == "llvm-cpu":
        return LLVM_CPU_FLAGS
    if target == "cuda":
        arch = arch or _compilable_cuda_arch(detect_cuda_arch()) or DEFAULT_ARCH["cuda"]
        return ("--iree-hal-target-backends=cuda", f"--iree-cuda-target={arch}")
    if target == "rocm":
        return ("--iree-hal-target-backends=rocm", f"--iree-rocm-target={arch or DEFAULT_ARCH['rocm']}")
    return ("--iree-hal-target-backends=vulkan-spirv", f"--iree-vulkan-target={arch or DEFAULT_ARCH['vulkan']}")


def cpu_features_hash() -> str:
    """sha256 of this host's CPU model and feature flags (part of an llvm-cpu cache key)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        lines = [platform.machine(), platform.processor()]
    keep = sorted({ln.split(":", 1)[1].strip() for ln in lines if ln.startswith(("flags", "model name"))})
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()


def iree_compile_exe() -> str:
    """Path of the iree-compile tool that belongs to the installed iree-base-compiler."""
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


def compile_mlir(mlir_path: Path, vmfb_path: Path, flags: tuple[str, ...]) -> None:
    """Run iree-compile MLIR -> VMFB. The caller handles atomic placement of vmfb_path."""
    cmd = [iree_compile_exe(), str(mlir_path), *flags, "-o", str(vmfb_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-20:])
        raise RuntimeError(f"iree-compile failed ({proc.returncode}) for {mlir_path}:\n{tail}")
