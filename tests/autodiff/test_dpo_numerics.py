"""Compiled DPO loss, rewards and gradients against plain PyTorch (HF Qwen2 + TRL's formulas) and TRL itself, fp32.

ref_logps are the reference's sequence sums for every loss type (ipo divides the log-ratios by the mask count
inside), and the rewards are beta * (policy sum - reference sum), as TRL logs them. TRL 1.16.0's own
DPOTrainer._compute_loss (trl_reference.py: the real method, a stand-in `self`, the reference computed inside it)
is the reference for pcpc's eager loss (relative < TORCH_TOL) and for the compiled module (< TOL): loss,
gradients and the logged rewards/chosen, rejected, margins and accuracies.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_reference import (B, T, TOL, WINDOW, dpo_loss, hf_model, np_params as _np, prefix_module, rel_err,
                          rl_module, setup, token_logps, window_module)
from trl_reference import trl_dpo
from pcpc.autodiff import derive
from pcpc.autodiff.dpo import LOSS_TYPES as DPO_TYPES, reward_metrics, sequence_logps
from pcpc.autodiff.grpo import token_logprobs
from pcpc.exporters import qwen2
from pcpc.mlir.rl_functions import make_dpo_loss

TORCH_TOL = 2e-6
"""pcpc's eager torch loss / gradients against TRL's, both fp32 on CPU (measured up to ~8e-7)."""


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_value_and_grad_matches_torch(rl_module, setup, loss_type):
    cfg, params, ref_params, ids, mask = setup
    beta = 0.1

    def seq(model):
        return (token_logps(model, ids) * mask).sum(-1)

    with torch.no_grad():
        ref = seq(hf_model(cfg, ref_params))  # sums, for every loss type
    model = hf_model(cfg, params)
    pol = seq(model)
    tokens = mask.sum(-1)
    loss, c_rew, r_rew = dpo_loss(pol[:2], pol[2:], ref[:2], ref[2:], beta, loss_type, tokens[:2], tokens[2:])
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


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_completion_window_gives_the_full_heads_results(rl_module, window_module, setup, loss_type):
    """sequence_logps and dpo_value_and_grad with the head on each row's completion window (C = 12 of 15
    positions) give what the head on every position gives."""
    cfg, params, ref_params, ids, mask = setup
    assert int(mask.sum(-1).max()) <= WINDOW < T - 1
    seq = [m.call_host("sequence_logps", *_np(params), ids.numpy(), mask.numpy())[0]
           for m in (rl_module, window_module)]
    assert rel_err(seq[1], seq[0]) < 1e-6
    ref = window_module.call_host("sequence_logps", *_np(ref_params), ids.numpy(), mask.numpy())[0]
    sel = np.array([t == loss_type for t in DPO_TYPES], np.float32)
    want, got = (m.call_host("dpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), ref, sel,
                             np.float32(0.1)) for m in (rl_module, window_module))
    assert rel_err(got[0], want[0]) < 1e-6
    scale = 0.1 * float(np.abs(seq[0]).max())  # rewards are beta times differences of the sums
    assert np.abs(got[1] - want[1]).max() < 1e-6 * scale and np.abs(got[2] - want[2]).max() < 1e-6 * scale
    for name, a, b in zip(params, got[3:], want[3:]):
        assert rel_err(a, b) < 1e-6, name


def test_shared_prefix_gives_the_same_results(window_module, prefix_module, setup):
    """Pairs (rows 0, 2 and 1, 3) whose rows share their first 3 tokens, computed once per pair: the sequence
    log-probs, loss, rewards and gradients of the module that computes every row's."""
    cfg, params, ref_params, ids, mask = setup
    ids = ids.clone()
    ids[2, :3], ids[3, :3] = ids[0, :3], ids[1, :3]
    seq = [m.call_host("sequence_logps", *_np(params), ids.numpy(), mask.numpy())[0]
           for m in (window_module, prefix_module)]
    assert rel_err(seq[1], seq[0]) < 1e-6
    ref = window_module.call_host("sequence_logps", *_np(ref_params), ids.numpy(), mask.numpy())[0]
    sel = np.array([t == "sigmoid" for t in DPO_TYPES], np.float32)
    want, got = (m.call_host("dpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), ref, sel,
                             np.float32(0.1)) for m in (window_module, prefix_module))
    for name, a, b in zip(["loss", "chosen_rewards", "rejected_rewards", *params], got, want):
        assert rel_err(a, b) < 1e-5, name


