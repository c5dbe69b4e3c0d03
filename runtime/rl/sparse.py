"""Sparse fine-tuning: a GRPO / DPO learner that trains only the weights of a mask (`mask` in the config).

The gradient module is the dense one; the optimizer step is the sparse module's (mlir/sparse_functions.py),
three compiled calls over every group of trained tensors: one gathers the masked entries of the gradients, one
steps compact AdamW moments of nnz entries (never the weight's size) and the masked entries of the weights
(which the optimizer keeps compact, gathered once), and one writes the new values into the weights in place. Every
weight outside the mask stays bit-identical to the start. The clip factor is the masked gradient's global norm
(the gradient the step applies), as dense AdamW given the masked gradient would clip.

Layout: each tensor's mask is a sorted list of flat indices, padded to K (4, 5, 6 or 7 x 2^e, the next
such size up: at most 25% padding) with an index outside the mask, so tensors of one shape share few
dispatches (groups), and shapes stay static.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from pcpc.errors import UserError


def padded(n: int, numel: int) -> int:
    """The smallest m * 2^e >= n with m in 4..7 (and n <= 4 as it is), at most numel."""
    if n <= 4:
        return min(max(n, 1), numel)
    e = max(0, math.floor(math.log2(n)) - 2)
    while True:
        for m in (4, 5, 6, 7):
            if m << e >= n:
                return min(m << e, numel)
        e += 1


def max_group(target: str) -> int:
    """Tensors per group on a compile target. A dispatch binds each member's weight or gradient (grad: two
    buffers a member and one more, in one dispatch), and IREE allows a dispatch 32 bindings on llvm-cpu,
    16 on cuda (more there fail at load: "binding_flags count 17 exceeds maximum of 16")."""
    return 8 if target == "llvm-cpu" else 6


@dataclass
class TensorMask:
    name: str
    shape: tuple[int, ...]
    decay: bool
    idx: np.ndarray
    """The flat indices (int64, sorted), padded to K."""
    n: int
    """The masked entries (the first n of idx)."""
    group: int = -1
    """The group (a compiled function set) the tensor is stepped in, and its row there; -1: not trained."""
    row: int = -1


@dataclass
class Group:
    shape: tuple[int, ...]
    K: int
    decay: bool
    members: list[int]
    """Parameter indices, in order."""
    idx: np.ndarray | None = None
    """(count, K) int64: each member's padded indices."""
    n: np.ndarray | None = None
    """(count,) int64: each member's mask count."""

    @property
    def key(self) -> list:
        return [list(self.shape), self.K, self.decay, len(self.members)]


def layout(mask: dict[str, np.ndarray], specs, where: str, target: str = "llvm-cpu"
           ) -> tuple[list[TensorMask], list[Group]]:
    """Each tensor's padded indices, and the groups of trained tensors the sparse module steps together (for
    the compile target's binding limit)."""
    names = [s.name for s in specs]
    missing, extra = [n for n in names if n not in mask], sorted(set(mask) - set(names))
    if missing or extra:
        raise UserError(f"{where}: the mask does not fit the training module's weights: missing {missing[:3]}, "
                        f"unexpected {extra[:3]} (a mask found from another model's delta log?)")
    tensors, groups = [], {}
    for i, spec in enumerate(specs):
        m = np.asarray(mask[spec.name], bool)
        if m.shape != tuple(spec.shape):
            raise UserError(f"{where}: {spec.name} is {list(m.shape)} in the mask, {list(spec.shape)} in the model")
        flat = np.flatnonzero(m.reshape(-1)).astype(np.int64)
        decay = len(spec.shape) >= 2 and not spec.name.endswith(".bias")  # the dense module's rule
        t = TensorMask(spec.name, tuple(spec.shape), decay, flat, int(flat.size))
        if flat.size:
            K = padded(flat.size, m.size)
            if K > flat.size:  # pad with an index outside the mask: the padded entries write back what they read
                outside = np.flatnonzero(~m.reshape(-1))[0]
                t.idx = np.concatenate([flat, np.full(K - flat.size, outside, np.int64)])
            key = (t.shape, K, decay)
            part = 0
            while (*key, part) in groups and len(groups[(*key, part)].members) >= max_group(target):
                part += 1
            g = groups.setdefault((*key, part), Group(t.shape, K, decay, []))
            t.group, t.row = list(groups).index((*key, part)), len(g.members)
            g.members.append(i)
        tensors.append(t)
    out = list(groups.values())
    for g in out:
        g.idx = np.stack([tensors[i].idx for i in g.members])
        g.n = np.array([tensors[i].n for i in g.members], np.int64)
    return tensors, out


def load_mask(path: str | Path, specs, target: str) -> tuple[list[TensorMask], list]:
    from pcpc.runtime import masks

    return layout(masks.load(path), specs, f"mask {path}", target)


