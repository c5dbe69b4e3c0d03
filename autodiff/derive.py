"""Derive flat, traceable functions from a functional loss.

A model's loss is `loss_fn(params: dict, *data) -> scalar`. The builders here
return *flat* functions whose positional arguments are the weights in the
documented order, then optimizer state, then data — the calling convention
of every exported function. Gradients come from torch.func; `trace` turns a
flat function into an FX graph with make_fx, decomposing the ops IREE
cannot take.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from pcpc.autodiff.optim import AdamWConfig, adamw, global_norm, nesterov_outer

LossFn = Callable[..., torch.Tensor]


def _embedding_dense_backward(grad_output, indices, num_weights, padding_idx, scale_grad_by_freq):
    # aten's decomposition emits an op IREE rejects; index_put(accumulate) lowers to a scatter.
    assert not scale_grad_by_freq, "scale_grad_by_freq is not supported"
    grad = grad_output.reshape(-1, grad_output.shape[-1])  # (N, C)
    idx = indices.reshape(-1)
    if padding_idx >= 0:
        grad = grad * (idx != padding_idx).unsqueeze(-1).to(grad.dtype)
    out = grad.new_zeros((num_weights, grad.shape[-1]))
    return torch.ops.aten.index_put(out, [idx], grad, accumulate=True)


SHORT_ROW = 32
"""Softmax rows up to this long are decomposed (below); longer ones stay one linalg.softmax."""


def _softmax(x, dim, half_to_float):
    # On rows of 32 (nanoGPT attention at block 32) the decomposed form takes ~0.6x the time of IREE's
    # linalg.softmax; on rows of 128, ~1.2x (bench/NOTES.md, "The Zen 4 host again"). So only short rows.
    if half_to_float or x.dtype != torch.float32 or x.shape[dim] > SHORT_ROW:
        return NotImplemented
    e = torch.exp(x - torch.amax(x, dim, keepdim=True))
    return e * torch.reciprocal(torch.sum(e, dim, keepdim=True))


def _column_sum(x, dims, keepdim=False, dtype=None):
    # A sum over every leading dim (a norm's or bias's weight gradient over the tokens) as ones(1, M) @ x:
    # IREE vectorizes the plain reduction along its strided axis, one float per instruction, and the product
    # runs ~2.3x faster (nanoGPT's norms' weight gradients, 0.79 -> 0.34 ms a step).
    if dtype is not None or x.dtype != torch.float32 or x.dim() < 2 or x.numel() == 0 or not dims:
        return NotImplemented
    n = x.dim()
    if sorted(d % n for d in dims) != list(range(n - 1)) or x.numel() // x.shape[-1] < 256:
        return NotImplemented
    rows = x.reshape(-1, x.shape[-1])
    out = torch.ones(1, rows.shape[0], dtype=x.dtype, device=x.device) @ rows  # (1, N)
    return out.reshape([1] * (n - 1) + [x.shape[-1]]) if keepdim else out.reshape(x.shape[-1])


BLOCK_ROWS = 2048
"""Rows of the right operand per partial product in `_long_reduction_mm`."""


def _long_reduction_mm(a, b):
    # a @ b with b (R x N) row-major and a reduction much longer than its output row (R >= 4 N, N >= 256): the
    # input gradient dy · W of a frozen weight with a long output (Qwen's tied lm_head, 151936 x 896; gate and
    # up, 4864 x 896). Without data tiling (adapter modules) IREE's llvm-cpu code runs it down W's columns at
    # 22 GFLOP/s (1536 x 151936 · 151936 x 896, Zen 4, 2 threads); as a sum of products over blocks of 1-2k of
    # W's rows at 175-200, faster than the same product on a transposed copy of W (114) (bench/NOTES.md).
    R, N = b.shape
    if a.dtype != torch.float32 or N < 256 or R < 4 * N or R <= BLOCK_ROWS or b.stride() != (N, 1):
        return NotImplemented
    out = None
    for i in range(0, R, BLOCK_ROWS):
        part = torch.mm(a[:, i:i + BLOCK_ROWS], b[i:i + BLOCK_ROWS])
        out = part if out is None else out + part
    return out


ADAPTER_DECOMPOSITIONS = {torch.ops.aten.mm.default: _long_reduction_mm}
"""For adapter training modules, compiled without data tiling (mlir/compile.py ADAPTER_TRAINING_CPU_FLAGS),
whose backward is input gradients only. Data-tiled modules run the long products as mmt4d and keep aten's."""

DECOMPOSITIONS = {
    torch.ops.aten.embedding_dense_backward.default: _embedding_dense_backward,
    torch.ops.aten._softmax.default: _softmax,
    torch.ops.aten.sum.dim_IntList: _column_sum,
}


def trace(fn: Callable, example_args: Sequence[torch.Tensor]) -> torch.fx.GraphModule:
    """FX graph of `fn` (aten level, autograd already applied) on fake example tensors."""
    return scatter_into_sums(make_fx(fn, decomposition_table=DECOMPOSITIONS, tracing_mode="fake")(*example_args))


