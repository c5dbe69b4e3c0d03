"""Compile targets and flags for iree-compile.

`llvm-cpu` compiles for this host's CPU (`--iree-llvmcpu-target-cpu=host`,
2-3x faster than the generic target), or for the CPU named by $PCPC_CPU
(pcpc.mlir.cpu); such a module is not portable, so the host CPU feature set
is part of the cache key. `cuda`, `rocm` and `vulkan` are selectable with
their architecture flags.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile
from pathlib import Path

from pcpc.errors import UserError
from pcpc.mlir.cpu import target_cpu

# Flags common to every llvm-cpu build (with the target CPU's, llvm_cpu_flags). Measured in bench/NOTES.md.
LLVM_CPU_FLAGS = ("--iree-hal-target-backends=llvm-cpu",)

DATA_TILING = "--iree-global-opt-data-tiling"
"""Data tiling (mmt4d operand layouts) through IREE's global-optimization path. The path that
`--iree-opt-data-tiling` picks in IREE 3.13 (dispatch creation) miscompiles a batch matmul whose
narrow, padded operand comes from a fused elementwise producer through a reshape: Qwen2.5-0.5B
decode (RoPE'd queries, 7 heads per KV head) got the second KV group's attention wrong, rel.
error 4e-2 (tests/test_qwen_compiled.py: the gqa-tied case has 14 / 2 heads). Same speed on the
benchmarked modules."""

PACKED_SCOPE = "packed"
"""Parameter scope of the weights a PACK_AT_EXPORT module reads already packed."""
PACK_AT_EXPORT = ("--iree-parameter-encoder-mode=overlay", f"--iree-parameter-encoder-output-scope={PACKED_SCOPE}")
"""For modules whose weights are parameter-backed globals and data-tiled: split the packing of the weights
out into a separate encoder module (NAME.encoder.vmfb, see compile_mlir). pcpc runs it once per weight
file (pcpc.runtime.pack) and the module maps the packed weights from that file instead of loading and
packing them on every start, which held the loaded and the packed weights at once (2.07x the weight bytes
at Qwen2.5-0.5B fp32; 1.25x with the packed file, bench/generate.py)."""

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

AVX2_TRAINING_FLAGS = ("--iree-llvmcpu-enable-ukernels=mmt4d",)
"""Added to a training module (TRAINING_CPU_FLAGS, data-tiled) compiled for an AVX2 CPU (pcpc.mlir.cpu):
IREE's mmt4d microkernel instead of the generated tile loop. With PCPC_CPU=znver3 on a Zen 5 host the
nanoGPT-medium train step took 1553 CPU ms instead of 1764 (small: the same); on AVX-512 it made no gain
(bench/NOTES.md, attempt 4)."""


def isa_flags(flags: tuple[str, ...]) -> tuple[str, ...]:
    """`flags` (a target's llvm-cpu flags) plus those measured best for the target CPU's instruction set."""
    if target_cpu().isa == "avx2" and set(TRAINING_CPU_FLAGS) <= set(flags):
        return (*flags, *AVX2_TRAINING_FLAGS)
    return tuple(flags)


def exact_fp_flags() -> tuple[str, ...]:
    """llvm-cpu flags under which each fp32 multiply and add rounds once, as eager torch's ops do: on x86 the
    target's instruction set without FMA (x86-64-v3, i.e. AVX2, or x86-64-v2 below it). LLVM contracts
    a * b + c into a fused multiply-add wherever the target has one, and iree-compile has no switch for it
    (an FMA rounds once where torch rounds twice: AdamW's moments differed from torch in ~30% of entries).
    For memory-bound code (the sparse step) the narrower vectors cost nothing measurable (bench/NOTES.md).
    Elsewhere (aarch64) there is no such target and contraction stays."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ()
    cpu = "x86-64-v2" if target_cpu().isa == "baseline" else "x86-64-v3"
    return (f"--iree-llvmcpu-target-cpu={cpu}", "--iree-llvmcpu-target-cpu-features=-fma")


ADAPTER_TRAINING_CPU_FLAGS = ("--iree-opt-data-tiling=false", *(f for f in TRAINING_CPU_FLAGS if f != DATA_TILING))
"""llvm-cpu flags for adapter training modules (a `peft` recipe): TRAINING_CPU_FLAGS without data tiling. Their
backward has no weight-gradient matmuls (the base is frozen), the one thing data tiling speeds up, while it
re-packs every frozen base weight on every call: at Qwen2.5-0.5B with LoRA r 16 the GRPO gradient call ran
~2x faster without it and the 3.4 GB of packed copies it held during the call went away (bench/peft.py)."""

RL_TRAINING_CPU_FLAGS = (*TRAINING_CPU_FLAGS, "--iree-dispatch-creation-fuse-multi-use=false")
"""llvm-cpu flags for full fine-tuning RL modules (mlir/targets.py rl_target): TRAINING_CPU_FLAGS, and IREE
may not fuse an elementwise op that has several users into one of them. With it, IREE fused the backward's
packing of a normed activation (for its weight gradient) into the forward's dispatch; that dispatch then
sits where the backward needs it, every forward op after it moves down with it, and the weight packs, which
depend on the arguments alone, run up front and stay live: at Qwen2.5-0.5B with a group's prompt computed
once (recipe shared_prefix) IREE's transient memory was 3.96 GB, 1.85 GB without the fusion (per-row
module 2.25 → 2.00 GB). GRPO learner step (bench/grpo.py --shapes 0.5b, 4 x 48 tokens, Zen 4, three
alternating rounds): 4.117 / 4.176 / 4.180 s with, 4.534 / 4.152 / 3.984 s without; peak RSS 14.87-15.95
→ 12.77 GB (bench/NOTES.md, "IREE's transient memory in the RL learner")."""

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
    cap = out.stdout.split()[0] if out.returncode == 0 and out.stdout.strip() else ""
    return "sm_" + cap.replace(".", "") if re.fullmatch(r"\d+\.\d+", cap) else None


# Highest CUDA architecture iree-base-compiler 3.13 has target details for: sm_90 and
# newer fail with "missing GPU target" (iree-org/iree#22147). PTX is forward
# compatible, so a newer GPU, detected or named by --arch, gets sm_89 PTX, which its
# driver JIT-compiles.
NEWEST_CUDA_ARCH = 89
_CUDA_ARCH = re.compile(r"sm_(\d+)a?")


def _compilable_cuda_arch(arch: str | None) -> str | None:
    if arch is None:
        return None
    m = _CUDA_ARCH.fullmatch(arch)
    if m is None:
        raise UserError(f"--arch: expected a CUDA architecture such as sm_80 or sm_90 for --target cuda, got {arch!r}")
    return arch if int(m.group(1)) <= NEWEST_CUDA_ARCH else f"sm_{NEWEST_CUDA_ARCH}"


def compile_flags(target: str = "llvm-cpu", arch: str | None = None) -> tuple[str, ...]:
    """iree-compile flags for `target` (and GPU architecture `arch`, detected or defaulted)."""
    if target not in TARGETS:
        raise UserError(f"--target: unknown target {target!r}; valid: {', '.join(TARGETS)}")
    if target == "llvm-cpu":
        return (*LLVM_CPU_FLAGS, f"--iree-llvmcpu-target-cpu={target_cpu().name}")
    if target == "cuda":
        arch = _compilable_cuda_arch(arch or detect_cuda_arch()) or DEFAULT_ARCH["cuda"]
        return ("--iree-hal-target-backends=cuda", f"--iree-cuda-target={arch}")
    if target == "rocm":
        return ("--iree-hal-target-backends=rocm", f"--iree-rocm-target={arch or DEFAULT_ARCH['rocm']}")
    return ("--iree-hal-target-backends=vulkan-spirv", f"--iree-vulkan-target={arch or _vulkan_arch()}")


def _vulkan_arch() -> str:
    """IREE's Vulkan target for this machine's GPU: an NVIDIA one by its generation (nvidia-smi; "ampere"
    ran nanoGPT's train step on an H200), else DEFAULT_ARCH's (AMD RDNA3)."""
    detected = detect_cuda_arch()
    if detected is None:
        return DEFAULT_ARCH["vulkan"]
    return "ampere" if int(detected.removeprefix("sm_").rstrip("a") or 0) >= 80 else "turing"


def iree_compile_exe() -> str:
    """Path of the iree-compile tool that belongs to the installed iree-base-compiler."""
    from iree.compiler.tools.binaries import find_tool

    return find_tool("iree-compile")


SKIP_VERIFIER = "--verify=false"
"""iree-compile checks the whole module's IR after every pass by default; the input is still verified when it is
parsed. Without the checks the same modules compile 1.5-1.8x faster, byte for byte the same VMFB (nanogpt-small,
nanogpt-medium, qwen-generation, qwen-tiny-grpo; bench/NOTES.md). A compile that fails runs again with them, so
an error names the pass that broke the IR. Not part of the flags a build records: it changes no output."""


def _iree_compile(src: Path, out: Path, flags) -> None:
    def run(*extra):
        cmd = [iree_compile_exe(), str(src), *flags, *extra, "-o", str(out)]
        return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})

    if run(SKIP_VERIFIER).returncode == 0:
        return
    proc = run()
    if proc.returncode != 0:
        raise UserError(compile_failure(src, flags, proc.stderr, proc.returncode), details=proc.stderr)


def compile_failure(src: Path, flags, stderr: str, code: int) -> str:
    """One line on a failed iree-compile: the target flags and the compiler's first error (the whole
    output goes into the error's details, which --debug prints)."""
    target = " ".join(f for f in flags if f.startswith(("--iree-hal-target-backends=", "--iree-cuda-target=",
                                                        "--iree-rocm-target=", "--iree-vulkan-target=")))
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else f"exit status {code}")
    first = re.sub(r"^\S*?(\.mlir)?:\d+(:\d+)?: ", "", first)  # file:line:col, or <unknown>:0
    return (f"iree-compile could not compile {src.name} for {target or 'its target'}: {first[:300]} "
            f"(pcpc --debug shows the compiler's output)")


