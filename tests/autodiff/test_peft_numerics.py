"""Compiled adapter modules (mlir/rl_functions.py with a `peft` section) against the HF peft library + torch
autograd: for every method, the GRPO and DPO losses and the adapter gradients (relative error < 1e-5 in fp32),
the token log-probs of the adapted policy, one AdamW step (LoRA+: the B matrices at lr x ratio), and the merged
weights the rollouts get. The base weights are inputs and get no gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rl_reference import B, L, OVERRIDES, T, TOL, grpo_loss, rel_err, token_logps
from pcpc.autodiff.dpo import LOSS_TYPES as DPO_TYPES
from pcpc.autodiff.grpo import LOSS_TYPES as GRPO_TYPES
from pcpc.exporters import peft as pcpc_peft, qwen2
from peft_helpers import into_peft_model, peft_config, peft_name, peft_orth_penalty

peft = pytest.importorskip("peft")

METHODS = {"lora": dict(r=4, lora_alpha=8), "lora_plus": dict(r=4, lora_alpha=8, loraplus_lr_ratio=4.0),
           "dora": dict(r=4, lora_alpha=8, use_rslora=True), "pissa": dict(r=4, lora_alpha=8),
           "vera": dict(r=16), "adalora": dict(init_r=4, target_r=2, lora_alpha=8, orth_reg_weight=0.3),
           "miss": dict(r=8)}
WIDE = {**OVERRIDES, "hidden_size": 256, "intermediate_size": 2304, "vocab_size": 5096}
"""A "-wide" case: wide enough that the gradient's long products (the tied head's, gate/up's input gradients)
become block products (autodiff/derive.py ADAPTER_DECOMPOSITIONS), the last block short."""
FUNCTIONS = ["token_logprobs", "sequence_logps", "grpo_value_and_grad", "dpo_value_and_grad", "grad_clip_coef",
             "adamw", "merge"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import rl_target
    from pcpc.runtime.module import CompiledModule

    cache = {}

    def get(method):
        if method not in cache:
            target = rl_target(f"test-peft-{method}", "qwen2-tiny", model_overrides=overrides_of(method),
                               batch_size=B, seq_len=T, functions=FUNCTIONS,
                               peft={"type": type_of(method), **METHODS[type_of(method)]})
            cache[method] = CompiledModule(build(target, tmp_path_factory.getbasetemp() / "peft_numerics").vmfb)
        return cache[method]

    return get


def hf_from(cfg, params):
    from rl_reference import hf_model

    return hf_model(cfg, params)


def peft_model(cfg, base, pcfg, adapter, frozen, residual):
    """A peft model on HF Qwen2 with pcpc's adapter values (and, for pissa, the residual base)."""
    return into_peft_model(peft.get_peft_model(hf_from(cfg, {**base, **residual}), peft_config(pcfg)), adapter,
                           frozen)


def type_of(method):
    return method.removesuffix("-wide")


def overrides_of(method):
    return WIDE if method.endswith("-wide") else OVERRIDES


def case(method):
    cfg = qwen2.make_config("qwen2-tiny", **overrides_of(method))
    base = qwen2.init_params(cfg, seed=3)
    base = {k: v * 4 if v.dim() == 2 else v for k, v in base.items()}
    pcfg = pcpc_peft.PeftConfig(type=type_of(method), **METHODS[type_of(method)])
    adapter0, frozen, residual = pcpc_peft.init(base, cfg, pcfg, seed=0)
    g = torch.Generator().manual_seed(5)  # a trained adapter: nothing zero by construction
    adapter = {k: v + 0.1 * torch.randn(v.shape, generator=g) * (v.abs().mean() + 0.1) for k, v in adapter0.items()}
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(11))
    mask = torch.zeros(B, L)
    mask[:, 5:] = 1.0
    mask[1, 12:] = 0.0
    return cfg, base, pcfg, adapter0, adapter, frozen, residual, ids, mask


