"""Losses written so they trace and lower cleanly (no one_hot, no gather)."""

import torch


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy of logits (B, T, V) against integer targets (B, T).

    The target log-probability is picked by comparing against `arange(V)`
    instead of `F.one_hot` (data-dependent, breaks make_fx) or `gather`; for
    the small vocabularies of nanoGPT this is as fast and lowers to plain
    elementwise + reduction dispatches.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    picked = targets.unsqueeze(-1) == vocab  # (B, T, V) bool
    return -(logp * picked).sum(-1).mean()