# ------------------------------------------------------------------------------------------ against TRL itself

ORDER = [2, 1, 0, 3]
"""setup's rows as (chosen, chosen, rejected, rejected): one pair won and one lost (checked below), so
rewards/accuracies is neither 0 nor 1; completions of 10 and 6 vs 12 and 1 tokens, so per-token means and
sums tell apart."""


@pytest.fixture(scope="module")
def trl_pairs(setup):
    """setup's rows in ORDER, with TRL's (B, T) attention and completion masks beside pcpc's (B, L) mask."""
    cfg, params, ref_params, ids, mask = setup
    ids, mask = ids[ORDER], mask[ORDER]
    completion_mask = torch.cat([torch.zeros(B, 1), mask], 1).long()  # token t is a completion token
    last = torch.arange(T) * completion_mask  # position of each row's last completion token
    attention_mask = (torch.arange(T) <= last.max(1, keepdim=True).values).long()  # prompt + completion
    return cfg, params, ref_params, ids, mask, attention_mask, completion_mask


@pytest.mark.parametrize("loss_type", DPO_TYPES)
def test_dpo_matches_trl(rl_module, trl_pairs, loss_type):
    """TRL's DPOTrainer._compute_loss against pcpc's eager loss (make_dpo_loss + torch.func, the function the
    module compiles) and the compiled dpo_value_and_grad, with the reference sums from sequence_logps (eager /
    compiled): loss, gradients, and reward_metrics of the returned rewards against TRL's logged rewards/*."""
    cfg, params, ref_params, ids, mask, attention_mask, completion_mask = trl_pairs
    beta = 0.1
    loss, grads, metrics = trl_dpo(cfg, params, ref_params, ids, attention_mask, completion_mask, beta=beta,
                                   loss_type=[loss_type])
    names = list(params)
    sel = [float(t == loss_type) for t in DPO_TYPES]
    with torch.no_grad():
        ref = sequence_logps(token_logprobs(qwen2.forward(ref_params, ids, None, cfg), ids, 1.0), mask)
        pol = sequence_logps(token_logprobs(qwen2.forward(params, ids, None, cfg), ids, 1.0), mask)
    eager = derive.value_and_grad_fn(make_dpo_loss(cfg), names, has_aux=True)(
        *params.values(), ids, mask, ref, torch.tensor(sel), torch.tensor(beta))
    ref_compiled = rl_module.call_host("sequence_logps", *_np(ref_params), ids.numpy(), mask.numpy())[0]
    compiled = rl_module.call_host("dpo_value_and_grad", *_np(params), ids.numpy(), mask.numpy(), ref_compiled,
                                   np.array(sel, np.float32), np.float32(beta))
    # rewards are beta * differences of sums ~50x larger: measure them against the sums' scale
    scale = beta * float(pol.abs().max())
    assert metrics["rewards/accuracies"] == 0.5
    for out, tol in ((eager, TORCH_TOL), (compiled, TOL)):
        assert rel_err(out[0], loss) < tol
        for i, name in enumerate(names):
            assert rel_err(out[3 + i], grads[name]) < tol, name
        got = reward_metrics(out[1], out[2])
        for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            assert abs(got[key] - metrics[key]) < tol * scale, key
        assert got["rewards/accuracies"] == metrics["rewards/accuracies"]


def test_dpo_loss_ipo_needs_token_counts():
    from pcpc.autodiff.dpo import dpo_loss as pcpc_dpo_loss

    x = torch.zeros(2)
    with pytest.raises(ValueError, match="ipo needs chosen_tokens and rejected_tokens"):
        pcpc_dpo_loss(x, x, x, x, 0.1, "ipo")
    with pytest.raises(ValueError, match="ipo needs"):  # a loss-type weight vector may select ipo
        pcpc_dpo_loss(x, x, x, x, 0.1, torch.tensor([1.0, 0.0, 0.0]))
    with pytest.raises(ValueError, match="loss_type must be one of sigmoid, ipo, hinge"):
        pcpc_dpo_loss(x, x, x, x, 0.1, "kto")
    assert float(pcpc_dpo_loss(x, x, x, x, 0.1, "sigmoid")[0]) == pytest.approx(np.log(2))  # no counts needed
