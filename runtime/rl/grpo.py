"""GRPO through compiled modules: rollout workers generate, the learner scores and updates.

Iteration i (rank 0 = learner, ranks 1..W = rollout workers, runtime/rl/rollout.py):

    prompts   the next num_prompts prompts of prompt_file (or of the dataset section's rows,
              runtime/rl/datasets.py), each repeated group_size times
    rollout   workers sample completions with the compiled generation module (weights synced first
              whenever the policy changed)
    score     reward functions on (prompts, completions, completion ids, a dataset row's columns),
              weighted sum;
              advantages (r - group mean) / (std + 1e-4)          autodiff/grpo.py: compute_advantages
    update    ref / old token_logprobs (beta > 0 / updates_per_iteration > 1), then
              updates_per_iteration x grpo_value_and_grad(...)   loss + gradients (derived by torch.func),
              AdamW chunk by chunk                               runtime/rl/update.py (adamw_K calls),
              the outer Nesterov step on θ_global − θ_after      unless learning_rate 1 and momentum 0
    record    metrics, one sample to samples.jsonl

Policy, optimizer state and reference stay device arrays on the learner;
only token ids, masks, advantages and (after each update) the flat weights
cross between processes. The run directory, checkpoints, metrics, signals
and launch are the skeleton's (runtime/run/).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError
from pcpc.runtime.rl import setup
from pcpc.runtime.rl.grpo_config import GRPOConfig
from pcpc.runtime.rl.policy import pack_reference, start_reference
from pcpc.runtime.rl.sparse import plan_sparse
from pcpc.runtime.rl.update import start_inplace
from pcpc.runtime.run.artifacts import WHY_DERIVED, check_not_foreign, start_artifact
from pcpc.runtime.run.skeleton import Loop


@dataclass(frozen=True)
class Plan:
    """What the launcher resolved for every process."""

    generation_vmfb: str
    training_vmfb: str
    weights_path: str
    eos_token_ids: tuple[int, ...]
    seq_len: int
    reward_dir: str
    """Where file.py reward functions are found (the config file's folder)."""
    sparse_vmfb: str | None = None
    """The sparse AdamW module of the run's mask (runtime/rl/sparse.py), or None."""
    inplace_vmfb: str | None = None
    """The in-place AdamW module of a full fine-tuning run (runtime/rl/update.py), or None."""
    shared_prefix: tuple[int, int] | None = None
    """(group_size, P): the learner computes each group's first P tokens (its prompt's) once (shared_prefix)."""
    reference_vmfb: str | None = None
    """The frozen reference's module, its weights packed once from weights_path (runtime/rl/policy.py
    start_reference), or None: the training module's token_logprobs on the reference's weights."""


def _seq_len(prompts: list[list[int]], max_tokens: int) -> tuple[int, int]:
    """(prefill length, rows' total length): the longest prompt rounded up to 8, plus max_tokens."""
    prefill = -(-max(len(p) for p in prompts) // 8) * 8
    return prefill, prefill + max_tokens


def load_prompts(cfg: GRPOConfig, tok, vocab_size: int, config_dir: Path, say):
    """The run's prompts (a runtime/rl/datasets.PromptSet): from the dataset section when there is one, with
    the rows whose columns the reward functions get, else from grpo_config.prompt_file (no columns)."""
    from pcpc.runtime.rl import datasets

    if cfg.dataset is None:
        return datasets.PromptSet(setup.ensure_prompts(cfg.grpo_config.prompt_file, tok, vocab_size, say))
    found = datasets.load_prompts(cfg.dataset, tok, config_dir)
    setup.check_prompts(found.ids, vocab_size, f"dataset {cfg.dataset.source}",
                        f"does the tokenizer ({tok.name}) belong to the model?")
    return found


def shared_prefix(prompts: list[list[int]], group_size: int) -> tuple[int, int] | None:
    """(group_size, the shortest prompt's length): a group's rows hold one prompt, so their first P tokens
    agree and the learner computes them once (rl recipe shared_prefix); None for groups of one."""
    return (group_size, min(len(p) for p in prompts)) if group_size > 1 else None


def check_groups(ids: np.ndarray, shared: tuple[int, int] | None) -> None:
    """The learner's rows (N, T) must agree on their first P tokens within each group of G (how the module
    was built); a violation is a bug, not a user mistake."""
    if shared is not None:
        G, P = shared
        heads = ids[:, :P].reshape(-1, G, P)
        if not (heads == heads[:, :1]).all():
            raise RuntimeError(f"GRPO rows: a group of {G} rows differs in its first {P} tokens (shared_prefix)")


def training_target(cfg: GRPOConfig, src, seq_len: int, shared: tuple[int, int] | None = None):
    from pcpc.mlir.targets import GRPO_FUNCTIONS, rl_target

    g = cfg.grpo_config
    return rl_target(Path(cfg.training_model_path).stem, **src.recipe, batch_size=cfg.rollouts_per_iteration,
                     seq_len=seq_len, completion_len=cfg.rollout_config.max_tokens,
                     **({"shared_prefix": list(shared)} if shared else {}),
                     **setup.module_recipe(cfg, GRPO_FUNCTIONS),
                     optimizer={"beta1": g.adam_beta1, "beta2": g.adam_beta2, "weight_decay": g.weight_decay,
                                "grad_clip": g.max_grad_norm})


def generation_target(cfg: GRPOConfig, src, prefill_len: int, seq_len: int):
    from pcpc.mlir.targets import qwen_target

    recipe = dict(src.recipe)
    return qwen_target(Path(cfg.model_path).stem, recipe.pop("model", None), recipe.pop("hf_config", None),
                       **recipe, batch_sizes=[cfg.rollout_config.batch_size], prefill_len=prefill_len,
                       max_seq=seq_len)


class GRPO(Loop):
    kind, title, unit = "grpo", "GRPO", "iteration"
    roles = " (rank 0 is the learner, ranks 1.. the rollout workers)"
    files = ("metrics.png", "samples.jsonl", "workers.json")
    shows_gradients = True
    Config = GRPOConfig

    # --- the launcher side

    @classmethod
    def world_size(cls, cfg: GRPOConfig) -> int:
        return cfg.num_workers + 1

    @classmethod
    def plan(cls, cfg: GRPOConfig, ctx) -> Plan:
        from pcpc.mlir.signature import load_meta
        from pcpc.runtime.rl.rewards import RewardSet

        g, r = cfg.grpo_config, cfg.rollout_config
        if ctx.world < 2:
            raise UserError("GRPO needs a learner and at least one rollout worker: WORLD_SIZE must be >= 2")
        rewards = RewardSet.from_config(g.reward_funcs, g.reward_weights, ctx.config_dir)  # fail fast
        src = setup.model_source(cfg.model, cfg.model_overrides)
        setup.check_weights_source(cfg.weights_path, src, cfg.init_weights)  # before any slow build
        setup.check_mask(cfg)
        tok = setup.load_tokenizer(cfg.tokenizer, cfg.model, cfg.eos_token_ids)
        found = load_prompts(cfg, tok, src.config.vocab_size, ctx.config_dir, ctx.say)
        rewards.check_arguments(list(found.arguments))
        if cfg.dataset is not None:
            ctx.say(f"dataset {cfg.dataset.source} ({cfg.dataset.split}): {len(found.ids)} prompts; the reward "
                    f"functions also get {', '.join(found.arguments)}")
        prefill_len, seq_len = _seq_len(found.ids, r.max_tokens)
        if seq_len > src.config.max_position_embeddings:
            raise UserError(f"rollout_config.max_tokens: the longest prompt ({prefill_len} tokens, rounded) plus "
                            f"{r.max_tokens} new tokens exceeds the model's {src.config.max_position_embeddings} "
                            f"positions")
        if cfg.mask is not None and cfg.outer_step_active:
            raise UserError("mask: a sparse run takes no outer Nesterov step; set learning_rate 1.0 and "
                            "nesterov_momentum 0.0")
        ctx.claim(g.num_iterations)
        # The modules are started one after another, the longest compile first: each export runs beside the
        # compiles before it. Both paths are checked before either build starts.
        for field in ("model_path", "training_model_path"):
            check_not_foreign(field, Path(getattr(cfg, field)), WHY_DERIVED)
        shared = shared_prefix(found.ids, g.group_size)
        train_t = training_target(cfg, src, seq_len, shared)
        train_b = start_artifact("training_model_path", cfg.training_model_path, train_t, cfg.target, ctx.say)
        gen_b = start_artifact("model_path", cfg.model_path, generation_target(cfg, src, prefill_len, seq_len),
                               cfg.target, ctx.say)
        inplace_b = start_inplace(cfg, train_t, Path(cfg.training_model_path).with_suffix(".vmfb"), ctx.say)
        ref_b = start_reference(cfg, train_t, Path(cfg.training_model_path).with_suffix(".vmfb"), ctx.say)
        gen = gen_b.wait()
        weights = setup.ensure_weights(cfg.weights_path, src, load_meta(gen.meta), cfg.init_weights, cfg.seed,
                                       ctx.say)
        train = train_b.wait()
        sparse_vmfb = plan_sparse(cfg, load_meta(train.meta), train_t.config["optimizer"], ctx.say)
        inplace_vmfb = str(inplace_b.wait().vmfb) if inplace_b else None
        reference_vmfb = str(ref_b.wait().vmfb) if ref_b else None
        if reference_vmfb and not pack_reference(reference_vmfb, weights, ctx.say):
            reference_vmfb = None
        ctx.write_config(generation_vmfb=str(gen.vmfb), training_vmfb=str(train.vmfb), weights=str(weights),
                         eos_token_ids=list(tok.eos_token_ids), seq_len=seq_len)
        ctx.say(f"GRPO: {cfg.model} ({setup.describe_training(cfg, load_meta(train.meta))}), 1 learner + "
                f"{ctx.world - 1} rollout worker(s); "
                f"{cfg.rollouts_per_iteration} rollouts/iteration ({g.num_prompts} prompts x {g.group_size}), "
                f"{g.num_iterations} iterations, rows of {seq_len} tokens; run dir {ctx.dir.path}")
        if cfg.outer_step_active:
            ctx.say(f"  outer Nesterov step on each iteration's pseudo-gradient: learning_rate {cfg.learning_rate}, "
                    f"nesterov_momentum {cfg.nesterov_momentum} (1.0 / 0.0 gives plain GRPO)")
        if cfg.outer_step_note():
            ctx.say("  " + cfg.outer_step_note())
        return Plan(str(gen.vmfb), str(train.vmfb), str(weights), tuple(tok.eos_token_ids), seq_len,
                    str(ctx.config_dir), sparse_vmfb, inplace_vmfb, shared, reference_vmfb)

    @classmethod
    def check_inputs(cls, cfg: GRPOConfig, config_dir: Path) -> None:
        from pcpc.runtime.rl.rewards import RewardSet

        g = cfg.grpo_config
        RewardSet.from_config(g.reward_funcs, g.reward_weights, config_dir)
        if cfg.dataset is not None:
            from pcpc.runtime.rl.datasets import check_source

            check_source(cfg.dataset, config_dir)  # a Hub name is checked when the run loads it
        src = setup.model_source(cfg.model, cfg.model_overrides)
        setup.check_weights_source(cfg.weights_path, src, cfg.init_weights)
        setup.load_tokenizer(cfg.tokenizer, cfg.model, cfg.eos_token_ids)  # a missing prompt file is written
        setup.check_mask(cfg)

    # --- every process: rank 0 learns, the others serve rollouts

    def threads(self) -> int:
        cores = os.cpu_count() or 1  # the learner computes while the workers wait, and vice versa
        return self.cfg.threads or (cores if self.rank == 0 else max(1, cores // (self.world - 1)))

    def drives(self) -> bool:
        return self.rank == 0

    def serve(self) -> None:
        from pcpc.runtime.rl.rollout import SamplingPlan, serve

        r = self.cfg.rollout_config
        serve(self.rank, SamplingPlan(self.plan.generation_vmfb, r.max_tokens, r.temperature, r.top_p,
                                      self.plan.eos_token_ids, self.threads()))

    def setup(self, resume) -> int:
        from pcpc.autodiff.grpo import loss_type_weights
        from pcpc.runtime.module import CompiledModule
        from pcpc.runtime.rl.policy import make_policy
        from pcpc.runtime.rl.rewards import RewardSet
        from pcpc.runtime.rl.rollout import RolloutClient
        from pcpc.runtime.rl.sparse import make_optimizer
        from pcpc.runtime.run.metrics import truncate_jsonl

        cfg, g, r = self.cfg, self.cfg.grpo_config, self.cfg.rollout_config
        self.mod = mod = CompiledModule(self.plan.training_vmfb, threads=self.threads())
        self.opt = make_optimizer(mod, self.plan.sparse_vmfb, cfg, self.threads(), self.plan.inplace_vmfb)
        self.tok = setup.load_tokenizer(cfg.tokenizer, cfg.model, self.plan.eos_token_ids)
        self.prompt_set = load_prompts(cfg, self.tok, setup.vocab_size(mod.meta), Path(self.plan.reward_dir),
                                       lambda m: None)
        self.prompts = self.prompt_set.ids
        self.rewards = RewardSet.from_config(g.reward_funcs, g.reward_weights, Path(self.plan.reward_dir))
        self.client = RolloutClient(self.world)

        zeros = [np.zeros(p.shape, np.float32) for p in mod.meta.parameters]
        state = resume.state if resume else {"m": self.opt.zeros(), "v": self.opt.zeros(), "momentum": None,
                                             "adam_step": 0}
        # the policy keeps the reference where the loss has a KL term: its own module (built only then, weights
        # packed once: start_reference) or the initial weights
        self.policy = make_policy(mod, self.plan.weights_path, cfg, resume.state if resume else None,
                                  keep_reference=g.beta > 0, total_steps=g.num_iterations * g.updates_per_iteration,
                                  reference_vmfb=self.plan.reference_vmfb, threads=self.threads())
        self.P = self.policy.P  # updated in place
        self.M, self.V = self.opt.upload_state(state["m"]), self.opt.upload_state(state["v"])
        self.Bm = mod.upload_all(state["momentum"] or zeros) if cfg.outer_step_active else None
        self.adam_step = state["adam_step"]
        N, L = cfg.rollouts_per_iteration, self.plan.seq_len - 1
        self.zeros_bl = mod.upload(np.zeros((N, L), np.float32))
        self.sel = np.asarray(loss_type_weights(g.loss_type), np.float32)
        self.scalars = [np.float32(g.beta), np.float32(g.epsilon), np.float32(g.eps_high),
                        np.float32(r.temperature), np.float32(r.max_tokens),
                        np.float32(1.0 if g.updates_per_iteration > 1 else 0.0),
                        np.float32(1.0 if g.use_bias_correction_kl else 0.0)]
        start = resume.step if resume else 0
        samples = self.run.dir.path / "samples.jsonl"
        truncate_jsonl(samples, "step", start)
        self.samples = open(samples, "a")
        self.sync, self.first = True, start  # the workers have no weights yet
        return start

    def layout(self) -> dict:
        fn_cols = [f"reward/{name}" for name in self.rewards.names]
        columns = ["step", "reward_mean", "reward_std", *fn_cols, "frac_reward_zero_std", "kl", "clip_ratio",
                   "clip_ratio_low", "clip_ratio_high", "loss", "completion_length_mean", "completion_length_min",
                   "completion_length_max", "completions_clipped_frac", "rollout_tokens", "rollout_s",
                   "rollout_tokens_per_s", "weight_sync_s", "learner_step_s", "elapsed_s"]
        return dict(columns=columns,
                    panels=[("reward", ["reward_mean", *fn_cols]), ("kl", ["kl"]),
                            ("completion length", ["completion_length_mean", "completion_length_min",
                                                   "completion_length_max"]),
                            ("rollout tok/s", ["rollout_tokens_per_s"]), ("learner step s", ["learner_step_s"])],
                    png="metrics.png", title=f"GRPO {Path(self.cfg.training_model_path).stem}",
                    postfix=[("reward_mean", "reward"), ("kl", "kl"), ("rollout_tokens_per_s", "tok/s")])

    def step(self, it: int) -> dict:
        order = self.prompt_order(it)
        rows = [self.prompts[i] for i in order]
        comps, rollout_s, sync_s = self.rollout(it, rows)
        score = self.score(rows, comps, order)
        t0 = time.perf_counter()
        stats = self.update(it, rows, comps, score["advantages"])
        learner_s = time.perf_counter() - t0
        return self.record(it, comps, score, stats, rollout_s, sync_s, learner_s)

    def prompt_order(self, it: int) -> list[int]:
        """Which prompt each of the iteration's rows holds: the next num_prompts (in order, wrapping), each
        group_size times."""
        g = self.cfg.grpo_config
        order = [(it * g.num_prompts + j) % len(self.prompts) for j in range(g.num_prompts)]
        return [i for i in order for _ in range(g.group_size)]

    def rollout(self, it: int, rows) -> tuple[list[list[int]], float, float]:
        """(completions, rollout seconds, weight-sync seconds) from the workers; syncs the policy first."""
        from pcpc.runtime.rl.rollout import make_tasks

        tasks, _ = make_tasks(rows, self.cfg.rollout_config.batch_size, self.cfg.seed, it)
        t0 = time.perf_counter()
        results, sync_s = self.client.rollout(tasks, self.policy.rollout_weights() if self.sync else None)
        rollout_s = time.perf_counter() - t0 - sync_s
        self.sync = True
        if it == self.first:  # which process is which, for whoever needs to find a worker
            pids = {f"rank {res['worker']}": res["pid"] for res in results.values()}
            self.run.dir.write_json("workers.json", {"rank 0": os.getpid(), **pids})
        comps = [c for t in tasks for c in results[t.index]["completions"]]
        return comps[:len(rows)], rollout_s, sync_s

    def score(self, rows, comps, order) -> dict:
        """Rewards of the completions (total and per function) and their group-relative advantages; `order`
        says which prompt (and so which dataset row's columns) each row holds."""
        import torch

        from pcpc.autodiff.grpo import compute_advantages

        eos = set(self.plan.eos_token_ids)
        bodies = [c[:-1] if c and c[-1] in eos else c for c in comps]
        texts, prompt_texts = [self.tok.decode(b) for b in bodies], [self.tok.decode(p) for p in rows]
        total, per_fn = self.rewards.score(prompt_texts, texts, comps, rows, self.plan.eos_token_ids,
                                           self.prompt_set.columns_for(order))
        adv, frac_zero = compute_advantages(torch.tensor(total, dtype=torch.float32), self.cfg.grpo_config.group_size,
                                            self.cfg.grpo_config.scale_rewards)
        return {"total": total, "per_fn": per_fn, "texts": texts, "prompt_texts": prompt_texts,
                "advantages": adv.numpy(), "frac_zero_std": frac_zero}

    def update(self, it: int, rows, comps, advantages) -> np.ndarray:
        """updates_per_iteration compiled loss + gradient calls, each followed by the chunked AdamW (and the
        outer step); the mean (loss, kl, clip_ratio, low, high) over the updates."""
        from pcpc.runtime.module import to_host
        from pcpc.runtime.rl.rows import pack_rows

        cfg, g, mod = self.cfg, self.cfg.grpo_config, self.mod
        temperature = np.float32(cfg.rollout_config.temperature)
        ids, mask = pack_rows(rows, comps, self.plan.seq_len, self.plan.eos_token_ids[0])
        check_groups(ids, self.plan.shared_prefix)
        ids_d, mask_d, adv_d = mod.upload(ids), mod.upload(mask), mod.upload(advantages)
        ref_logp = (self.policy.reference("token_logprobs", ids_d, mask_d, temperature)[0] if g.beta > 0
                    else self.zeros_bl)
        old_logp = (self.policy.score("token_logprobs", ids_d, mask_d, temperature)[0]
                    if g.updates_per_iteration > 1 else self.zeros_bl)
        # One update: the outer step goes chunk by chunk right behind AdamW (no copy of the weights
        # kept); several: the iteration's starting weights are kept for it.
        fused = cfg.outer_step_active and g.updates_per_iteration == 1
        before = list(self.P) if cfg.outer_step_active and not fused else None
        outer = (self.Bm, cfg.learning_rate, cfg.nesterov_momentum)
        stats = []
        for _ in range(g.updates_per_iteration):
            self.adam_step += 1
            out = mod("grpo_value_and_grad", *self.policy.args(), ids_d, mask_d, adv_d, old_logp, ref_logp,
                      self.sel, *self.scalars)
            stats.append([float(to_host(x)) for x in out[:5]])
            grads = list(out[5:])
            del out
            kept = [to_host(x) for x in grads] if self.policy.wants_grads else None
            self.run.gradients(it + 1, grads)
            self.opt.step(self.P, self.M, self.V, grads, self.adam_step, g.learning_rate,
                          outer=outer if fused else None)
            self.policy.after_step(self.adam_step, kept)
        if before is not None:
            self.opt.outer(before, self.Bm, self.P, cfg.learning_rate, cfg.nesterov_momentum)
        return np.mean(stats, axis=0)

    def record(self, it, comps, score, stats, rollout_s, sync_s, learner_s) -> dict:
        """The iteration's metrics record, and its first completion in samples.jsonl."""
        eos = set(self.plan.eos_token_ids)
        total, lengths = score["total"], [len(c) for c in comps]
        loss, kl, clip, low, high = stats
        tokens = sum(lengths)
        rec = {"step": it + 1, "reward_mean": float(np.mean(total)), "reward_std": float(np.std(total, ddof=1)),
               **{f"reward/{nm}": float(np.mean(score["per_fn"][nm])) for nm in self.rewards.names},
               "frac_reward_zero_std": score["frac_zero_std"],
               "kl": float(kl) if self.cfg.grpo_config.beta > 0 else None,
               "clip_ratio": float(clip), "clip_ratio_low": float(low), "clip_ratio_high": float(high),
               "loss": float(loss), "completion_length_mean": float(np.mean(lengths)),
               "completion_length_min": min(lengths), "completion_length_max": max(lengths),
               "completions_clipped_frac": float(np.mean([not (c and c[-1] in eos) for c in comps])),
               "rollout_tokens": tokens, "rollout_s": round(rollout_s, 4),
               "rollout_tokens_per_s": round(tokens / max(rollout_s, 1e-9), 2), "weight_sync_s": round(sync_s, 4),
               "learner_step_s": round(learner_s, 4), "elapsed_s": round(self.run.elapsed(), 3)}
        sample = {"step": it + 1, "prompt": score["prompt_texts"][0], "completion": score["texts"][0],
                  "reward": total[0]}
        self.samples.write(json.dumps(sample) + "\n")
        self.samples.flush()
        return rec

    def state(self) -> dict:
        return {**self.policy.state(), "m": self.M, "v": self.V, "momentum": self.Bm, "adam_step": self.adam_step}

    def weights(self) -> tuple[list[str], list]:
        from pcpc.runtime.module import to_host

        return [s.name for s in self.mod.meta.parameters], [to_host(p) for p in self.policy.P]

    def finish(self, done: int, stopped: bool) -> dict:
        self.client.stop()
        self.samples.close()
        adapter = self.policy.save(self.run.dir.path / "adapter")
        recs = self.run.log.records
        summary = {
            "iterations": done, "iterations_planned": self.run.spec.steps, "workers": self.world - 1,
            "first_reward_mean": recs[0]["reward_mean"] if recs else None,
            "final_reward_mean": recs[-1]["reward_mean"] if recs else None,
            "rollout_tokens_per_s": _mean([x["rollout_tokens_per_s"] for x in recs]),
            "learner_step_s": _mean([x["learner_step_s"] for x in recs]),
            "train_seconds": round(self.run.elapsed(), 3),
            **({"adapter": str(adapter)} if adapter else {}),
        }
        if not stopped and recs:
            self.run.say(f"done: {done} iterations, reward {summary['first_reward_mean']:.3f} -> "
                         f"{summary['final_reward_mean']:.3f}; metrics, metrics.png, samples"
                         f"{', adapter' if adapter else ''} and checkpoint in {self.run.dir.path}")
        return summary


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(float(np.mean(xs)), 4) if xs else None
