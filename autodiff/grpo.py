"""GRPO: group-relative advantages and the clipped, KL-regularised policy loss.

The formulas follow TRL's GRPOTrainer:

    advantage_i   = (r_i - mean_group(r)) / (std(r) + 1e-4)          (std per group, per batch, or none)
    ratio_t       = exp(logp_t - old_logp_t)
    per_token_t   = -min(ratio_t * A, clamp(ratio_t, 1 - eps_low, 1 + eps_high) * A) + beta * kl_t
    kl_t          = exp(ref_t - logp_t) - (ref_t - logp_t) - 1                  (k3 estimator)
    kl_t          = ratio_t * kl_t       with bias_correction_kl (TRL's default use_bias_correction_kl=True)

aggregated over completion tokens (mask) as
    grpo     mean over sequences of (sum_t per_token * mask) / (sum_t mask)
    dapo     sum(per_token * mask) / sum(mask)                   (token level, whole batch)
    dr_grpo  sum(per_token * mask) / (B * max_completion_length)

`token_logprobs` turns logits into the per-token log-probabilities these
take, written to trace and lower cleanly (arange comparison, no gather).
Everything here is a pure function of tensors; hyperparameters that may
change between runs (beta, epsilons, temperature, bias_correction_kl) are
tensors too, so a compiled loss never needs rebuilding when they change.

Checked against TRL 1.16.0's own GRPOTrainer._compute_loss and
_generate_and_score_completions in tests/test_grpo_numerics.py.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
SCALE_REWARDS = ("group", "batch", "none")
ADV_EPS = 1e-4


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, temperature) -> torch.Tensor:
    """log p(ids[:, t+1] | ids[:, :t+1]) at temperature: (B, T, V), (B, T) -> (B, T-1).

    The sampled distribution is softmax(logits / temperature), so the policy
    ratio and the KL are measured against it (TRL does the same).
    """
    # log_softmax, not logsumexp: aten.logsumexp does not lower to IREE.
    logp = torch.log_softmax(logits[:, :-1].float() / temperature, dim=-1)  # (B, T-1, V)
    vocab = torch.arange(logp.shape[-1], device=logp.device)
    picked = ids[:, 1:].unsqueeze(-1) == vocab  # (B, T-1, V) bool
    return (logp * picked).sum(-1)  # (B, T-1)


def completion_window(mask: torch.Tensor, width: int) -> torch.Tensor:
    """sel (B, width, L) float, one-hot rows: `width` consecutive positions of each row from its first
    completion target (the first 1 of mask (B, L)), moved back where they would pass L. An RL learner's rows
    are [prompt][completion][padding] with at most `width` completion targets, so the window holds them all
    and the head and log-softmax need only run there (TRL's logits_to_keep; the prompt's logits are not
    used). A matmul with sel selects those positions exactly (one product by 1, the rest by 0)."""
    L = mask.shape[1]
    pos = torch.arange(L, device=mask.device)
    first = torch.where(mask > 0, pos, L).amin(-1)  # (B,); L for a row without targets
    start = torch.clamp(first, max=L - width)
    idx = start[:, None] + torch.arange(width, device=mask.device)  # (B, width)
    return (idx[:, :, None] == pos).float()


def window_logprobs(logits: torch.Tensor, ids: torch.Tensor, sel: torch.Tensor, temperature) -> torch.Tensor:
    """token_logprobs on a completion window: logits (B, W, V) at the positions sel (B, W, L) selects (the
    model's head on those rows), ids (B, T) -> (B, L) log-probs, 0 outside the window."""
    targets = (sel.long() * ids[:, None, 1:]).sum(-1)  # (B, W): the token each selected position predicts
    logp = torch.log_softmax(logits.float() / temperature, dim=-1)  # (B, W, V)
    vocab = torch.arange(logp.shape[-1], device=logp.device)
    picked = (logp * (targets[:, :, None] == vocab)).sum(-1)  # (B, W)
    return (sel * picked[:, :, None]).sum(1)  # (B, L)


def per_token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref - logp (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1.0


def bias_corrected_kl(kl: torch.Tensor, ratio: torch.Tensor, bias_correction_kl=True) -> torch.Tensor:
    """kl (B, L) times the importance ratio (B, L) where bias_correction_kl says so (TRL 1.16's default).

    ratio = pi / pi_old is differentiable, so the correction changes the
    gradient even on-policy (ratio 1 in value, d ratio = d logp): it makes
    the KL term's gradient that of the reverse KL to the reference
    (DeepSeek-V3.2). bias_correction_kl: bool, or a 0-d tensor in {0, 1}
    (compiled modules choose at run time).
    """
    if isinstance(bias_correction_kl, bool):
        return kl * ratio if bias_correction_kl else kl
    return kl * (bias_correction_kl * ratio + (1.0 - bias_correction_kl))


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, loss_type, max_completion_length):
    """Reduce a (B, L) per-token loss over the completion mask as `loss_type` says.

    loss_type is a name, or a (3,) tensor of weights over LOSS_TYPES (a
    one-hot selects one): the compiled loss takes it as an input, so one
    module serves every loss type.
    """
    seq_mean = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    token_mean = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    dr = (per_token * mask).sum() / (per_token.shape[0] * max_completion_length)
    if isinstance(loss_type, str):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
        return {"grpo": seq_mean, "dapo": token_mean, "dr_grpo": dr}[loss_type]
    return loss_type[0] * seq_mean + loss_type[1] * token_mean + loss_type[2] * dr


def loss_type_weights(loss_type: str) -> list[float]:
    """The one-hot (3,) selector of `loss_type` for compiled losses."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    return [float(t == loss_type) for t in LOSS_TYPES]


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta,
    eps_low,
    eps_high,
    loss_type="grpo",
    max_completion_length=1,
    bias_correction_kl=True,
):
    """GRPO loss and its statistics.

    logp, old_logp, ref_logp, mask: (B, L); advantages: (B,). beta, eps_low,
    eps_high, max_completion_length: floats or 0-d tensors; loss_type: see
    `aggregate`; bias_correction_kl: see `bias_corrected_kl` (default True, as
    TRL's use_bias_correction_kl). Returns (loss, kl, clip_ratio, low_clip,
    high_clip), the last four masked token means over the batch, as TRL logs
    kl (the corrected one when corrected), clip_ratio/region_mean, low_mean
    and high_mean.
    """
    adv = advantages.unsqueeze(1)  # (B, 1)
    # Outside the completion mask (prompt, padding) the old / reference log-probs are replaced by the
    # current ones, so exp() there cannot overflow into inf * 0 = NaN; masked tokens contribute 0 anyway.
    on = mask > 0
    current = logp.detach()
    old_logp = torch.where(on, old_logp, current)
    ref_logp = torch.where(on, ref_logp, current)
    ratio = torch.exp(logp - old_logp)  # (B, L)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    per_token = -torch.minimum(ratio * adv, clipped * adv)  # (B, L)
    kl = bias_corrected_kl(per_token_kl(logp, ref_logp), ratio, bias_correction_kl)
    per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_type, max_completion_length)

    ntok = mask.sum().clamp(min=1.0)
    low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
    high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
    stats = [(x * mask).sum() / ntok for x in (kl, low + high, low, high)]
    return (loss, *stats)


def compute_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group"):
    """Group-relative advantages of rewards (N,) laid out group after group.

    advantage = (r - group mean) / (std + 1e-4), std the group's (scale
    "group"), the whole batch's ("batch"), or no division ("none"); std is
    unbiased (torch.std, TRL's nanstd). Returns (advantages (N,),
    frac_reward_zero_std), as TRL logs it: the fraction of rewards whose std
    (the one of the scale: the batch std for "batch", else the group std, which
    "none" only logs) is zero. For "group" / "none" that is the fraction of
    groups whose rewards are all equal (they carry no learning signal); for
    "batch" it is 1 when every reward in the batch is equal, else 0.
    """
    if scale not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}; got {scale!r}")
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size} (group_size >= 2)")
    grouped = rewards.view(-1, group_size)  # (G, group_size)
    mean = grouped.mean(1).repeat_interleave(group_size)  # (N,)
    if scale == "batch":
        std = rewards.std().expand_as(rewards)  # (N,) unbiased, as torch.std / TRL's nanstd
    else:
        std = grouped.std(1).repeat_interleave(group_size)  # (N,)
    adv = rewards - mean
    if scale != "none":
        adv = adv / (std + ADV_EPS)
    # TRL: is_std_zero = isclose(std_rewards, 0) per reward, frac = its mean (default isclose tolerances)
    frac_zero_std = torch.isclose(std, torch.zeros_like(std)).float().mean()
    return adv, float(frac_zero_std)
