"""Compiled GRPO / DPO losses and gradients against plain PyTorch (HF Qwen2 + TRL's formulas).

One tiny module (1 layer, vocab 256) is compiled once per session with every
RL function; each loss type, the clipped-ratio path (old log-probs given) and
one AdamW train step are compared with relative error < 1e-5 in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_reference import dpo_loss, grpo_loss, hf_model, rel_err, token_logps
from pcpc.autodiff.dpo import LOSS_TYPES as DPO_TYPES
from pcpc.autodiff.grpo import LOSS_TYPES as GRPO_TYPES
from pcpc.exporters import qwen2
from pcpc.mlir.build import build
from pcpc.mlir.targets import rl_target
from pcpc.runtime.module import CompiledModule

B, T = 4, 16
L = T - 1
OVERRIDES = {"num_hidden_layers": 1}
TOL = 1e-5


@pytest.fixture(scope="session")
def rl_module(tmp_path_factory):
    target = rl_target(
        "test-rl-numerics", "qwen2-tiny", model_overrides=OVERRIDES, batch_size=B, seq_len=T,
        functions=["token_logprobs", "sequence_logps", "grpo_value_and_grad", "grpo_train_step",
                   "dpo_value_and_grad"],
    )
    return CompiledModule(build(target, tmp_path_factory.mktemp("rl")).vmfb)


@pytest.fixture(scope="module")
def setup():
    cfg = qwen2.make_config("qwen2-tiny", **OVERRIDES)
    params = qwen2.init_params(cfg, seed=3)
    # Larger than HF's init so the policy is far from uniform and gradients are not tiny.
    params = {k: v * 4 if v.dim() == 2 else v for k, v in params.items()}
    ref_params = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in params.items()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    prompt_len = torch.tensor([3, 3, 5, 5])
    comp_len = torch.tensor([12, 6, 10, 1])  # completion targets per row (padding after)
    t = torch.arange(L)
    mask = ((t >= prompt_len[:, None] - 1) & (t < (prompt_len + comp_len)[:, None] - 1)).float()
    return cfg, params, ref_params, ids, mask


def _np(params):
    return [p.numpy() for p in params.values()]


def test_token_logprobs_match_hf(rl_module, setup):
    cfg, params, _, ids, mask = setup
    want = token_logps(hf_model(cfg, params), ids, temperature=0.7).detach()
    got = rl_module.call_host("token_logprobs", *_np(params), ids.numpy(), np.float32(0.7))[0]
    assert rel_err(got, want) < TOL
    seq = rl_module.call_host("sequence_logps", *_np(params), ids.numpy(), mask.numpy())[0]
    assert rel_err(seq, (token_logps(hf_model(cfg, params), ids) * mask).sum(-1).detach()) < TOL


def _grpo_reference(cfg, params, ref_params, ids, mask, adv, old, beta, eps, temperature, loss_type, use_old):
    model = hf_model(cfg, params)
    with torch.no_grad():
        ref = token_logps(hf_model(cfg, ref_params), ids, temperature)
    logp = token_logps(model, ids, temperature)
    old_logp = old if use_old else logp.detach()
    loss = grpo_loss(logp, old_logp, ref, adv, mask, beta, eps[0], eps[1], loss_type, max_len=L)
    loss.backward()
    names = list(params)
    grads = dict(model.named_parameters())
    return loss.detach(), ref, [grads[n].grad for n in names]


@pytest.mark.parametrize("loss_type,use_old", [("grpo", False), ("dapo", False), ("dr_grpo", False), ("grpo", True)])
def test_grpo_value_and_grad_matches_torch(rl_module, setup, loss_type, use_old):
    cfg, params, ref_params, ids, mask = setup
    # Not group-normalised: those sum to zero per group and the loss value would be pure rounding.
    adv = torch.tensor([1.0, -0.4, 0.8, 0.3])
    beta, eps, temperature = 0.1, (0.2, 0.28), 0.9
    # "old" policy log-probs far enough from the current ones that both clip sides trigger
    with torch.no_grad():
        cur = token_logps(hf_model(cfg, params), ids, temperature)
    old = cur + 0.3 * torch.randn(cur.shape, generator=torch.Generator().manual_seed(1))
    loss, ref, grads = _grpo_reference(cfg, params, ref_params, ids, mask, adv, old, beta, eps, temperature,
                                       loss_type, use_old)
    sel = np.array([t == loss_type for t in GRPO_TYPES], np.float32)
    out = rl_module.call_host(
        "grpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), adv.numpy(), old.numpy(), ref.numpy(),
        sel, np.float32(beta), np.float32(eps[0]), np.float32(eps[1]), np.float32(temperature), np.float32(L),
        np.float32(use_old))
    assert rel_err(out[0], loss) < TOL
    for name, got, want in zip(params, out[5:], grads):
        assert rel_err(got, want) < TOL, name
    if use_old:
        assert out[2] > 0  # the clip ratio sees clipped tokens on this input
    else:
        assert out[2] == 0  # ratio 1 everywhere: nothing is clipped


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_value_and_grad_matches_torch(rl_module, setup, loss_type):
    cfg, params, ref_params, ids, mask = setup
    beta = 0.1
    avg = loss_type == "ipo"

    def seq(model):
        s = (token_logps(model, ids) * mask).sum(-1)
        return s / mask.sum(-1) if avg else s

    with torch.no_grad():
        ref = seq(hf_model(cfg, ref_params))
    model = hf_model(cfg, params)
    pol = seq(model)
    loss, c_rew, r_rew = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], beta, loss_type)
    loss.backward()
    named = dict(model.named_parameters())
    sel = np.array([t == loss_type for t in DPO_TYPES], np.float32)
    out = rl_module.call_host("dpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), ref.numpy(), sel,
                              np.float32(beta))
    assert rel_err(out[0], loss.detach()) < TOL
    # rewards = beta (logp - ref) are differences of large sums: measure against the sums' scale
    scale = beta * float(pol.detach().abs().max())
    assert np.abs(out[1] - c_rew.numpy()).max() < TOL * scale
    assert np.abs(out[2] - r_rew.numpy()).max() < TOL * scale
    for name, got in zip(params, out[3:]):
        assert rel_err(got, named[name].grad) < TOL, name


def test_grpo_train_step_matches_torch_adamw(rl_module, setup):
    """One update from a mid-run optimizer state (step 10; second moments well above eps, so the update is a
    well-conditioned function of the gradient) against torch.optim.AdamW + clip_grad_norm_."""
    cfg, params, ref_params, ids, mask = setup
    adv = torch.tensor([1.0, -0.5, 0.7, 0.2])
    beta, eps, temperature, lr, step = 0.05, (0.2, 0.2), 1.0, 1e-3, 10
    names = list(params)
    gen = torch.Generator().manual_seed(5)
    m0 = {k: 1e-3 * torch.randn(v.shape, generator=gen) for k, v in params.items()}
    v0 = {k: 1e-5 + 1e-4 * torch.rand(v.shape, generator=gen) for k, v in params.items()}
    model = hf_model(cfg, params)
    named = dict(model.named_parameters())
    opt = torch.optim.AdamW([named[n] for n in names], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for n in names:
        opt.state[named[n]] = {"step": torch.tensor(float(step - 1)), "exp_avg": m0[n].clone(),
                               "exp_avg_sq": v0[n].clone()}
    with torch.no_grad():
        ref = token_logps(hf_model(cfg, ref_params), ids, temperature)
    logp = token_logps(model, ids, temperature)
    loss = grpo_loss(logp, logp.detach(), ref, adv, mask, beta, eps[0], eps[1], "grpo", L)
    loss.backward()
    torch.nn.utils.clip_grad_norm_([named[n] for n in names], 1.0)
    opt.step()
    sel = np.array([1, 0, 0], np.float32)
    out = rl_module.call_host(
        "grpo_train_step", *_np(params), *[m0[n].numpy() for n in names], *[v0[n].numpy() for n in names],
        np.float32(step), np.float32(lr), ids.numpy(), mask.numpy(), adv.numpy(), np.zeros((B, L), np.float32),
        ref.numpy(), sel, np.float32(beta), np.float32(eps[0]), np.float32(eps[1]), np.float32(temperature),
        np.float32(L), np.float32(0))
    assert rel_err(out[0], loss.detach()) < TOL
    n = len(names)
    f32 = float(np.finfo(np.float32).eps)
    for i, name in enumerate(names):
        # The moments carry the clipped gradient: 1e-5. The weights: 1e-4 of one update (the compiled step
        # forms 1 - 0.999^step in fp32, torch in float64: ~6e-6 relative at step 10), plus the fp32 rounding
        # of weights ~1000x larger than one update.
        assert rel_err(out[5 + n + i], opt.state[named[name]]["exp_avg"]) < TOL, name
        assert rel_err(out[5 + 2 * n + i], opt.state[named[name]]["exp_avg_sq"]) < TOL, name
        want = named[name].detach().numpy()
        update = np.abs(want - params[name].numpy()).max()
        assert np.abs(out[5 + i] - want).max() <= 1e-4 * update + 2 * f32 * np.abs(want).max(), name