def packs_at_export(flags) -> bool:
    """True when `flags` ask for a parameter encoder (PACK_AT_EXPORT)."""
    return any(f.startswith("--iree-parameter-encoder-output-scope=") for f in flags)


def compile_mlir(mlir_path: Path, vmfb_path: Path, flags: tuple[str, ...], encoder_path: Path | None = None) -> None:
    """Run iree-compile MLIR -> VMFB. The caller handles atomic placement of vmfb_path.

    With PACK_AT_EXPORT in `flags`, also writes the parameter encoder module to `encoder_path`, in three
    runs: to the end of global optimization (where data tiling has hoisted each weight's packing into
    an initializer of its own global); merge the globals whose initializers are identical (prefill's
    and decode's packings of one weight: IREE keeps both when it splits out an encoder, ~2x the
    weight bytes); then the rest, splitting the packing into the encoder module; compile that module.
    """
    if not packs_at_export(flags):
        if not mutates_arguments(mlir_path):
            _iree_compile(mlir_path, vmfb_path, flags)
            return
        with tempfile.TemporaryDirectory(dir=vmfb_path.parent, prefix=".inplace-") as tmp:
            tmp = Path(tmp)
            _iree_compile(mlir_path, tmp / "input.mlir", (*flags, "--compile-to=input"))
            text, _ = alias_barriers((tmp / "input.mlir").read_text())
            (tmp / "aliased.mlir").write_text(text)
            _iree_compile(tmp / "aliased.mlir", vmfb_path, (*flags, "--compile-from=input"))
        return
    if encoder_path is None:
        raise ValueError("compile_mlir: these flags write a parameter encoder; pass encoder_path")
    base = tuple(f for f in flags if not f.startswith("--iree-parameter-encoder-"))
    with tempfile.TemporaryDirectory(dir=vmfb_path.parent, prefix=".encoder-") as tmp:
        tmp = Path(tmp)
        _iree_compile(mlir_path, tmp / "global-opt.mlir", (*base, "--compile-to=global-optimization"))
        merged, _ = merge_identical_globals((tmp / "global-opt.mlir").read_text())
        (tmp / "merged.mlir").write_text(merged)
        _iree_compile(tmp / "merged.mlir", vmfb_path, (*flags, "--compile-from=global-optimization",
                                                         f"--iree-parameter-encoder-output-file={tmp / 'encoder.mlir'}"))
        _iree_compile(tmp / "encoder.mlir", encoder_path, base)