def args_of(mod, base, residual, adapter, frozen):
    """The module's weight arguments: adapter, base (the residual for pissa), vera's projections."""
    from pcpc.runtime.module import frozen_specs

    fb = {k: v.numpy() for k, v in {**base, **residual}.items()}
    return ([v.numpy() for v in adapter.values()] + [fb[s.name] for s in frozen_specs(mod.meta)]
            + [v.numpy() for v in frozen.values()])


def penalty(pm, pcfg):
    """AdaLoRA's orthogonality term, which pcpc's compiled loss includes (as peft's model adds it); 0 otherwise."""
    return peft_orth_penalty(pm, pcfg) if pcfg.type == "adalora" else 0.0


@pytest.mark.parametrize("method", [*METHODS, "lora-wide"])
def test_compiled_adapter_losses_and_gradients_equal_peft(built, method):
    mod = built(method)
    cfg, base, pcfg, adapter0, adapter, frozen, residual, ids, mask = case(method)
    assert [p.name for p in mod.meta.parameters] == list(adapter)  # only the adapter is trained
    weights = args_of(mod, base, residual, adapter, frozen)

    def peft_grad(pm, k):
        return dict(pm.named_parameters())[peft_name(k)].grad

    # token log-probs of the adapted policy
    pm = peft_model(cfg, base, pcfg, adapter, frozen, residual)
    got = mod.call_host("token_logprobs", *weights, ids.numpy(), mask.numpy(), np.float32(0.8))[0]
    assert rel_err(got, token_logps(pm, ids, 0.8).detach()) < TOL

    # GRPO: the loss and the adapter's gradients
    adv = torch.tensor([1.0, -0.4, 0.8, 0.3])
    with torch.no_grad():
        ref = token_logps(peft_model(cfg, base, pcfg, adapter0, frozen, residual), ids, 0.9)
    logp = token_logps(pm, ids, 0.9)
    loss = grpo_loss(logp, logp.detach(), ref, adv, mask, 0.1, 0.2, 0.28, "grpo", max_len=L) + penalty(pm, pcfg)
    loss.backward()
    sel = np.array([t == "grpo" for t in GRPO_TYPES], np.float32)
    zeros = np.zeros((B, L), np.float32)
    out = mod.call_host("grpo_value_and_grad", *weights, ids.numpy(), mask.numpy(), adv.numpy(), zeros,
                        ref.numpy(), sel, np.float32(0.1), np.float32(0.2), np.float32(0.28), np.float32(0.9),
                        np.float32(L), np.float32(0), np.float32(1))
    assert rel_err(out[0], loss.detach()) < TOL
    grads = out[5:]
    assert len(grads) == len(adapter)
    for name, got_g in zip(adapter, grads):
        assert rel_err(got_g, peft_grad(pm, name)) < TOL, name
    assert all(p.grad is None for n, p in pm.named_parameters() if not p.requires_grad)

    # DPO (sigmoid): the loss and the adapter's gradients
    pm = peft_model(cfg, base, pcfg, adapter, frozen, residual)
    seq = (token_logps(pm, ids) * mask).sum(-1)
    ref_seq = torch.tensor([-30.0, -28.0, -31.0, -29.5])
    n = B // 2
    margin = 0.1 * ((seq[:n] - ref_seq[:n]) - (seq[n:] - ref_seq[n:]))
    dpo = -torch.nn.functional.logsigmoid(margin).mean() + penalty(pm, pcfg)
    dpo.backward()
    sel = np.array([t == "sigmoid" for t in DPO_TYPES], np.float32)
    out = mod.call_host("dpo_value_and_grad", *weights, ids.numpy(), mask.numpy(), ref_seq.numpy(), sel,
                        np.float32(0.1))
    assert rel_err(out[0], dpo.detach()) < TOL
    for name, got_g in zip(adapter, out[3:]):
        assert rel_err(got_g, peft_grad(pm, name)) < TOL, name


