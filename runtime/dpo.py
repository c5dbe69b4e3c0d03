"""DPO through compiled modules: preference pairs, reference log-probs once, compiled train steps.

    pairs      JSONL lines {"prompt", "chosen", "rejected"} (text), or {"prompt_ids", "chosen_ids",
               "rejected_ids"} (token ids); completions get EOS appended
    reference  sequence_logps of the initial weights for every pair, computed once before training
               (per-token means for ipo)
    step k     the k-th batch of a seeded per-epoch shuffle; dpo_value_and_grad(...) = loss (sigmoid / ipo /
               hinge), implicit rewards and gradients derived by torch.func; then compiled AdamW chunk by
               chunk (runtime/rl_update.py)
    metrics    loss, rewards/chosen, rewards/rejected, rewards/margins, rewards/accuracies per step, and
               the same over the whole data set with the final weights (summary.json)

Single process: DPO needs no rollouts. `run_experiment` is what `pcpc run` calls.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcpc.autodiff.dpo import LOSS_TYPES
from pcpc.config import from_dict
from pcpc.errors import UserError

RUN_FILES = ("metrics.jsonl", "metrics.csv", "metrics.png", "summary.json")
TARGETS = ("llvm-cpu", "cuda", "rocm", "vulkan")


@dataclass(frozen=True)
class DPOSection:
    """dpo_config: the algorithm and the data."""

    data_path: str
    """JSONL preference data: {"prompt", "chosen", "rejected"} strings, or *_ids lists of token ids."""
    beta: float = 0.1
    """Strength of the implicit KL constraint (TRL's default 0.1)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo (on per-token mean log-probs) or hinge."""
    learning_rate: float = 1e-6
    """AdamW learning rate."""
    batch_size: int = 2
    """Preference pairs per step (the compiled call takes 2 x batch_size rows)."""
    num_epochs: int = 1
    """Passes over the data (each epoch in a new seeded order)."""
    max_steps: int | None = None
    """Stop after this many steps (null: num_epochs worth)."""
    max_length: int = 512
    """Most tokens of prompt + completion per row; longer completions are cut at the end."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices and embeddings only)."""
    max_grad_norm: float = 1.0
    """Clip each step's global gradient norm to this (0: off)."""

    def __post_init__(self):
        if not self.data_path:
            raise ValueError("data_path must not be empty")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {', '.join(LOSS_TYPES)}; got {self.loss_type!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        for name in ("batch_size", "num_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null, got {self.max_steps}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class DPOExperiment:
    """One DPO run of a Qwen2-family model."""

    training_model_path: str
    """Training module artifact (.vmfb): sequence_logps, dpo_value_and_grad and the chunked AdamW; built
    there when missing or stale."""
    weights_path: str
    """Flat fp32 weight file of the initial policy (and reference); exported from HF weights when missing."""
    dpo_config: DPOSection
    """The algorithm and data (see DPOSection)."""
    tokenizer: str = "qwen"
    """qwen, bytes (UTF-8 bytes, id 0 = EOS) or a HF tokenizer directory; prompts get the chat template."""
    model: str = "qwen2.5-0.5b"
    """A preset of exporters/qwen2.py, or a local HF directory of a Qwen2-family model."""
    model_overrides: dict = field(default_factory=dict)
    """Qwen2Config fields applied on top of the preset (toy models)."""
    init_weights: str = "hf"
    """How weights_path is made when missing: hf (export HF weights) or random (seeded init)."""
    eos_token_ids: tuple[int, ...] | None = None
    """EOS ids (the first is appended to completions); null: the tokenizer's."""
    seed: int = 0
    """Seeds the data order (and random init)."""
    checkpoint_interval: int = 50
    """Checkpoint every this many steps (and always after the last); 0: only at the end."""
    target: str = "llvm-cpu"
    """Compile target and device: llvm-cpu, cuda, rocm, vulkan."""
    threads: int | None = None
    """IREE CPU threads (null: all cores)."""
    wandb_project: str | None = None
    """Weights & Biases project; null logs locally only."""
    wandb_run_name: str | None = None
    """W&B run name."""
    wandb_entity: str | None = None
    """W&B team or user."""
    wandb_api_key: str | None = field(default=None, repr=False)
    """W&B API key (or WANDB_API_KEY / `wandb login`); never printed or written to the run directory."""

    def __post_init__(self):
        if Path(self.training_model_path).suffix != ".vmfb":
            raise ValueError(f"training_model_path must name a .vmfb build artifact, got {self.training_model_path!r}")
        if self.init_weights not in ("hf", "random"):
            raise ValueError(f"init_weights must be hf or random; got {self.init_weights!r}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}; got {self.target!r}")
        if self.seed < 0 or self.checkpoint_interval < 0:
            raise ValueError("seed and checkpoint_interval must be >= 0")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")

    def public_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if out["wandb_api_key"] is not None:
            out["wandb_api_key"] = "<redacted>"
        return out


def parse_dpo(raw: dict, where: str = "config") -> DPOExperiment:
    return from_dict(DPOExperiment, raw, where=where)


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
    if not path.is_file():
        raise UserError(f"dpo_config.data_path: {path} not found (JSONL of {{\"prompt\", \"chosen\", \"rejected\"}})")
    out = Pairs([], [], [])
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
        if all(k in rec for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
            p, c, r = (list(rec[k]) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
        elif all(isinstance(rec.get(k), str) for k in ("prompt", "chosen", "rejected")):
            p = tok.encode(rec["prompt"], chat=True)
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
        raise UserError(f"dpo_config.data_path: {path} holds no pairs")
    return out


def seq_len_for(pairs: Pairs) -> int:
    longest = max(len(p) + max(len(c), len(r)) for p, c, r in zip(pairs.prompts, pairs.chosen, pairs.rejected))
    return -(-longest // 8) * 8


def batch_rows(pairs: Pairs, idx: list[int], T: int, pad: int):
    """ids (2P, T): chosen rows then rejected rows; mask (2P, T-1) on completion targets."""
    from pcpc.runtime.grpo import pack_rows

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


def run_experiment(config_path: str, raw: dict, *, resume: bool = False, out_dir: str | None = None,
                   overwrite: bool = False, quiet: bool = False, say=print) -> dict:
    """`pcpc run` of a DPO config."""
    from pcpc.autodiff.dpo import loss_type_weights
    from pcpc.mlir.targets import DPO_FUNCTIONS, rl_target
    from pcpc.runtime import rl_setup
    from pcpc.runtime.module import CompiledModule, to_host
    from pcpc.runtime.rl_log import RLRunLog, truncate_records
    from pcpc.runtime.rl_update import ChunkedOptimizer

    exp = parse_dpo(raw, where=str(config_path))
    d = exp.dpo_config
    say = (lambda m: None) if quiet else say
    run_dir = Path(out_dir) if out_dir else Path("runs") / Path(config_path).stem
    src = rl_setup.model_source(exp.model, exp.model_overrides)
    cfg = src.config
    rl_setup.check_weights_source(exp.weights_path, src, exp.init_weights)
    tok = rl_setup.load_tokenizer(exp.tokenizer, exp.model, exp.eos_token_ids)
    data_path = Path(d.data_path)
    if not data_path.is_absolute() and not data_path.exists():
        data_path = Path(config_path).parent / data_path
    pairs = load_pairs(data_path, tok, tok.eos_token_ids[0], cfg.vocab_size, d.max_length)
    T = seq_len_for(pairs)
    opt = {"beta1": d.adam_beta1, "beta2": d.adam_beta2, "weight_decay": d.weight_decay, "grad_clip": d.max_grad_norm}
    target = rl_target(Path(exp.training_model_path).stem, **src.recipe, batch_size=2 * d.batch_size, seq_len=T,
                       functions=DPO_FUNCTIONS, optimizer=opt)
    built = rl_setup.build_artifact("training_model_path", exp.training_model_path, target, exp.target, say)
    mod = CompiledModule(built.vmfb, threads=exp.threads)
    opt = ChunkedOptimizer(mod)
    meta = mod.meta
    weights = rl_setup.ensure_weights(exp.weights_path, src, meta, exp.init_weights, exp.seed, say)
    trajectory = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(exp).items()
                                        if k in ("model", "model_overrides", "weights_path", "tokenizer", "seed",
                                                 "eos_token_ids", "dpo_config")}))
    rl_setup.prepare_run_dir(run_dir, "dpo", trajectory, resume, overwrite, RUN_FILES,
                             may_change=("dpo_config.num_epochs", "dpo_config.max_steps"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps({"experiment": exp.public_dict(), "config_path": str(config_path),
                                                     "training_vmfb": str(built.vmfb), "seq_len": T,
                                                     "pairs": len(pairs.prompts)}, indent=1) + "\n")
    n_pairs = len(pairs.prompts)
    steps = d.num_epochs * math.ceil(n_pairs / d.batch_size)
    steps = min(steps, d.max_steps) if d.max_steps else steps
    pad = tok.eos_token_ids[0]
    average = d.loss_type == "ipo"

    # The reference: the initial weights' sequence log-probs of every pair, once.
    def pair_logps(weights) -> tuple[np.ndarray, np.ndarray]:
        """Sequence log-probs (per-token means for ipo) of every pair's chosen and rejected completion."""
        chosen, rejected = np.zeros(n_pairs), np.zeros(n_pairs)
        for start in range(0, n_pairs, d.batch_size):
            idx = [i % n_pairs for i in range(start, start + d.batch_size)]
            ids, mask = batch_rows(pairs, idx, T, pad)
            seq = to_host(mod("sequence_logps", *weights, ids, mask)[0])
            if average:
                seq = seq / np.maximum(mask.sum(-1), 1.0)
            chosen[idx], rejected[idx] = seq[:d.batch_size], seq[d.batch_size:]
        return chosen, rejected

    initial = rl_setup.read_weights(weights, meta)
    t0 = time.perf_counter()
    ref_c, ref_r = pair_logps(mod.upload_all(initial))
    ref_s = time.perf_counter() - t0

    zeros = [np.zeros(p.shape, np.float32) for p in meta.parameters]
    state = {"step": 0, "arrays": {"params": initial, "m": zeros, "v": zeros}, "extra": {"elapsed_s": 0.0}}
    if resume:
        state = rl_setup.load_checkpoint(rl_setup.checkpoint_path(run_dir), "dpo")
    P, M, V = (mod.upload_all(state["arrays"][k]) for k in ("params", "m", "v"))
    del initial, zeros
    start = state["step"]
    sel = np.asarray(loss_type_weights(d.loss_type), np.float32)
    columns = ["step", "epoch", "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
               "step_s", "elapsed_s"]
    log = RLRunLog(exp, run_dir, columns, steps, start, truncate_records(run_dir, columns, start),
                   panels=[("loss", ["loss"]), ("rewards", ["rewards/chosen", "rewards/rejected", "rewards/margins"]),
                           ("accuracy", ["rewards/accuracies"])],
                   title=f"DPO {d.loss_type} {Path(exp.training_model_path).stem}",
                   postfix=[("loss", "loss"), ("rewards/accuracies", "acc"), ("rewards/margins", "margin")],
                   quiet=quiet)
    log.say(f"DPO ({d.loss_type}, beta {d.beta}): {exp.model} ({meta.parameter_bytes // 4:,} params), {n_pairs} pairs"
            f"{f' ({pairs.truncated} completions cut to max_length)' if pairs.truncated else ''}, {steps} steps of "
            f"{d.batch_size} pairs, rows of {T} tokens; reference log-probs in {ref_s:.2f}s; run dir {run_dir}")
    stop = {"requested": False}
    old = signal.signal(signal.SIGINT, lambda *a: stop.update(requested=True))
    t_start = time.perf_counter() - state["extra"]["elapsed_s"]
    done = start
    try:
        for k in range(start, steps):
            idx = order_for(k, n_pairs, d.batch_size, exp.seed)
            ids, mask = batch_rows(pairs, idx, T, pad)
            refs = np.concatenate([ref_c[idx], ref_r[idx]]).astype(np.float32)
            t0 = time.perf_counter()
            out = mod("dpo_value_and_grad", *P, ids, mask, refs, sel, np.float32(d.beta))
            loss, c_rew, r_rew = (to_host(x) for x in out[:3])
            grads = list(out[3:])
            del out
            opt.step(P, M, V, grads, k + 1, d.learning_rate)
            step_s = time.perf_counter() - t0
            done = k + 1
            log.step({"step": k + 1, "epoch": round((k + 1) * d.batch_size / n_pairs, 4), "loss": float(loss),
                      **_reward_metrics(c_rew, r_rew), "step_s": round(step_s, 4),
                      "elapsed_s": round(time.perf_counter() - t_start, 3)})
            last = k + 1 == steps
            if last or stop["requested"] or (exp.checkpoint_interval and (k + 1) % exp.checkpoint_interval == 0):
                rl_setup.save_checkpoint(rl_setup.checkpoint_path(run_dir), "dpo", k + 1, {"params": P, "m": M, "v": V},
                                         {"elapsed_s": time.perf_counter() - t_start}, trajectory)
            if stop["requested"]:
                break
    finally:
        signal.signal(signal.SIGINT, old)
    # The whole data set with the final weights.
    pol_c, pol_r = pair_logps(P)
    final = _reward_metrics(d.beta * (pol_c - ref_c), d.beta * (pol_r - ref_r))
    recs = log.records
    summary = {"steps": done, "steps_planned": steps, "stopped": stop["requested"], "pairs": n_pairs,
               "final_train_loss": recs[-1]["loss"] if recs else None,
               **{f"dataset_{k.replace('/', '_')}": v for k, v in final.items()},
               "step_s": round(float(np.mean([r["step_s"] for r in recs])), 4) if recs else None,
               "reference_s": round(ref_s, 3), "run_dir": str(run_dir)}
    log.close(summary)
    log.say(f"done: {done} steps; on all {n_pairs} pairs: accuracy {final['rewards/accuracies']:.3f}, "
            f"margin {final['rewards/margins']:.3f}; metrics, metrics.png and checkpoint in {run_dir}")
    return summary


def _reward_metrics(chosen, rejected) -> dict:
    from pcpc.autodiff.dpo import reward_metrics

    return reward_metrics(np.asarray(chosen, np.float64), np.asarray(rejected, np.float64))
