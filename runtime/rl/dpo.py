"""DPO through compiled modules: preference pairs, reference log-probs once, compiled train steps.

    pairs      JSONL lines {"prompt", "chosen", "rejected"} (text), or {"prompt_ids", "chosen_ids",
               "rejected_ids"} (token ids), or the rows of the dataset section (runtime/rl/datasets.py);
               completions get EOS appended
    reference  sequence_logps (sums of the completion's token log-probs) of the initial weights for
               every pair, computed once before training
    step k     the k-th batch of a seeded per-epoch shuffle; dpo_value_and_grad(...) = loss (sigmoid / ipo /
               hinge; ipo on per-token means), implicit rewards (on sums, as TRL logs them) and gradients
               derived by torch.func; then compiled AdamW chunk by chunk (runtime/rl/update.py)
    metrics    loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies per step, and
               the same over the whole data set with the final weights (summary.json)

One process: DPO needs no rollouts. The run directory, checkpoints,
metrics, signals and launch (--max-restarts included) are the skeleton's
(runtime/run/).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError
from pcpc.runtime.rl import setup
from pcpc.runtime.rl.sparse import plan_sparse
from pcpc.runtime.rl.update import start_inplace
from pcpc.runtime.rl.dpo_config import DPOConfig
from pcpc.runtime.run.artifacts import start_artifact
from pcpc.runtime.run.skeleton import Loop


@dataclass(frozen=True)
class Plan:
    """What the launcher resolved for the process."""

    training_vmfb: str
    weights_path: str
    data_path: str
    """The JSONL file ("" when the pairs come from the dataset section)."""
    eos_token_ids: tuple[int, ...]
    seq_len: int
    sparse_vmfb: str | None = None
    """The sparse AdamW module of the run's mask (runtime/rl/sparse.py), or None."""
    config_dir: str = "."
    """The config file's folder (a relative dataset.path may be there)."""
    inplace_vmfb: str | None = None
    """The in-place AdamW module of a full fine-tuning run (runtime/rl/update.py), or None."""


@dataclass
class Pairs:
    """Tokenized preference pairs."""

    prompts: list[list[int]]
    chosen: list[list[int]]
    rejected: list[list[int]]
    truncated: int = 0


def load_pairs(path: str | Path, tok, eos: int, vocab: int, max_length: int) -> Pairs:
    """Read and tokenize the JSONL preference file; errors name the line."""
    path = Path(path)
    return tokenize_pairs(read_pair_records(path), tok, eos, vocab, max_length, f"dpo_config.data_path: {path}")


def read_pair_records(path: Path) -> list[tuple[str, dict]]:
    """(where, record) per non-empty line of a JSONL preference file."""
    if not path.is_file():
        raise UserError(f"dpo_config.data_path: {path} not found (JSONL of {{\"prompt\", \"chosen\", \"rejected\"}})")
    out = []
    for no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: invalid JSON: {e.msg}") from None
        if not isinstance(rec, dict):
            raise UserError(f"{where}: expected an object with prompt, chosen, rejected")
        out.append((where, rec))
    return out


