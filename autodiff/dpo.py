"""DPO: the preference losses of TRL's DPOTrainer over sequence log-probabilities.

With z = (logp_c - logp_r) - (ref_c - ref_r) for a chosen / rejected pair:

    sigmoid  -log sigmoid(beta z)                 (Rafailov et al., default beta 0.1)
    hinge    relu(1 - beta z)                     (RSO)
    ipo      (z - 1 / (2 beta))^2                 (Azar et al.; log-probs averaged per token)

and the implicit rewards beta (logp - ref) of each side. `sequence_logps`
sums per-token log-probabilities over the completion mask (or averages them,
which IPO uses). Pure functions of tensors; beta is a tensor so compiled
losses need no rebuild when it changes.
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(token_logp: torch.Tensor, mask: torch.Tensor, average=False) -> torch.Tensor:
    """Sum (or mean) of (B, L) token log-probs over the (B, L) completion mask -> (B,).

    average: bool, or a 0-d tensor in {0, 1} (compiled modules choose at run time).
    """
    total = (token_logp * mask).sum(-1)
    count = mask.sum(-1).clamp(min=1.0)
    if isinstance(average, bool):
        return total / count if average else total
    return total / (average * count + (1.0 - average))


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
             beta, loss_type="sigmoid"):
    """Mean DPO loss over pairs and the implicit rewards.

    All inputs (P,) sequence log-probs (per-token means for ipo). loss_type
    is a name, or a (3,) tensor of weights over LOSS_TYPES (one-hot in the
    compiled module, so one module serves every loss type). Returns (loss,
    chosen_rewards (P,), rejected_rewards (P,)).
    """
    z = (chosen - rejected) - (ref_chosen - ref_rejected)  # (P,)
    terms = {
        "sigmoid": lambda: -log_sigmoid(beta * z),
        "ipo": lambda: (z - 1.0 / (2.0 * beta)) ** 2,
        "hinge": lambda: torch.relu(1.0 - beta * z),
    }
    if isinstance(loss_type, str):
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
        losses = terms[loss_type]()
    else:
        losses = sum(loss_type[i] * terms[t]() for i, t in enumerate(LOSS_TYPES))
    chosen_rewards = beta * (chosen - ref_chosen)
    rejected_rewards = beta * (rejected - ref_rejected)
    return losses.mean(), chosen_rewards.detach(), rejected_rewards.detach()


def reward_metrics(chosen_rewards, rejected_rewards) -> dict[str, float]:
    """rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies (means over pairs)."""
    c = torch.as_tensor(chosen_rewards, dtype=torch.float64)
    r = torch.as_tensor(rejected_rewards, dtype=torch.float64)
    return {
        "rewards/chosen": float(c.mean()),
        "rewards/rejected": float(r.mean()),
        "rewards/margins": float((c - r).mean()),
        "rewards/accuracies": float((c > r).double().mean()),
    }
