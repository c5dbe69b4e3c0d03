"""DPO: the preference losses of TRL's DPOTrainer over sequence log-probabilities.

With the log-ratios d_c = logp_c - ref_c, d_r = logp_r - ref_r of a chosen /
rejected pair (logp, ref: sums of the completion's masked token log-probs)
and z = d_c - d_r:

    sigmoid  -log sigmoid(beta z)                 (Rafailov et al., default beta 0.1)
    hinge    relu(1 - beta z)                     (RSO)
    ipo      (d_c / n_c - d_r / n_r - 1 / (2 beta))^2
             (Azar et al.; n = completion tokens: per-token mean log-ratios, as TRL)

and the implicit rewards beta d of each side, on the sums for every loss type
(TRL logs them so). `sequence_logps` sums per-token log-probabilities over the
completion mask. Pure functions of tensors; beta is a tensor so compiled
losses need no rebuild when it changes. Checked against TRL 1.16.0's own
DPOTrainer._compute_loss in tests/test_dpo_numerics.py.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(token_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of (B, L) token log-probs over the (B, L) completion mask -> (B,); what DPO compares, ipo too."""
    return (token_logp * mask).sum(-1)


def log_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """Stable log sigmoid(x) = (x - |x|) / 2 - log1p(exp(-|x|)).

    F.logsigmoid's backward op does not lower to IREE. Writing min(x, 0) as
    (x - |x|) / 2 keeps the derivative exact at x = 0 (1/2, where DPO starts:
    policy = reference), which clamp or relu would get wrong.
    """
    a = torch.abs(x)
    return 0.5 * (x - a) - torch.log1p(torch.exp(-a))


def loss_type_weights(loss_type: str) -> list[float]:
    """The one-hot (3,) selector of `loss_type` for compiled losses."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    return [float(t == loss_type) for t in LOSS_TYPES]


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta, loss_type="sigmoid", chosen_tokens=None, rejected_tokens=None):
    """Mean DPO loss over pairs and the implicit rewards.

    chosen, rejected, ref_chosen, ref_rejected: (P,) sums of masked token
    log-probs (policy and reference), for every loss type. chosen_tokens,
    rejected_tokens: (P,) completion token counts, which ipo divides the
    log-ratios by (TRL: sum / count.clamp(min=1)); needed whenever ipo may be
    selected. loss_type is a name, or a (3,) tensor of weights over LOSS_TYPES
    (one-hot in the compiled module, so one module serves every loss type).
    Returns (loss, chosen_rewards (P,), rejected_rewards (P,)), the rewards
    beta * (policy sum - reference sum), detached.
    """
    if isinstance(loss_type, str) and loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
    if (loss_type == "ipo" or not isinstance(loss_type, str)) and (chosen_tokens is None or rejected_tokens is None):
        raise ValueError("ipo needs chosen_tokens and rejected_tokens (completion token counts per pair)")
    d_chosen = chosen - ref_chosen  # (P,)
    d_rejected = rejected - ref_rejected
    z = d_chosen - d_rejected

    def ipo():
        z_mean = d_chosen / chosen_tokens.clamp(min=1.0) - d_rejected / rejected_tokens.clamp(min=1.0)
        return (z_mean - 1.0 / (2.0 * beta)) ** 2

    terms = {
        "sigmoid": lambda: -log_sigmoid(beta * z),
        "ipo": ipo,
        "hinge": lambda: torch.relu(1.0 - beta * z),
    }
    if isinstance(loss_type, str):
        losses = terms[loss_type]()
    else:
        losses = sum(loss_type[i] * terms[t]() for i, t in enumerate(LOSS_TYPES))
    return losses.mean(), (beta * d_chosen).detach(), (beta * d_rejected).detach()


def reward_metrics(chosen_rewards, rejected_rewards) -> dict[str, float]:
    """rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies: means over pairs, as TRL logs them.

    chosen_rewards, rejected_rewards: (P,) beta * (policy sum - reference sum)
    of each side (what dpo_loss returns), for every loss type, ipo too.
    Accuracy counts strictly larger chosen rewards (a tie is a miss).
    """
    c = torch.as_tensor(chosen_rewards, dtype=torch.float64)
    r = torch.as_tensor(rejected_rewards, dtype=torch.float64)
    return {
        "rewards/chosen": float(c.mean()),
        "rewards/rejected": float(r.mean()),
        "rewards/margins": float((c - r).mean()),
        "rewards/accuracies": float((c > r).double().mean()),
    }
