"""Sparse updates over a fixed mask: Triton kernels, each with its torch reference beside it.

A mask is a sorted int64 list of flat indices into one parameter (its nnz entries); int32 where the
parameter has fewer than 2^31 entries, which halves the bytes the index list costs. The optimizer state
is compact: m and v have nnz entries, never the parameter's size.

    sparse_adamw_(p, g, idx, m, v, step, lr, ...)   p[idx], m, v <- one AdamW step on the masked entries
    gather(x, idx)                                  x[idx]           (the masked gradient, compact)
    apply_delta(base, idx, delta)                   base with base[idx] + delta at idx (a new tensor)

Every implementation does the update autodiff/optim.py's dense `adamw` makes, restricted to the mask: the
same fp32 operations in the same order (`adamw_entries`), its scalars (bias corrections, step size, decay
factor) computed the same way (`adamw_scalars`), with IEEE round-to-nearest sqrt and division and no FMA
contraction. The Triton kernel (sqrt_rn, div_rn, enable_fp_fusion=False) and the reference agree bit for bit,
on a GPU and under the interpreter; so does the compiled sparse step (mlir/sparse_functions.py) on x86, whose
module is compiled without FMA and takes these scalars as runtime values. The compiled dense AdamW of the
training modules keeps FMA contraction and IREE's transcendentals, so it differs from all three at the ulp
level. The reference takes its sqrt in float64 and rounds it (exact: sqrt is correctly rounded through a
double); torch's own vectorised CPU sqrt is not correctly rounded (it differs in ~20% of fp32 inputs).
Weight decay touches only the masked entries: dense AdamW given a masked gradient would still decay every
frozen weight. Learning rate and step are runtime values, so no step recompiles a kernel.

Which implementation runs: the Triton kernel for CUDA tensors, the same kernel under Triton's interpreter for
CPU tensors when TRITON_INTERPRET=1 (how the tests check the kernels without a GPU), else the reference.
"""

from __future__ import annotations

import os

import torch

from pcpc.autodiff.optim import bias_correction, f32

BLOCK = 512
"""Entries of the mask per Triton program."""
WARPS = 16
"""Warps per program of the AdamW kernel: 512 x 16 ran fastest of 256..4096 x 4..16 at every sparsity from 90
to 99.75% on an H200 (bench/sparse_gpu.py, 2026-12-04: 0.43 ms at 99% against 0.61 ms with 1024 x 4)."""
_NO_FMA = {} if os.environ.get("TRITON_INTERPRET", "0") == "1" else {"enable_fp_fusion": False}
"""Launch options of the AdamW kernel: p * keep - step_size * m / denom op by op, as the reference rounds it."""

try:
    import triton
    import triton.language as tl
except ImportError:  # a platform without Triton: the references serve
    triton = None


def interpreted() -> bool:
    """Whether the kernels run under Triton's interpreter (TRITON_INTERPRET=1 when this module was imported)."""
    return triton is not None and _INTERPRET


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def uses_kernel(t: torch.Tensor) -> bool:
    """True when operations on `t` run the Triton kernel (natively or interpreted), False for the reference."""
    return triton is not None and (t.is_cuda or (_INTERPRET and t.device.type == "cpu"))


# ---------------------------------------------------------------------------
# AdamW on the masked entries


def adamw_scalars(step: int, lr: float, beta1: float, beta2: float, weight_decay: float, decay: bool = True
                  ) -> dict[str, float]:
    """The per-step scalars of autodiff/optim.adamw, computed as it computes them (fp32 tensors), as floats."""
    step_t, lr_t = torch.tensor(float(step)), torch.tensor(float(lr))
    bc1 = bias_correction(beta1, step_t)
    bc2_sqrt = torch.sqrt(bias_correction(beta2, step_t))
    keep = (1.0 - lr_t * weight_decay) if decay and weight_decay else torch.tensor(1.0)
    return {"step_size": float(lr_t / bc1), "bc2_sqrt": float(bc2_sqrt), "keep": float(keep)}


def sqrt_rn(x: torch.Tensor) -> torch.Tensor:
    """The correctly rounded fp32 sqrt (IEEE's, IREE's, Triton's sqrt_rn): taken in float64, then rounded."""
    return torch.sqrt(x.double()).to(x.dtype)


def adamw_entries(p, g, m, v, keep, step_size, bc2_sqrt, beta1: float, beta2: float, eps: float,
                  sqrt=torch.sqrt):
    """One AdamW step of gathered entries (p, g, m, v alike), op by op: the arithmetic every implementation
    here makes, the compiled sparse step (mlir/sparse_functions.py) included. keep, step_size and bc2_sqrt
    are adamw_scalars' (tensors, or floats where eager torch rounds them to fp32 itself); bc2_sqrt divides as
    a tensor (CUDA divides by a scalar's reciprocal). Returns the new (p, m, v)."""
    p = p * keep
    m = f32(beta1) * m + f32(1.0 - beta1) * g
    v = f32(beta2) * v + f32(1.0 - beta2) * g * g
    denom = sqrt(v) / bc2_sqrt + f32(eps)
    return p - step_size * m / denom, m, v


def sparse_adamw_reference(p, g, idx, m, v, step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                           eps: float = 1e-8, weight_decay: float = 0.0, decay: bool = True) -> None:
    """In place: p (flat, its size) at idx, and the compact m, v (nnz), after one AdamW step."""
    s = adamw_scalars(step, lr, beta1, beta2, weight_decay, decay)
    new_p, new_m, new_v = adamw_entries(p[idx], g[idx], m, v, s["keep"], s["step_size"],
                                        torch.full_like(v, s["bc2_sqrt"]), beta1, beta2, eps, sqrt=sqrt_rn)
    m.copy_(new_m)
    v.copy_(new_v)
    p[idx] = new_p


