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
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def sequence_logps(token_logp: torch.Tensor, mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """Sum (or mean) of (B, L) token log-probs over the (B, L) completion mask -> (B,)."""
    total = (token_logp * mask).sum(-1)
    return total / mask.sum(-1).clamp(min=1.0) if average else total


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor, ref_rejected: torch.Tensor,
             beta, loss_type: str = "sigmoid"):
    """Mean DPO loss over pairs and the implicit rewards.

    All inputs (P,) sequence log-probs. Returns (loss, chosen_rewards (P,),
    rejected_rewards (P,)).
    """
    z = (chosen - rejected) - (ref_chosen - ref_rejected)  # (P,)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * z)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * z)
    elif loss_type == "ipo":
        losses = (z - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {loss_type!r}")
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
