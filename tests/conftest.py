"""Shared fixtures: tiny compiled nanoGPT modules, built once per test session."""

from __future__ import annotations

import pytest

from pcpc.mlir.build import build
from pcpc.mlir.targets import nanogpt_target

# (target name, preset, overrides, batch) for the compiled-numerics tests: both presets and a
# non-default variant (gelu, untied, bias). Batches are small to keep compile and run cheap.
NUMERICS_CASES = {
    "small": ("nanogpt-small", {}, 4),
    "medium": ("nanogpt-medium", {}, 2),
    "variant": ("nanogpt-small", {"mlp": "gelu", "tie_embeddings": False, "bias": True}, 4),
}
NUMERICS_FUNCTIONS = ["value_and_grad", "train_step", "outer_step"]


@pytest.fixture(scope="session")
def artifacts_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def numerics_module(artifacts_dir):
    """Build (once) and return the compiled module path for a NUMERICS_CASES key."""
    built = {}

    def get(case: str):
        if case not in built:
            preset, overrides, batch = NUMERICS_CASES[case]
            target = nanogpt_target(
                f"test-{case}", preset, batch, model_overrides=overrides, functions=NUMERICS_FUNCTIONS
            )
            built[case] = build(target, artifacts_dir)
        return built[case]

    return get


TINY_OVERRIDES = {"n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 8, "vocab_size": 11}


def tiny_target(name="tiny", functions=("forward_loss",), **overrides):
    """A nanoGPT target small enough to export + compile in a few seconds."""
    return nanogpt_target(
        name, "nanogpt-small", 2, model_overrides={**TINY_OVERRIDES, **overrides}, functions=list(functions)
    )


def torch_adamw_reference(params: dict, batches, cfg, lr: float):
    """nanoGPT trained in torch eager on `batches` ((x, y) pairs), one torch.optim.AdamW step each with
    nanoGPT's param groups (decay on matrices only) and clip_grad_norm_: what a compiled train_step must
    match. Returns (losses, leaves, optimizer)."""
    import torch

    from pcpc.autodiff.losses import cross_entropy
    from pcpc.autodiff.optim import AdamWConfig
    from pcpc.exporters import nanogpt

    opt_cfg = AdamWConfig()
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    groups = [{"params": [p for p in leaves.values() if p.dim() >= 2], "weight_decay": opt_cfg.weight_decay},
              {"params": [p for p in leaves.values() if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(opt_cfg.beta1, opt_cfg.beta2), eps=opt_cfg.eps, foreach=False)
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = cross_entropy(nanogpt.forward(leaves, x, cfg), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(leaves.values()), opt_cfg.grad_clip)
        opt.step()
        losses.append(loss.item())
    return losses, leaves, opt
