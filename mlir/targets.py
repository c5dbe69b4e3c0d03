"""Named build targets (`pcpc build NAME`, `make NAME.vmfb`).

Pure data: listing targets and checking that one is up to date never imports
torch. Other targets are made on the fly (e.g. by `pcpc run` for a config's
batch size) with `nanogpt_target`.
"""

from __future__ import annotations

from pcpc.errors import UserError
from pcpc.mlir.build import Target
from pcpc.mlir.compile import (ADAPTER_TRAINING_CPU_FLAGS, DATA_TILING, PACK_AT_EXPORT, RL_TRAINING_CPU_FLAGS,
                               TRAINING_CPU_FLAGS, exact_fp_flags)

NANOGPT_RECIPE = "pcpc.mlir.nanogpt_functions:build"
NANOGPT_SOURCES = (
    "pcpc.exporters.nanogpt",
    "pcpc.exporters.precision",
    "pcpc.autodiff.derive",
    "pcpc.autodiff.losses",
    "pcpc.autodiff.optim",
    "pcpc.mlir.lower",
    "pcpc.mlir.nanogpt_functions",
)


def nanogpt_target(
    name: str,
    model: str,
    batch_size: int,
    eval_batch_size: int | None = None,
    model_overrides: dict | None = None,
    optimizer: dict | None = None,
    functions: list[str] | None = None,
    peft: dict | None = None,
) -> Target:
    """A nanoGPT training module: train_step, eval, outer step and sampling functions; with `peft` (an
    exporters/peft.py module section) an adapter's, on a frozen base (ADAPTER_TRAINING_CPU_FLAGS, as
    rl_target)."""
    config = {
        "model": model,
        "model_overrides": dict(model_overrides or {}),
        "batch_size": batch_size,
        "eval_batch_size": eval_batch_size or batch_size,
        "optimizer": dict(optimizer or {}),
    }
    if functions is not None:
        config["functions"] = list(functions)
    if peft is not None:
        config["peft"] = dict(peft)
    what = f"{model} {peft['type']} adapter" if peft else model
    sources = NANOGPT_SOURCES + (("pcpc.exporters.peft",) if peft else ())
    return Target(name, NANOGPT_RECIPE, config, sources, f"{what} training module (batch {batch_size})",
                  ADAPTER_TRAINING_CPU_FLAGS if peft else TRAINING_CPU_FLAGS)


QWEN_RECIPE = "pcpc.mlir.qwen_functions:build"
_QWEN_REDUCTIONS = ("--iree-llvmcpu-reassociate-fp-reductions", "--iree-llvmcpu-use-fast-min-max-ops")
QWEN_CPU_FLAGS = ("--iree-opt-data-tiling=false", *_QWEN_REDUCTIONS)
"""Weights are call arguments: data tiling would re-pack every weight on every call (decode
10x slower, a weight-sized allocation per call; bench/NOTES_generate.md). Vectorized
RMSNorm/softmax reductions as in the benchmarked build."""
RESIDENT_CPU_FLAGS = (DATA_TILING, *_QWEN_REDUCTIONS, *PACK_AT_EXPORT)
"""Weights are module parameters, data-tiled; packed once per weight file by the module's encoder."""
RESIDENT_BF16_CPU_FLAGS = (*RESIDENT_CPU_FLAGS, "--iree-llvmcpu-enable-ukernels=mmt4d")
"""bf16 weights: IREE's mmt4d microkernel (avx512_bf16 dot products) decodes ~5% faster than the generated
code (alternating A/B at 0.5B: 39.0 / 45.3 / 38.3 vs 34.3 / 43.2 / 36.6 tok/s); for fp32 it is no faster."""


SHORT_CACHE = 256
"""KV-cache capacity the generation modules export besides max_seq (prefill_bs{B}_kv256 / decode_bs{B}_kv256):
decode reads and rewrites its whole cache every step, and a generation that fits (a 128-token prompt + 64
new tokens) decodes ~4% faster on it at Qwen2.5-0.5B than on 1024 slots (bench/NOTES_generate.md)."""


def resident_cpu_flags(dtype: str) -> tuple[str, ...]:
    return RESIDENT_BF16_CPU_FLAGS if dtype == "bfloat16" else RESIDENT_CPU_FLAGS
QWEN_SOURCES = (
    "pcpc.exporters.qwen2",
    "pcpc.exporters.precision",
    "pcpc.autodiff.derive",
    "pcpc.mlir.lower",
    "pcpc.mlir.qwen_functions",
)


