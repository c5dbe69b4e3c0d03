"""The DiLoCo experiment config: what `pcpc run experiments/nanogpt_small.json` reads.

The first eleven keys are exactly those of the reference design's
experiment files, so configs written for it run unchanged (the W&B ones
live in the shared base, runtime/run/config.py, with seed, target, threads,
checkpoint_interval and timeout_s); the rest are optional with documented
defaults. Loading is strict: unknown keys, wrong types and out-of-range
values are UserErrors naming the file and the field.

One deliberate reading of the reference: it describes `learning_rate` as the
outer-loop rate, but its value (0.0006) is nanoGPT's inner AdamW rate and
DiLoCo's outer rate is 0.7; so here `learning_rate` is the inner AdamW peak
learning rate and `outer_learning_rate` (default 0.7) the outer Nesterov rate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from pcpc.config import check_at_least, check_choice, check_positive, from_dict, load_json
from pcpc.exporters.peft import QWEN2_TARGETS, PeftConfig
from pcpc.runtime.run.config import RunConfig

TOKENIZERS = ("auto", "char", "byte")
LR_SCHEDULES = ("constant", "cosine")
BACKENDS = ("auto", "gloo", "nccl")


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig(RunConfig):
    """One DiLoCo training run of a nanoGPT preset on a text file."""

    # --- the reference design's fields ---
    model_path: str
    """Build-graph artifact, e.g. models/nanogpt_small.mlir: the file stem names the nanoGPT preset
    (nanogpt_small -> nanogpt-small); the .mlir/.vmfb/.meta.json are built there if missing (cached)."""
    data_path: str
    """Training text file (relative paths are resolved against the current directory)."""
    learning_rate: float = 6e-4
    """Inner AdamW peak learning rate (nanoGPT's value); the outer rate is outer_learning_rate."""
    tau: int = 50
    """Inner AdamW steps each worker runs per round (between synchronisations)."""
    outer_loop_steps: int = 100
    """Rounds (outer Nesterov steps)."""
    nesterov_momentum: float = 0.9
    """Outer Nesterov momentum mu, in [0, 1)."""
    max_epochs: int = 10
    """Upper bound on passes over each worker's data shard; stops the run early if reached first."""

    # --- optional fields ---
    num_workers: int = 2
    """Local worker processes `pcpc run` launches (under torchrun, WORLD_SIZE decides)."""
    outer_learning_rate: float = 0.7
    """Outer Nesterov learning rate applied to the averaged pseudo-gradient."""
    batch_size: int = 16
    """Sequences per inner step per worker (each block_size tokens long)."""
    eval_batch_size: int = 64
    """Sequences per compiled validation call."""
    eval_batches: int = 50
    """Validation batches per evaluation, evenly spaced over the validation split (0: all of it)."""
    seed: int = 1337
    """Seeds the initialisation, each worker's data order and text sampling."""
    eval_interval: int = 10
    """Evaluate the validation loss every this many rounds (and always after the last); 0: only at the end."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl for cuda, else gloo), gloo, nccl."""
    tokenizer: str = "auto"
    """char (vocabulary from the data), byte (256 ids) or auto (byte when the preset's vocab is 256, else char)."""
    beta1: float = 0.9
    """Inner AdamW beta1."""
    beta2: float = 0.95
    """Inner AdamW beta2."""
    weight_decay: float = 0.1
    """Inner AdamW decoupled weight decay (matrices and embeddings only, as nanoGPT)."""
    grad_clip: float = 1.0
    """Clip each inner step's global gradient norm to this (0: off)."""
    lr_schedule: str = "constant"
    """Inner learning-rate schedule: constant, or cosine (linear warmup then cosine decay, nanoGPT's get_lr)."""
    warmup_steps: int = 0
    """Inner steps of linear warmup (lr * (step + 1) / (warmup + 1), nanoGPT's), before either schedule."""
    lr_decay_steps: int | None = None
    """cosine: inner step at which the rate reaches min_learning_rate (null: the run's last inner step)."""
    min_learning_rate: float | None = None
    """cosine: floor of the decay (null: learning_rate / 10, as nanoGPT)."""
    persist_inner_state: bool = True
    """Keep each worker's AdamW moments and step count across rounds (false: reset every round)."""
    sample_tokens: int = 200
    """Characters/bytes of text sampled from the final model (0: none)."""
    model: str | dict | None = None
    """The architecture: null (the model_path stem names a preset, as the reference's configs do), a preset
    name (nanogpt-small, gpt2-124m, ...), or an object {"preset": ..., <NanoGPTConfig fields>} (preset
    default nanogpt-small): n_layer, n_head, n_embd, block_size, bias, tie_embeddings, mlp, norm, positions,
    moe, ... (README: model config reference). vocab_size comes from the tokenizer unless given."""
    init_from: str | None = None
    """A DiLoCo run directory (or its checkpoints/latest.pt) whose global weights this run starts from, instead
    of a random initialisation: the same architecture and tokenizer. With `peft`, the frozen base."""
    peft: PeftConfig | None = None
    """Train an adapter on the init_from weights, frozen, instead of every weight (exporters/peft.py: lora,
    lora_plus, dora, pissa, milora, vera or miss, HF peft's fields; target_modules default to every block
    Linear: c_attn, c_proj, c_fc, or w1, w2, w3 with SwiGLU). Only the adapter's pseudo-gradients are
    all-reduced; the run saves it in <run dir>/adapter as adapter_model.safetensors + adapter_config.json."""

    RESUME_MAY_CHANGE = RunConfig.RESUME_MAY_CHANGE + (
        "outer_loop_steps", "max_epochs", "num_workers", "backend", "eval_interval", "eval_batches",
        "eval_batch_size", "sample_tokens",
    )
    """How long it runs and how it is watched; the worker count is checked against the checkpoint's
    worker states, and a cosine schedule's real decay length is checked as a derived value."""

    def __post_init__(self):
        super().__post_init__()
        for name in ("model_path", "data_path"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if Path(self.model_path).suffix != ".mlir":
            raise ValueError(f"model_path must name a .mlir build artifact (e.g. models/nanogpt_small.mlir), "
                             f"got {self.model_path!r}")
        check_positive(self, "learning_rate", "outer_learning_rate")
        check_at_least(self, 1, "tau", "outer_loop_steps", "max_epochs", "num_workers", "batch_size", "eval_batch_size")
        check_at_least(self, 0, "eval_batches", "eval_interval", "warmup_steps", "sample_tokens", "weight_decay",
                       "grad_clip")
        for name in ("nesterov_momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        check_choice(self, "backend", BACKENDS)
        check_choice(self, "tokenizer", TOKENIZERS)
        check_choice(self, "lr_schedule", LR_SCHEDULES)
        if self.min_learning_rate is not None and not 0.0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"min_learning_rate must be in [0, learning_rate={self.learning_rate}], "
                             f"got {self.min_learning_rate}")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise ValueError(f"lr_decay_steps ({self.lr_decay_steps}) must be > warmup_steps ({self.warmup_steps})")
        if self.lr_schedule == "constant" and (self.lr_decay_steps is not None or self.min_learning_rate is not None):
            raise ValueError("lr_decay_steps and min_learning_rate need lr_schedule \"cosine\"")
        mcfg = self.model_config()  # strict: unknown fields and bad combinations are errors naming the field
        if self.init_from is not None and not self.init_from:
            raise ValueError("init_from must not be empty (a DiLoCo run directory, or null)")
        if self.peft is not None:
            from pcpc.exporters.peft import default_targets, targets

            if self.init_from is None:
                raise ValueError("peft needs init_from: the run directory of the base model the adapter trains on "
                                 "(an adapter on random weights learns nothing a full run would not)")
            if self.peft.type == "adalora":
                raise ValueError("peft.type adalora is for GRPO / DPO runs: its rank allocator needs every inner "
                                 "step's gradients, which DiLoCo's fused train_step keeps on the device")
            if self.peft.target_modules == QWEN2_TARGETS:  # the dataclass default: this model's Linears
                object.__setattr__(self, "peft", replace(self.peft, target_modules=default_targets(mcfg)))
            try:
                targets(mcfg, self.peft)  # names this model has
            except ValueError as e:
                raise ValueError(str(e)) from None  # named with the file by from_dict

    @property
    def preset(self) -> str:
        """The nanoGPT preset the architecture starts from."""
        if self.model is None:
            return Path(self.model_path).stem.replace("_", "-")
        return self.model if isinstance(self.model, str) else self.model.get("preset", "nanogpt-small")

    @property
    def model_fields(self) -> dict:
        """The architecture fields given on top of the preset (the model object less its preset)."""
        return {k: v for k, v in self.model.items() if k != "preset"} if isinstance(self.model, dict) else {}

    def model_config(self, vocab_size: int | None = None):
        """The NanoGPTConfig this experiment trains; vocab_size (the tokenizer's) applies unless the model
        object gives one, which must then hold the tokenizer's ids."""
        from pcpc.exporters.nanogpt import PRESETS, make_config

        if self.model is None and self.preset not in PRESETS:
            raise ValueError(f"model_path: {Path(self.model_path).name!r} does not name a nanoGPT preset (the file "
                             f"stem picks it, or give \"model\"); valid: "
                             f"{', '.join(p.replace('-', '_') + '.mlir' for p in PRESETS)}")
        fields = dict(self.model_fields)
        given = fields.get("vocab_size")
        if vocab_size is not None and given is None:
            fields["vocab_size"] = vocab_size
        try:
            cfg = make_config(self.preset, where="model", **fields)
        except ValueError as e:  # UserError included: name the experiment's field
            raise ValueError(str(e) if str(e).startswith("model") else f"model: {e}") from None
        if vocab_size is not None and given is not None and isinstance(given, int) and given < vocab_size:
            raise ValueError(f"model.vocab_size ({given}) is smaller than the tokenizer's {vocab_size} ids")
        return cfg

    @property
    def total_inner_steps(self) -> int:
        """Inner steps per worker if every round runs (max_epochs may stop the run earlier)."""
        return self.outer_loop_steps * self.tau

    def decay_steps(self, rounds: int | None = None) -> int:
        """cosine: the inner step where the rate reaches the floor. lr_decay_steps, or by default the run's
        real length: `rounds` rounds (fewer than outer_loop_steps when max_epochs ends the run first)."""
        if self.lr_decay_steps is not None:
            return self.lr_decay_steps
        return (self.outer_loop_steps if rounds is None else rounds) * self.tau

    def lr_at(self, it: int, rounds: int | None = None) -> float:
        """Inner learning rate of 0-based inner step `it` (nanoGPT's get_lr for "cosine") in a run of
        `rounds` rounds (default outer_loop_steps)."""
        lr, warmup = self.learning_rate, self.warmup_steps
        if it < warmup:  # linear warmup, as nanoGPT's get_lr, before either schedule
            return lr * (it + 1) / (warmup + 1)
        if self.lr_schedule == "constant":
            return lr
        decay = self.decay_steps(rounds)
        min_lr = self.min_learning_rate if self.min_learning_rate is not None else lr / 10
        if it > decay:
            return min_lr
        ratio = (it - warmup) / max(1, decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


def parse_experiment(raw: dict, where: str = "config") -> DiLoCoConfig:
    """DiLoCoConfig from a decoded JSON object; errors name `where` and the field."""
    return from_dict(DiLoCoConfig, raw, where=where)


def load_experiment(path: str | Path) -> DiLoCoConfig:
    """Read and validate a DiLoCo experiment JSON file."""
    return parse_experiment(load_json(path), where=str(path))

