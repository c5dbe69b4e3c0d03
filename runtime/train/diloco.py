"""DiLoCo training of a nanoGPT preset through compiled modules, on torch.distributed.

Round r, on each of W workers (DiLoCo, Douillard et al. 2023):

    θ_local ← θ_global
    tau × train_step(θ_local, m, v, step, lr, x, y)   compiled forward + backward + AdamW; weights and
                                                      moments stay device arrays between the steps
    Δ_w = θ_global − θ_local                          the pseudo-gradient
    Δ = mean_w Δ_w                                    one all-reduce of one flat fp32 buffer
    θ_global, b ← outer_step(θ_global, b, Δ, lr, μ)   compiled Nesterov: b ← μb + Δ, θ ← θ − lr(Δ + μb)

Every worker applies the same outer step to the same Δ, so the global
parameters stay identical everywhere without a broadcast. Only the
pseudo-gradient crosses the network: once per tau inner steps, 1/tau of
what per-step data-parallel training would all-reduce.

With a `peft` section the run trains an adapter (exporters/peft.py) on the
frozen weights of the `init_from` run: θ above is the adapter alone, the base
weights are uploaded once and passed to every call, and Δ (the all-reduce) is
the adapter's pseudo-gradient, its size instead of the model's.

This file is the loop only (plan, setup, one round, state, finish); the run
directory, checkpoints, metrics, signals and launch are the skeleton's
(runtime/run/).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError
from pcpc.runtime.run.skeleton import every
from pcpc.runtime.train import common
from pcpc.runtime.train.common import (PretrainLoop, all_reduce_mean, check_data, fmt_bytes, module_model_config,
                                       resolve_tokenizer, sample_text, unpack)
from pcpc.runtime.train.config import DiLoCoConfig
from pcpc.runtime.train.data import load_dataset, val_batches

FUNCTIONS = ["train_step", "eval_loss", "outer_step", "logits"]
COLUMNS = ("round", "inner_step", "train_loss", "val_loss", "lr", "tokens", "elapsed_s", "tokens_per_s",
           "allreduce_bytes_per_worker", "data_parallel_bytes_per_worker")
PEFT_COLUMNS = ("full_diloco_bytes_per_worker",)
"""With an adapter: what full DiLoCo of the same model would all-reduce per round."""

@dataclass(frozen=True)
class Plan:
    """What the launcher resolved for the workers."""

    vmfb: str
    tokenizer: str
    """The run's tokenizer, as its vocab.json holds it (Tokenizer.to_json)."""


def resolve_model(cfg: DiLoCoConfig, vocab_size: int, say=print):
    """Build (or find cached) the experiment's modules; returns the BuildResult."""
    return common.resolve_model(cfg, vocab_size, FUNCTIONS, say)


