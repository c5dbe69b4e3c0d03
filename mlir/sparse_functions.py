"""The sparse optimizer step as a compiled module: AdamW on a mask's entries, in place, O(nnz).

Config keys (JSON): groups ([[shape, K, decay, count], ...]: the trained tensors grouped by shape, padded
mask length and weight-decay flag; runtime/rl/sparse.py makes them), optimizer (AdamWConfig fields). A step
is three calls, each over every group (G of them; group j holds c_j tensors, in order):

    grad    (*g (every member of every group), *idx_j (c_j, K_j), *n_j (c_j,)) -> *gc_j (c_j, K_j), sumsq (G,)
            the masked gradients, gathered once, and each group's part of the clip norm (also, once, the
            gather of the weights' masked entries: runtime/rl/sparse.py)
    adamw   (*pc_j, *gc_j, *m_j, *v_j, *n_j, coef, keep, step_size, bc2_sqrt) -> pc_0[0, :1]   one AdamW step
            of the masked entries pc_j (row r: p_r.flat[idx_j[r]], kept compact by the optimizer); pc, m, v
            written in place (role "inplace"); keep applies to the groups with weight decay
    scatter (*p, *idx_j, *pc_j) -> pc_0[0, :1]                    p_r.flat[idx_j[r]] = pc_j[r], in place

A group is one dispatch of each kind: its members share a shape and K, and IREE allows a dispatch 32
bindings on llvm-cpu (16 on cuda), which bounds a group's size. The calls are not per group: a call costs
~0.2 ms whatever it does, and at 0.5B (46 groups, 138 calls a step) that was a third of a 99%-sparse step
(bench/NOTES.md, "The sparse step in three calls"); one call runs its groups' dispatches back to back on
IREE's workers.

Each dispatch that reads or writes a dense tensor at the mask's indices touches a cache line of it per index
(a uniform 1% mask: 15% of the lines), so the step makes two such passes: the gradient's read (grad) and the
weight's write (scatter). AdamW reads and writes only compact (c, K) arrays, in place: the optimizer keeps
the masked entries of the weights it writes, so no step reads a weight back, and a step allocates only the
compact gradients. (New (c, K) values each step, with the previous ones alive until the scatter, made the
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


def _live(n, K: int):
    return torch.arange(K)[None, :] < n[:, None]


def _by_group(members, counts: list[int]) -> list:
    """The flat list of every group's members (in group order), as one list per group."""
    starts = [sum(counts[:j]) for j in range(len(counts) + 1)]
    return [members[a:b] for a, b in zip(starts, starts[1:])]


def _grad(counts: list[int], Ks: list[int]):
    G = len(counts)

    def grad(*flat):
        gs, idx, n = _by_group(flat[:sum(counts)], counts), flat[-2 * G:-G], flat[-G:]
        gathered, sums = [], []
        for j, K in enumerate(Ks):
            gc = _gathered(gs[j], idx[j])
            masked = torch.where(_live(n[j], K), gc, torch.zeros_like(gc))
            # Rows of 1024: IREE gives each row of a row sum one workgroup, so the embedding's group (one row of
            # 1.57M at 99%) summed on one core (gather + norm 10.1 -> 7.2 ms, bench/NOTES.md).
            rows = masked.reshape(-1, 1024) if K % 1024 == 0 else masked
            gathered.append(gc)
            sums.append(sum_of_squares(rows).float())
        return (*gathered, torch.stack(sums))

    return grad


def _adamw(Ks: list[int], decays: list[bool], opt: AdamWConfig):
    G = len(Ks)

    def step_fn(*flat):
        pc, gc, m, v, n = (flat[k * G:(k + 1) * G] for k in range(5))
        coef, keep, step_size, bc2_sqrt = flat[5 * G:]
        for j, K in enumerate(Ks):
            live = _live(n[j], K)
            new_p, new_m, new_v = adamw_entries(pc[j], gc[j] * coef, m[j], v[j], keep if decays[j] else 1.0,
                                                step_size, bc2_sqrt, opt.beta1, opt.beta2, opt.eps)
            m[j].copy_(torch.where(live, new_m, m[j]))
            v[j].copy_(torch.where(live, new_v, v[j]))
            pc[j].copy_(torch.where(live, new_p, pc[j]))
        return pc[0][0, :1] * 1.0

    return step_fn


def _scatter(counts: list[int]):
    G, total = len(counts), sum(counts)

    def scatter(*flat):
        ps, idx, vals = _by_group(flat[:total], counts), flat[total:total + G], flat[total + G:]
        for j, group in enumerate(ps):
            for r, p in enumerate(group):
                p.view(-1).index_put_((idx[j][r],), vals[j][r])
        return vals[0][0, :1] * 1.0

    return scatter


def build(config: dict) -> tuple[list[ExportFunction], list[TensorSpec]]:
    opt = from_dict(AdamWConfig, config.get("optimizer", {}), where="optimizer")
    groups = config["groups"]
    if not groups:
        raise ValueError("sparse recipe: no groups (an empty mask trains nothing)")

    def f32(name, shape=()):
        return TensorSpec(name, "scalar" if not shape else "data", shape, "float32")

    for j, (shape, K, decay, c) in enumerate(groups):
        numel = math.prod(shape)
        if not 0 < K <= numel or c < 1:
            raise ValueError(f"sparse recipe: group {j}: K {K} must be in [1, numel {numel}], count {c} >= 1")
    shapes = [tuple(shape) for shape, _, _, _ in groups]
    Ks, decays, counts = [K for _, K, _, _ in groups], [bool(d) for _, _, d, _ in groups], [c for *_, c in groups]
    G = len(groups)

    def per_group(prefix, role, dtype="float32", rows=True):
        return [TensorSpec(f"{prefix}{j}", role, (counts[j], Ks[j]) if rows else (counts[j],), dtype)
                for j in range(G)]

    def members(prefix, role):
        return [TensorSpec(f"{prefix}{j}_{r}", role, shapes[j], "float32") for j in range(G) for r in range(counts[j])]

    idx, n = per_group("idx", "data", "int64"), per_group("n", "data", "int64", rows=False)
    grad = ExportFunction("grad", _grad(counts, Ks), [*members("g", "data"), *idx, *n],
                          [*((f"gc{j}", "output") for j in range(G)), ("sumsq", "output")])
    adamw = ExportFunction(
        "adamw", _adamw(Ks, decays, opt),
        [*per_group("pc", "inplace"), *per_group("gc", "data"), *per_group("m", "inplace"),
         *per_group("v", "inplace"), *n, *map(f32, ("coef", "keep", "step_size", "bc2_sqrt"))],
        [("first", "output")], inplace=True)
    scatter = ExportFunction("scatter", _scatter(counts), [*members("p", "inplace"), *idx, *per_group("pc", "data")],
                             [("first", "output")], inplace=True)
    return [grad, adamw, scatter], []
