"""The RL learner's optimizer step, one parameter chunk per compiled call.

The training module exports `grad_clip_coef`, and `adamw_K` / `outer_K` per
chunk kind K (mlir/rl_functions.py). Updating a chunk replaces its entries
in the caller's lists, so the old buffers are released as the loop goes and
the step's extra memory is one chunk (a transformer block), not a second copy
of the weights and both moments:

    coef = grad_clip_coef(*grads)
    for each chunk:  p, m, v = adamw_K(p, g, m, v, step, lr, coef)
                     [p, b = outer_K(p_before, b, p, lr_outer, mu)]   the outer Nesterov step, when asked

A full fine-tuning run without an outer step has a second module, the training target's
`optimizer_target` (mlir/targets.py), whose adamw_inplace_K writes p, m and v into their own buffers,
one dispatch per tensor: the same numbers, bit for bit, at ~4x the speed (Qwen2.5-0.5B's embedding: 118
against 474 ms; bench/NOTES.md). Its weights must be the run's own (`writes_in_place`): an outer step
needs the weights before the update, and an adapter run's chunks are small.
"""

from __future__ import annotations

import numpy as np

from pcpc.autodiff.optim import update_groups


def writes_in_place(cfg) -> bool:
    """Whether a run's optimizer writes into its weights' buffers (an RLConfig): the sparse step (a mask), or
    the in-place AdamW module (full fine-tuning without an outer step). Its policy then gets its own copy of the
    initial weights where a reference model shares them (runtime/rl/policy.py make_policy)."""
    return cfg.mask is not None or (cfg.peft is None and not getattr(cfg, "outer_step_active", False))


def start_inplace(cfg, train_target, train_vmfb, say):
    """Launcher side: start building (or find) the in-place AdamW module beside the training module `train_vmfb`
    (runtime/run/artifacts.py PendingArtifact; its compile goes on beside the caller), or None where the run
    keeps the training module's adamw_K (a mask, an adapter, an outer step)."""
    if cfg.mask is not None or not writes_in_place(cfg):
        return None
    from pathlib import Path

    from pcpc.mlir.targets import optimizer_target
    from pcpc.runtime.run.artifacts import start_artifact

    path = Path(train_vmfb).with_name(f"{Path(train_vmfb).stem}-adamw.vmfb")
    return start_artifact("training_model_path", path, optimizer_target(train_target), cfg.target, say)


class ChunkedOptimizer:
    """AdamW (and the outer Nesterov step) of a training module, applied in place on lists of device arrays.
    `inplace`: the training target's optimizer module (adamw_inplace_K), which writes into P, M and V's own
    buffers; without it (or with an outer step) the training module's adamw_K returns new ones."""

    def __init__(self, mod, inplace=None):
        specs = mod.meta.parameters
        self.mod, self.inplace = mod, inplace
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
        if self.inplace is not None and outer is None:
            for kind, idx in self.chunks:
                self.inplace(f"adamw_inplace_{kind}", *[P[i] for i in idx], *[grads[i] for i in idx],
                             *[M[i] for i in idx], *[V[i] for i in idx], step_, lr_, coef)
                for i in idx:
                    grads[i] = None
            return
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