def qwen_target(name: str, model: str | None = None, hf_config: dict | None = None,
                llvm_cpu_flags: tuple[str, ...] = QWEN_CPU_FLAGS, **recipe) -> Target:
    """A Qwen2 module (prefill_bs{B} / decode_bs{B} / forward_loss); recipe keys: mlir/qwen_functions.py."""
    config = {"model": model} if hf_config is None else {"hf_config": dict(hf_config)}
    config.update(recipe)
    what = model or "Qwen2 (config.json)"
    fns = ", ".join(config.get("functions", ["prefill", "decode"]))
    where = ", weights as module parameters" if config.get("resident") else ""
    return Target(name, QWEN_RECIPE, config, QWEN_SOURCES,
                  f"{what} {config.get('dtype', 'float32')} {fns}, batch {config.get('batch_sizes', [1])}{where}",
                  tuple(llvm_cpu_flags))


RL_RECIPE = "pcpc.mlir.rl_functions:build"
RL_SOURCES = QWEN_SOURCES + (
    "pcpc.autodiff.grpo",
    "pcpc.autodiff.dpo",
    "pcpc.autodiff.optim",
    "pcpc.exporters.peft",
    "pcpc.mlir.rl_functions",
)
GRPO_FUNCTIONS = ["token_logprobs", "grpo_value_and_grad", "grad_clip_coef", "adamw", "outer"]
DPO_FUNCTIONS = ["sequence_logps", "dpo_value_and_grad", "grad_clip_coef", "adamw"]


def rl_target(name: str, model: str | None = None, hf_config: dict | None = None, **recipe) -> Target:
    """A Qwen2 GRPO / DPO training module; recipe keys: mlir/rl_functions.py.

    Compiled with RL_TRAINING_CPU_FLAGS: at the 0.5B shape the GRPO step (forward, backward, AdamW) ran
    1.25-1.4x faster with data tiling than without, at the same peak memory (bench/grpo.py, learner step),
    and 2.1 GB lower in peak memory at the same speed without IREE's multi-use fusion.
    An adapter module (a `peft` recipe) is compiled without data tiling: ADAPTER_TRAINING_CPU_FLAGS.
    """
    config = {"model": model} if hf_config is None else {"hf_config": dict(hf_config)}
    config.update(recipe)
    what = model or "Qwen2 (config.json)"
    fns = ", ".join(config.get("functions", ["all RL functions"]))
    return Target(name, RL_RECIPE, config, RL_SOURCES,
                  f"{what} {fns}, batch {config.get('batch_size')} x {config.get('seq_len')} tokens",
                  ADAPTER_TRAINING_CPU_FLAGS if config.get("peft") else RL_TRAINING_CPU_FLAGS)


OPTIMIZER_CPU_FLAGS = ("--iree-opt-data-tiling=false", "--iree-dispatch-creation-enable-aggressive-fusion")
"""The in-place AdamW module: aggressive fusion makes each tensor's update one dispatch (reading p, g, m, v once
and writing p, m, v in place); without it IREE computes m' and v' in one dispatch and p' in a second that reads
them, so the in-place results went through a transient and two copies. Over the 151936 x 896 embedding, 2
threads: 118 ms, against 474 ms for the training module's adamw_K returning new buffers (torch's fused AdamW:
110 ms). Not for the training modules: it fails to compile nanoGPT's train step (bench/NOTES.md)."""


def optimizer_target(train: Target) -> Target:
    """The in-place AdamW of an RL training target (its adamw_inplace_K functions, mlir/rl_functions.py), as a
    module of its own: compiled with OPTIMIZER_CPU_FLAGS, which the training functions must not get."""
    config = {k: v for k, v in train.config.items() if k not in ("functions", "shared_prefix", "completion_len",
                                                                     "compute_dtype")}
    return Target(f"{train.name}-adamw", RL_RECIPE, {**config, "functions": ["adamw_inplace"]}, RL_SOURCES,
                  "AdamW in place, chunk by chunk", OPTIMIZER_CPU_FLAGS)


REFERENCE_CPU_FLAGS = (*RL_TRAINING_CPU_FLAGS, *PACK_AT_EXPORT)
"""The frozen reference's module: the training module's flags (the same numerics), its weights packed once per
weight file by the module's encoder (pcpc.runtime.pack) instead of on every call."""


