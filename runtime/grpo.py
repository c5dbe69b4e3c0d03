"""GRPO through compiled modules: rollout workers generate, the learner scores and updates.

Iteration i (rank 0 = learner, ranks 1..W = rollout workers, runtime/rollout.py):

    prompts   the next num_prompts prompts of prompt_file, each repeated group_size times
    rollout   workers sample completions with the compiled generation module (weights synced first
              whenever the policy changed)
    rewards   reward functions on (prompts, completions, completion ids), weighted sum
    adv       (r - group mean) / (std + 1e-4)                    autodiff/grpo.py: compute_advantages
    ref, old  token_logprobs of the frozen reference (beta > 0) and of the policy (updates_per_iteration > 1)
    update    updates_per_iteration x grpo_value_and_grad(...)   loss + gradients (derived by torch.func),
              then AdamW chunk by chunk                          runtime/rl_update.py (adamw_K calls)
    outer     outer_K(θ_global, b, θ_after, lr, μ) per chunk     Nesterov on θ_global − θ_after, unless
                                                                 learning_rate 1 and nesterov_momentum 0

Policy, optimizer state and reference stay device arrays on the learner;
only token ids, masks, advantages and (after each update) the flat weights
cross between processes. `run_experiment` is what `pcpc run` calls.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError
from pcpc.runtime.grpo_config import GRPOExperiment, parse_grpo

RUN_FILES = ("metrics.jsonl", "metrics.csv", "metrics.png", "summary.json", "samples.jsonl", "workers.json")
TRAJECTORY_FIELDS = ("model", "model_overrides", "weights_path", "tokenizer", "learning_rate", "nesterov_momentum",
                     "grpo_config", "rollout_config", "seed", "eos_token_ids")


@dataclass(frozen=True)
class Plan:
    """Everything every process needs (picklable: it crosses the process spawn)."""

    exp: GRPOExperiment
    config_path: str
    run_dir: str
    generation_vmfb: str
    training_vmfb: str
    weights_path: str
    eos_token_ids: tuple[int, ...]
    seq_len: int
    resume: bool
    quiet: bool = False


def _seq_len(prompts: list[list[int]], max_tokens: int) -> tuple[int, int]:
    """(prefill length, rows' total length): the longest prompt rounded up to 8, plus max_tokens."""
    prefill = -(-max(len(p) for p in prompts) // 8) * 8
    return prefill, prefill + max_tokens


def training_target(exp: GRPOExperiment, src, seq_len: int):
    from pcpc.mlir.targets import GRPO_FUNCTIONS, rl_target

    g = exp.grpo_config
    return rl_target(Path(exp.training_model_path).stem, **src.recipe, batch_size=exp.rollouts_per_iteration,
                     seq_len=seq_len, functions=GRPO_FUNCTIONS,
                     optimizer={"beta1": g.adam_beta1, "beta2": g.adam_beta2, "weight_decay": g.weight_decay,
                                "grad_clip": g.max_grad_norm})


def generation_target(exp: GRPOExperiment, src, prefill_len: int, seq_len: int):
    from pcpc.mlir.targets import qwen_target

    recipe = dict(src.recipe)
    return qwen_target(Path(exp.model_path).stem, recipe.pop("model", None), recipe.pop("hf_config", None),
                       **recipe, batch_sizes=[exp.rollout_config.batch_size], prefill_len=prefill_len,
                       max_seq=seq_len)


def run_experiment(config_path: str, raw: dict, *, resume: bool = False, out_dir: str | None = None,
                   overwrite: bool = False, quiet: bool = False, say=print) -> dict | None:
    """`pcpc run` of a GRPO config: resolve model, artifacts, weights and prompts; launch learner + workers."""
    from pcpc.mlir.signature import load_meta
    from pcpc.runtime import rl_setup
    from pcpc.runtime.launch import WorkerFailure, env_rank, launch_local, under_torchrun
    from pcpc.runtime.rewards import RewardSet

    exp = parse_grpo(raw, where=str(config_path))
    say = (lambda m: None) if quiet else say
    torchrun = under_torchrun()
    rank, world, _ = env_rank() if torchrun else (0, exp.num_workers + 1, exp.num_workers + 1)
    if world < 2:
        raise UserError("GRPO needs a learner and at least one rollout worker: WORLD_SIZE must be >= 2")
    talk = say if rank == 0 else (lambda m: None)
    run_dir = Path(out_dir) if out_dir else Path("runs") / Path(config_path).stem
    RewardSet.from_config(exp.grpo_config.reward_funcs, exp.grpo_config.reward_weights,
                          Path(config_path).parent)  # fail fast on a bad reward function
    src = rl_setup.model_source(exp.model, exp.model_overrides)
    cfg = src.config
    rl_setup.check_weights_source(exp.weights_path, src, exp.init_weights)  # before any slow build
    tok = rl_setup.load_tokenizer(exp.tokenizer, exp.model, exp.eos_token_ids)
    prompts = rl_setup.ensure_prompts(exp.grpo_config.prompt_file, tok, cfg.vocab_size, talk)
    prefill_len, seq_len = _seq_len(prompts, exp.rollout_config.max_tokens)
    if seq_len > cfg.max_position_embeddings:
        raise UserError(f"rollout_config.max_tokens: the longest prompt ({prefill_len} tokens, rounded) plus "
                        f"{exp.rollout_config.max_tokens} new tokens exceeds the model's {cfg.max_position_embeddings} "
                        f"positions")
    gen = rl_setup.build_artifact("model_path", exp.model_path,
                                  generation_target(exp, src, prefill_len, seq_len), exp.target, talk)
    weights = rl_setup.ensure_weights(exp.weights_path, src, load_meta(gen.meta), exp.init_weights, exp.seed, talk)
    train = rl_setup.build_artifact("training_model_path", exp.training_model_path,
                                    training_target(exp, src, seq_len), exp.target, talk)
    if rank == 0:  # under torchrun every rank gets here; only the learner owns the run directory
        rl_setup.prepare_run_dir(run_dir, "grpo", trajectory(exp), resume, overwrite, RUN_FILES,
                                 may_change=("grpo_config.num_iterations",))
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"experiment": exp.public_dict(), "config_path": str(config_path), "world": world,
                    "generation_vmfb": str(gen.vmfb), "training_vmfb": str(train.vmfb), "weights": str(weights),
                    "eos_token_ids": list(tok.eos_token_ids), "seq_len": seq_len}
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")
    plan = Plan(exp, str(config_path), str(run_dir), str(gen.vmfb), str(train.vmfb), str(weights),
                tuple(tok.eos_token_ids), seq_len, resume, quiet)
    if torchrun:
        return run_process(rank, world, plan)
    try:
        return launch_local(run_process, plan, world, say=say)[0]
    except WorkerFailure as e:
        done = (run_dir / "checkpoints" / "latest.pt").is_file()
        hint = (f"; the last checkpoint is in {run_dir}: continue with `pcpc run {config_path} --resume"
                f"{' --out ' + str(run_dir) if out_dir else ''}`") if done else "; no checkpoint was written yet"
        raise UserError(f"GRPO run failed (rank 0 is the learner, ranks 1.. the rollout workers): {e}{hint}") from None


def run_process(rank: int, world: int, plan: Plan):
    """Rank 0 runs the learner, every other rank a rollout worker."""
    import torch
    import torch.distributed as dist

    from pcpc.runtime.launch import init_process_group
    from pcpc.runtime.rollout import SamplingPlan, serve

    exp = plan.exp
    cores = os.cpu_count() or 1
    backend = "gloo" if exp.backend == "auto" else exp.backend  # the exchange is host memory (ids, weights)
    init_process_group(backend, exp.timeout_s)
    try:
        if rank == 0:
            threads = exp.threads or cores  # the learner computes while the workers wait, and vice versa
            torch.set_num_threads(threads)
            return _learn(world, plan, threads)
        threads = exp.threads or max(1, cores // (world - 1))
        torch.set_num_threads(threads)
        r = exp.rollout_config
        serve(rank, SamplingPlan(plan.generation_vmfb, r.max_tokens, r.temperature, r.top_p, plan.eos_token_ids,
                                 threads))
        return None
    finally:
        dist.destroy_process_group()


class _Stop:
    """SIGINT/SIGTERM ask the learner to stop after the current iteration (checkpoint saved); a repeat kills."""

    def __init__(self):
        self.requested = False
        self._old = {s: signal.signal(s, self._on) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def pack_rows(prompts: list[list[int]], completions: list[list[int]], seq_len: int, pad: int):
    """Training rows [prompt][completion][pad] (N, T) int64 and the completion-target mask (N, T-1) f32.

    mask[b, t] = 1 where token t+1 of row b is a completion token (EOS included).
    """
    n = len(prompts)
    ids = np.full((n, seq_len), pad, np.int64)
    mask = np.zeros((n, seq_len - 1), np.float32)
    for b, (p, c) in enumerate(zip(prompts, completions)):
        row = (list(p) + list(c))[:seq_len]
        ids[b, :len(row)] = row
        mask[b, len(p) - 1:len(row) - 1] = 1.0
    return ids, mask


def _learn(world: int, plan: Plan, threads: int) -> dict:
    """The learner: the GRPO loop, top to bottom."""
    import torch

    from pcpc.autodiff.grpo import compute_advantages, loss_type_weights
    from pcpc.runtime import rl_setup
    from pcpc.runtime.generate import import_host_array
    from pcpc.runtime.module import CompiledModule, to_host
    from pcpc.runtime.rewards import RewardSet
    from pcpc.runtime.rl_log import RLRunLog, truncate_records
    from pcpc.runtime.rl_update import ChunkedOptimizer
    from pcpc.runtime.rollout import RolloutClient, make_tasks

    exp, g, r = plan.exp, plan.exp.grpo_config, plan.exp.rollout_config
    run_dir = Path(plan.run_dir)
    mod = CompiledModule(plan.training_vmfb, threads=threads)
    opt = ChunkedOptimizer(mod)
    meta = mod.meta
    tok = rl_setup.load_tokenizer(exp.tokenizer, exp.model, plan.eos_token_ids)
    prompts = rl_setup.ensure_prompts(g.prompt_file, tok, meta.parameters[0].shape[0], lambda m: None)
    rewards = RewardSet.from_config(g.reward_funcs, g.reward_weights, Path(plan.config_path).parent)
    client = RolloutClient(world)
    stop = _Stop()

    initial = rl_setup.read_weights(plan.weights_path, meta)
    ckpt_path = rl_setup.checkpoint_path(run_dir)
    zeros = [np.zeros(p.shape, np.float32) for p in meta.parameters]
    state = {"step": 0, "arrays": {"params": initial, "m": zeros, "v": zeros, "momentum": None},
             "extra": {"adam_step": 0, "elapsed_s": 0.0}}
    if plan.resume:
        state = rl_setup.load_checkpoint(ckpt_path, "grpo")
    arrays = state["arrays"]
    # The initial weights are imported without a copy (aligned host arrays): the frozen reference and, on a
    # fresh start, the first policy share them.
    imported = mod.driver == "local-task"
    ref = [import_host_array(mod, a) for a in initial] if imported else mod.upload_all(initial)
    P = list(ref) if arrays["params"] is initial else mod.upload_all(arrays["params"])  # a new list: updated in place
    M, V = mod.upload_all(arrays["m"]), mod.upload_all(arrays["v"])
    Bm = mod.upload_all(arrays["momentum"] or zeros) if exp.outer_step_active else None
    if g.beta == 0:
        ref = None
    del initial, zeros, arrays, state["arrays"]
    adam_step, start = state["extra"]["adam_step"], state["step"]
    N, T = exp.rollouts_per_iteration, plan.seq_len
    L = T - 1
    zeros_bl = mod.upload(np.zeros((N, L), np.float32))
    sel = np.asarray(loss_type_weights(g.loss_type), np.float32)
    scalars = [np.float32(g.beta), np.float32(g.epsilon), np.float32(g.eps_high), np.float32(r.temperature),
               np.float32(r.max_tokens), np.float32(1.0 if g.updates_per_iteration > 1 else 0.0)]

    fn_cols = [f"reward/{name}" for name in rewards.names]
    columns = ["step", "reward_mean", "reward_std", *fn_cols, "frac_reward_zero_std", "kl", "clip_ratio",
               "clip_ratio_low", "clip_ratio_high", "loss", "completion_length_mean", "completion_length_min",
               "completion_length_max", "completions_clipped_frac", "rollout_tokens", "rollout_s",
               "rollout_tokens_per_s", "weight_sync_s", "learner_step_s", "elapsed_s"]
    records = truncate_records(run_dir, columns, start)
    log = RLRunLog(exp, run_dir, columns, g.num_iterations, start, records,
                   panels=[("reward", ["reward_mean", *fn_cols]), ("kl", ["kl"]),
                           ("completion length", ["completion_length_mean", "completion_length_min",
                                                  "completion_length_max"]),
                           ("rollout tok/s", ["rollout_tokens_per_s"]), ("learner step s", ["learner_step_s"])],
                   title=f"GRPO {Path(exp.training_model_path).stem}",
                   postfix=[("reward_mean", "reward"), ("kl", "kl"), ("rollout_tokens_per_s", "tok/s")],
                   quiet=plan.quiet)
    _announce(log, exp, plan, world, meta, T, start)
    samples = open(run_dir / "samples.jsonl", "a")
    sync = True  # the workers have no weights yet
    t_start = time.perf_counter() - state["extra"]["elapsed_s"]
    done, stopped = start, False
    try:
        for it in range(start, g.num_iterations):
            # 1. rollouts
            order = [(it * g.num_prompts + j) % len(prompts) for j in range(g.num_prompts)]
            rows = [prompts[i] for i in order for _ in range(g.group_size)]
            tasks, _ = make_tasks(rows, r.batch_size, exp.seed, it)
            t0 = time.perf_counter()
            results, sync_s = client.rollout(tasks, P if sync else None)
            rollout_s = time.perf_counter() - t0 - sync_s
            comps = [c for t in tasks for c in results[t.index]["completions"]][:N]
            if it == start:  # which process is which, for whoever needs to find a worker
                pids = {f"rank {res['worker']}": res["pid"] for res in results.values()}
                (run_dir / "workers.json").write_text(json.dumps({"rank 0": os.getpid(), **pids}, indent=1) + "\n")
            # 2. rewards and advantages
            eos = set(plan.eos_token_ids)
            bodies = [c[:-1] if c and c[-1] in eos else c for c in comps]
            texts, prompt_texts = [tok.decode(b) for b in bodies], [tok.decode(p) for p in rows]
            total, per_fn = rewards.score(prompt_texts, texts, comps, rows, plan.eos_token_ids)
            adv, frac_zero = compute_advantages(torch.tensor(total, dtype=torch.float32), g.group_size,
                                                g.scale_rewards)
            # 3. update
            t1 = time.perf_counter()
            ids, mask = pack_rows(rows, comps, T, plan.eos_token_ids[0])
            ids_d, mask_d, adv_d = mod.upload(ids), mod.upload(mask), mod.upload(adv.numpy())
            ref_logp = mod("token_logprobs", *ref, ids_d, np.float32(r.temperature))[0] if ref else zeros_bl
            old_logp = (mod("token_logprobs", *P, ids_d, np.float32(r.temperature))[0]
                        if g.updates_per_iteration > 1 else zeros_bl)
            # One update: the outer step goes chunk by chunk right behind AdamW (no copy of the weights
            # kept); several: the iteration's starting weights are kept for it.
            fused = exp.outer_step_active and g.updates_per_iteration == 1
            before = list(P) if exp.outer_step_active and not fused else None
            stats = []
            for _ in range(g.updates_per_iteration):
                adam_step += 1
                out = mod("grpo_value_and_grad", *P, ids_d, mask_d, adv_d, old_logp, ref_logp, sel, *scalars)
                stats.append([float(to_host(x)) for x in out[:5]])
                grads = list(out[5:])
                del out
                opt.step(P, M, V, grads, adam_step, g.learning_rate,
                         outer=(Bm, exp.learning_rate, exp.nesterov_momentum) if fused else None)
            if before is not None:
                opt.outer(before, Bm, P, exp.learning_rate, exp.nesterov_momentum)
            del before
            learner_s = time.perf_counter() - t1
            sync, done = True, it + 1
            # 4. record
            lengths = [len(c) for c in comps]
            tokens = sum(lengths)
            loss, kl, clip, low, high = np.mean(stats, axis=0)
            elapsed = time.perf_counter() - t_start
            rec = {"step": it + 1, "reward_mean": float(np.mean(total)), "reward_std": float(np.std(total, ddof=1)),
                   **{c: float(np.mean(per_fn[nm])) for c, nm in zip(fn_cols, rewards.names)},
                   "frac_reward_zero_std": frac_zero, "kl": float(kl) if ref else None, "clip_ratio": float(clip),
                   "clip_ratio_low": float(low), "clip_ratio_high": float(high), "loss": float(loss),
                   "completion_length_mean": float(np.mean(lengths)), "completion_length_min": min(lengths),
                   "completion_length_max": max(lengths),
                   "completions_clipped_frac": float(np.mean([not (c and c[-1] in eos) for c in comps])),
                   "rollout_tokens": tokens, "rollout_s": round(rollout_s, 4),
                   "rollout_tokens_per_s": round(tokens / max(rollout_s, 1e-9), 2), "weight_sync_s": round(sync_s, 4),
                   "learner_step_s": round(learner_s, 4), "elapsed_s": round(elapsed, 3)}
            log.step(rec)
            samples.write(json.dumps({"step": it + 1, "prompt": prompt_texts[0], "completion": texts[0],
                                      "reward": total[0]}) + "\n")
            samples.flush()
            stopped = stop.requested
            last = it + 1 == g.num_iterations
            if last or stopped or (exp.checkpoint_interval and (it + 1) % exp.checkpoint_interval == 0):
                rl_setup.save_checkpoint(ckpt_path, "grpo", it + 1, {"params": P, "m": M, "v": V, "momentum": Bm},
                                         {"adam_step": adam_step, "elapsed_s": elapsed}, trajectory(exp))
            if stopped:
                break
    finally:
        stop.restore()
        samples.close()
    client.stop()
    recs = log.records
    summary = {
        "iterations": done, "iterations_planned": g.num_iterations, "stopped": stopped, "workers": world - 1,
        "first_reward_mean": recs[0]["reward_mean"] if recs else None,
        "final_reward_mean": recs[-1]["reward_mean"] if recs else None,
        "rollout_tokens_per_s": _mean([x["rollout_tokens_per_s"] for x in recs]),
        "learner_step_s": _mean([x["learner_step_s"] for x in recs]),
        "train_seconds": round(time.perf_counter() - t_start, 3), "run_dir": str(run_dir),
    }
    log.close(summary)
    if stopped:
        log.say(f"stopped after iteration {done} (checkpoint saved): continue with "
                f"`pcpc run {plan.config_path} --resume --out {run_dir}`")
    else:
        log.say(f"done: {done} iterations, reward {summary['first_reward_mean']:.3f} -> "
                f"{summary['final_reward_mean']:.3f}; metrics, metrics.png, samples and checkpoint in {run_dir}")
    return summary


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return round(float(np.mean(xs)), 4) if xs else None


def _announce(log, exp, plan, world, meta, T, start):
    g = exp.grpo_config
    n_params = meta.parameter_bytes // 4
    log.say(f"GRPO: {exp.model} ({n_params:,} params), 1 learner + {world - 1} rollout worker(s); "
            f"{exp.rollouts_per_iteration} rollouts/iteration ({g.num_prompts} prompts x {g.group_size}), "
            f"{g.num_iterations} iterations, rows of {T} tokens; run dir {plan.run_dir}")
    if exp.outer_step_active:
        log.say(f"  outer Nesterov step on each iteration's pseudo-gradient: learning_rate {exp.learning_rate}, "
                f"nesterov_momentum {exp.nesterov_momentum} (1.0 / 0.0 gives plain GRPO)")
    if start:
        log.say(f"  resuming after iteration {start}")


def trajectory(exp: GRPOExperiment) -> dict:
    """The config fields a resumed run must share with the checkpoint (JSON-able)."""
    return json.loads(json.dumps({k: v for k, v in dataclasses.asdict(exp).items() if k in TRAJECTORY_FIELDS}))
