"""The CPU an llvm-cpu module is compiled for, and its instruction-set class.

By default a module is compiled for this host (`--iree-llvmcpu-target-cpu=host`). `PCPC_CPU=<name>`
compiles for the named LLVM CPU instead (`znver3`, `haswell`, `skylake-avx512`, ...): a module built for
a CPU older than the host runs on it, so an AVX-512 host can build and measure what an AVX2-only host
gets (bench/NOTES.md, "AVX2 hosts"). The class of that CPU (`avx512`, `avx2` or `baseline`) picks the
flags that were measured fastest on it (pcpc.mlir.compile.isa_flags).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pcpc.errors import UserError

ENV = "PCPC_CPU"

# LLVM x86 CPU names by instruction-set class (the common ones; `host` reads /proc/cpuinfo).
AVX512_CPUS = ("skylake-avx512", "cascadelake", "cooperlake", "cannonlake", "icelake-client", "icelake-server",
               "tigerlake", "rocketlake", "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5",
               "x86-64-v4")
AVX2_CPUS = ("haswell", "broadwell", "skylake", "alderlake", "raptorlake", "meteorlake", "arrowlake", "lunarlake",
             "gracemont", "znver1", "znver2", "znver3", "bdver4", "x86-64-v3")
BASELINE_CPUS = ("x86-64", "x86-64-v2", "nehalem", "westmere", "sandybridge", "ivybridge")
BF16_CPUS = ("cooperlake", "sapphirerapids", "emeraldrapids", "graniterapids", "znver4", "znver5")
KNOWN = ("host", *AVX512_CPUS, *AVX2_CPUS, *BASELINE_CPUS)


@dataclass(frozen=True)
class Cpu:
    """What an llvm-cpu module is compiled for: `name` (an LLVM CPU, or `host`) and its class."""

    name: str
    isa: str  # "avx512", "avx2" or "baseline"
    bf16: bool  # native bf16 dot products (avx512_bf16)

    @property
    def emulated(self) -> bool:
        """True when the module targets a named CPU rather than this host."""
        return self.name != "host"

    def describe(self) -> str:
        what = f"{self.isa}{' + avx512_bf16' if self.bf16 else ''}"
        return f"{self.name} ({what})" if self.emulated else what


def _cpuinfo(field: str) -> list[str]:
    """The values of `field` in /proc/cpuinfo, one per CPU ([] where that is not readable)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []
    return [ln.split(":", 1)[1].strip() for ln in lines if ln.split(":", 1)[0].strip() == field]


def host_flags() -> set[str]:
    """This host's CPU feature flags (/proc/cpuinfo), empty where that is not readable."""
    return set(next(iter(_cpuinfo("flags")), "").split())


def host_model() -> str:
    """This host's CPU model name (/proc/cpuinfo), or the platform's processor string."""
    import platform

    return next(iter(_cpuinfo("model name")), "") or platform.processor() or platform.machine()


def features_hash() -> str:
    """sha256 of this host's CPU models and feature flags (part of an llvm-cpu cache key)."""
    import hashlib
    import platform

    keep = sorted({*_cpuinfo("flags"), *_cpuinfo("model name")}) or [platform.machine(), platform.processor()]
    return hashlib.sha256("\n".join(keep).encode()).hexdigest()


def target_cpu() -> Cpu:
    """The CPU llvm-cpu modules are compiled for: $PCPC_CPU, else this host."""
    name = os.environ.get(ENV, "").strip() or "host"
    if name not in KNOWN:
        raise UserError(f"{ENV}={name!r}: not a known CPU; valid: {', '.join(KNOWN)}")
    if name == "host":
        flags = host_flags()
        isa = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "baseline"
        return Cpu(name, isa, "avx512_bf16" in flags)
    isa = "avx512" if name in AVX512_CPUS else "avx2" if name in AVX2_CPUS else "baseline"
    return Cpu(name, isa, name in BF16_CPUS)


def summary() -> str:
    """One line for a benchmark's header: the host's model and vector features, and the target if emulated."""
    flags = host_flags()
    vec = sorted(f for f in flags if f.startswith(("avx", "fma", "amx")))
    avx512 = [f for f in vec if f.startswith("avx512")]
    shown = [f for f in vec if not f.startswith("avx512")] + (
        ["avx512 (" + " ".join(f.removeprefix("avx512") for f in avx512) + ")"] if avx512 else [])
    line = f"{host_model()}, {os.cpu_count()} cores; {' '.join(shown) or 'no AVX'}"
    cpu = target_cpu()
    if cpu.emulated:
        line += f"; EMULATED {cpu.describe()}: pcpc compiled with {ENV}={cpu.name}"
        if os.environ.get("ATEN_CPU_CAPABILITY"):
            line += f", torch with ATEN_CPU_CAPABILITY={os.environ['ATEN_CPU_CAPABILITY']}"
    return line


# What makes torch (the peer in bench/) run at a CPU class below the host's: ATen's vectorized kernels,
# oneDNN and MKL each pick their instruction set at start, so these must be set before torch is imported.
TORCH_ENV = {
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
    "baseline": {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
}


def match_torch() -> dict[str, str]:
    """Make torch in this process (and its children) use the instruction-set class of target_cpu(), so a
    benchmark with PCPC_CPU=znver3 on an AVX-512 host compares AVX2 with AVX2. Returns what it set; a
    variable the caller already set is kept. Must run before torch is imported."""
    cpu = target_cpu()
    env = TORCH_ENV.get(cpu.isa, {}) if cpu.emulated else {}
    if env:
        # each instruction-set class gets its own torch.compile kernel cache: with one cache shared by emulated
        # and host runs, bench/train_step.py on the host aborted twice inside a cached kernel (heap corruption)
        # and ran clean with a fresh cache
        import getpass
        import tempfile

        env = {**env, "TORCHINDUCTOR_CACHE_DIR": os.path.join(tempfile.gettempdir(),
                                                              f"torchinductor_{getpass.getuser()}_{cpu.isa}")}
    todo = {k: v for k, v in env.items() if k not in os.environ}
    if todo and "torch" in sys.modules:
        raise RuntimeError(f"{ENV}={cpu.name}: set the torch instruction-set variables before importing torch")
    os.environ.update(todo)
    return todo
