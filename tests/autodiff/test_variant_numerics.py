"""Compiled modules of the model variants against the eager nn.Module reference (tests/nanogpt_reference.py):
the loss (with the aux and z losses and expert loads of MoE), every gradient, and one clipped AdamW train
step against torch.optim.AdamW on the reference module; relative error < 1e-5 in fp32 (normwise, as in
test_train_numerics.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nanogpt_reference import params_of, reference, rel_err
from pcpc.autodiff.optim import AdamWConfig
from pcpc.exporters import nanogpt
from pcpc.mlir.build import build
from pcpc.mlir.targets import nanogpt_target
from pcpc.runtime.module import CompiledModule, to_host

MOE = {"num_experts": 4, "top_k": 2}
CASES = {
    "llama-style": {"mlp": "swiglu", "norm": "rmsnorm", "positions": "rope"},
    "moe": {"moe": MOE},
    "moe-rope-rmsnorm-swiglu": {"mlp": "swiglu", "norm": "rmsnorm", "positions": "rope", "moe": MOE},
    "moe-every-2-gelu-bias": {"n_layer": 4, "mlp": "gelu", "bias": True, "moe": {**MOE, "every": 2}},
    "moe-capacity-swiglu": {"mlp": "swiglu", "moe": {**MOE, "capacity_factor": 1.0}},
}
BATCH, LR = 4, 6e-4


@pytest.fixture(scope="module")
def modules(tmp_path_factory):
    out, built = tmp_path_factory.mktemp("variants"), {}

    def get(case):
        if case not in built:
            target = nanogpt_target(f"variant-{case}", "nanogpt-small", BATCH, model_overrides=CASES[case],
                                    functions=["forward_loss", "value_and_grad", "train_step"])
            built[case] = CompiledModule(build(target, out).vmfb)
        return built[case]

    return get


def setup(case, seed=0):
    cfg = nanogpt.make_config("nanogpt-small", **CASES[case])
    params = nanogpt.init_params(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 100)
    x = torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size), generator=gen)
    y = torch.randint(0, cfg.vocab_size, (BATCH, cfg.block_size), generator=gen)
    return cfg, params, x, y


@pytest.mark.parametrize("case", list(CASES))
def test_loss_and_gradients_match_the_eager_module(case, modules):
    cfg, params, x, y = setup(case)
    mod = modules(case)
    ref = reference(cfg, params)
    loss, ce, aux, z, loads = ref.loss(x, y)
    loss.backward()
    grads = params_of({n: p.grad for n, p in ref.named_parameters()}, params)
    host = [p.numpy() for p in params.values()]
    assert rel_err(mod.call_host("forward_loss", *host, x.numpy(), y.numpy())[0], ce) < 1e-5
    out = mod.call_host("value_and_grad", *host, x.numpy(), y.numpy())
    assert rel_err(out[0], loss) < 1e-5
    if cfg.moe is not None:
        got_ce, got_aux, got_z, got_loads = out[1:5]
        assert rel_err(got_ce, ce) < 1e-5 and rel_err(got_aux, aux) < 1e-5 and rel_err(got_z, z) < 1e-5
        np.testing.assert_array_equal(got_loads, loads.numpy())  # the same experts for every token
        out = out[4:]
    for (name, want), got in zip(grads.items(), out[1:]):
        assert rel_err(got, want) < 1e-5, name


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_matches_torch_adamw_on_the_eager_module(case, modules):
    cfg, params, x, y = setup(case, seed=1)
    mod = modules(case)
    opt_cfg = AdamWConfig()
    ref = reference(cfg, params)
    named = dict(ref.named_parameters())
    groups = [{"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": opt_cfg.weight_decay},
              {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0}]
    # nanoGPT's groups: matrices decay, biases and norms do not (the exporter's stacked expert biases too)
    opt = torch.optim.AdamW(groups, lr=LR, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps, foreach=False)
    loss = ref.loss(x, y)[0]
    loss.backward()
    torch.nn.utils.clip_grad_norm_(list(named.values()), opt_cfg.grad_clip)
    opt.step()
    n = len(params)
    zeros = [np.zeros(p.shape, np.float32) for p in params.values()]
    out = mod("train_step", *[p.numpy() for p in params.values()], *zeros, *zeros, np.float32(1), np.float32(LR),
              x.numpy(), y.numpy())
    assert rel_err(to_host(out[0]), loss.detach()) < 1e-5
    P = out[len(out) - 3 * n:len(out) - 2 * n]
    want = params_of({k: v.detach() for k, v in named.items()}, params)
    got_all = np.concatenate([to_host(g).ravel() for g in P])
    want_all = np.concatenate([want[k].numpy().ravel() for k in params])
    assert rel_err(got_all, want_all) < 1e-5


@pytest.mark.parametrize("case", ["moe-rope-rmsnorm-swiglu", "moe-capacity-swiglu"])
def test_the_moe_modules_compile_for_gpus_too(case, tmp_path):
    """Both MoE formulations lower through iree-turbine and compile for CUDA (no GPU needed to compile)."""
    target = nanogpt_target(f"gpu-{case}", "nanogpt-small", BATCH, model_overrides=CASES[case],
                            functions=["train_step"])
    result = build(target, tmp_path, compile_target="cuda")
    assert result.vmfb.stat().st_size > 0
