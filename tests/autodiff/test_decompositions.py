"""pcpc's trace-time decompositions (autodiff/derive.py DECOMPOSITIONS, and ADAPTER_DECOMPOSITIONS for adapter
modules): the graph keeps torch's results, and each rewrite applies only where it was measured to pay (short
softmax rows; sums over every leading dim; products with a long reduction down a row-major right operand)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from pcpc.autodiff.derive import ADAPTER_DECOMPOSITIONS, BLOCK_ROWS, SHORT_ROW, trace


def _ops(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}


@pytest.mark.parametrize("row, decomposed", [(SHORT_ROW, True), (SHORT_ROW + 1, False), (128, False)])
def test_softmax_is_decomposed_on_short_rows_only_and_equals_torchs(row, decomposed):
    x = torch.randn(4, 3, 5, row) * 4

    gm = trace(lambda t: torch.softmax(t, -1), [x])

    assert ("aten._softmax.default" not in _ops(gm)) == decomposed
    torch.testing.assert_close(gm(x), torch.softmax(x, -1), rtol=1e-6, atol=1e-7)


def test_softmax_backward_through_the_decomposed_form_equals_autograds():
    x, g = torch.randn(8, 2, SHORT_ROW, SHORT_ROW), torch.randn(8, 2, SHORT_ROW, SHORT_ROW)

    def grad(t, dy):
        return torch.autograd.grad(torch.softmax(t, -1), t, dy)[0]

    gm = trace(lambda t, dy: grad(t.requires_grad_(), dy), [x, g])

    torch.testing.assert_close(gm(x, g), grad(x.clone().requires_grad_(), g), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape, dims, keepdim, decomposed", [
    ((64, 32, 48), [0, 1], False, True),  # a norm's weight gradient over (batch, tokens)
    ((64, 32, 48), [0, 1], True, True),
    ((64, 32, 48), [-3, -2], False, True),
    ((2048, 64), [0], False, True),
    ((64, 32, 48), [0], False, False),  # not every leading dim
    ((64, 32, 48), [2], False, False),  # the last dim: a row sum
    ((8, 16), [0], False, False),  # fewer than 256 rows
])
def test_column_sums_become_a_product_with_ones_and_equal_torchs(shape, dims, keepdim, decomposed):
    x = torch.randn(*shape)

    gm = trace(lambda t: torch.sum(t, dims, keepdim=keepdim), [x])

    assert ("aten.sum.dim_IntList" not in _ops(gm)) == decomposed
    out = gm(x)
    want = torch.sum(x.double(), dims, keepdim=keepdim).float()
    assert out.shape == want.shape
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)


def _adapter_trace(fn, args):
    return make_fx(fn, decomposition_table=ADAPTER_DECOMPOSITIONS, tracing_mode="fake")(*args)


@pytest.mark.parametrize("rows, cols, blocks", [
    (2 * BLOCK_ROWS + 768, 256, 3),  # R >= 4 N, the last block short
    (4 * BLOCK_ROWS, BLOCK_ROWS, 4),  # exactly 4 N
    (4 * BLOCK_ROWS - 1, BLOCK_ROWS, 1),  # under 4 N: one product
    (4 * BLOCK_ROWS, 128, 1),  # a narrow output (an adapter's r): one product
    (BLOCK_ROWS, 256, 1),  # one block already
])
def test_a_long_reduction_becomes_a_sum_of_block_products_and_equals_torchs(rows, cols, blocks):
    a, w = torch.randn(24, rows), torch.randn(rows, cols)

    gm = _adapter_trace(lambda x, y: x @ y, [a, w])

    assert sum(n.target == torch.ops.aten.mm.default for n in gm.graph.nodes) == blocks
    torch.testing.assert_close(gm(a, w), (a.double() @ w.double()).float(), rtol=1e-4, atol=1e-3)


def test_a_frozen_weights_input_gradient_is_blocked_and_its_forward_and_a_transposed_copy_are_not():
    """y = x · Wᵀ: the forward reads W transposed (no long reduction); the input gradient dy · W is blocked;
    the same gradient through a stored transpose (x · Wt) reads a column-major operand and stays one product."""
    W, x, dy = torch.randn(3 * BLOCK_ROWS, 512), torch.randn(16, 512), torch.randn(16, 3 * BLOCK_ROWS)

    def input_grad(w, inp, g):
        inp = inp.requires_grad_()
        return torch.autograd.grad(inp @ w.t(), inp, g)[0]

    gm = _adapter_trace(input_grad, [W, x, dy])
    assert sum(n.target == torch.ops.aten.mm.default for n in gm.graph.nodes) == 1 + 3
    torch.testing.assert_close(gm(W, x, dy), dy @ W, rtol=1e-4, atol=1e-3)

    gm_t = _adapter_trace(lambda wt, inp, g: input_grad(wt.t(), inp, g), [W.t().contiguous(), x, dy])
    assert sum(n.target == torch.ops.aten.mm.default for n in gm_t.graph.nodes) == 2


def test_a_tied_embeddings_lookup_gradient_is_scattered_into_the_heads():
    """derive.scatter_into_sums: the head's weight gradient plus the lookup's scatter into zeros becomes one
    scatter into the head's gradient (no weight-sized zeros); values as eager's, repeated tokens included.
    An untied embedding (no sum) keeps its scatter into zeros."""
    from pcpc.autodiff.derive import value_and_grad_fn

    def tied(p, ids):
        return F.linear(F.embedding(ids, p["e"]), p["e"]).logsumexp(-1).sum()

    def untied(p, ids):
        return F.linear(F.embedding(ids, p["e"]), p["w"]).logsumexp(-1).sum()

    gen = torch.Generator().manual_seed(0)
    e, w = torch.randn(10, 4, generator=gen), torch.randn(10, 4, generator=gen)
    ids = torch.tensor([1, 3, 1, 7])
    for loss, names, args, scatters_into_zeros in ((tied, ["e"], [e, ids], 0), (untied, ["e", "w"], [e, w, ids], 1)):
        f = value_and_grad_fn(loss, names)
        gm = trace(f, args)
        puts = [n for n in gm.graph.nodes if n.target == torch.ops.aten.index_put.default]
        assert len(puts) == 1
        assert (puts[0].args[0].target == torch.ops.aten.new_zeros.default) == scatters_into_zeros
        for want, got in zip(f(*args), gm(*args)):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
