"""Functional optimizers: AdamW (as torch.optim.AdamW), global-norm clipping, DiLoCo's outer Nesterov.

Every function takes and returns lists of tensors and never mutates its
inputs, so it can be traced into a compiled module. Hyperparameters fixed at
build time live in `AdamWConfig`; the learning rate and the step count are
tensor inputs so schedules never recompile.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AdamWConfig:
    """Inner optimizer hyperparameters (baked into the compiled train_step)."""

    beta1: float = 0.9
    """Exponential decay of the first moment."""
    beta2: float = 0.95
    """Exponential decay of the second moment (nanoGPT uses 0.95)."""
    eps: float = 1e-8
    """Added to the denominator for numerical stability."""
    weight_decay: float = 0.1
    """Decoupled weight decay, applied only to parameters with 2+ dims (matrices and embeddings)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value before the update; 0 disables clipping."""

    def __post_init__(self):
        for name in ("beta1", "beta2"):
            v = getattr(self, name)
            if not 0.0 <= v < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {v}")
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0 (0 disables), got {self.grad_clip}")


def f32(x: float) -> float:
    """x rounded to the nearest fp32, as a Python float. A Python constant in a traced graph reaches IREE as
    an f64, which it converts to f32 toward zero (x * 0.999 compiled to x * 0.99899995, where torch uses
    0.99900001); one already representable converts exactly, so compiled and eager code use the same
    number. Eager results do not change: torch rounds a Python scalar to the nearest fp32 itself."""
    return struct.unpack("f", struct.pack("f", x))[0]


def bias_correction(beta: float, step: torch.Tensor) -> torch.Tensor:
    """1 - beta^step, as -expm1(step * log(beta)): no cancellation. The direct form loses ~10 bits in fp32 at
    beta 0.999 and small steps (fp32(0.999) itself is 1.3e-5 off 0.999 relative to 1 - 0.999), and IREE's
    pow is a few ulps off libm's, which the cancellation turns into a 5e-5 relative error in the update;
    this form stays within 2e-7 of the exact value (1 - beta ** step in double, as torch.optim computes it),
    compiled or eager."""
    if beta == 0.0:
        return torch.ones_like(step)
    return -torch.expm1(step * f32(math.log(beta)))


def sum_of_squares(g: torch.Tensor) -> torch.Tensor:
    """sum(g*g) accurate to fp32 rounding for millions of elements.

    A single flat fp32 reduction over a 3M-parameter model drifts by ~1e-4
    relative when compiled as a sequential loop; summing rows in fp32 and the
    row sums in fp64 keeps the clip coefficient within 1e-6 of torch's.

    |g| * |g| (the same values as g * g, bit for bit): IREE 3.13's llvm-cpu code for a row sum of
    `x * x` with --iree-llvmcpu-reassociate-fp-reductions comes out scalar, 136 ms for Qwen2.5-0.5B's
    embedding gradient on 2 cores; the sum of `|x| * |x|` is vectorized, 20 ms (bench/NOTES.md).
    """
    a = g.float().abs()
    sq = a * a
    rows = sq.reshape(-1, sq.shape[-1]) if sq.dim() >= 2 else sq.reshape(1, -1)  # (R, C)
    return rows.sum(-1).double().sum()


def global_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all of grads together (fp32), as clip_grad_norm_ computes it."""
    return torch.sqrt(sum(sum_of_squares(g) for g in grads)).float()


