"""The llvm-cpu target CPU: this host by default, a named CPU with PCPC_CPU (how an AVX-512 host builds and
measures what an AVX2 host gets), and torch matched to it in the benchmarks."""

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_target
from pcpc.errors import UserError
from pcpc.mlir import cpu
from pcpc.mlir.build import build
from pcpc.mlir.compile import compile_flags
from pcpc.mlir.signature import load_meta
from pcpc.runtime.module import CompiledModule


def test_host_by_default(monkeypatch):
    monkeypatch.delenv(cpu.ENV, raising=False)
    target = cpu.target_cpu()
    assert target.name == "host" and not target.emulated
    flags = cpu.host_flags()
    assert target.isa == ("avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "baseline")
    assert "--iree-llvmcpu-target-cpu=host" in compile_flags("llvm-cpu")


@pytest.mark.parametrize("name, isa, bf16", [("znver3", "avx2", False), ("haswell", "avx2", False),
                                             ("znver4", "avx512", True), ("skylake-avx512", "avx512", False),
                                             ("x86-64", "baseline", False)])
def test_named_cpu(monkeypatch, name, isa, bf16):
    monkeypatch.setenv(cpu.ENV, name)
    target = cpu.target_cpu()
    assert (target.name, target.isa, target.bf16, target.emulated) == (name, isa, bf16, True)
    assert f"--iree-llvmcpu-target-cpu={name}" in compile_flags("llvm-cpu")
    assert f"EMULATED {name}" in cpu.summary()


def test_unknown_cpu_names_the_variable_and_the_valid_names(monkeypatch):
    monkeypatch.setenv(cpu.ENV, "zen9")
    with pytest.raises(UserError, match=r"PCPC_CPU='zen9': not a known CPU; valid: host, .*znver3"):
        compile_flags("llvm-cpu")


def test_match_torch_sets_the_isa_before_torch_starts():
    """In a fresh process: PCPC_CPU=znver3 makes torch's ATen, oneDNN and MKL run AVX2; a variable the user set
    is kept; on the host nothing is set."""
    script = ("from pcpc.mlir import cpu; set_ = cpu.match_torch(); import torch; "
              "print(sorted(set_), torch.backends.cpu.get_cpu_capability())")
    env = {k: v for k, v in os.environ.items() if k not in cpu.TORCH_ENV["avx2"] and k != "TORCHINDUCTOR_CACHE_DIR"}

    def run(**extra):
        out = subprocess.run([sys.executable, "-c", script], env={**env, **extra}, capture_output=True, text=True,
                             check=True)
        return out.stdout.strip()

    assert run(PCPC_CPU="znver3") == ("['ATEN_CPU_CAPABILITY', 'MKL_ENABLE_INSTRUCTIONS', 'ONEDNN_MAX_CPU_ISA', "
                                      "'TORCHINDUCTOR_CACHE_DIR'] AVX2")  # torch.compile's cache apart too
    assert run(PCPC_CPU="znver3", ATEN_CPU_CAPABILITY="default").startswith("['MKL_ENABLE_INSTRUCTIONS', 'ONEDNN")
    assert run().startswith("[] ")


def test_a_module_built_for_an_avx2_cpu_is_cached_apart_and_computes_the_same(tmp_path, monkeypatch):
    """x86-64-v3 (AVX2 + FMA) runs on every host pcpc supports. Changing PCPC_CPU recompiles (the flags are
    in the compile key) without re-exporting, and the module gives the host build's loss."""
    monkeypatch.delenv(cpu.ENV, raising=False)
    host = build(tiny_target(), tmp_path)
    monkeypatch.setenv(cpu.ENV, "x86-64-v3")
    avx2 = build(tiny_target(), tmp_path / "avx2")
    assert "--iree-llvmcpu-target-cpu=x86-64-v3" in load_meta(avx2.meta).provenance.compile_flags
    again = build(tiny_target(), tmp_path)  # the host build's directory, now with PCPC_CPU set
    assert again.ran == ["compile"]

    rng = np.random.default_rng(0)
    sig = load_meta(host.meta).functions["forward_loss"]
    args = [rng.integers(0, 8, s.shape).astype(s.dtype) if "int" in s.dtype
            else (0.02 * rng.standard_normal(s.shape)).astype(s.dtype) for s in sig.args]
    losses = [CompiledModule(r.vmfb).call_host("forward_loss", *args)[0] for r in (host, avx2)]
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_training_modules_get_the_flags_measured_for_their_instruction_set(monkeypatch):
    from pcpc.mlir.compile import (ADAPTER_TRAINING_CPU_FLAGS, AVX2_TRAINING_FLAGS, RL_TRAINING_CPU_FLAGS,
                                   TRAINING_CPU_FLAGS, isa_flags)

    monkeypatch.setenv(cpu.ENV, "znver3")
    assert isa_flags(TRAINING_CPU_FLAGS) == (*TRAINING_CPU_FLAGS, *AVX2_TRAINING_FLAGS)
    assert isa_flags(RL_TRAINING_CPU_FLAGS) == (*RL_TRAINING_CPU_FLAGS, *AVX2_TRAINING_FLAGS)  # data-tiled too
    assert isa_flags(ADAPTER_TRAINING_CPU_FLAGS) == ADAPTER_TRAINING_CPU_FLAGS  # not data-tiled
    assert isa_flags(()) == ()
    monkeypatch.setenv(cpu.ENV, "znver4")
    assert isa_flags(TRAINING_CPU_FLAGS) == TRAINING_CPU_FLAGS


def test_bf16_module_for_a_cpu_without_avx512_bf16_warns(monkeypatch):
    """bf16 matmuls are emulated without avx512_bf16 (10x slower decode, measured): building one says so."""
    from pcpc.mlir.build import bf16_warning
    from pcpc.mlir.targets import get_target, rl_target

    bf16, fp32 = get_target("qwen-generation-resident-bf16"), get_target("qwen-generation-resident")
    monkeypatch.setenv(cpu.ENV, "znver3")
    warning = bf16_warning(bf16, "llvm-cpu")
    assert warning and "qwen-generation-resident-bf16" in warning and "znver3" in warning and "float32" in warning
    assert bf16_warning(tiny_target(compute_dtype="bfloat16"), "llvm-cpu")  # nanoGPT's compute_dtype
    assert bf16_warning(rl_target("rl-bf16", "qwen2-tiny", batch_size=2, seq_len=8, compute_dtype="bfloat16"),
                        "llvm-cpu")  # the RL learner's
    assert bf16_warning(fp32, "llvm-cpu") is None and bf16_warning(bf16, "cuda") is None
    monkeypatch.setenv(cpu.ENV, "znver4")  # avx512_bf16
    assert bf16_warning(bf16, "llvm-cpu") is None
