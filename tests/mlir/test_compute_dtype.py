"""nanoGPT's opt-in bfloat16 compute: eager semantics, the compiled module against eager, bad values."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pcpc.autodiff.losses import cross_entropy
from pcpc.errors import UserError
from pcpc.exporters import nanogpt
from pcpc.mlir.build import build
from pcpc.mlir.targets import nanogpt_target
from pcpc.runtime.module import CompiledModule

BF16 = {"compute_dtype": "bfloat16"}


def _batch(cfg, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    data = torch.randint(0, cfg.vocab_size, (rows, cfg.block_size + 1), generator=g)
    return data[:, :-1].contiguous(), data[:, 1:].contiguous()


def test_float32_is_the_default_and_unchanged():
    cfg = nanogpt.make_config("nanogpt-small")
    assert cfg.compute_dtype == "float32"
    params = nanogpt.init_params(cfg, seed=3)
    h = torch.randn(2, cfg.block_size, cfg.n_embd, generator=torch.Generator().manual_seed(0))
    # The float32 path is plain F.linear: same graph and numbers as before the option existed.
    assert torch.equal(nanogpt._linear(params, "transformer.h.0.attn.c_attn", h, cfg),
                       F.linear(h, params["transformer.h.0.attn.c_attn.weight"]))


def test_bfloat16_rounds_the_weight_matmuls_only():
    cfg32, cfg16 = nanogpt.make_config("nanogpt-small"), nanogpt.make_config("nanogpt-small", **BF16)
    params = nanogpt.init_params(cfg32, seed=1)
    x, _ = _batch(cfg32, 2)
    out32, out16 = nanogpt.forward(params, x, cfg32), nanogpt.forward(params, x, cfg16)
    assert out16.dtype == torch.float32  # activations and logits stay float32
    rel = ((out16 - out32).norm() / out32.norm()).item()
    assert 1e-5 < rel < 2e-2, rel  # rounded (not identical), but only at bf16 precision


def test_compiled_bfloat16_grads_match_eager_bfloat16(tmp_path):
    cfg = nanogpt.make_config("nanogpt-small", **BF16)
    target = nanogpt_target("bf16", "nanogpt-small", 4, model_overrides=BF16, functions=["value_and_grad"])
    built = build(target, tmp_path)
    mod = CompiledModule(built.vmfb)
    # The option reaches the exported graph: its weight matmuls take bf16 operands.
    assert "!torch.vtensor<[128,64],bf16>, !torch.vtensor<[64,192],bf16>" in built.mlir.read_text()
    params = nanogpt.init_params(cfg, seed=2)
    x, y = _batch(cfg, 4, seed=5)
    loss, *grads = mod.call_host("value_and_grad", *[p.numpy() for p in params.values()], x.numpy(), y.numpy())

    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    ref = cross_entropy(nanogpt.forward(leaves, x, cfg), y)
    ref.backward()
    np.testing.assert_allclose(loss, ref.item(), rtol=1e-4)
    got = np.concatenate([g.ravel() for g in grads])
    want = torch.cat([leaves[k].grad.ravel() for k in params]).numpy()
    # Both round matmul operands and products to bf16 and differ in accumulation order, so a
    # product can land one bf16 step (0.4%) apart; measured 1.4e-2 at this tiny batch.
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 3e-2


def test_unknown_compute_dtype_is_an_error_naming_the_field():
    with pytest.raises(UserError, match="compute_dtype must be one of float32, bfloat16; got 'float16'"):
        nanogpt.make_config("nanogpt-small", compute_dtype="float16")
