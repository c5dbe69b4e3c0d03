"""Compiled DPO loss, rewards and gradients against plain PyTorch (HF Qwen2 + TRL's formulas), fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_reference import TOL, dpo_loss, hf_model, np_params as _np, rel_err, rl_module, setup, token_logps
from pcpc.autodiff.dpo import LOSS_TYPES as DPO_TYPES


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


