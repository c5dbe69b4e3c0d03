"""The DPO experiment config: what `pcpc run experiments/dpo_tiny.json` reads.

`dpo_config` holds the algorithm and the data; the model, weight file and
tokenizer fields are RLConfig's (runtime/rl/setup.py), and seed, target,
threads, checkpoint_interval, timeout_s and W&B the shared RunConfig's.
Loading is strict: unknown keys, wrong types and out-of-range values are
UserErrors naming the file and the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from pcpc.autodiff.dpo import LOSS_TYPES
from pcpc.config import from_dict
from pcpc.runtime.rl.setup import RLConfig


@dataclass(frozen=True)
class DPOSection:
    """dpo_config: the algorithm and the data."""

    data_path: str | None = None
    """JSONL preference data: {"prompt", "chosen", "rejected"} strings, or *_ids lists of token ids; relative
    to the current directory, else to the config file's folder. Required unless the config has a dataset
    section (then null)."""
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
        if self.data_path is not None and not self.data_path:
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


@dataclass(frozen=True, kw_only=True)
class DPOConfig(RLConfig):
    """One DPO run of a Qwen2-family model (a single process: DPO needs no rollouts)."""

    dpo_config: DPOSection
    """The algorithm and data (see DPOSection); its key marks the file as a DPO run (pcpc/kinds.py), so a
    run whose pairs come from the dataset section still has one, {} at the least."""
    checkpoint_interval: int = 50
    """Checkpoint every this many steps (and always after the last and on Ctrl+C); 0: only then."""

    RESUME_MAY_CHANGE = RLConfig.RESUME_MAY_CHANGE + ("dpo_config.num_epochs", "dpo_config.max_steps")
    """How long it runs."""

    def __post_init__(self):
        super().__post_init__()
        if (self.dpo_config.data_path is None) == (self.dataset is None):
            raise ValueError("give the preference pairs once: dpo_config.data_path (a JSONL file) or a dataset "
                             "section, " + ("not both" if self.dataset is not None else "one of them"))
        foreign = [k for k in (self.dataset.columns if self.dataset else {}) if k not in ("prompt", "chosen",
                                                                                          "rejected")]
        if foreign:
            raise ValueError(f"dataset.columns.{foreign[0]}: DPO reads only prompt, chosen and rejected")


def parse_dpo(raw: dict, where: str = "config") -> DPOConfig:
    return from_dict(DPOConfig, raw, where=where)
