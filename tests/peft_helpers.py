"""pcpc adapters inside HF peft models: the tests' bridge between exporters/peft.py and the peft library."""

from __future__ import annotations

from pcpc.exporters import peft as pcpc_peft


def peft_config(cfg: pcpc_peft.PeftConfig, init=True):
    """peft's config of the same adapter."""
    import peft

    targets = list(cfg.target_modules)
    if cfg.type == "vera":
        return peft.VeraConfig(r=cfg.r, target_modules=targets, projection_prng_key=cfg.projection_prng_key,
                               d_initial=cfg.d_initial, save_projection=True)
    if cfg.type == "miss":
        return peft.MissConfig(r=cfg.r, target_modules=targets)
    if cfg.type == "adalora":
        return peft.AdaLoraConfig(init_r=cfg.init_r, target_r=cfg.target_r, lora_alpha=cfg.lora_alpha,
                                  target_modules=targets, tinit=cfg.tinit, tfinal=cfg.tfinal, deltaT=cfg.deltaT,
                                  beta1=cfg.beta1, beta2=cfg.beta2, orth_reg_weight=cfg.orth_reg_weight,
                                  total_step=cfg.total_step or 10, lora_dropout=0.0)
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=targets, use_rslora=cfg.use_rslora,
                           use_dora=cfg.type == "dora", init_lora_weights=init, lora_dropout=0.0)


def peft_name(k: str) -> str:
    """pcpc's (and peft's saved) key -> the peft model's parameter name, which carries the adapter's name."""
    if k.endswith(".weight"):
        return pcpc_peft.PREFIX + k.removesuffix(".weight") + ".default.weight"
    if k.endswith("lora_magnitude_vector"):
        return pcpc_peft.PREFIX + k + ".default.weight"
    return pcpc_peft.PREFIX + k + ".default"


def peft_orth_penalty(pm, cfg) -> "torch.Tensor":
    """AdaLoRA's regulariser exactly as peft's AdaLoraModel.forward adds it to the loss."""
    import torch

    regu, num = 0, 0
    for n, p in pm.named_parameters():
        if ("lora_A" in n or "lora_B" in n) and "default" in n:
            cov = p @ p.T if "lora_A" in n else p.T @ p
            regu = regu + torch.norm(cov - torch.eye(*cov.size()), p="fro")
            num += 1
    return cfg.orth_reg_weight * regu / num


def into_peft_model(pm, adapter: dict, frozen: dict):
    """Set a peft model's adapter tensors to pcpc's values; returns the model."""
    params, buffers = dict(pm.named_parameters()), dict(pm.named_buffers())
    for k, v in adapter.items():
        params[peft_name(k)].data.copy_(v)
    for k, v in frozen.items():  # vera's shared projections, referenced by every layer
        for name, buf in buffers.items():
            if name.endswith(f".{k}.default"):
                buf.copy_(v)
    return pm
