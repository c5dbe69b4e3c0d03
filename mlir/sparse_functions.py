"""The sparse optimizer step as a compiled module: AdamW on a mask's entries, in place, O(nnz).

Config keys (JSON): groups ([[shape, K, decay], ...]: one entry per distinct tensor shape, padded mask
length and weight-decay flag; runtime/rl/sparse.py makes them), optimizer (AdamWConfig fields). For each
group j:

    sq_j     (g (shape), idx (K,), n) -> sum of g.flat[idx[:n]]^2        the masked gradient's part of the norm
    adamw_j  (p (shape), g (shape), idx (K,), m (K,), v (K,), n, step, lr, coef) -> coef
             p.flat[idx[:n]], m[:n], v[:n] <- one AdamW step, written in place (role "inplace")

idx (flat indices) is int64, sorted, padded from n to K with an index outside the mask (the padded entries write back the
value they read); n is an int64 0-d count; step, lr, coef are f32 scalars (coef: the clip factor, 1 for
none). The update is autodiff/optim.py's `adamw` itself, on the gathered entries, so it compiles to the
dense module's AdamW arithmetic: the two agree bit for bit on the masked entries (tested). IREE's llvm-cpu
code contracts a * b + c into a fused multiply-add and folds the Python constants at double precision, so
both differ from torch eager (and kernels/sparse.py's reference) by an ulp here and there.
Weights outside the mask are never written, and weight decay touches only the masked entries.
"""

from __future__ import annotations

import math

import torch

from pcpc.autodiff.optim import AdamWConfig, adamw
from pcpc.config import from_dict
from pcpc.mlir.lower import ExportFunction
from pcpc.mlir.signature import TensorSpec


def _sq(K: int):
    def sq(g, idx, n):
        gi = g.reshape(-1)[idx]
        live = torch.arange(K) < n
        return torch.where(live, gi * gi, torch.zeros_like(gi)).sum()

    return sq


def _adamw(K: int, decay: bool, opt: AdamWConfig):
    def step_fn(p, g, idx, m, v, n, step, lr, coef):
        live = torch.arange(K) < n
        flat = p.view(-1)
        pi, gi = flat[idx], g.reshape(-1)[idx]
        (new_p,), (new_m,), (new_v,) = adamw([pi], [gi], [m], [v], step, lr, opt, [decay], coef=coef)
        flat.index_put_((idx,), torch.where(live, new_p, pi))
        m.copy_(torch.where(live, new_m, m))
        v.copy_(torch.where(live, new_v, v))
        return coef * 1.0

    return step_fn


def build(config: dict) -> tuple[list[ExportFunction], list[TensorSpec]]:
    opt = from_dict(AdamWConfig, config.get("optimizer", {}), where="optimizer")
    groups = config["groups"]
    if not groups:
        raise ValueError("sparse recipe: no groups (an empty mask trains nothing)")
    fns = []

    def f32(name, shape=()):
        return TensorSpec(name, "scalar" if not shape else "data", shape, "float32")

    for j, (shape, K, decay) in enumerate(groups):
        shape = tuple(shape)
        numel = math.prod(shape)
        if not 0 < K <= numel:
            raise ValueError(f"sparse recipe: group {j}: K {K} must be in [1, numel {numel}]")
        g, idx, n = f32("g", shape), TensorSpec("idx", "data", (K,), "int64"), TensorSpec("n", "data", (), "int64")
        fns.append(ExportFunction(f"sq_{j}", _sq(K), [g, idx, n], [("sumsq", "output")]))
        fns.append(ExportFunction(
            f"adamw_{j}", _adamw(K, bool(decay), opt),
            [TensorSpec("p", "inplace", shape, "float32"), g, idx, TensorSpec("m", "inplace", (K,), "float32"),
             TensorSpec("v", "inplace", (K,), "float32"), n, f32("step"), f32("lr"), f32("coef")],
            [("coef", "output")], inplace=True))
    return fns, []