def plan_sparse(cfg, train_meta, optimizer: dict, say) -> str | None:
    """Launcher side: build (or find) the run's sparse module; its .vmfb, or None without a mask. It is built
    beside the training module, named by the hash of its layout: runs with masks of one layout share it."""
    if cfg.mask is None:
        return None
    import json

    from pcpc.mlir.build import sha256_bytes
    from pcpc.mlir.targets import sparse_target
    from pcpc.runtime.run.artifacts import build_artifact

    tensors, groups = load_mask(cfg.mask, train_meta.parameters, cfg.target)
    target = sparse_target("sparse", [g.key for g in groups], optimizer)
    train = Path(cfg.training_model_path)
    name = f"{train.stem}-sparse-{sha256_bytes(json.dumps(target.config, sort_keys=True).encode())[:10]}"
    built = build_artifact("mask", train.with_name(f"{name}.vmfb"), replace(target, name=name), cfg.target, say)
    say("  " + describe(tensors) + f" ({cfg.mask}); AdamW on those alone")
    return str(built.vmfb)


def make_optimizer(mod, sparse_vmfb: str | None, cfg, threads: int, inplace_vmfb: str | None = None):
    """The learner's optimizer: the chunked dense AdamW (in place with the optimizer module `inplace_vmfb`,
    runtime/rl/update.py), or (a mask) the sparse one."""
    from pcpc.runtime.module import CompiledModule
    from pcpc.runtime.rl.update import ChunkedOptimizer

    if sparse_vmfb is None:
        return ChunkedOptimizer(mod, CompiledModule(inplace_vmfb, threads=threads) if inplace_vmfb else None)

    return SparseOptimizer(CompiledModule(sparse_vmfb, threads=threads),
                           *load_mask(cfg.mask, mod.meta.parameters, cfg.target))


def describe(tensors: list[TensorMask]) -> str:
    nnz = sum(t.n for t in tensors)
    total = sum(math.prod(t.shape) for t in tensors)
    return f"mask: {nnz:,} of {total:,} weights trained ({100 * nnz / total:.3f}%)"


class SparseOptimizer:
    """AdamW on the masked entries, in place; M and V are the compact moments, one (count, K) array per group.

    It keeps the masked entries of the weights it steps, compact, as the last step wrote them, so a step never
    reads a weight back: they are gathered on the first step, and again whenever `step` is handed weights that
    are not the buffers it wrote last (a resumed or replaced policy).
    """

    def __init__(self, sparse_mod, tensors: list[TensorMask], groups: list[Group]):
        from pcpc.autodiff.optim import AdamWConfig
        from pcpc.config import from_dict

        opt = from_dict(AdamWConfig, sparse_mod.meta.provenance.config.get("optimizer", {}), where="optimizer")
        self.mod, self.tensors, self.groups, self.opt = sparse_mod, tensors, groups, opt
        self.members = [i for g in groups for i in g.members]  # the trained tensors, in the module's order
        self.idx = [sparse_mod.upload(g.idx) for g in groups]
        self.n = [sparse_mod.upload(g.n) for g in groups]
        self._weights: list = []  # the weight buffers the compact values below were last written into
        self._compact: list = []  # per group the masked entries of those weights, (count, K), stepped in place

    def zeros(self) -> list[np.ndarray]:
        """Initial compact moments: one (count, K) array per group."""
        return [np.zeros((len(g.members), g.K), np.float32) for g in self.groups]

    def upload_state(self, arrays: list[np.ndarray]) -> list:
        """Moments (the initial zeros, or a checkpoint's) as the step takes them."""
        want = [(len(g.members), g.K) for g in self.groups]
        got = [tuple(np.shape(a)) for a in arrays]
        if got != want:
            raise UserError(f"--resume: the checkpoint's optimizer state does not fit the mask's layout "
                            f"(moments {got[:3]}..., the mask needs {want[:3]}...)")
        return [self.mod.upload(np.asarray(a, np.float32)) for a in arrays]

    def step(self, P: list, M: list, V: list, grads: list, step: int, lr: float, outer=None) -> None:
        """One AdamW update of the masked entries of P (written in place) and of M, V; `grads` is emptied."""
        from pcpc.kernels.sparse import adamw_scalars
        from pcpc.runtime.module import to_host

        if outer is not None:
            raise UserError("mask: a sparse run takes no outer Nesterov step (set learning_rate 1.0 and "
                            "nesterov_momentum 0.0)")
        G = len(self.groups)
        trained = [P[i] for i in self.members]
        if len(trained) != len(self._weights) or any(a is not b for a, b in zip(trained, self._weights)):
            self._compact = self.mod("grad", *trained, *self.idx, *self.n)[:G]  # a gather: grad's first results
            self._weights = trained
        out = self.mod("grad", *[grads[i] for i in self.members], *self.idx, *self.n)
        compact, sums = out[:G], out[G]
        grads[:] = [None] * len(grads)  # the dense gradients, read once, let go
        coef, opt = 1.0, self.opt
        if opt.grad_clip > 0:
            total = sum(float(x) for x in to_host(sums))
            coef = min(1.0, opt.grad_clip / (math.sqrt(total) + 1e-6))
        # coef, keep, step_size, bc2_sqrt: computed here as the Triton kernel takes them (keep: the decayed groups')
        s = adamw_scalars(step, lr, opt.beta1, opt.beta2, opt.weight_decay, True)
        scalars = [np.float32(x) for x in (coef, s["keep"], s["step_size"], s["bc2_sqrt"])]
        self.mod("adamw", *self._compact, *compact, *M, *V, *self.n, *scalars)
        self.mod("scatter", *trained, *self.idx, *self._compact)