def plan_rounds(cfg: DiLoCoConfig, data, block: int, world: int) -> int:
    """Rounds the run will take; every worker's batches and the validation batches are checked here, in the
    launcher, so a data file too small for them is an error before any worker starts."""
    samplers = [data.sampler(r, world, block, cfg.batch_size, cfg.seed) for r in range(world)]
    val_batches(data.val, block, cfg.eval_batch_size, cfg.eval_batches, data.where)
    steps_per_epoch = min(s.steps_per_epoch for s in samplers)
    rounds = min(cfg.outer_loop_steps, cfg.max_epochs * steps_per_epoch // cfg.tau)
    if rounds < 1:
        raise UserError(f"max_epochs: {cfg.max_epochs} epochs of {steps_per_epoch} steps is less than one round "
                        f"of tau={cfg.tau} steps")
    return rounds


class DiLoCo(PretrainLoop):
    kind, title, unit = "diloco", "DiLoCo", "round"
    files = ("vocab.json", "loss.png", "sample.txt")
    Config = DiLoCoConfig

    # --- the launcher side

    @classmethod
    def plan(cls, cfg: DiLoCoConfig, ctx) -> Plan:
        check_data(cfg)
        data = load_dataset(cfg.dataset, resolve_tokenizer(cfg), cfg.seed, cfg.data_where)
        vocab, tok_json = data.tokenizer.vocab_size, data.tokenizer.to_json()
        try:
            block = cfg.model_config(vocab).block_size
        except ValueError as e:  # the tokenizer's vocabulary against the model's
            raise UserError(f"{ctx.config_path}: {e}") from None
        rounds = plan_rounds(cfg, data, block, ctx.world)
        derived = {"workers": ctx.world}  # each has its own inner AdamW state in the checkpoint
        if cfg.lr_schedule == "cosine":
            derived["resolved.lr_decay_steps"] = cfg.decay_steps(rounds)
        ctx.claim(rounds, derived)  # before the build: fail fast
        built = resolve_model(cfg, vocab, ctx.say)
        if cfg.init_from is not None:  # the architecture and tokenizer it was trained with: this run's
            from pcpc.mlir.signature import load_meta
            from pcpc.runtime.module import base_specs

            load_init(cfg, base_specs(load_meta(built.meta)), tok_json)
        ctx.write_text("vocab.json", tok_json)
        ctx.write_config(tokenizer=data.tokenizer.kind, vocab_size=vocab, vmfb=str(built.vmfb))
        _announce(cfg, ctx, built, rounds, block)
        return Plan(str(built.vmfb), tok_json)

    @classmethod
    def check_inputs(cls, cfg: DiLoCoConfig, config_dir: Path) -> None:
        check_data(cfg)
        if cfg.init_from is not None:
            init_checkpoint(cfg)

    @classmethod
    def explain_change(cls, key, now, then):
        if key == "workers":
            return (f"--resume: the checkpoint has {then} workers' state but this run has {now} workers "
                    f"(num_workers / WORLD_SIZE)")
        if key == "resolved.lr_decay_steps":
            return (f"--resume: the cosine schedule would decay over {now} inner steps, but the checkpoint's decays "
                    f"over {then}: with lr_decay_steps null the decay length is the run's (outer_loop_steps x tau, "
                    f"or less when max_epochs ends it first), and outer_loop_steps or max_epochs changed. Set "
                    f"\"lr_decay_steps\": {then} to keep the schedule, or start a new run with --out DIR")
        return None

    # --- every worker

    def setup(self, resume) -> int:
        cfg = self.cfg
        self.open()
        mod = self.mod
        state = self._initial_state(resume)
        self.F = mod.upload_all(state["frozen"])  # the frozen base (and VeRA's projections), once; [] without
        self.initial = state["initial"]  # the adapter as drawn (PiSSA's saved form needs it)
        self.G_host = state["params"]
        self.G, self.Bm = mod.upload_all(self.G_host), mod.upload_all(state["momentum"])  # global θ, outer momentum
        self.M, self.V, self.adam_step = mod.upload_all(state["m"]), mod.upload_all(state["v"]), state["adam_step"]
        self.zeros = [np.zeros_like(p) for p in self.G_host]
        self.rng = np.random.default_rng(cfg.seed)  # text sampling
        self.rng.bit_generator.state = state["rng_state"] or self.rng.bit_generator.state
        self.sizes = [int(np.prod(spec.shape)) for spec in self.specs]
        # A model with experts: train_step also returns (ce, aux, z, expert_load) right after the loss.
        results = mod.meta.functions["train_step"].results
        self.n_stats = len(results) - 1 - 3 * len(self.specs)
        experts = results[4].shape[-1] if self.n_stats else 0
        self.stat_cols = ["aux_loss", "z_loss", *[f"expert_load/{e}" for e in range(experts)]] if experts else []
        # [Δ of every param, mean train loss, the MoE statistics, stop flag]: one all-reduce
        self.flat = np.zeros(sum(self.sizes) + 2 + len(self.stat_cols), np.float32)
        self.traffic = {"allreduce_bytes_per_worker": self.flat.nbytes,
                        "data_parallel_bytes_per_worker": sum(self.sizes) * 4 * cfg.tau}
        if cfg.peft is not None:  # full DiLoCo of this model: every weight's Δ and the same tail
            from pcpc.runtime.module import base_bytes

            self.traffic["full_diloco_bytes_per_worker"] = base_bytes(mod.meta) + self.flat.nbytes - 4 * sum(self.sizes)
        self.tokens_per_step = self.world * cfg.batch_size * self.block
        self.tokens, self.stop_agreed, self.val, self.done = state["tokens"], False, None, state["round"]
        return self.done

    def layout(self) -> dict:
        panels = [("cross-entropy (nats/token)", ["train_loss", "val_loss"])]
        postfix = [("train_loss", "loss"), ("val_loss", "val"), ("tokens_per_s", "tok/s")]
        moe = ["expert_load_max"] if self.stat_cols else []
        if moe:
            panels += [("router losses", ["aux_loss", "z_loss"]), ("expert load", self.stat_cols[2:])]
            postfix += [("aux_loss", "aux"), ("expert_load_max", "load max")]
        extra = list(PEFT_COLUMNS) if self.cfg.peft is not None else []
        return dict(columns=[*COLUMNS, *extra, *self.stat_cols, *moe], panels=panels, png="loss.png", x="inner_step",
                    title=f"DiLoCo {Path(self.cfg.model_path).stem}", postfix=postfix, ticks_per_step=self.cfg.tau)

    def step(self, r: int) -> dict:
        """Round r: tau compiled inner steps, one all-reduce of Δ, one compiled outer step."""
        from pcpc.runtime.module import host_view, to_host

        cfg, mod, n, tau = self.cfg, self.mod, len(self.specs), self.cfg.tau
        rounds = self.run.spec.steps
        if not cfg.persist_inner_state:
            self.M, self.V, self.adam_step = mod.upload_all(self.zeros), mod.upload_all(self.zeros), 0
        P, M, V, loss_sum = self.G, self.M, self.V, 0.0
        stats = np.zeros(len(self.stat_cols))
        for k in range(tau):
            step = r * tau + k  # the same on every worker: data position and schedule index
            self.adam_step += 1
            loss, *rest = mod("train_step", *P, *M, *V, np.float32(self.adam_step),
                              np.float32(cfg.lr_at(step, rounds)), *self.F, *self.sampler.batch(step))
            if self.n_stats:  # train_loss is the cross-entropy; the router's losses and loads are their own
                ce, aux, z, load = (to_host(x) for x in rest[:self.n_stats])
                loss, rest = ce, rest[self.n_stats:]
                stats += np.concatenate([[float(aux), float(z)], load.mean(0)])  # loads: mean over MoE blocks
            P, M, V = rest[:n], rest[n:2 * n], rest[2 * n:]
            loss_sum += float(to_host(loss))
            if self.run.log:
                self.run.log.tick(r, train_loss=loss_sum / (k + 1))
        self.M, self.V = M, V
        # Δ = θ_global − θ_local, averaged over the workers in one all-reduce of one flat buffer.
        offset = 0  # written straight into the flat buffer, from a view of each device result (no copies)
        for g, p in zip(self.G_host, P):
            np.subtract(g.reshape(-1), host_view(p).reshape(-1), out=self.flat[offset:offset + g.size])
            offset += g.size
        tail = self.flat[sum(self.sizes):]  # [mean train loss, MoE statistics, stop flag] (a view)
        tail[0], tail[1:-1], tail[-1] = loss_sum / tau, stats / tau, float(self.run.stop.requested)
        all_reduce_mean(self.flat, self.world, self.backend())
        out = mod("outer_step", *self.G, *self.Bm, *unpack(self.flat, self.specs, self.sizes),
                  np.float32(cfg.outer_learning_rate), np.float32(cfg.nesterov_momentum))
        self.G, self.Bm = out[:n], out[n:]
        self.G_host = [to_host(g) for g in self.G]
        self.done = done = r + 1
        self.stop_agreed = bool(self.flat[-1] > 0)
        evaluate = done == rounds or self.stop_agreed or every(cfg.eval_interval, done)
        self.val = self.evaluate([*self.G, *self.F]) if evaluate else None
        self.tokens += self.tokens_per_step * tau
        elapsed = self.run.elapsed()
        record = dict(round=done, inner_step=done * tau, train_loss=float(tail[0]), val_loss=self.val,
                      lr=cfg.lr_at(step, rounds), tokens=self.tokens, elapsed_s=round(elapsed, 3),
                      tokens_per_s=round(self.tokens / elapsed, 1), **self.traffic,
                      **{c: float(v) for c, v in zip(self.stat_cols, tail[1:-1])})
        if self.stat_cols:
            record["expert_load_max"] = float(tail[3:-1].max())
        if self.val is not None:
            self.run.say(f"round {done:>4}  step {done * tau:>6}  train {record['train_loss']:.4f}  "
                         f"val {self.val:.4f}")
        return record

    def agree_stop(self, requested: bool) -> bool:
        return self.stop_agreed  # the flag rode this round's all-reduce: every worker stops together

    def state(self) -> dict | None:
        """Gather every worker's inner state to rank 0, which returns the whole checkpoint state."""
        import torch.distributed as dist

        from pcpc.runtime.module import to_host

        inner = {"m": [to_host(a) for a in self.M], "v": [to_host(a) for a in self.V], "adam_step": self.adam_step,
                 "next_step": self.done * self.cfg.tau}  # the data position: batches are a function of it
        gathered = [None] * self.world if self.rank == 0 else None
        dist.gather_object(inner, gathered, dst=0)
        if self.rank != 0:
            return None
        out = {"params": self.G_host, "momentum": [to_host(b) for b in self.Bm], "workers": gathered,
               "rng_state": self.rng.bit_generator.state, "tokens": self.tokens}
        if self.cfg.peft is not None:  # params are the adapter; the base stays in the init_from run
            out["initial"] = self.initial
        return out

    def weights(self) -> tuple[list[str], list]:
        return [s.name for s in self.specs], self.G_host  # the global θ (or adapter), after the outer step

    def finish(self, done: int, stopped: bool) -> dict | None:
        """Rank 0: sample text, say how it went; the summary."""
        cfg = self.cfg
        if self.val is None:  # nothing left to train (a resumed, finished run): evaluate what there is
            self.val = self.evaluate([*self.G, *self.F])
        if self.rank != 0:
            return None
        log, elapsed = self.run.log, self.run.elapsed()
        sample = "" if stopped or not cfg.sample_tokens else sample_text(self.mod, [*self.G, *self.F], self.tokenizer,
                                                                         self.block, cfg.sample_tokens, self.rng)
        summary = {
            "rounds": done, "rounds_planned": self.run.spec.steps, "inner_steps_per_worker": done * cfg.tau,
            "workers": self.world, "final_val_loss": self.val, "final_train_loss": log.last("train_loss"),
            "tokens": self.tokens, "train_seconds": round(elapsed, 3),
            "tokens_per_s": round(self.tokens / max(elapsed, 1e-9), 1),
            "allreduce_bytes_per_worker_per_round": self.traffic["allreduce_bytes_per_worker"],
            "data_parallel_bytes_per_worker_per_round": self.traffic["data_parallel_bytes_per_worker"],
        }
        if cfg.peft is not None:
            summary["adapter"] = str(self._save_adapter())
            summary["full_diloco_bytes_per_worker_per_round"] = self.traffic["full_diloco_bytes_per_worker"]
        if sample:
            self.run.dir.write_text("sample.txt", sample)
            self.run.say("sample:\n" + sample)
        if not stopped:
            self.run.say(f"done: {done} rounds, val loss {self.val:.4f}, {summary['tokens_per_s'] / 1e3:.1f}k tok/s "
                         f"over {elapsed:.1f}s; metrics, loss.png and checkpoint in {self.run.dir.path}")
        return summary

    def _initial_state(self, resume) -> dict:
        """Rank 0 has the checkpoint (or initialises); every worker receives it and keeps its own inner state."""
        import torch.distributed as dist

        from pcpc.exporters.nanogpt import init_params

        from pcpc.runtime.module import base_specs

        cfg, box = self.cfg, [None]
        if self.rank == 0:
            if resume is not None:
                box[0] = {**resume.state, "round": resume.step}
            elif cfg.init_from is not None:
                box[0] = {"round": 0, "params": load_init(cfg, base_specs(self.mod.meta))}
            else:
                box[0] = {"round": 0, "params": [p.numpy() for p in init_params(module_model_config(self.mod), cfg.seed).values()]}
            if cfg.peft is not None:
                box[0].update(self._adapter_state(box[0]))
            if resume is None:
                box[0].update(momentum=[np.zeros_like(p) for p in box[0]["params"]], workers=None, rng_state=None,
                              tokens=0)
            box[0].setdefault("frozen", [])
            box[0].setdefault("initial", None)
        dist.broadcast_object_list(box, src=0)
        state = box[0]
        zeros = [np.zeros_like(p) for p in state["params"]]
        mine = state["workers"][self.rank] if state["workers"] else {"m": zeros, "v": zeros, "adam_step": 0}
        return {**state, "m": mine["m"], "v": mine["v"], "adam_step": mine["adam_step"]}

    def _adapter_state(self, state: dict) -> dict:
        """Rank 0, with an adapter: the frozen inputs (the init_from weights, PiSSA / MiLoRA's residual in
        place of the adapted ones, then VeRA's projections), the initial adapter, and (a new run) the
        adapter as the trained params. state["params"] is the base (a new run) or the adapter (a resume)."""
        import torch

        from pcpc.exporters import peft
        from pcpc.runtime.module import base_specs

        cfg, specs = self.cfg, base_specs(self.mod.meta)
        mcfg = module_model_config(self.mod)
        resumed = "initial" in state
        base = load_init(cfg, specs) if resumed else state["params"]
        tensors = {s.name: torch.from_numpy(np.asarray(a)) for s, a in zip(specs, base)}
        if resumed:  # the adapter as the run drew it (a second SVD on another machine could differ)
            adapter0 = {s.name: torch.from_numpy(np.asarray(a)) for s, a in zip(self.specs, state["initial"])}
            shared, residual = peft.shared_tensors(mcfg, cfg.peft), peft.residual_weights(tensors, adapter0, mcfg,
                                                                                         cfg.peft)
        else:
            adapter0, shared, residual = peft.init(tensors, mcfg, cfg.peft, cfg.seed)
        assert list(adapter0) == [s.name for s in self.specs], "the module's adapter layout differs from peft.py's"
        frozen = [residual[s.name].numpy() if s.name in residual else np.asarray(a) for s, a in zip(specs, base)]
        initial = [v.numpy() for v in adapter0.values()]
        out = {"frozen": frozen + [v.numpy() for v in shared.values()], "initial": initial}
        if not resumed:
            out["params"] = [a.copy() for a in initial]
        return out

    def _save_adapter(self) -> Path:
        """<run dir>/adapter: adapter_model.safetensors + adapter_config.json in HF peft's format."""
        import torch

        from pcpc.exporters import peft
        from pcpc.runtime.module import to_host

        names = [s.name for s in self.specs]
        adapter = {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, self.G_host)}
        _, shared_shapes = peft.shapes(module_model_config(self.mod), self.cfg.peft)
        n_base = len(self.F) - len(shared_shapes)
        shared = {k: torch.from_numpy(to_host(x)) for k, x in zip(shared_shapes, self.F[n_base:])}
        initial = {n: torch.from_numpy(np.asarray(a)) for n, a in zip(names, self.initial)}
        return peft.save(self.run.dir.path / "adapter", adapter, shared, self.cfg.peft, str(self.cfg.init_from),
                         initial=initial, task_type=None)



