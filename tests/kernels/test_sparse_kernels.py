"""kernels/sparse.py: the Triton kernels against their torch references, and the references against dense AdamW.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set for this module's import
and its tests); with one, the `gpu` test runs them natively. Each kernel test first checks that the kernel, not the
reference, is what runs.
"""

from __future__ import annotations

import os

import pytest
import torch

from pcpc.autodiff.optim import AdamWConfig, adamw

_before = os.environ.get("TRITON_INTERPRET")
if not torch.cuda.is_available():  # with a GPU the kernels compile natively and the gpu test runs them
    os.environ["TRITON_INTERPRET"] = "1"
try:
    from pcpc.kernels import sparse
finally:
    if _before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = _before



@pytest.fixture(autouse=True)
def interpreter_env(monkeypatch):
    """Triton's interpreter reads TRITON_INTERPRET again when it first launches a kernel: keep it set while
    these tests run (and only then: other tests' subprocesses inherit the environment)."""
    if sparse.interpreted():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


N, NNZ = 5000, 1237  # nnz not a multiple of the kernels' block
HYPER = dict(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)


def problem(seed: int, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(N, generator=g)
    idx = torch.sort(torch.randperm(N, generator=g)[:NNZ]).values
    grads = [torch.randn(N, generator=g) for _ in range(4)]
    return p.to(device), idx.to(device), [x.to(device) for x in grads]


def run_sparse(p, idx, grads, lrs, fn):
    m, v = torch.zeros(idx.numel(), device=p.device), torch.zeros(idx.numel(), device=p.device)
    for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
        fn(p, g, idx, m, v, step, lr, **HYPER)
    return p, m, v


def test_the_reference_is_dense_adamw_restricted_to_the_mask_bit_for_bit(monkeypatch):
    # with the correctly rounded sqrt the compiled modules use (torch's own CPU sqrt is not)
    sqrt = torch.sqrt
    monkeypatch.setattr(torch, "sqrt", lambda x: sqrt(x.double()).to(x.dtype))
    p0, idx, grads = problem(0)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[idx] = True
    lrs = [1e-3, 3e-3, 2e-3, 5e-4]  # a schedule: runtime values
    p_sparse, m_s, v_s = run_sparse(p0.clone(), idx, grads, lrs, sparse.sparse_adamw_reference)
    cfg = AdamWConfig(beta1=HYPER["beta1"], beta2=HYPER["beta2"], eps=HYPER["eps"],
                      weight_decay=HYPER["weight_decay"], grad_clip=0.0)
    p, m, v = p0.clone(), torch.zeros(N), torch.zeros(N)
    for step, (g, lr) in enumerate(zip(grads, lrs), start=1):
        (new_p,), (m,), (v,) = adamw([p], [g], [m], [v], torch.tensor(float(step)), torch.tensor(lr), cfg, [True])
        p = torch.where(mask, new_p, p0)  # dense AdamW, kept only on the mask
    assert torch.equal(p_sparse, p)
    assert torch.equal(m_s, m[idx]) and torch.equal(v_s, v[idx])
    assert torch.equal(p_sparse[~mask], p0[~mask])  # every other weight bit-identical


def test_weight_decay_touches_only_the_masked_entries():
    """Plain AdamW with a masked gradient decays the frozen weights too; the sparse step does not."""
    p0, idx, grads = problem(1)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[idx] = True
    cfg = AdamWConfig(beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, grad_clip=0.0)
    (dense,), _, _ = adamw([p0.clone()], [grads[0] * mask], [torch.zeros(N)], [torch.zeros(N)], torch.tensor(1.0),
                           torch.tensor(1e-2), cfg, [True])
    assert not torch.equal(dense[~mask], p0[~mask])  # the bug the indexed step avoids
    p, _, _ = run_sparse(p0.clone(), idx, grads[:1], [1e-2], sparse.sparse_adamw_)
    assert torch.equal(p[~mask], p0[~mask]) and not torch.equal(p[mask], p0[mask])


def _kernels_against_references(device):
    p0, idx, grads = problem(2, device)
    assert sparse.uses_kernel(p0)
    lrs = [1e-3, 2e-3, 3e-3, 1e-3]
    ours = run_sparse(p0.clone(), idx, grads, lrs, sparse.sparse_adamw_)
    ref = run_sparse(p0.clone(), idx, grads, lrs, sparse.sparse_adamw_reference)
    for a, b in zip(ours, ref):  # p, m, v: bit for bit
        assert torch.equal(a, b)
    ours32 = run_sparse(p0.clone(), idx.int(), grads, lrs, sparse.sparse_adamw_)  # an int32 index list
    for a, b in zip(ours32, ref):
        assert torch.equal(a, b)
    mask = torch.zeros(N, dtype=torch.bool, device=device)
    mask[idx] = True
    assert torch.equal(ours[0][~mask], p0[~mask]) and not torch.equal(ours[0][mask], p0[mask])
    assert torch.equal(sparse.gather(grads[0], idx), sparse.gather_reference(grads[0], idx))
    delta = torch.randn(idx.numel(), generator=torch.Generator().manual_seed(3)).to(device)
    out = sparse.apply_delta(p0, idx, delta)
    assert torch.equal(out, sparse.apply_delta_reference(p0, idx, delta))
    assert torch.equal(p0, problem(2, device)[0])  # apply_delta leaves its base as it was
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    assert sparse.gather(grads[0], empty).numel() == 0


def test_the_kernels_under_the_interpreter_equal_the_references():
    if not sparse.interpreted():
        pytest.skip("pcpc.kernels.sparse was imported before TRITON_INTERPRET was set")
    _kernels_against_references("cpu")


@pytest.mark.gpu
def test_the_kernels_on_a_gpu_equal_the_references():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    if sparse.interpreted():
        pytest.skip("imported under the interpreter")
    _kernels_against_references("cuda")


def test_bad_arguments_are_named():
    p, idx, grads = problem(4)
    with pytest.raises(ValueError, match="idx must be a flat int64"):
        sparse.sparse_adamw_(p, grads[0], idx.short(), torch.zeros(NNZ), torch.zeros(NNZ), 1, 1e-3)
    with pytest.raises(ValueError, match="m and v must have nnz = 1237"):
        sparse.sparse_adamw_(p, grads[0], idx, torch.zeros(N), torch.zeros(N), 1, 1e-3)
