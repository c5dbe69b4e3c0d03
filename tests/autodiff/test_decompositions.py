"""pcpc's trace-time decompositions (autodiff/derive.py DECOMPOSITIONS): the graph keeps torch's results, and
each rewrite applies only where it was measured to pay (short softmax rows; sums over every leading dim)."""

from __future__ import annotations

import pytest
import torch

from pcpc.autodiff.derive import SHORT_ROW, trace


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
