"""The GPU targets end to end: a nanoGPT train step compiled for cuda (and for vulkan) and run on IREE's
driver for it equals torch autograd + torch.optim.AdamW (+ clip_grad_norm_) over three steps, in fp32.

Marked gpu: skipped unless IREE's cuda driver sees an NVIDIA device (and, for vulkan, its vulkan driver too;
the Vulkan target is the one mlir/compile.py picks for the detected NVIDIA GPU). `build_module` and
`check_module` are separate so that the check can also run where the module was not built (a GPU machine
without the compiler).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import torch_adamw_reference
from pcpc.exporters import nanogpt

OVERRIDES = {"n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 32, "vocab_size": 65}
BATCH, STEPS, LR = 4, 3, 6e-4


GPU_TARGETS = ("cuda", "vulkan")
"""Built for the detected GPU (mlir/compile.py: sm_XY for cuda, IREE's Vulkan target for its generation)."""


def device_seen(driver: str) -> bool:
    try:
        import iree.runtime as rt

        return bool(rt.get_driver(driver).query_available_devices())
    except Exception:  # no such driver in this IREE runtime (or its library is missing), or no device
        return False


def build_module(out: Path, target: str = "cuda", arch: str | None = None):
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import nanogpt_target

    module = nanogpt_target("gpu-train", "nanogpt-small", BATCH, model_overrides=OVERRIDES,
                            functions=["train_step"])
    return build(module, out, compile_target=target, arch=arch).vmfb


def check_module(vmfb) -> dict[str, float]:
    """Run the module's train_step on its target's GPU driver; relative errors against the torch reference."""
    from pcpc.mlir.compile import DRIVERS
    from pcpc.runtime.module import CompiledModule, to_host

    cfg = nanogpt.make_config("nanogpt-small", **OVERRIDES)
    params = nanogpt.init_params(cfg, 0)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size), generator=gen),
                torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size), generator=gen)) for _ in range(STEPS)]
    mod = CompiledModule(vmfb)
    assert mod.driver == DRIVERS[mod.meta.provenance.compile_target] != "local-task"
    n = len(params)
    P = mod.upload_all([p.numpy() for p in params.values()])
    M = mod.upload_all([np.zeros(p.shape, np.float32) for p in params.values()])
    V = mod.upload_all([np.zeros(p.shape, np.float32) for p in params.values()])
    losses = []
    for step, (x, y) in enumerate(batches, start=1):
        out = mod("train_step", *P, *M, *V, np.float32(step), np.float32(LR), x.numpy(), y.numpy())
        losses.append(float(to_host(out[0])))
        P, M, V = out[1:1 + n], out[1 + n:1 + 2 * n], out[1 + 2 * n:]
    want_losses, leaves, _ = torch_adamw_reference(params, batches, cfg, LR)
    want_params = np.concatenate([p.detach().numpy().ravel() for p in leaves.values()])
    got_params = np.concatenate([to_host(p).ravel() for p in P])

    def rel(got, want):
        got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
        return float(np.linalg.norm(got - want) / np.linalg.norm(want))

    return {"loss": rel(losses, want_losses), "params": rel(got_params, want_params)}


@pytest.mark.gpu
@pytest.mark.parametrize("target", GPU_TARGETS)
def test_gpu_train_step_equals_torch(target, tmp_path):
    from pcpc.mlir.compile import DRIVERS

    if not device_seen("cuda"):
        pytest.skip("IREE's cuda driver sees no NVIDIA GPU")
    if not device_seen(DRIVERS[target]):
        pytest.skip(f"IREE's {DRIVERS[target]} driver sees no GPU")
    errors = check_module(build_module(tmp_path, target))
    assert errors["loss"] < 1e-5 and errors["params"] < 1e-5, errors
