"""The weights a GRPO / DPO learner trains, as the training module's arguments take them.

    full fine-tuning      P = every weight (trained); the reference is the initial weights
    an adapter (`peft`)   P = the adapter's trainable tensors; the base weights (PiSSA / MiLoRA: the residual
                          W - s B0 A0) and VeRA's projections are frozen inputs, uploaded once; the reference
                          is the base with the initial adapter (the base model itself: no extra weight copy)

`args()` are the weight arguments of a call with the current policy, `score(fn, ...)` calls a scoring function
(token_logprobs, sequence_logps) on them and `reference(fn, ...)` on the frozen reference, which the policy owns,
`rollout_weights()` the full weights the generation module takes (the adapter merged in, block by block,
by the module's merge_K functions), `state()` what a checkpoint keeps, `save(dir)` the adapter's peft files.
The chunked AdamW (runtime/rl/update.py) updates P in place.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pcpc.runtime.module import base_specs


def _aligned(a: np.ndarray) -> np.ndarray:
    """A 64-byte aligned copy (what import_host_array takes) of an array computed on the host."""
    from pcpc.exporters.hf_weights import aligned_empty

    out = aligned_empty(max(a.nbytes, 1))[:a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


class _Policy:
    """What both policies share: `mod` (the training module) and `args()` (the current weights' arguments)."""

    def score(self, fn: str, *data) -> list:
        """`fn` (token_logprobs, sequence_logps) with the current policy."""
        return self.mod(fn, *self.args(), *data)


class FullPolicy(_Policy):
    """Every weight trained."""

    adapter = None
    wants_grads = False

    def __init__(self, mod, initial: list[np.ndarray], state: dict | None, keep_reference: bool,
                 private: bool = False, reference=None):
        """`reference`: the frozen reference's own module (its weights resident and packed once: start_reference),
        which then scores it; without one and with keep_reference, the initial weights are kept for the training
        module to score it on."""
        from pcpc.runtime.generate import import_host_array

        # The initial weights are imported without a copy (aligned host arrays): the frozen reference and, on a
        # fresh start, the first policy share them; `private`: the policy gets its own copy (the sparse step and
        # the in-place AdamW write into its weights, runtime/rl/update.py).
        self.mod, self.ref_mod = mod, reference
        ref = [import_host_array(mod, a) for a in initial] if mod.driver == "local-task" else mod.upload_all(initial)
        if state is not None:
            self.P = mod.upload_all(state["params"])
        else:
            self.P = mod.upload_all(initial) if private else list(ref)
        self.ref = ref if keep_reference and reference is None else None

    def args(self) -> list:
        return self.P

    def reference(self, fn: str, *data) -> list:
        """`fn` on the frozen reference: its own module, or the training module on the initial weights."""
        if self.ref_mod is not None:
            return self.ref_mod(fn, *data)
        if self.ref is None:
            raise RuntimeError("this policy keeps no reference (keep_reference=False, or dropped)")
        return self.mod(fn, *self.ref, *data)

    def drop_reference(self) -> None:
        """Release the reference (DPO scores it once, before training)."""
        self.ref = self.ref_mod = None

    def rollout_weights(self):
        return self.P

    def state(self) -> dict:
        return {"params": self.P}

    def save(self, out_dir: Path) -> Path | None:
        return None

    def after_step(self, step: int, grads: list) -> None:
        pass


class AdapterPolicy(_Policy):
    """An adapter trained on a frozen base (exporters/peft.py)."""

    def __init__(self, mod, base: list[np.ndarray], qcfg, pcfg, seed: int, state: dict | None, base_model: str,
                 total_steps: int | None = None):
        import torch

        from pcpc.exporters import peft
        from pcpc.runtime.generate import import_host_array
        from pcpc.autodiff.optim import update_groups
        from pcpc.runtime.module import frozen_specs

        self.mod, self.qcfg, self.pcfg, self.base_model = mod, qcfg, pcfg, base_model
        specs = base_specs(mod.meta)
        names = [s.name for s in specs]
        tensors = {n: torch.from_numpy(a) for n, a in zip(names, base)}
        if state is None:
            adapter0, shared, residual = peft.init(tensors, qcfg, pcfg, seed)
        else:  # the initial adapter as the run drew it (a second SVD on another machine could differ)
            adapter0 = {s.name: torch.from_numpy(np.asarray(a)) for s, a in zip(mod.meta.parameters, state["initial"])}
            shared, residual = peft.shared_tensors(qcfg, pcfg), peft.residual_weights(tensors, adapter0, qcfg, pcfg)
        self.adapter_names = [s.name for s in mod.meta.parameters]
        assert list(adapter0) == self.adapter_names, "the module's adapter layout differs from exporters/peft.py's"
        by_name = {n: _aligned(residual[n].numpy()) if n in residual else a for n, a in zip(names, base)}
        del tensors, residual, base
        # the module's frozen inputs: the base (PiSSA's residual)
        self.frozen = frozen_specs(mod.meta)
        self.F = [import_host_array(mod, a) if mod.driver == "local-task" else mod.upload(a)
                  for a in (by_name[s.name] for s in self.frozen)]
        del by_name
        self.X = mod.upload_all([v.numpy() for v in shared.values()])
        self.initial = [v.numpy() for v in adapter0.values()]
        self.A0 = mod.upload_all(self.initial)
        self.P = mod.upload_all(self.initial if state is None else state["params"])
        # which merge_K call makes each adapted base weight: {frozen index: (kind, adapter indices, modules)}
        index = {s.name: i for i, s in enumerate(self.frozen)}
        self.merge_plan = {}
        for kind, idx in update_groups(self.adapter_names, [s.shape for s in mod.meta.parameters]):
            modules = list(dict.fromkeys(peft.module_of(self.adapter_names[i]) for i in idx))
            targets = [index[f"{m}.weight"] for m in modules]
            for t in targets:
                self.merge_plan[t] = (kind, idx, targets)
        self.allocator = None
        if pcfg.type == "adalora":  # AdaLoRA's rank allocation, after every optimizer step (runtime/rl/adalora.py)
            from pcpc.runtime.rl.adalora import RankAllocator

            pcfg = pcfg.with_schedule(total_steps or 1)
            self.pcfg = pcfg
            self.allocator = RankAllocator(self.adapter_names, pcfg)
            if state is not None and state.get("adalora"):
                self.allocator.load(state["adalora"])
        self.wants_grads = self.allocator is not None
        self.adapter = pcfg

    def args(self) -> list:
        return [*self.P, *self.F, *self.X]

    def reference(self, fn: str, *data) -> list:
        """`fn` on the frozen reference: the base (the policy's own frozen inputs) with the initial adapter."""
        return self.mod(fn, *self.A0, *self.F, *self.X, *data)

    def drop_reference(self) -> None:
        """Nothing to release: the reference is the policy's own base and the initial adapter (the adapter's size)."""

    def rollout_weights(self):
        """The full weights in the base's order, the adapted ones merged (merge_K): a generator that merges
        a block when its first weight is due, so one block's merged weights exist at a time."""
        pending = {}
        for i, f in enumerate(self.F):
            if i in self.merge_plan and i not in pending:
                kind, idx, targets = self.merge_plan[i]
                out = self.mod(f"merge_{kind}", *[self.P[j] for j in idx], *[self.F[t] for t in targets], *self.X)
                pending.update(zip(targets, out))
            if i in self.merge_plan:
                yield pending.pop(i)
            else:  # not adapted: the base weight
                yield f

    def state(self) -> dict:
        out = {"params": self.P, "initial": self.initial}
        if self.allocator is not None:
            out["adalora"] = self.allocator.state()
        return out

    def after_step(self, step: int, grads: list[np.ndarray]) -> None:
        """AdaLoRA: score the triplets on this step's weights and gradients (host copies) and prune as the
        schedule says, zeroing E entries in P."""
        if self.allocator is None:
            return
        from pcpc.runtime.module import to_host

        params = [to_host(p) for p in self.P]
        if self.allocator.step(step, params, grads):
            for i in self.allocator.apply(params):
                self.P[i] = self.mod.upload(params[i])

    def tensors(self) -> tuple[dict, dict]:
        """(the adapter's trainable tensors, its shared frozen ones) on the host."""
        import torch

        from pcpc.exporters.peft import shapes
        from pcpc.runtime.module import to_host

        adapter = {n: torch.from_numpy(to_host(a)) for n, a in zip(self.adapter_names, self.P)}
        shared = {n: torch.from_numpy(to_host(a)) for n, a in zip(shapes(self.qcfg, self.pcfg)[1], self.X)}
        return adapter, shared

    def save(self, out_dir: Path) -> Path:
        """adapter_model.safetensors + adapter_config.json (peft's format) in out_dir."""
        import torch

        from pcpc.exporters import peft

        adapter, shared = self.tensors()
        initial = {n: torch.from_numpy(a) for n, a in zip(self.adapter_names, self.initial)}
        pattern = self.allocator.pattern if self.allocator is not None else None
        return peft.save(out_dir, adapter, shared, self.pcfg, self.base_model, initial=initial, rank_pattern=pattern)


def start_reference(cfg, train_target, train_vmfb, say):
    """Launcher side: start building (or find) the frozen reference's own module beside the training module
    `train_vmfb` (mlir/targets.py reference_target: the weights as parameters, packed once per weight file),
    or None where the reference stays the training module's function on weight arguments: an adapter (its
    reference is the base with the initial adapter, and its modules are not data-tiled), no KL term (beta 0),
    a GPU target (no packing to save). At Qwen2.5-0.5B, 4 x 48 tokens, a reference call took 0.81 s instead of
    1.02 s, the same log-probs bit for bit (bench/NOTES.md)."""
    if cfg.peft is not None or cfg.target != "llvm-cpu" or getattr(cfg, "grpo_config", None) is None \
            or cfg.grpo_config.beta <= 0:
        return None
    from pcpc.mlir.targets import reference_target
    from pcpc.runtime.run.artifacts import start_artifact

    path = Path(train_vmfb).with_name(f"{Path(train_vmfb).stem}-ref.vmfb")
    return start_artifact("training_model_path", path, reference_target(train_target), cfg.target, say)


def pack_reference(ref_vmfb, weights_path, say) -> bool:
    """Launcher side: pack the weight file for the reference module once (pcpc.runtime.pack; kept next to the
    weight file and reused while the file is unchanged), so the learner starts with it ready. False, with a
    note, where that cannot be done (e.g. the weight file's folder is read-only): the run then keeps the
    reference on the training module, as before the reference had a module of its own."""
    from pcpc.errors import UserError
    from pcpc.mlir.signature import load_meta, meta_path_for
    from pcpc.runtime.pack import ensure_packed, packed_entries

    meta = load_meta(meta_path_for(Path(ref_vmfb)))
    if packed_entries(Path(weights_path), meta) is None:
        say(f"packing {weights_path} for the reference module (once, reused while the file is unchanged)")
    try:
        ensure_packed(Path(ref_vmfb), meta, Path(weights_path))
    except UserError as e:
        say(f"note: the reference runs on the training module instead (its weights re-packed on every call): {e}")
        return False
    return True


def make_policy(mod, weights_path, cfg, state: dict | None, keep_reference: bool, total_steps: int | None = None,
                reference_vmfb=None, threads: int | None = None):
    """The learner's policy for `cfg` (an RLConfig): full fine-tuning, or its `peft` adapter (total_steps:
    the run's optimizer steps, AdaLoRA's schedule). keep_reference: the policy keeps the frozen reference
    (`reference(fn, ...)`): with full fine-tuning the reference's own module `reference_vmfb` where there is
    one (start_reference, pack_reference; loaded here on `threads` workers, its weights read from weights_path),
    else the initial weights."""
    from pcpc.runtime.rl import setup

    from pcpc.runtime.rl.update import writes_in_place

    base = setup.read_weights(weights_path, mod.meta)
    if cfg.peft is None:
        ref_mod = None
        if keep_reference and reference_vmfb is not None:
            from pcpc.runtime.module import CompiledModule

            ref_mod = CompiledModule(reference_vmfb, threads=threads, parameters=weights_path)
        # weights written in place must not be the reference's (the initial arrays, read into memory)
        keeps_arrays = keep_reference and ref_mod is None
        return FullPolicy(mod, base, state, keep_reference, reference=ref_mod,
                          private=cfg.mask is not None or (keeps_arrays and writes_in_place(cfg)))
    src = setup.model_source(cfg.model, cfg.model_overrides)
    return AdapterPolicy(mod, base, src.config, cfg.peft, cfg.seed, state, cfg.model, total_steps)