def sparse_adamw_(p, g, idx, m, v, step: int, lr: float, beta1: float = 0.9, beta2: float = 0.999,
                  eps: float = 1e-8, weight_decay: float = 0.0, decay: bool = True) -> None:
    """One AdamW step of the masked entries of p (flat fp32), in place; g is the dense flat gradient (only its
    masked entries are read), m and v the compact moments (nnz). `decay` False: no weight decay (biases)."""
    _check(p, g, idx, m, v)
    if not uses_kernel(p):
        return sparse_adamw_reference(p, g, idx, m, v, step, lr, beta1, beta2, eps, weight_decay, decay)
    s = adamw_scalars(step, lr, beta1, beta2, weight_decay, decay)
    _launch_adamw(p, g, idx, m, v, beta1, beta2, eps, s, BLOCK, WARPS)


def _launch_adamw(p, g, idx, m, v, beta1, beta2, eps, s, block: int, warps: int) -> None:
    """The AdamW kernel over idx in programs of `block` entries and `warps` warps (bench/sparse_gpu.py tries
    others)."""
    nnz = idx.numel()
    if nnz:
        _adamw_kernel[(triton.cdiv(nnz, block),)](
            p, g, idx, m, v, nnz, beta1, 1.0 - beta1, beta2, 1.0 - beta2, eps, s["keep"], s["step_size"],
            s["bc2_sqrt"], BLOCK=block, num_warps=warps, **_NO_FMA)


# ---------------------------------------------------------------------------
# gather and delta apply


def gather_reference(x, idx):
    return x[idx]


def gather(x, idx):
    """x[idx] (flat x), compact: the masked gradient the sparse step and the delta logs read."""
    if not uses_kernel(x):
        return gather_reference(x, idx)
    out = torch.empty(idx.numel(), dtype=x.dtype, device=x.device)
    if idx.numel():
        _gather_kernel[(triton.cdiv(idx.numel(), BLOCK),)](x, idx, out, idx.numel(), BLOCK=BLOCK)
    return out


def apply_delta_reference(base, idx, delta):
    out = base.clone()
    out[idx] = base[idx] + delta
    return out


def apply_delta(base, idx, delta):
    """base (flat) with delta added at idx: θ_base + Δ, as a new tensor."""
    if not uses_kernel(base):
        return apply_delta_reference(base, idx, delta)
    out = base.clone()
    if idx.numel():
        _delta_kernel[(triton.cdiv(idx.numel(), BLOCK),)](out, idx, delta, idx.numel(), BLOCK=BLOCK)
    return out


def _check(p, g, idx, m, v) -> None:
    if p.dim() != 1 or g.shape != p.shape:
        raise ValueError(f"sparse_adamw_: p and g must be flat and alike; got {tuple(p.shape)}, {tuple(g.shape)}")
    if idx.dtype not in (torch.int64, torch.int32) or idx.dim() != 1:
        raise ValueError(f"sparse_adamw_: idx must be a flat int64 (or int32) tensor; got {idx.dtype} "
                         f"{tuple(idx.shape)}")
    if m.shape != idx.shape or v.shape != idx.shape:
        raise ValueError(f"sparse_adamw_: m and v must have nnz = {idx.numel()} entries; got {tuple(m.shape)}, "
                         f"{tuple(v.shape)}")
    if p.dtype != torch.float32 or not (p.device == g.device == idx.device == m.device == v.device):
        raise ValueError("sparse_adamw_: fp32 tensors, all on one device")


if triton is not None:
    @triton.jit
    def _adamw_kernel(p_ptr, g_ptr, idx_ptr, m_ptr, v_ptr, nnz, beta1, one_minus_beta1, beta2, one_minus_beta2,
                      eps, keep, step_size, bc2_sqrt, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < nnz
        idx = tl.load(idx_ptr + offs, mask=live, other=0)
        p = tl.load(p_ptr + idx, mask=live, other=0.0)
        g = tl.load(g_ptr + idx, mask=live, other=0.0)
        m = tl.load(m_ptr + offs, mask=live, other=0.0)
        v = tl.load(v_ptr + offs, mask=live, other=0.0)
        p = p * keep
        m = beta1 * m + one_minus_beta1 * g
        v = beta2 * v + one_minus_beta2 * g * g
        denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
        p = p - tl.div_rn(step_size * m, denom)
        tl.store(p_ptr + idx, p, mask=live)
        tl.store(m_ptr + offs, m, mask=live)
        tl.store(v_ptr + offs, v, mask=live)

    @triton.jit
    def _gather_kernel(x_ptr, idx_ptr, out_ptr, nnz, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < nnz
        idx = tl.load(idx_ptr + offs, mask=live, other=0)
        tl.store(out_ptr + offs, tl.load(x_ptr + idx, mask=live), mask=live)

    @triton.jit
    def _delta_kernel(out_ptr, idx_ptr, delta_ptr, nnz, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        live = offs < nnz
        idx = tl.load(idx_ptr + offs, mask=live, other=0)
        base = tl.load(out_ptr + idx, mask=live)
        tl.store(out_ptr + idx, base + tl.load(delta_ptr + offs, mask=live), mask=live)
