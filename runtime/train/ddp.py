"""Data-parallel pretraining (`"sync": "ddp"`) of a nanoGPT model through compiled modules, on torch.distributed.

Step s, on each of W workers, as PyTorch DDP with gradient accumulation:

    A × value_and_grad(θ, x, y)      compiled forward + backward of one micro-batch, A = tokens_per_step /
                                     (W × batch_size × block_size); the gradients summed in one flat buffer
    g = mean over workers and micro-batches     one all-reduce of the flat buffer (+ the loss, a stop flag)
    θ, m, v ← adamw_step(θ, m, v, g, step, lr)  compiled AdamW with the global-norm clip (the norm logged),
                                                nanoGPT's decay

Every worker applies the same update to the same θ, so the weights stay identical without a broadcast and
the checkpoint holds one copy. The data position is a function of the step (runtime/train/data.py), so a
resumed run reads on where it stopped. Validation runs every eval_interval steps, a text sample from
sample_prompt every sample_interval steps (samples.jsonl).

Each step all-reduces the whole gradient: per step, what DiLoCo sends once per tau steps. The metrics
log records both (allreduce_bytes_per_worker, diloco_bytes_per_worker).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from pcpc.errors import UserError
from pcpc.runtime.run.skeleton import every
from pcpc.runtime.train.common import (PretrainLoop, all_reduce_mean, check_data, fmt_bytes, module_model_config,
                                       resolve_model, resolve_tokenizer, sample_text, unpack)
from pcpc.runtime.train.config import DDPConfig
from pcpc.runtime.train.data import load_dataset, val_batches

FUNCTIONS = ["value_and_grad", "adamw_step", "eval_loss", "logits"]
COLUMNS = ("step", "train_loss", "val_loss", "lr", "grad_norm", "tokens", "elapsed_s", "tokens_per_s",
           "allreduce_bytes_per_worker", "diloco_bytes_per_worker")
DILOCO_TAU = 50
"""DiLoCo's default tau: what it would all-reduce over the same steps is 1/tau of this loop's traffic."""


@dataclass(frozen=True)
class Plan:
    vmfb: str
    tokenizer: str
    """The run's tokenizer, as its vocab.json holds it (Tokenizer.to_json)."""
    accumulation: int
    """Micro-batches per worker per step."""


