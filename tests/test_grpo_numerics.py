"""Compiled GRPO loss, gradients and train step against plain PyTorch (HF Qwen2 + TRL's formulas).

The tiny module (1 layer, vocab 256; rl_reference.rl_module) holds every RL
function; each loss type, the clipped-ratio path (old log-probs given) and
one AdamW train step are compared with relative error < 1e-5 in fp32.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_reference import B, L, TOL, grpo_loss, hf_model, np_params as _np, rel_err, rl_module, setup, token_logps
from pcpc.autodiff.grpo import LOSS_TYPES as GRPO_TYPES


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


def test_grpo_update_matches_torch_adamw(rl_module, setup):
    """Gradients, then the chunked AdamW update (runtime/rl_update.py), from a mid-run optimizer state (step 10;
    second moments well above eps, so the update is a well-conditioned function of the gradient) against
    torch.optim.AdamW + clip_grad_norm_."""
    from pcpc.runtime.rl_update import ChunkedOptimizer

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
    norm = torch.nn.utils.clip_grad_norm_([named[n] for n in names], 1.0)
    assert norm > 1.0  # the clip acts on this input
    opt.step()

    sel = np.array([1, 0, 0], np.float32)
    out = rl_module("grpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), adv.numpy(),
                    np.zeros((B, L), np.float32), ref.numpy(), sel, np.float32(beta), np.float32(eps[0]),
                    np.float32(eps[1]), np.float32(temperature), np.float32(L), np.float32(0))
    assert rel_err(out[0].to_host(), loss.detach()) < TOL
    P = rl_module.upload_all(_np(params))
    M = rl_module.upload_all([m0[n].numpy() for n in names])
    V = rl_module.upload_all([v0[n].numpy() for n in names])
    grads = list(out[5:])
    ChunkedOptimizer(rl_module).step(P, M, V, grads, step, lr)
    assert grads == [None] * len(names)  # consumed as the chunks went
    f32 = float(np.finfo(np.float32).eps)
    for i, name in enumerate(names):
        # The moments carry the clipped gradient: 1e-5. The weights: 1e-4 of one update (the compiled step
        # forms 1 - 0.999^step in fp32, torch in float64: ~6e-6 relative at step 10), plus the fp32 rounding
        # of weights ~1000x larger than one update.
        assert rel_err(M[i].to_host(), opt.state[named[name]]["exp_avg"]) < TOL, name
        assert rel_err(V[i].to_host(), opt.state[named[name]]["exp_avg_sq"]) < TOL, name
        want = named[name].detach().numpy()
        update = np.abs(want - params[name].numpy()).max()
        assert np.abs(P[i].to_host() - want).max() <= 1e-4 * update + 2 * f32 * np.abs(want).max(), name


def test_outer_step_per_chunk_matches_sgd_nesterov(rl_module, setup):
    """The outer Nesterov step, fused behind each chunk's AdamW and on its own, against torch SGD(nesterov)
    with the pseudo-gradient (weights before - after) as the gradient."""
    from pcpc.runtime.rl_update import ChunkedOptimizer

    _, params, _, _, _ = setup
    names = list(params)
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(p.shape, generator=gen) * 1e-2 for p in params.values()]
    b0 = [torch.randn(p.shape, generator=gen) * 1e-3 for p in params.values()]
    up = rl_module.upload_all
    chunked = ChunkedOptimizer(rl_module)
    zeros = [np.zeros(p.shape, np.float32) for p in params.values()]
    # fused: AdamW then the outer step, chunk by chunk
    P, M, V, Bm = up(_np(params)), up(zeros), up(zeros), up([b.numpy() for b in b0])
    chunked.step(P, M, V, up([g.numpy() for g in grads]), 1, 1e-2, outer=(Bm, 0.7, 0.9))
    # separately: AdamW on all chunks, then the outer step over all of them
    P2, M2, V2, B2 = up(_np(params)), up(zeros), up(zeros), up([b.numpy() for b in b0])
    chunked.step(P2, M2, V2, up([g.numpy() for g in grads]), 1, 1e-2)
    after = [a.to_host().copy() for a in P2]
    before = up(_np(params))
    chunked.outer(before, B2, P2, 0.7, 0.9)
    assert before == [None] * len(names)
    # torch: SGD with nesterov on delta = before - after
    ws = [torch.nn.Parameter(p.clone()) for p in params.values()]
    sgd = torch.optim.SGD(ws, lr=0.7, momentum=0.9, nesterov=True)
    for w, b in zip(ws, b0):
        sgd.state[w] = {"momentum_buffer": b.clone()}
    for w, p, a in zip(ws, params.values(), after):
        w.grad = p - torch.from_numpy(a)
    sgd.step()
    for i, name in enumerate(names):
        want_b = sgd.state[ws[i]]["momentum_buffer"]
        for got_p, got_b in ((P[i], Bm[i]), (P2[i], B2[i])):
            assert rel_err(got_b.to_host(), want_b) < TOL, name
            assert np.allclose(got_p.to_host(), ws[i].detach().numpy(), rtol=0, atol=1e-6), name
