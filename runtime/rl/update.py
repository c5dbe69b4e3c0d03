"""The RL learner's optimizer step, one parameter chunk per compiled call.

The training module exports `grad_clip_coef`, and `adamw_K` / `outer_K` per
chunk kind K (mlir/rl_functions.py). Updating a chunk replaces its entries
in the caller's lists, so the old buffers are released as the loop goes and
the step's extra memory is one chunk (a transformer block), not a second copy
of the weights and both moments:

    coef = grad_clip_coef(*grads)
    for each chunk:  p, m, v = adamw_K(p, g, m, v, step, lr, coef)
                     [p, b = outer_K(p_before, b, p, lr_outer, mu)]   the outer Nesterov step, when asked
"""

from __future__ import annotations

import numpy as np

from pcpc.autodiff.optim import update_groups


class ChunkedOptimizer:
    """AdamW (and the outer Nesterov step) of a training module, applied in place on lists of device arrays."""

    def __init__(self, mod):
        specs = mod.meta.parameters
        self.mod = mod
        self.chunks = update_groups([s.name for s in specs], [s.shape for s in specs])

    def zeros(self) -> list[np.ndarray]:
        """Initial moments: one zero array per parameter."""
        return [np.zeros(s.shape, np.float32) for s in self.mod.meta.parameters]

    def upload_state(self, arrays: list) -> list:
        return self.mod.upload_all(arrays)

    def step(self, P: list, M: list, V: list, grads: list, step: int, lr: float, outer=None) -> None:
        """One AdamW update of P, M, V (replaced in place); `grads` is emptied as it is consumed.

        outer = (B, lr, mu): then each chunk also takes the outer Nesterov step on this update's delta
        (the chunk's weights before minus after), B the outer momentum (replaced in place).
        """
        coef = self.mod("grad_clip_coef", *grads)[0]
        step_, lr_ = np.float32(step), np.float32(lr)
        for kind, idx in self.chunks:
            k = len(idx)
            before = [P[i] for i in idx]
            out = self.mod(f"adamw_{kind}", *before, *[grads[i] for i in idx], *[M[i] for i in idx],
                           *[V[i] for i in idx], step_, lr_, coef)
            for j, i in enumerate(idx):
                P[i], M[i], V[i], grads[i] = out[j], out[k + j], out[2 * k + j], None
            if outer is not None:
                B, outer_lr, mu = outer
                self._outer(kind, idx, before, B, P, outer_lr, mu)
            del before, out

    def outer(self, before: list, B: list, P: list, lr: float, mu: float) -> None:
        """The outer Nesterov step on delta = before - P, chunk by chunk; P and B replaced in place,
        `before` emptied as it is consumed."""
        for kind, idx in self.chunks:
            self._outer(kind, idx, [before[i] for i in idx], B, P, lr, mu)
            for i in idx:
                before[i] = None

    def _outer(self, kind, idx, before, B, P, lr, mu):
        k = len(idx)
        out = self.mod(f"outer_{kind}", *before, *[B[i] for i in idx], *[P[i] for i in idx], np.float32(lr),
                       np.float32(mu))
        for j, i in enumerate(idx):
            P[i], B[i] = out[j], out[k + j]