class DataParallel(PretrainLoop):
    kind, title, unit = "ddp", "DDP", "step"
    files = ("vocab.json", "loss.png", "sample.txt", "samples.jsonl")
    Config = DDPConfig

    # --- the launcher side

    @classmethod
    def plan(cls, cfg: DDPConfig, ctx) -> Plan:
        check_data(cfg)
        data = load_dataset(cfg.dataset, resolve_tokenizer(cfg), cfg.seed, cfg.data_where)
        vocab, tok_json = data.tokenizer.vocab_size, data.tokenizer.to_json()
        try:
            block = cfg.model_config(vocab).block_size
        except ValueError as e:
            raise UserError(f"{ctx.config_path}: {e}") from None
        accumulation = cfg.accumulation(ctx.world, block)
        for r in range(ctx.world):  # every worker's data and the validation batches, before anything starts
            data.sampler(r, ctx.world, block, cfg.batch_size, cfg.seed)
        val_batches(data.val, block, cfg.eval_batch_size, cfg.eval_batches, data.where)
        derived = {"resolved.accumulation": accumulation}
        if cfg.lr_schedule == "cosine":
            derived["resolved.lr_decay_steps"] = cfg.decay_steps()
        ctx.claim(cfg.max_steps, derived)
        built = resolve_model(cfg, vocab, FUNCTIONS, ctx.say)
        ctx.write_text("vocab.json", tok_json)
        ctx.write_config(tokenizer=data.tokenizer.kind, vocab_size=vocab, vmfb=str(built.vmfb),
                         accumulation=accumulation)
        _announce(cfg, ctx, built, block, accumulation)
        return Plan(str(built.vmfb), tok_json, accumulation)

    @classmethod
    def check_inputs(cls, cfg: DDPConfig, config_dir) -> None:
        check_data(cfg)

    @classmethod
    def explain_change(cls, key, now, then):
        if key == "resolved.accumulation":
            return (f"--resume: {now} micro-batches per worker per step, the checkpoint's run took {then}: the "
                    f"worker count changed the accumulation (tokens_per_step / (workers x batch_size x block)); "
                    f"resume with the same number of workers")
        return None

    # --- every worker

    def setup(self, resume) -> int:
        import torch.distributed as dist

        from pcpc.exporters.nanogpt import init_params
        from pcpc.runtime.run.metrics import truncate_jsonl

        cfg = self.cfg
        self.open()
        mod = self.mod
        box = [None]
        if self.rank == 0:  # every worker starts from rank 0's weights (DDP's broadcast), resumed or new
            if resume is not None:
                box[0] = {**resume.state, "step": resume.step}
            else:
                params = [p.numpy() for p in init_params(module_model_config(mod), cfg.seed).values()]
                zeros = [np.zeros_like(p) for p in params]
                box[0] = {"step": 0, "params": params, "m": zeros, "v": zeros, "rng_state": None, "tokens": 0}
        dist.broadcast_object_list(box, src=0)
        state = box[0]
        self.P, self.M, self.V = (mod.upload_all(state[k]) for k in ("params", "m", "v"))
        self.rng = np.random.default_rng(cfg.seed)  # text sampling
        self.rng.bit_generator.state = state["rng_state"] or self.rng.bit_generator.state
        self.sizes = [int(np.prod(s.shape)) for s in self.specs]
        results = mod.meta.functions["value_and_grad"].results
        self.n_stats = len(results) - 1 - len(self.specs)  # a model with experts: (ce, aux, z, expert_load)
        experts = results[4].shape[-1] if self.n_stats else 0
        self.stat_cols = ["aux_loss", "z_loss", *[f"expert_load/{e}" for e in range(experts)]] if experts else []
        n = sum(self.sizes)
        # [Σ gradients, Σ train loss, the MoE statistics, stop flag]: one all-reduce per step
        self.flat = np.zeros(n + 2 + len(self.stat_cols), np.float32)
        self.traffic = {"allreduce_bytes_per_worker": self.flat.nbytes,
                        "diloco_bytes_per_worker": round(4 * (n + 2) / DILOCO_TAU, 1)}
        self.tokens_per_step = self.world * self.plan.accumulation * cfg.batch_size * self.block
        self.tokens, self.val, self.done, self.stop_agreed = state["tokens"], None, state["step"], False
        samples = self.run.dir.path / "samples.jsonl"
        if self.rank == 0:
            truncate_jsonl(samples, "step", self.done)
        self.samples = open(samples, "a") if self.rank == 0 else None
        return self.done

    def layout(self) -> dict:
        panels = [("cross-entropy (nats/token)", ["train_loss", "val_loss"]), ("grad norm", ["grad_norm"])]
        postfix = [("train_loss", "loss"), ("val_loss", "val"), ("tokens_per_s", "tok/s")]
        moe = ["expert_load_max"] if self.stat_cols else []
        if moe:
            panels += [("router losses", ["aux_loss", "z_loss"]), ("expert load", self.stat_cols[2:])]
        return dict(columns=[*COLUMNS, *self.stat_cols, *moe], panels=panels, png="loss.png", x="step",
                    title=f"DDP {self.cfg.preset}", postfix=postfix)

    def step(self, s: int) -> dict:
        """Step s: accumulation compiled value_and_grad calls, one all-reduce, one compiled AdamW step."""
        from pcpc.runtime.module import to_host

        cfg, mod, A, n = self.cfg, self.mod, self.plan.accumulation, sum(self.sizes)
        flat = self.flat
        flat[:] = 0.0
        grads, tail = flat[:n], flat[n:]  # views
        for k in range(A):
            out = mod("value_and_grad", *self.P, *self.sampler.batch(s * A + k))
            loss, stats, g = out[0], out[1:1 + self.n_stats], out[1 + self.n_stats:]
            if self.n_stats:  # train_loss is the cross-entropy; the router's losses and loads are their own
                ce, aux, z, load = (to_host(x) for x in stats)
                loss = ce
                tail[1:-1] += np.concatenate([[float(aux), float(z)], load.mean(0)])
            tail[0] += float(to_host(loss))
            offset = 0
            for x, size in zip(g, self.sizes):
                grads[offset:offset + size] += to_host(x).reshape(-1)
                offset += size
            del out, g
        tail[-1] = float(self.run.stop.requested)  # > 0 after the mean when any worker was asked to stop
        all_reduce_mean(flat, self.world, self.backend())
        if A > 1:
            flat /= A  # the mean over every worker's micro-batches: the gradient of the global batch's mean loss
        lr = cfg.lr_at(s)
        norm, *out = mod("adamw_step", *self.P, *self.M, *self.V, *unpack(grads, self.specs, self.sizes),
                         np.float32(s + 1), np.float32(lr))
        self.P, self.M, self.V = _split(out, len(self.specs))
        grad_norm = float(to_host(norm))
        self.done = done = s + 1
        self.stop_agreed = bool(tail[-1] > 0)
        self.tokens += self.tokens_per_step
        evaluate = done == self.run.spec.steps or self.stop_agreed or every(cfg.eval_interval, done)
        self.val = self.evaluate(self.P) if evaluate else None
        if self.rank == 0 and cfg.sample_interval and every(cfg.sample_interval, done):
            text = sample_text(mod, self.P, self.tokenizer, self.block, cfg.sample_tokens, self.rng,
                               cfg.sample_prompt)
            self.samples.write(json.dumps({"step": done, "text": text}) + "\n")
            self.samples.flush()
        elapsed = self.run.elapsed()
        record = dict(step=done, train_loss=float(tail[0]), val_loss=self.val, lr=lr, grad_norm=grad_norm,
                      tokens=self.tokens, elapsed_s=round(elapsed, 3), tokens_per_s=round(self.tokens / elapsed, 1),
                      **self.traffic, **{c: float(v) for c, v in zip(self.stat_cols, tail[1:-1])})
        if self.stat_cols:
            record["expert_load_max"] = float(tail[3:-1].max())
        if self.val is not None:
            self.run.say(f"step {done:>6}  train {record['train_loss']:.4f}  val {self.val:.4f}")
        return record

    def agree_stop(self, requested: bool) -> bool:
        return self.stop_agreed  # the flag rode this step's all-reduce: every worker stops together

    def state(self) -> dict | None:
        """Rank 0: the weights and moments (the same on every worker), the sampling rng, the tokens seen."""
        from pcpc.runtime.module import to_host

        if self.rank != 0:
            return None
        return {"params": [to_host(p) for p in self.P], "m": [to_host(a) for a in self.M],
                "v": [to_host(a) for a in self.V], "rng_state": self.rng.bit_generator.state, "tokens": self.tokens}

    def weights(self) -> tuple[list[str], list]:
        from pcpc.runtime.module import to_host

        return [s.name for s in self.specs], [to_host(p) for p in self.P]

    def finish(self, done: int, stopped: bool) -> dict | None:
        cfg = self.cfg
        if self.val is None:  # a resumed, finished run: evaluate what there is
            self.val = self.evaluate(self.P)
        if self.rank != 0:
            return None
        self.samples.close()
        log, elapsed = self.run.log, self.run.elapsed()
        sample = "" if stopped or not cfg.sample_tokens else sample_text(
            self.mod, self.P, self.tokenizer, self.block, cfg.sample_tokens, self.rng, cfg.sample_prompt)
        summary = {
            "steps": done, "steps_planned": self.run.spec.steps, "workers": self.world,
            "accumulation": self.plan.accumulation, "tokens_per_step": self.tokens_per_step,
            "final_val_loss": self.val, "final_train_loss": log.last("train_loss"), "tokens": self.tokens,
            "train_seconds": round(elapsed, 3), "tokens_per_s": round(self.tokens / max(elapsed, 1e-9), 1),
            "allreduce_bytes_per_worker_per_step": self.traffic["allreduce_bytes_per_worker"],
            "diloco_bytes_per_worker_per_step": self.traffic["diloco_bytes_per_worker"],
        }
        if sample:
            self.run.dir.write_text("sample.txt", sample)
            self.run.say("sample:\n" + sample)
        if not stopped:
            self.run.say(f"done: {done} steps, val loss {self.val:.4f}, {summary['tokens_per_s'] / 1e3:.1f}k tok/s "
                         f"over {elapsed:.1f}s; metrics, loss.png and checkpoint in {self.run.dir.path}")
        return summary



def _split(out, n: int):
    return out[:n], out[n:2 * n], out[2 * n:]


def _announce(cfg: DDPConfig, ctx, built, block: int, accumulation: int) -> None:
    from pcpc.mlir.signature import load_meta

    meta = load_meta(built.meta)
    n_params = meta.parameter_bytes // 4
    per_step = 4 * (n_params + 2)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if cfg.target == "cuda" else "gloo")
    tokens = ctx.world * accumulation * cfg.batch_size * block
    ctx.say(f"DDP: {cfg.preset} ({n_params:,} params), {ctx.world} workers ({backend}), {cfg.max_steps} steps of "
            f"{tokens:,} tokens ({ctx.world} x {accumulation} micro-batch(es) x {cfg.batch_size} x {block}); "
            f"run dir {ctx.dir.path}")
    ctx.say(f"  each worker all-reduces {fmt_bytes(per_step)} per step; DiLoCo (tau {DILOCO_TAU}) would send "
            f"{fmt_bytes(per_step / DILOCO_TAU)} per step ({DILOCO_TAU}x less)")
    if ctx.resume:
        ctx.say(f"  resuming from {ctx.dir.checkpoint}")
