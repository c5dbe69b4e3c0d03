"""The DiLoCo experiment config: what `pcpc run experiments/nanogpt_small.json` reads.

The first eleven fields are exactly those of the reference design's
experiment files, so configs written for it run unchanged; the rest are
optional with documented defaults. Loading is strict: unknown keys, wrong
types and out-of-range values are UserErrors naming the file and the field.

One deliberate reading of the reference: it describes `learning_rate` as the
outer-loop rate, but its value (0.0006) is nanoGPT's inner AdamW rate and
DiLoCo's outer rate is 0.7; so here `learning_rate` is the inner AdamW peak
learning rate and `outer_learning_rate` (default 0.7) the outer Nesterov rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pcpc.config import check_at_least, check_choice, check_positive, from_dict, load_json, redacted_dict

TARGETS = ("llvm-cpu", "cuda", "rocm", "vulkan")
TOKENIZERS = ("auto", "char", "byte")
LR_SCHEDULES = ("constant", "cosine")
BACKENDS = ("auto", "gloo", "nccl")
SECRET_FIELDS = ("wandb_api_key",)


@dataclass(frozen=True)
class DiLoCoExperiment:
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
    wandb_project: str | None = None
    """Weights & Biases project; null logs locally only."""
    wandb_entity: str | None = None
    """W&B team or user (null: your default entity)."""
    wandb_run_name: str | None = None
    """W&B run name (null: W&B picks one)."""
    wandb_api_key: str | None = field(default=None, repr=False)
    """W&B API key (or WANDB_API_KEY / `wandb login`); never printed or written to the run directory."""

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
    checkpoint_interval: int = 10
    """Checkpoint every this many rounds (and always after the last); 0: only at the end."""
    target: str = "llvm-cpu"
    """Compile target and device of the modules: llvm-cpu (this host's CPU), cuda, rocm, vulkan."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl for cuda, else gloo), gloo, nccl."""
    threads: int | None = None
    """IREE CPU threads per worker (null: CPU cores / local workers)."""
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
    """cosine: inner steps of linear warmup."""
    lr_decay_steps: int | None = None
    """cosine: inner step at which the rate reaches min_learning_rate (null: the run's last inner step)."""
    min_learning_rate: float | None = None
    """cosine: floor of the decay (null: learning_rate / 10, as nanoGPT)."""
    persist_inner_state: bool = True
    """Keep each worker's AdamW moments and step count across rounds (false: reset every round)."""
    sample_tokens: int = 200
    """Characters/bytes of text sampled from the final model (0: none)."""
    timeout_s: float = 300.0
    """Collective timeout: a worker that stops answering fails the run after this many seconds."""

    def __post_init__(self):
        for name in ("model_path", "data_path"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if Path(self.model_path).suffix != ".mlir":
            raise ValueError(f"model_path must name a .mlir build artifact (e.g. models/nanogpt_small.mlir), "
                             f"got {self.model_path!r}")
        check_positive(self, "learning_rate", "outer_learning_rate", "timeout_s")
        check_at_least(self, 1, "tau", "outer_loop_steps", "max_epochs", "num_workers", "batch_size", "eval_batch_size")
        check_at_least(self, 0, "eval_batches", "seed", "eval_interval", "checkpoint_interval", "warmup_steps",
                  "sample_tokens", "weight_decay", "grad_clip")
        for name in ("nesterov_momentum", "beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")
        check_choice(self, "target", TARGETS)
        check_choice(self, "backend", BACKENDS)
        check_choice(self, "tokenizer", TOKENIZERS)
        check_choice(self, "lr_schedule", LR_SCHEDULES)
        if self.min_learning_rate is not None and not 0.0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"min_learning_rate must be in [0, learning_rate={self.learning_rate}], "
                             f"got {self.min_learning_rate}")
        if self.lr_decay_steps is not None and self.lr_decay_steps <= self.warmup_steps:
            raise ValueError(f"lr_decay_steps ({self.lr_decay_steps}) must be > warmup_steps ({self.warmup_steps})")
        if self.lr_schedule == "constant" and (self.warmup_steps or self.lr_decay_steps is not None
                                               or self.min_learning_rate is not None):
            raise ValueError("warmup_steps, lr_decay_steps and min_learning_rate need lr_schedule \"cosine\"")

    @property
    def total_inner_steps(self) -> int:
        """Inner steps per worker if every round runs (max_epochs may stop the run earlier)."""
        return self.outer_loop_steps * self.tau

    def lr_at(self, it: int) -> float:
        """Inner learning rate of 0-based inner step `it` (nanoGPT's get_lr for "cosine")."""
        if self.lr_schedule == "constant":
            return self.learning_rate
        import math

        lr, warmup = self.learning_rate, self.warmup_steps
        decay = self.lr_decay_steps if self.lr_decay_steps is not None else self.total_inner_steps
        min_lr = self.min_learning_rate if self.min_learning_rate is not None else lr / 10
        if it < warmup:
            return lr * (it + 1) / (warmup + 1)
        if it > decay:
            return min_lr
        ratio = (it - warmup) / max(1, decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    def public_dict(self) -> dict:
        """All fields, secrets redacted: what is printed, saved in the run directory and sent to W&B."""
        return redacted_dict(self, SECRET_FIELDS)


def parse_experiment(raw: dict, where: str = "config") -> DiLoCoExperiment:
    """DiLoCoExperiment from a decoded JSON object; errors name `where` and the field."""
    return from_dict(DiLoCoExperiment, raw, where=where)


def load_experiment(path: str | Path) -> DiLoCoExperiment:
    """Read and validate a DiLoCo experiment JSON file."""
    return parse_experiment(load_json(path), where=str(path))


def experiment_kind(raw: dict) -> str:
    """"grpo", "dpo" or "diloco": which loop an experiment file is for."""
    if "grpo_config" in raw:
        return "grpo"
    if "dpo_config" in raw:
        return "dpo"
    return "diloco"

