"""nanoGPT's recipe functions as lower() gets them.

train_step is value_and_grad, then adamw_step on its gradients (a Composite): lowered, the two graphs are
spliced, so forward and backward are traced once for both functions. LoRA+'s learning-rate ratio applies in
both optimizer steps.
"""

import pytest
import torch

from pcpc.autodiff.optim import AdamWConfig
from pcpc.mlir import lower as lower_mod
from pcpc.mlir.lower import ExportFunction, lower
from pcpc.mlir.nanogpt_functions import FUNCTIONS, build

TINY = {"n_layer": 2, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 11}
CASES = {
    "plain": {},
    "moe": {"model_overrides": {"moe": {"num_experts": 4, "top_k": 2}}},
    "lora_plus": {"peft": {"type": "lora_plus", "r": 2, "lora_alpha": 4, "loraplus_lr_ratio": 8.0,
                           "target_modules": ["c_attn", "c_proj", "c_fc"]}},
}


def config(case, **more):
    cfg = {"model": "nanogpt-small", "batch_size": 3, "eval_batch_size": 3, **CASES[case], **more}
    cfg["model_overrides"] = {**TINY, **cfg.get("model_overrides", {})}
    return cfg


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_is_spliced_from_value_and_grad_and_adamw_step(case, monkeypatch):
    traces = []
    real = lower_mod._trace
    monkeypatch.setattr(lower_mod, "_trace", lambda *a: traces.append(a) or real(*a))
    functions, _ = build(config(case))
    text, signatures = lower(functions)
    # eval_loss is forward_loss at the same batch, train_step the graphs of value_and_grad and adamw_step
    assert len(traces) == len(FUNCTIONS) - 2
    if case == "moe":
        # a trace of the whole copies an expert's strided gradient before adamw_step's reshape, where the
        # spliced graph reshapes the value as it is (tests/autodiff/test_variant_numerics.py steps it)
        return
    whole = [ExportFunction(f.name, lambda *a, _fn=f.fn: _fn(*a), f.args, f.results) for f in functions]
    assert text == lower(whole)[0]  # the same module as tracing each function whole


@pytest.mark.parametrize("case", ["plain", "lora_plus"])
def test_both_optimizer_steps_match_torch_adamw_with_nanogpts_groups(case):
    """train_step and adamw_step against torch.optim.AdamW + clip_grad_norm_, with LoRA+'s B matrices in a
    group of their own at lr * loraplus_lr_ratio."""
    functions, P = build(config(case, functions=["value_and_grad", "train_step", "adamw_step"]))
    vg, train_step, adamw_step = (f.fn for f in functions)
    gen = torch.Generator().manual_seed(0)
    spec = functions[0].args
    n = len(P)
    values = [torch.randn(s.shape, generator=gen) * 0.5 if s.dtype == "float32"
              else torch.randint(0, TINY["vocab_size"], s.shape, generator=gen) for s in spec]
    params, rest = values[:n], values[n:]  # rest: frozen base weights (LoRA+), x, y
    loss, *grads = vg(*params, *rest)

    opt = AdamWConfig()
    lr, ratio = 1e-2, CASES[case].get("peft", {}).get("loraplus_lr_ratio", 1.0)
    leaves = [p.clone().requires_grad_(True) for p in params]
    groups = {}
    for s, leaf in zip(P, leaves):
        key = (len(s.shape) >= 2 and not s.name.endswith(".bias"), ".lora_B." in s.name)
        groups.setdefault(key, []).append(leaf)
    ref = torch.optim.AdamW([{"params": ps, "weight_decay": opt.weight_decay if decay else 0.0,
                              "lr": lr * ratio if b else lr} for (decay, b), ps in groups.items()],
                            betas=(opt.beta1, opt.beta2), eps=opt.eps, foreach=False)
    for leaf, g in zip(leaves, grads):
        leaf.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(leaves, opt.grad_clip)
    ref.step()
    if case == "lora_plus":
        assert any(".lora_B." in s.name for s in P) and any(".lora_A." in s.name for s in P)

    zeros = [torch.zeros_like(p) for p in params]
    step, lr_t = torch.tensor(1.0), torch.tensor(lr)
    got_train = train_step(*params, *zeros, *zeros, step, lr_t, *rest)
    got_adamw = adamw_step(*params, *zeros, *zeros, *grads, step, lr_t)
    assert torch.equal(got_train[0], loss)
    for i, (s, leaf) in enumerate(zip(P, leaves)):
        for got in (got_train[1 + i], got_adamw[1 + i]):
            torch.testing.assert_close(got, leaf.detach(), rtol=1e-5, atol=1e-6, msg=s.name)