@pytest.mark.parametrize("method", ["lora_plus", "pissa", "vera"])
def test_adamw_steps_the_adapter_and_merge_folds_it(built, method):
    """One chunked AdamW step equals torch.optim.AdamW on the adapter (LoRA+: B at lr x ratio, as peft's
    create_loraplus_optimizer); merge_K gives the weights of peft's merge_and_unload."""
    mod = built(method)
    cfg, base, pcfg, _, adapter, frozen, residual, ids, _ = case(method)
    from pcpc.autodiff.optim import update_groups
    names = list(adapter)
    g = torch.Generator().manual_seed(9)
    grads = {k: torch.randn(v.shape, generator=g) for k, v in adapter.items()}
    torch_p = {k: torch.nn.Parameter(v.clone()) for k, v in adapter.items()}
    ratio = pcfg.loraplus_lr_ratio if method == "lora_plus" else 1.0
    groups = [{"params": [p for k, p in torch_p.items() if ".lora_B." not in k], "lr": 1e-3},
              {"params": [p for k, p in torch_p.items() if ".lora_B." in k], "lr": 1e-3 * ratio}]
    opt = torch.optim.AdamW([gr for gr in groups if gr["params"]], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for k, p in torch_p.items():
        p.grad = grads[k].clone()
    opt.step()
    specs = mod.meta.parameters
    for kind, idx in update_groups([s.name for s in specs], [s.shape for s in specs]):
        k = len(idx)
        out = mod.call_host(f"adamw_{kind}", *[adapter[names[i]].numpy() for i in idx],
                            *[grads[names[i]].numpy() for i in idx],
                            *[np.zeros(specs[i].shape, np.float32) for i in idx] * 2, np.float32(1),
                            np.float32(1e-3), np.float32(1))
        for j, i in enumerate(idx):
            assert rel_err(out[j], torch_p[names[i]].detach()) < TOL, names[i]
        # merge: the adapter's modules of this chunk, folded into their (residual) base weights
        modules = list(dict.fromkeys(pcpc_peft.module_of(names[i]) for i in idx))
        fb = {**base, **residual}
        merged = mod.call_host(f"merge_{kind}", *[adapter[names[i]].numpy() for i in idx],
                               *[fb[f"{m}.weight"].numpy() for m in modules],
                               *[v.numpy() for v in frozen.values()])
        pm = peft_model(cfg, base, pcfg, adapter, frozen, residual).merge_and_unload()
        want = dict(pm.named_parameters())
        for m, got in zip(modules, merged):
            assert rel_err(got, want[f"{m}.weight"].detach()) < TOL, m


def test_the_base_goes_in_as_it_is_and_the_rollout_gets_every_weight(tmp_path):
    """An adapter module takes the base weights in the base's order and layout (no transposed copies: its
    long input gradients are block products, autodiff/derive.py ADAPTER_DECOMPOSITIONS); the rollout gets every
    base weight, merged or not (at init LoRA's B is zero: merged equals the base exactly)."""
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import rl_target
    from pcpc.runtime.module import CompiledModule, base_specs, frozen_specs, to_host
    from pcpc.runtime.rl.policy import AdapterPolicy

    target = rl_target("test-peft-layout", "qwen2-tiny", model_overrides=OVERRIDES, batch_size=B, seq_len=T,
                       functions=["token_logprobs", "merge"],
                       peft={"type": "lora", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]})
    mod = CompiledModule(build(target, tmp_path).vmfb)
    cfg = qwen2.make_config("qwen2-tiny", **OVERRIDES)
    shapes = qwen2.param_shapes(cfg)
    assert [(s.name, s.shape) for s in frozen_specs(mod.meta)] == list(shapes.items())
    assert base_specs(mod.meta) == frozen_specs(mod.meta)
    base = {k: v.numpy() for k, v in qwen2.init_params(cfg, seed=3).items()}
    policy = AdapterPolicy(mod, [base[k] for k in shapes], cfg, pcpc_peft.PeftConfig(
        type="lora", r=4, lora_alpha=8, target_modules=("q_proj",)), seed=0, state=None, base_model="tiny")
    rollout = [to_host(w) for w in policy.rollout_weights()]
    assert len(rollout) == len(shapes)
    for (name, shape), got in zip(shapes.items(), rollout):
        assert got.shape == shape and np.array_equal(got, base[name]), name