def scatter_into_sums(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`x + index_put(zeros, [idx], v, accumulate=True)` -> `index_put(x, [idx], v, accumulate=True)`: a tied
    embedding's gradient is the head's product plus the lookup's scatter (_embedding_dense_backward); scattered
    into the product, IREE writes the rows in place instead of filling and reading back a second weight-sized
    tensor. Qwen2.5-0.5B's 151936 x 896 embedding: 285 -> 233 ms for that gradient (bench/NOTES.md). The sum
    differs only in rounding order where a token repeats."""
    zeros = (torch.ops.aten.new_zeros.default, torch.ops.aten.zeros.default)
    changed = False
    for add in list(gm.graph.nodes):
        if add.op != "call_function" or add.target != torch.ops.aten.add.Tensor or add.kwargs or len(add.args) != 2:
            continue
        for i, scatter in enumerate(add.args):
            other = add.args[1 - i]
            if not (isinstance(scatter, torch.fx.Node) and isinstance(other, torch.fx.Node)
                    and scatter.target == torch.ops.aten.index_put.default and len(scatter.users) == 1
                    and len(scatter.args) == 4 and scatter.args[3] is True and not scatter.kwargs
                    and getattr(scatter.args[0], "target", None) in zeros and len(scatter.args[0].users) == 1):
                continue
            a, b = (other.meta.get("val"), add.meta.get("val"))
            if a is None or b is None or a.shape != b.shape or a.dtype != b.dtype:
                continue
            with gm.graph.inserting_before(add):
                fused = gm.graph.call_function(torch.ops.aten.index_put.default,
                                               (other, scatter.args[1], scatter.args[2], True))
            fused.meta = dict(add.meta)
            add.replace_all_uses_with(fused)
            base = scatter.args[0]
            for node in (add, scatter, base):
                gm.graph.erase_node(node)
            changed = True
            break
    if changed:
        gm.graph.lint()
        gm.recompile()
    return gm


def forward_loss_fn(loss_fn: LossFn, names: Sequence[str]):
    """(*params, *data) -> loss."""
    n = len(names)

    def forward_loss(*flat):
        return loss_fn(dict(zip(names, flat[:n])), *flat[n:])

    return forward_loss


def value_and_grad_fn(loss_fn: LossFn, names: Sequence[str], has_aux: bool = False):
    """(*params, *data) -> (loss, *grads) with grads in parameter order.

    With has_aux, loss_fn returns (loss, *aux) — statistics computed in the
    same forward, not differentiated — and the result is (loss, *aux, *grads).
    """
    n = len(names)

    def value_and_grad(*flat):
        params, data = dict(zip(names, flat[:n])), flat[n:]
        if has_aux:
            def split(p):
                loss, *aux = loss_fn(p, *data)
                return loss, tuple(aux)

            grads, (loss, aux) = torch.func.grad_and_value(split, has_aux=True)(params)
            return (loss, *aux, *[grads[k] for k in names])
        grads, loss = torch.func.grad_and_value(lambda p: loss_fn(p, *data))(params)
        return (loss, *[grads[k] for k in names])

    return value_and_grad


def adamw_step_fn(n: int, decay: Sequence[bool], opt: AdamWConfig, lr_scale: Sequence[float] | None = None):
    """(*params, *m, *v, *grads, step, lr) -> (grad_norm, *params', *m', *v'): one AdamW update (clipped to
    opt.grad_clip by the global norm, which it returns) with given gradients: data-parallel training's, after
    the all-reduce, and a train step's after its value_and_grad (mlir/nanogpt_functions.py).
    lr_scale: each parameter's constant lr multiplier (LoRA+), 1 when None."""

    def adamw_step(*flat):
        params, m, v, grads = (list(flat[i * n:(i + 1) * n]) for i in range(4))
        step, lr = flat[4 * n], flat[4 * n + 1]
        norm = global_norm(grads)
        coef = torch.clamp(opt.grad_clip / (norm + 1e-6), max=1.0) if opt.grad_clip > 0 else None
        new_p, new_m, new_v = adamw(params, grads, m, v, step, lr, opt, list(decay), coef=coef,
                                    lr_scale=None if lr_scale is None else list(lr_scale))
        return (norm, *new_p, *new_m, *new_v)

    return adamw_step


def outer_step_fn(n: int):
    """(*params, *momentum, *delta, lr, mu) -> (*params', *momentum'): DiLoCo's outer Nesterov step."""

    def outer_step(*flat):
        params, momentum, delta = list(flat[:n]), list(flat[n : 2 * n]), list(flat[2 * n : 3 * n])
        lr, mu = flat[3 * n], flat[3 * n + 1]
        new_p, new_b = nesterov_outer(params, momentum, delta, lr, mu)
        return (*new_p, *new_b)

    return outer_step