def init_checkpoint(cfg: DiLoCoConfig) -> Path:
    """The checkpoint file init_from names (a run directory, or the file itself)."""
    from pcpc.runtime.run import checkpoint

    given = Path(cfg.init_from)
    path = given if given.is_file() else checkpoint.path_in(given)
    if not path.is_file():
        raise UserError(f"init_from: no checkpoint at {path} (relative to {Path.cwd()}); name a DiLoCo run "
                        f"directory, or its checkpoints/latest.pt")
    return path


def load_init(cfg: DiLoCoConfig, specs, tokenizer_json: str | None = None) -> list[np.ndarray]:
    """The init_from run's global weights, checked against this model's weight specs and, given this run's
    tokenizer (its vocab.json text), against the tokenizer the init_from run trained with."""
    from pcpc.runtime.run import checkpoint

    path = init_checkpoint(cfg)
    try:
        params = checkpoint.load(path, DiLoCo.kind).state["params"]
    except UserError as e:
        raise UserError(f"init_from: {e}") from None
    got, want = [tuple(p.shape) for p in params], [tuple(s.shape) for s in specs]
    if got != want:
        diff = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        where = (f"weight {diff} ({specs[diff].name}) is {got[diff]}, this model's is {want[diff]}"
                 if diff < min(len(got), len(want)) else f"it has {len(got)} weights, this model {len(want)}")
        raise UserError(f"init_from: {path} holds another architecture: {where}; give this run the same model "
                        f"(and tokenizer) as the init_from run")
    vocab = path.parent.parent / "vocab.json"
    if tokenizer_json is not None and vocab.is_file() and vocab.read_text().strip() != tokenizer_json.strip():
        raise UserError(f"init_from: {vocab} is another tokenizer than this run's ({cfg.data_where} "
                        f"{cfg.dataset.path}, tokenizer {cfg.dataset.tokenizer}): the base's token ids would mean "
                        f"other text")
    return [np.asarray(p) for p in params]