IN_PLACE_MARK = b"torch.overwrite.tensor.contents"
"""How torch-mlir marks a function that writes into an argument (pcpc.mlir.lower: an "inplace" spec)."""


def mutates_arguments(mlir_path: Path) -> bool:
    """True when some function of the MLIR file writes into one of its arguments."""
    tail = b""
    with open(mlir_path, "rb") as f:
        while chunk := f.read(1 << 24):
            if IN_PLACE_MARK in tail + chunk:
                return True
            tail = chunk[-len(IN_PLACE_MARK):]
    return False


_BARRIER = re.compile(r"^(\s*)(%[\w]+)(?::(\d+))? = hal\.tensor\.barrier join\((.*) : (.*)\) => (%[\w]+) : !hal\.fence\s*$")
_ALIAS = re.compile(r"^\s*(%[\w]+) = hal\.tensor\.alias ")
_STATIC_TENSOR = re.compile(r"^tensor<((?:\d+x)+)(\w+)>$")


def _split_top(s: str) -> list[str]:
    """`a, tensor<1x2xf32>, b` split at the commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in s:
        depth += ch in "<([" and 1 or (-1 if ch in ">)]" else 0)
        if ch == "," and depth == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return out + [cur.strip()]


def alias_barriers(text: str) -> tuple[str, int]:
    """Let an in-place function write its argument without a copy of it: in the IR at the end of the input
    phase, each `hal.tensor.barrier` that joins an argument's new value (a `hal.tensor.alias`, how a
    function that writes into an argument ends) joins a one-element slice of that value instead.

    IREE turns every barrier into a copy during allocation (iree-org/iree#19735, "this should be aliasable
    in the future"), so a function that writes K entries into an argument also copied the whole argument
    into a buffer nobody reads: the sparse step's scatter into Qwen2.5-0.5B's embedding (544 MB, 0.25% of
    it written) took 154 ms, 4.5 ms after this rewrite, the argument written in place either way. The
    slice depends on the written value, so the fence still signals after the write. A barrier whose
    aliased result is used later, or of a dynamic or 0-d tensor, is left as it is. Returns (text, slices)."""
    lines = text.split("\n")
    aliased, out, made = set(), [], 0
    for i, line in enumerate(lines):
        m = _ALIAS.match(line)
        if m:
            aliased.add(m.group(1))
        m = _BARRIER.match(line)
        if not m:
            out.append(line)
            continue
        indent, res, count, vals, types, fence = m.groups()
        vals, types = _split_top(vals), _split_top(types)
        end = next((k for k in range(i + 1, len(lines)) if lines[k] == "  }"), len(lines))
        rest = "\n".join(lines[i + 1:end]) if any(v in aliased for v in vals) else ""  # this function's
        pre, new_vals, new_types = [], [], []
        for j, (v, t) in enumerate(zip(vals, types)):
            shape = _STATIC_TENSOR.match(t)
            ref = f"{res}#{j}" if count else res
            if v not in aliased or shape is None or re.search(re.escape(ref) + r"(?![\w#])", rest):
                new_vals.append(v)
                new_types.append(t)
                continue
            rank = shape.group(1).count("x")
            zeros, ones = ", ".join(["0"] * rank), ", ".join(["1"] * rank)
            one = "tensor<" + "1x" * rank + shape.group(2) + ">"
            name = f"%__pcpc_written{made}"
            made += 1
            pre.append(f"{indent}{name} = tensor.extract_slice {v}[{zeros}] [{ones}] [{ones}] : {t} to {one}")
            new_vals.append(name)
            new_types.append(one)
        out.extend(pre)
        out.append(f"{indent}{res}{':' + count if count else ''} = hal.tensor.barrier join({', '.join(new_vals)} : "
                   f"{', '.join(new_types)}) => {fence} : !hal.fence" if pre else line)
    return "\n".join(out), made


_GLOBAL_DECL = re.compile(r"^  util\.global private @(\S+) .*: tensor<")


def merge_identical_globals(text: str) -> tuple[str, int]:
    """Drop each tensor global whose initializer (the block right after its declaration) is identical to an
    earlier one's up to the global's own name, and point its uses at the earlier global.

    Works on the textual IR iree-compile prints at the end of global optimization; returns the new
    text and the number of globals merged.
    """
    lines = text.split("\n")
    out, seen, rename, i = [], {}, {}, 0
    while i < len(lines):
        m = _GLOBAL_DECL.match(lines[i])
        if m and i + 1 < len(lines) and lines[i + 1].startswith("  util.initializer"):
            end = lines.index("  }", i + 1)
            name = m.group(1)
            key = re.sub("@" + re.escape(name) + r"(?![\w$.])", "@SELF", "\n".join(lines[i:end + 1]))
            if key in seen:
                rename[name] = seen[key]
            else:
                seen[key] = name
                out.extend(lines[i:end + 1])
            i = end + 1
            continue
        out.append(lines[i])
        i += 1
    merged = "\n".join(out)
    if rename:
        uses = re.compile("@(" + "|".join(re.escape(n) for n in sorted(rename, key=len, reverse=True)) + r")(?![\w$.])")
        merged = uses.sub(lambda u: "@" + rename[u.group(1)], merged)
    return merged, len(rename)
