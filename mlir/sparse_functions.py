"""The sparse optimizer step as a compiled module: AdamW on a mask's entries, in place, O(nnz).

Config keys (JSON): groups ([[shape, K, decay, count], ...]: the trained tensors grouped by shape, padded
mask length and weight-decay flag; runtime/rl/sparse.py makes them), optimizer (AdamWConfig fields). Group
j's `count` tensors go through one call of each function (a call per tensor cost ~0.25 ms each, which at
0.5B was most of a 99%-sparse step):

    grad_j    (*g, idx (c, K), n (c,)) -> gc (c, K), sum of the masked gc^2   the masked gradient, gathered once,
              and its part of the norm (also, once, the gather of the weights' masked entries: runtime/rl/sparse.py)
    adamw_j   (pc (c, K), gc, m (c, K), v (c, K), n, coef, keep, step_size, bc2_sqrt) -> pc[0, :1]   one AdamW
              step of the masked entries pc (row r: p_r.flat[idx[r]], kept compact by the optimizer); pc, m, v
              written in place (role "inplace")
    scatter_j (*p, idx, pc) -> pc[0, :1]                                  p_r.flat[idx[r]] = pc[r], in place

Each call that reads or writes a dense tensor at the mask's indices touches a cache line of it per index (a
uniform 1% mask: 15% of the lines), so the step makes two such passes: the gradient's read (grad_j) and the
weight's write (scatter_j). AdamW reads and writes only compact (c, K) arrays, in place: the optimizer keeps
the masked entries of the weights it writes, so no step reads a weight back, and a step allocates only the
compact gradient. (New (c, K) values each step, with the previous ones alive until the scatter, made the
process fault ~470 MB of fresh pages a step at 90%: 120k minor faults, the step 2.4x slower.) IREE writes the
new entries into the argument buffers in place, and since mlir/compile.py alias_barriers it no longer copies
each written argument whole after the call (the embedding's scatter, 544 MB with 0.25% written, took ~155 ms,
now ~3-4.5 ms). One fused in-place call per group (gather, AdamW and scatter together) was slower, not faster:
619 ms against 214 at 99% (bench/NOTES.md, "Sparse step: in-place writes without a copy").

idx (flat indices) is int64, each row sorted, padded from n to K with an index outside the mask (the padded
entries write back the value they read); n holds the counts (int64). coef (the clip factor, 1 for none) and
the per-step scalars keep (1 - lr * wd, 1 without decay), step_size (lr / bias correction 1) and bc2_sqrt are
f32 runtime values, computed by the caller as kernels/sparse.py's adamw_scalars computes them: no step
recompiles, and IREE's own expm1 and pow never enter the update. The update is kernels/sparse.py's
`adamw_entries`, the arithmetic of its torch reference and its Triton kernel, op by op; on x86 the module is
compiled without FMA (mlir/compile.exact_fp_flags), so it equals the reference, and dense AdamW restricted to
the mask, bit for bit (tested over 20 steps, with and without weight decay).
Weights outside the mask are never written, and weight decay touches only the masked entries.
"""

from __future__ import annotations

import math

import torch

from pcpc.autodiff.optim import AdamWConfig, sum_of_squares
from pcpc.config import from_dict
from pcpc.kernels.sparse import adamw_entries
from pcpc.mlir.lower import ExportFunction
from pcpc.mlir.signature import TensorSpec


def _gathered(ts, idx):
    """(c, K): row r is tensor r's entries at its indices idx[r]."""
    return torch.stack([t.reshape(-1)[idx[r]] for r, t in enumerate(ts)])


def _grad(c: int, K: int):
    def grad(*flat):
        gs, idx, n = flat[:c], flat[c], flat[c + 1]
        gc = _gathered(gs, idx)
        live = torch.arange(K)[None, :] < n[:, None]
        masked = torch.where(live, gc, torch.zeros_like(gc))
        # Rows of 1024: IREE gives each row of a row sum one workgroup, so the embedding's group (one row of
        # 1.57M at 99%) summed on one core (gather + norm 10.1 -> 7.2 ms, bench/NOTES.md).
        rows = masked.reshape(-1, 1024) if K % 1024 == 0 else masked
        return gc, sum_of_squares(rows).float()

    return grad


def _adamw(K: int, opt: AdamWConfig):
    def step_fn(pc, gc, m, v, n, coef, keep, step_size, bc2_sqrt):
        live = torch.arange(K)[None, :] < n[:, None]
        new_p, new_m, new_v = adamw_entries(pc, gc * coef, m, v, keep, step_size, bc2_sqrt,
                                            opt.beta1, opt.beta2, opt.eps)
        m.copy_(torch.where(live, new_m, m))
        v.copy_(torch.where(live, new_v, v))
        pc.copy_(torch.where(live, new_p, pc))
        return pc[0, :1] * 1.0

    return step_fn


def _scatter(c: int):
    def scatter(*flat):
        ps, idx, vals = flat[:c], flat[c], flat[c + 1]
        for r, p in enumerate(ps):
            p.view(-1).index_put_((idx[r],), vals[r])
        return vals[0, :1] * 1.0

    return scatter


def build(config: dict) -> tuple[list[ExportFunction], list[TensorSpec]]:
    opt = from_dict(AdamWConfig, config.get("optimizer", {}), where="optimizer")
    groups = config["groups"]
    if not groups:
        raise ValueError("sparse recipe: no groups (an empty mask trains nothing)")
    fns = []

    def f32(name, shape=()):
        return TensorSpec(name, "scalar" if not shape else "data", shape, "float32")

    for j, (shape, K, decay, c) in enumerate(groups):
        shape = tuple(shape)
        numel = math.prod(shape)
        if not 0 < K <= numel or c < 1:
            raise ValueError(f"sparse recipe: group {j}: K {K} must be in [1, numel {numel}], count {c} >= 1")
        gs = [f32(f"g{r}", shape) for r in range(c)]
        idx, n = TensorSpec("idx", "data", (c, K), "int64"), TensorSpec("n", "data", (c,), "int64")
        vals = f32("vals", (c, K))
        fns.append(ExportFunction(f"grad_{j}", _grad(c, K), [*gs, idx, n], [("gc", "output"), ("sumsq", "output")]))
        moments = [TensorSpec(name, "inplace", (c, K), "float32") for name in ("m", "v")]
        fns.append(ExportFunction(
            f"adamw_{j}", _adamw(K, opt),
            [TensorSpec("pc", "inplace", (c, K), "float32"), f32("gc", (c, K)), *moments, n,
             *map(f32, ("coef", "keep", "step_size", "bc2_sqrt"))],
            [("first", "output")], inplace=True))
        fns.append(ExportFunction(
            f"scatter_{j}", _scatter(c),
            [*[TensorSpec(f"p{r}", "inplace", shape, "float32") for r in range(c)], idx, vals],
            [("first", "output")], inplace=True))
    return fns, []