def _announce(cfg: DiLoCoConfig, ctx, built, rounds: int, block: int) -> None:
    from pcpc.mlir.signature import load_meta

    from pcpc.runtime.module import base_bytes

    meta = load_meta(built.meta)
    n_params, n_base = meta.parameter_bytes // 4, base_bytes(meta) // 4
    payload = 4 * (n_params + 2)
    dp = 4 * n_params * cfg.tau
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.target == "cuda" else "gloo")
    what = f"{n_params:,} params" if cfg.peft is None else (
        f"{n_base:,} params frozen from {cfg.init_from}, {cfg.peft.type} r {cfg.peft.r}: {n_params:,} trained "
        f"({100 * n_params / n_base:.2f}%)")
    ctx.say(f"DiLoCo: {Path(cfg.model_path).stem} ({what}), {ctx.world} workers ({backend}), "
            f"tau {cfg.tau}, {rounds} rounds; run dir {ctx.dir.path}")
    if rounds < cfg.outer_loop_steps:
        ctx.say(f"  max_epochs {cfg.max_epochs} limits the run to {rounds} rounds")
    ctx.say(f"  each worker all-reduces {fmt_bytes(payload)} per round; per-step data parallel would all-reduce "
            f"{fmt_bytes(dp)} over the same {cfg.tau} steps ({dp / payload:.1f}x more)")
    if cfg.peft is not None:
        full = 4 * (n_base + 2)
        ctx.say(f"  full DiLoCo of this model would all-reduce {fmt_bytes(full)} per round ({full / payload:.1f}x more)")
    if ctx.resume:
        ctx.say(f"  resuming from {ctx.dir.checkpoint}")