def reference_target(train: Target) -> Target:
    """The frozen reference model of a full fine-tuning RL target: its token_logprobs (GRPO) or sequence_logps
    (DPO), with the weights as parameter-backed globals read from the run's weight file (`resident`). A GRPO
    step calls it once; with the weights as call arguments, IREE re-packed all of them on every call."""
    functions = [f for f in train.config.get("functions", []) if f in ("token_logprobs", "sequence_logps")]
    config = {k: v for k, v in train.config.items() if k not in ("functions", "optimizer")}
    return Target(f"{train.name}-ref", RL_RECIPE, {**config, "functions": functions or ["token_logprobs"],
                                                    "resident": True}, RL_SOURCES,
                  "the frozen reference, weights as module parameters", REFERENCE_CPU_FLAGS)


SPARSE_RECIPE = "pcpc.mlir.sparse_functions:build"
SPARSE_SOURCES = ("pcpc.autodiff.optim", "pcpc.kernels.sparse", "pcpc.mlir.lower", "pcpc.mlir.sparse_functions")


def sparse_target(name: str, groups: list, optimizer: dict | None = None) -> Target:
    """The sparse AdamW step of a mask's layout (mlir/sparse_functions.py): in place, O(nnz)."""
    config = {"groups": [[list(shape), int(k), bool(decay), int(count)] for shape, k, decay, count in groups],
              "optimizer": dict(optimizer or {})}
    return Target(name, SPARSE_RECIPE, config, SPARSE_SOURCES,
                  f"sparse AdamW step, {len(groups)} tensor kinds", (*QWEN_CPU_FLAGS, *exact_fp_flags()))


def _registry() -> dict[str, Target]:
    targets = [
        nanogpt_target("nanogpt-small", "nanogpt-small", batch_size=64),
        nanogpt_target("nanogpt-medium", "nanogpt-medium", batch_size=32),
        qwen_target("qwen-generation", "qwen2.5-0.5b", batch_sizes=[1], prefill_len=128, max_seq=1024,
                    cache_sizes=[SHORT_CACHE]),
        qwen_target("qwen-generation-bf16", "qwen2.5-0.5b", dtype="bfloat16", batch_sizes=[1], prefill_len=128,
                    max_seq=1024, cache_sizes=[SHORT_CACHE]),
        # Same functions with the weights as parameter-backed module globals, loaded once from the
        # flat weight file: data tiling then packs them once at load instead of on every call
        # (bf16 decode 2.4x the fp32 contract module; bench/NOTES_generate.md).
        qwen_target("qwen-generation-resident", "qwen2.5-0.5b", batch_sizes=[1], prefill_len=128, max_seq=1024,
                    cache_sizes=[SHORT_CACHE], resident=True, llvm_cpu_flags=RESIDENT_CPU_FLAGS),
        qwen_target("qwen-generation-resident-bf16", "qwen2.5-0.5b", dtype="bfloat16", batch_sizes=[1],
                    prefill_len=128, max_seq=1024, cache_sizes=[SHORT_CACHE], resident=True,
                    llvm_cpu_flags=RESIDENT_BF16_CPU_FLAGS),
        qwen_target("qwen-tiny", "qwen2-tiny", batch_sizes=[1, 2], prefill_len=8, max_seq=64,
                    functions=["prefill", "decode", "forward_loss"], loss_batch_size=2, loss_seq_len=16),
        # GRPO learner of experiments/qwen_rl_test.json: 1 prompt x group 4, 16 prompt + 128 completion tokens.
        rl_target("qwen-grpo-training", "qwen2.5-0.5b", batch_size=4, seq_len=144, completion_len=128,
                  functions=GRPO_FUNCTIONS),
        rl_target("qwen-tiny-grpo", "qwen2-tiny", batch_size=4, seq_len=32, functions=GRPO_FUNCTIONS),
        rl_target("qwen-tiny-dpo", "qwen2-tiny", batch_size=4, seq_len=32, functions=DPO_FUNCTIONS),
    ]
    return {t.name: t for t in targets}


TARGETS = _registry()


def get_target(name: str) -> Target:
    """The registered target called `name` (a trailing .vmfb is allowed)."""
    name = name.removesuffix(".vmfb")
    if name not in TARGETS:
        raise UserError(f"unknown build target {name!r}; valid: {', '.join(TARGETS)}")
    return TARGETS[name]