def tokenize_pairs(records, tok, eos: int, vocab: int, max_length: int, source: str, chat: bool = True) -> Pairs:
    """Pairs from (where, record) items: text records are tokenized (the prompt as a chat user turn when
    `chat`), *_ids records taken as they are; completions get EOS; errors name `where`."""
    out = Pairs([], [], [])
    for where, rec in records:
        if all(k in rec for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
            p, c, r = (list(rec[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        elif all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            p = tok.encode(rec["prompt"], chat=chat)
            c, r = tok.encode(rec["chosen"], chat=False), tok.encode(rec["rejected"], chat=False)
        else:
            raise UserError(f"{where}: needs string fields prompt, chosen, rejected (or prompt_ids, chosen_ids, "
                            f"rejected_ids lists)")
        c, r = c + [eos], r + [eos]
        for name, ids in (("prompt", p), ("chosen", c), ("rejected", r)):
            if not all(isinstance(t, int) and 0 <= t < vocab for t in ids):
                raise UserError(f"{where}: {name} has token ids outside the vocabulary (0..{vocab - 1})")
        if not p:
            raise UserError(f"{where}: empty prompt")
        if len(p) >= max_length:
            raise UserError(f"{where}: the prompt has {len(p)} tokens, max_length is {max_length}")
        keep = max_length - len(p)
        out.truncated += int(len(c) > keep) + int(len(r) > keep)
        out.prompts.append(p)
        out.chosen.append(c[:keep])
        out.rejected.append(r[:keep])
    if not out.prompts:
        raise UserError(f"{source} holds no pairs")
    return out


def pairs_for(cfg: DPOConfig, tok, eos: int, vocab: int, config_dir: Path) -> Pairs:
    """The run's pairs: from the dataset section (runtime/rl/datasets.py), else dpo_config.data_path."""
    d = cfg.dpo_config
    if cfg.dataset is None:
        return load_pairs(data_path_of(cfg, config_dir), tok, eos, vocab, d.max_length)
    from pcpc.runtime.rl.datasets import load_pair_records

    records = load_pair_records(cfg.dataset, config_dir)
    return tokenize_pairs(records, tok, eos, vocab, d.max_length, f"dataset {cfg.dataset.source}",
                          chat=cfg.dataset.chat_template)


def seq_len_for(pairs: Pairs) -> int:
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected))
    return -(-longest // 8) * 8


def completion_len_for(pairs: Pairs, T: int) -> int:
    """The most completion tokens a row holds (rounded up to 8, at most T - 1): the learner's head runs on
    that many positions of each row (mlir/rl_functions.py completion_len), not on the prompts."""
    longest = max(max(len(c), len(r)) for c, r in zip(pairs.chosen, pairs.rejected))
    return min(-(-longest // 8) * 8, T - 1)


def shared_prefix(pairs: Pairs, T: int) -> list[int]:
    """[2, the shortest prompt's length]: a pair's chosen and rejected rows (batch_rows: i and n + i) start
    with its prompt, so the learner computes those positions once per pair (rl recipe shared_prefix)."""
    return [2, min(min(len(p) for p in pairs.prompts), T - 1)]


def batch_rows(pairs: Pairs, idx: list[int], T: int, pad: int):
    """ids (2P, T): chosen rows then rejected rows; mask (2P, T-1) on completion targets."""
    from pcpc.runtime.rl.rows import pack_rows

    prompts = [pairs.prompts[i] for i in idx] * 2
    comps = [pairs.chosen[i] for i in idx] + [pairs.rejected[i] for i in idx]
    return pack_rows(prompts, comps, T, pad)


def order_for(step: int, n: int, batch: int, seed: int) -> list[int]:
    """Pair indices of 0-based step `step`: a seeded permutation per epoch, read as one stream."""
    start = step * batch
    out = []
    while len(out) < batch:
        epoch, pos = divmod(start + len(out), n)
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(int(i) for i in perm[pos:pos + batch - len(out)])
    return out


def data_path_of(cfg: DPOConfig, config_dir: Path) -> Path:
    """dpo_config.data_path as given, or relative to the config file's folder when it is not there."""
    path = Path(cfg.dpo_config.data_path)
    if not path.is_absolute() and not path.exists():
        path = config_dir / path
    return path


class DPO(Loop):
    kind, title, unit = "dpo", "DPO", "step"
    files = ("metrics.png",)
    shows_gradients = True
    Config = DPOConfig

    # --- the launcher side

    @classmethod
    def plan(cls, cfg: DPOConfig, ctx) -> Plan:
        from pcpc.mlir.signature import load_meta
        from pcpc.mlir.targets import DPO_FUNCTIONS, rl_target

        d = cfg.dpo_config
        src = setup.model_source(cfg.model, cfg.model_overrides)
        setup.check_weights_source(cfg.weights_path, src, cfg.init_weights)
        setup.check_mask(cfg)
        tok = setup.load_tokenizer(cfg.tokenizer, cfg.model, cfg.eos_token_ids)
        data_path = data_path_of(cfg, ctx.config_dir) if d.data_path is not None else ""
        pairs = pairs_for(cfg, tok, tok.eos_token_ids[0], src.config.vocab_size, ctx.config_dir)
        T, n_pairs = seq_len_for(pairs), len(pairs.prompts)
        steps = d.num_epochs * math.ceil(n_pairs / d.batch_size)
        steps = min(steps, d.max_steps) if d.max_steps else steps
        ctx.claim(steps)
        opt = {"beta1": d.adam_beta1, "beta2": d.adam_beta2, "weight_decay": d.weight_decay,
               "grad_clip": d.max_grad_norm}
        target = rl_target(Path(cfg.training_model_path).stem, **src.recipe, batch_size=2 * d.batch_size, seq_len=T,
                           completion_len=completion_len_for(pairs, T), shared_prefix=shared_prefix(pairs, T),
                           **setup.module_recipe(cfg, DPO_FUNCTIONS),
                           optimizer=opt)
        train_b = start_artifact("training_model_path", cfg.training_model_path, target, cfg.target, ctx.say)
        inplace_b = start_inplace(cfg, target, Path(cfg.training_model_path).with_suffix(".vmfb"), ctx.say)
        built = train_b.wait()
        weights = setup.ensure_weights(cfg.weights_path, src, load_meta(built.meta), cfg.init_weights, cfg.seed,
                                       ctx.say)
        sparse_vmfb = plan_sparse(cfg, load_meta(built.meta), target.config["optimizer"], ctx.say)
        inplace_vmfb = str(inplace_b.wait().vmfb) if inplace_b else None
        ctx.write_config(training_vmfb=str(built.vmfb), seq_len=T, pairs=n_pairs)
        cut = f" ({pairs.truncated} completions cut to max_length)" if pairs.truncated else ""
        ctx.say(f"DPO ({d.loss_type}, beta {d.beta}): {cfg.model} "
                f"({setup.describe_training(cfg, load_meta(built.meta))}), {n_pairs} pairs{cut}"
                f", {steps} steps of {d.batch_size} pairs, rows of {T} tokens; run dir {ctx.dir.path}")
        return Plan(str(built.vmfb), str(weights), str(data_path), tuple(tok.eos_token_ids), T, sparse_vmfb,
                    str(ctx.config_dir), inplace_vmfb)

    @classmethod
    def check_inputs(cls, cfg: DPOConfig, config_dir: Path) -> None:
        if cfg.dataset is not None:
            from pcpc.runtime.rl.datasets import check_source

            check_source(cfg.dataset, config_dir)
        elif not data_path_of(cfg, config_dir).is_file():
            raise UserError(f"dpo_config.data_path: {data_path_of(cfg, config_dir)} not found (JSONL of "
                            f"{{\"prompt\", \"chosen\", \"rejected\"}})")
        setup.check_weights_source(cfg.weights_path, setup.model_source(cfg.model, cfg.model_overrides),
                                   cfg.init_weights)
        setup.load_tokenizer(cfg.tokenizer, cfg.model, cfg.eos_token_ids)
        setup.check_mask(cfg)

    # --- the process

    def setup(self, resume) -> int:
        from pcpc.autodiff.dpo import loss_type_weights
        from pcpc.runtime.module import CompiledModule
        from pcpc.runtime.rl.policy import make_policy
        from pcpc.runtime.rl.sparse import make_optimizer

        cfg, d = self.cfg, self.cfg.dpo_config
        self.mod = mod = CompiledModule(self.plan.training_vmfb, threads=self.threads())
        self.opt = make_optimizer(mod, self.plan.sparse_vmfb, cfg, self.threads(), self.plan.inplace_vmfb)
        tok = setup.load_tokenizer(cfg.tokenizer, cfg.model, self.plan.eos_token_ids)
        self.pairs = pairs_for(cfg, tok, self.plan.eos_token_ids[0], setup.vocab_size(mod.meta),
                               Path(self.plan.config_dir))
        self.sel = np.asarray(loss_type_weights(d.loss_type), np.float32)
        self.policy = make_policy(mod, self.plan.weights_path, cfg, resume.state if resume else None,
                                  keep_reference=True, total_steps=self.run.spec.steps)
        t0 = time.perf_counter()
        self.ref_c, self.ref_r = self.pair_logps(self.policy.reference)  # the reference, once
        self.reference_s = time.perf_counter() - t0
        self.run.say(f"  reference log-probs of {len(self.pairs.prompts)} pairs in {self.reference_s:.2f}s")
        self.policy.drop_reference()  # not needed again (full fine-tuning: the initial weights)
        state = resume.state if resume else {"m": self.opt.zeros(), "v": self.opt.zeros()}
        self.P = self.policy.P
        self.M, self.V = (self.opt.upload_state(state[k]) for k in ("m", "v"))
        return resume.step if resume else 0

    def layout(self) -> dict:
        d = self.cfg.dpo_config
        return dict(columns=["step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins",
                             "rewards/accuracies", "step_s", "elapsed_s"],
                    panels=[("loss", ["loss"]), ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
                            ("accuracy", ["rewards/accuracies"])],
                    png="metrics.png", title=f"DPO {d.loss_type} {Path(self.cfg.training_model_path).stem}",
                    postfix=[("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin")])

    def pair_logps(self, score) -> tuple[np.ndarray, np.ndarray]:
        """Sequence log-probs (sums over each completion) of every pair's chosen and rejected completion, by
        `score` (the policy's `score` or `reference`)."""
        from pcpc.runtime.module import to_host

        d, n = self.cfg.dpo_config, len(self.pairs.prompts)
        chosen, rejected = np.zeros(n), np.zeros(n)
        for start in range(0, n, d.batch_size):
            idx = [i % n for i in range(start, start + d.batch_size)]
            ids, mask = batch_rows(self.pairs, idx, self.plan.seq_len, self.plan.eos_token_ids[0])
            seq = to_host(score("sequence_logps", ids, mask)[0])
            chosen[idx], rejected[idx] = seq[:d.batch_size], seq[d.batch_size:]
        return chosen, rejected

    def step(self, k: int) -> dict:
        from pcpc.runtime.module import to_host

        d, n = self.cfg.dpo_config, len(self.pairs.prompts)
        idx = order_for(k, n, d.batch_size, self.cfg.seed)
        ids, mask = batch_rows(self.pairs, idx, self.plan.seq_len, self.plan.eos_token_ids[0])
        refs = np.concatenate([self.ref_c[idx], self.ref_r[idx]]).astype(np.float32)
        t0 = time.perf_counter()
        out = self.mod("dpo_value_and_grad", *self.policy.args(), ids, mask, refs, self.sel, np.float32(d.beta))
        loss, c_rew, r_rew = (to_host(x) for x in out[:3])
        grads = list(out[3:])
        del out
        kept = [to_host(x) for x in grads] if self.policy.wants_grads else None
        self.run.gradients(k + 1, grads)
        self.opt.step(self.P, self.M, self.V, grads, k + 1, d.learning_rate)
        self.policy.after_step(k + 1, kept)
        return {"step": k + 1, "epoch": round((k + 1) * d.batch_size / n, 4), "loss": float(loss),
                **_reward_metrics(c_rew, r_rew), "step_s": round(time.perf_counter() - t0, 4),
                "elapsed_s": round(self.run.elapsed(), 3)}

    def state(self) -> dict:
        return {**self.policy.state(), "m": self.M, "v": self.V}

    def weights(self) -> tuple[list[str], list]:
        from pcpc.runtime.module import to_host

        return [s.name for s in self.mod.meta.parameters], [to_host(p) for p in self.policy.P]

    def finish(self, done: int, stopped: bool) -> dict:
        """The whole data set with the final weights; the summary."""
        d, n = self.cfg.dpo_config, len(self.pairs.prompts)
        pol_c, pol_r = self.pair_logps(self.policy.score)
        adapter = self.policy.save(self.run.dir.path / "adapter")
        final = _reward_metrics(d.beta * (pol_c - self.ref_c), d.beta * (pol_r - self.ref_r))
        recs = self.run.log.records
        summary = {"steps": done, "steps_planned": self.run.spec.steps, "pairs": n,
                   "final_train_loss": recs[-1]["loss"] if recs else None,
                   **{f"dataset_{k.replace('/', '_')}": v for k, v in final.items()},
                   "step_s": round(float(np.mean([r["step_s"] for r in recs])), 4) if recs else None,
                   "reference_s": round(self.reference_s, 3), **({"adapter": str(adapter)} if adapter else {})}
        if not stopped:
            self.run.say(f"done: {done} steps; on all {n} pairs: accuracy {final['rewards/accuracies']:.3f}, "
                         f"margin {final['rewards/margins']:.3f}; metrics, metrics.png"
                         f"{', adapter' if adapter else ''} and checkpoint in {self.run.dir.path}")
        return summary


def _reward_metrics(chosen, rejected) -> dict:
    from pcpc.autodiff.dpo import reward_metrics

    return reward_metrics(np.asarray(chosen, np.float64), np.asarray(rejected, np.float64))