def clip_coef(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """The factor torch.nn.utils.clip_grad_norm_ scales grads by: min(1, max_norm / (global L2 norm + 1e-6))."""
    return torch.clamp(max_norm / (global_norm(grads) + 1e-6), max=1.0)


def clip_by_global_norm(grads: list[torch.Tensor], max_norm: float) -> list[torch.Tensor]:
    """Scale grads so their global L2 norm is at most max_norm (torch.nn.utils.clip_grad_norm_)."""
    coef = clip_coef(grads, max_norm)
    return [g * coef for g in grads]


def adamw(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    m: list[torch.Tensor],
    v: list[torch.Tensor],
    step: torch.Tensor,
    lr: torch.Tensor,
    cfg: AdamWConfig,
    decay: list[bool],
    coef: torch.Tensor | None = None,
    lr_scale: list[float] | None = None,
):
    """One AdamW update. `step` is the 1-based count of this update (t in the Adam paper).
    lr_scale: a constant multiplier of lr per parameter (LoRA+'s B matrices), 1 when None.

    Returns (new_params, new_m, new_v); matches torch.optim.AdamW (foreach=False).
    Gradients are clipped to cfg.grad_clip by their global norm, or, when `coef`
    is given, scaled by it: the clip factor of a global norm computed over more
    parameters than this call updates (`clip_coef`; see `update_groups`).
    """
    if coef is not None:
        grads = [g * coef for g in grads]
    elif cfg.grad_clip > 0:
        grads = clip_by_global_norm(grads, cfg.grad_clip)
    bc1 = bias_correction(cfg.beta1, step)
    bc2_sqrt = torch.sqrt(bias_correction(cfg.beta2, step))
    b1, b2, eps, wd = f32(cfg.beta1), f32(cfg.beta2), f32(cfg.eps), f32(cfg.weight_decay)
    new_p, new_m, new_v = [], [], []
    for j, (p, g, m_i, v_i, d) in enumerate(zip(params, grads, m, v, decay)):
        lr_j = lr * f32(lr_scale[j]) if lr_scale is not None and lr_scale[j] != 1.0 else lr
        if d and wd:
            p = p * (1.0 - lr_j * wd)
        m_i = b1 * m_i + f32(1.0 - cfg.beta1) * g
        v_i = b2 * v_i + f32(1.0 - cfg.beta2) * g * g
        denom = torch.sqrt(v_i) / bc2_sqrt + eps
        p = p - (lr_j / bc1) * m_i / denom
        new_p.append(p)
        new_m.append(m_i)
        new_v.append(v_i)
    return new_p, new_m, new_v


def nesterov_outer(
    params: list[torch.Tensor],
    momentum: list[torch.Tensor],
    delta: list[torch.Tensor],
    lr: torch.Tensor,
    mu: torch.Tensor,
):
    """DiLoCo outer step on the averaged pseudo-gradient delta = theta_global - theta_local.

    b <- mu * b + delta;  theta <- theta - lr * (delta + mu * b)
    (torch.optim.SGD(nesterov=True) with the pseudo-gradient as the gradient.)
    """
    new_b = [mu * b + d for b, d in zip(momentum, delta)]
    new_p = [p - lr * (d + mu * b) for p, d, b in zip(params, delta, new_b)]
    return new_p, new_b


def update_groups(names: list[str], shapes: list[tuple[int, ...]]) -> list[tuple[int, list[int]]]:
    """Split the parameters into chunks the optimizer updates one call at a time.

    A chunk is a run of consecutive parameters under the same numbered prefix
    (`model.layers.7.`: one transformer block), or a single parameter outside
    any. Returns [(kind, indices)] in parameter order, where chunks of one kind
    have the same names (up to the number) and shapes — or, single tensors,
    the same shape (a tied-off lm_head shares the embedding's) — so one
    compiled function serves every block. Updating chunk by chunk keeps the optimizer's
    transients at one block's size instead of the whole model's.
    """
    import re

    chunks: list[tuple[str, list[int]]] = []
    for i, name in enumerate(names):
        m = re.match(r"(.*?\.\d+\.)", name)
        key = m.group(1) if m else name
        if chunks and m and chunks[-1][0] == key:
            chunks[-1][1].append(i)
        else:
            chunks.append((key, [i]))
    kinds: dict[tuple, int] = {}
    out = []
    for key, idx in chunks:
        sig = tuple((names[i][len(key):] if key != names[i] else "", tuple(shapes[i])) for i in idx)
        out.append((kinds.setdefault(sig, len(kinds)), idx))
    return out


def generic_name(name: str) -> str:
    """`model.layers.7.mlp.up_proj.weight` -> `model.layers.*.mlp.up_proj.weight`: the argument names of the
    compiled function that updates every chunk of one kind."""
    import re

    return re.sub(r"\.\d+\.", ".*.", name, count=1)
