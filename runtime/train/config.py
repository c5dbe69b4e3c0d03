"""The pretraining configs: DiLoCo (what `pcpc run experiments/nanogpt_small.json` reads) and data-parallel
(`"sync": "ddp"`), on one base, PretrainConfig: the model, the data, the inner AdamW and its schedule.

The reference design's experiment files run unchanged: model_path, data_path,
learning_rate, tau, outer_loop_steps, nesterov_momentum, max_epochs and the W&B
keys (in the shared base, runtime/run/config.py, with seed, target, threads,
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
SYNCS = ("diloco", "ddp")
FORMATS = ("auto", "text", "jsonl", "shards")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """The `data` section: what a training run reads (runtime/train/data.py has the formats' semantics)."""

    path: str
    """A text or JSONL file, or a directory of token shards (`pcpc data prepare` writes one)."""
    format: str = "auto"
    """text, jsonl or shards; auto: shards for a directory, jsonl for a .jsonl file, else text."""
    tokenizer: str = "auto"
    """char, byte, gpt2 (tiktoken's GPT-2 BPE) or a local HF tokenizer directory. auto: text as the top-level
    `tokenizer` auto (byte for a 256-id preset, else char); jsonl gpt2; shards the one their dataset.json
    names, else gpt2 (FineWeb-style shards)."""
    test_size: int | float | None = None
    """The validation split. text: a fraction of the tokens; jsonl: a fraction of the documents (< 1) or their
    number (an integer >= 1); null: 0.1. Shards validate on their val_* files (null only)."""
    block_size: int | None = None
    """Tokens per training window; sets the model's block_size (null: the model's)."""
    text_field: str = "text"
    """jsonl: the field that holds each document's text."""

    def __post_init__(self):
        if not self.path:
            raise ValueError("path must not be empty")
        check_choice(self, "format", FORMATS)
        if not self.tokenizer:
            raise ValueError("tokenizer must not be empty (char, byte, gpt2, a tokenizer directory or auto)")
        if self.block_size is not None:
            check_at_least(self, 1, "block_size")
        t = self.test_size
        if t is not None:
            if self.kind == "shards":
                raise ValueError("test_size: shards validate on their val_* files; leave test_size out")
            if isinstance(t, float) and not 0.0 < t < 1.0:
                raise ValueError(f"test_size must be a fraction in (0, 1) or a number of documents, got {t}")
            if isinstance(t, int) and (t < 1 or self.kind == "text"):
                raise ValueError(f"test_size must be a fraction in (0, 1){'' if self.kind == 'text' else ' or a number of documents >= 1'}, got {t}")
        if self.kind == "shards" and self.tokenizer == "char":
            raise ValueError("tokenizer char needs the text; shards hold token ids (byte, gpt2 or a directory)")

    @property
    def kind(self) -> str:
        """The format, auto resolved from the path."""
        if self.format != "auto":
            return self.format
        path = Path(self.path)
        return "shards" if path.is_dir() else "jsonl" if path.suffix == ".jsonl" else "text"


@dataclass(frozen=True, kw_only=True)
class PretrainConfig(RunConfig):
    """What every pretraining run of a nanoGPT model takes, DiLoCo or data-parallel."""

    model_path: str
    """Build-graph artifact, e.g. models/nanogpt_small.mlir: the file stem names the nanoGPT preset
    (nanogpt_small -> nanogpt-small); the .mlir/.vmfb/.meta.json are built there if missing (cached)."""
    data_path: str | None = None
    """Training text file (relative paths are resolved against the current directory); or give `data`."""
    learning_rate: float = 6e-4
    """Inner AdamW peak learning rate (nanoGPT's value); DiLoCo's outer rate is outer_learning_rate."""
    sync: str = "diloco"
    """How the workers train together: diloco (average pseudo-gradients every tau steps) or ddp (all-reduce
    the gradients every step, runtime/train/ddp.py)."""
    num_workers: int = 2
    """Local worker processes `pcpc run` launches (under torchrun, WORLD_SIZE decides)."""
    batch_size: int = 16
    """Sequences per inner step (DDP: per micro-batch) per worker, each block_size tokens long."""
    eval_batch_size: int = 64
    """Sequences per compiled validation call."""
    eval_batches: int = 50
    """Validation batches per evaluation, evenly spaced over the validation split (0: all of it)."""
    seed: int = 1337
    """Seeds the initialisation, each worker's data order and text sampling."""
    eval_interval: int = 10
    """Evaluate the validation loss every this many rounds (DDP: steps), and always after the last; 0: only at
    the end."""
    backend: str = "auto"
    """torch.distributed backend: auto (nccl for cuda, else gloo), gloo, nccl."""
    tokenizer: str = "auto"
    """char (vocabulary from the data), byte (256 ids) or auto (byte when the preset's vocab is 256, else char);
    with a data section, data.tokenizer."""
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
    sample_tokens: int = 200
    """Tokens of text sampled from the final model (0: none)."""
    model: str | dict | None = None
    """The architecture: null (the model_path stem names a preset, as the reference's configs do), a preset
    name (nanogpt-small, gpt2-124m, ...), or an object {"preset": ..., <NanoGPTConfig fields>} (preset
    default nanogpt-small): n_layer, n_head, n_embd, block_size, bias, tie_embeddings, mlp, norm, positions,
    moe, compute_dtype, ... (README: model config reference). vocab_size comes from the tokenizer unless
    given."""
    data: DataConfig | None = None
    """Instead of data_path: the data section (path, format text/jsonl/shards, tokenizer char/byte/gpt2/a HF
    tokenizer directory, test_size, block_size, text_field; README: Datasets)."""

    def __post_init__(self):
        super().__post_init__()
        if not self.model_path:
            raise ValueError("model_path must not be empty")
        if Path(self.model_path).suffix != ".mlir":
            raise ValueError(f"model_path must name a .mlir build artifact (e.g. models/nanogpt_small.mlir), "
                             f"got {self.model_path!r}")
        if (self.data_path is None) == (self.data is None):
            raise ValueError("give the training data as data_path (a text file) or as a data section, one of them"
                             if self.data is None else "give data_path or a data section, not both")
        if self.data_path is not None and not self.data_path:
            raise ValueError("data_path must not be empty")
        if self.data is not None and self.tokenizer != "auto":
            raise ValueError("tokenizer: with a data section the tokenizer is data.tokenizer")
        check_choice(self, "sync", SYNCS)
        check_positive(self, "learning_rate")
        check_at_least(self, 1, "num_workers", "batch_size", "eval_batch_size")
        check_at_least(self, 0, "eval_batches", "eval_interval", "warmup_steps", "sample_tokens", "weight_decay",
                       "grad_clip")
        for name in ("beta1", "beta2"):
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
        given = self.model.get("block_size") if isinstance(self.model, dict) else None
        if self.data is not None and self.data.block_size is not None and given not in (None, self.data.block_size):
            raise ValueError(f"data.block_size ({self.data.block_size}) and model.block_size ({given}) differ; "
                             f"give one of them")
        self.model_config()  # strict: unknown fields and bad combinations are errors naming the field

    @property
    def dataset(self) -> DataConfig:
        """The data section; data_path and tokenizer as one when the config gives those (the reference's)."""
        if self.data is not None:
            return self.data
        return DataConfig(path=self.data_path, format="text", tokenizer=self.tokenizer)

    @property
    def data_where(self) -> str:
        """The field the data comes from, for errors."""
        return "data.path" if self.data is not None else "data_path"

    @property
    def preset(self) -> str:
        """The nanoGPT preset the architecture starts from."""
        if self.model is None:
            return Path(self.model_path).stem.replace("_", "-")
        return self.model if isinstance(self.model, str) else self.model.get("preset", "nanogpt-small")

    @property
    def model_fields(self) -> dict:
        """The architecture fields given on top of the preset (the model object less its preset, and
        data.block_size)."""
        fields = {k: v for k, v in self.model.items() if k != "preset"} if isinstance(self.model, dict) else {}
        if self.data is not None and self.data.block_size is not None:
            fields.setdefault("block_size", self.data.block_size)  # a conflict is an error (__post_init__)
        return fields

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

    def scheduled_lr(self, it: int, decay: int) -> float:
        """The inner learning rate of 0-based inner step `it` with the cosine decay ending at step `decay`
        (nanoGPT's get_lr for "cosine")."""
        lr, warmup = self.learning_rate, self.warmup_steps
        if it < warmup:  # linear warmup, as nanoGPT's get_lr, before either schedule
            return lr * (it + 1) / (warmup + 1)
        if self.lr_schedule == "constant":
            return lr
        min_lr = self.min_learning_rate if self.min_learning_rate is not None else lr / 10
        if it > decay:
            return min_lr
        ratio = (it - warmup) / max(1, decay - warmup)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


@dataclass(frozen=True, kw_only=True)
class DiLoCoConfig(PretrainConfig):
    """One DiLoCo training run of a nanoGPT model."""

    # --- the reference design's fields (with model_path, data_path, learning_rate in the base) ---
    tau: int = 50
    """Inner AdamW steps each worker runs per round (between synchronisations)."""
    outer_loop_steps: int = 100
    """Rounds (outer Nesterov steps)."""
    nesterov_momentum: float = 0.9
    """Outer Nesterov momentum mu, in [0, 1)."""
    max_epochs: int = 10
    """Upper bound on passes over each worker's data shard; stops the run early if reached first."""

    # --- optional fields ---
    outer_learning_rate: float = 0.7
    """Outer Nesterov learning rate applied to the averaged pseudo-gradient."""
    persist_inner_state: bool = True
    """Keep each worker's AdamW moments and step count across rounds (false: reset every round)."""
    init_from: str | None = None
    """A DiLoCo run directory (or its checkpoints/latest.pt) whose global weights this run starts from, instead
    of a random initialisation: the same architecture and tokenizer. With `peft`, the frozen base."""
    peft: PeftConfig | None = None
    """Train an adapter on the init_from weights, frozen, instead of every weight (exporters/peft.py: lora,
    lora_plus, dora, pissa, milora, vera or miss, HF peft's fields; target_modules default to every block
    Linear: c_attn, c_proj, c_fc, or w1, w2, w3 with SwiGLU). Only the adapter's pseudo-gradients are
    all-reduced; the run saves it in <run dir>/adapter as adapter_model.safetensors + adapter_config.json."""

    FIRST_KEYS = ("model_path", "data_path", "learning_rate", "tau", "outer_loop_steps", "nesterov_momentum",
                  "max_epochs")
    """The reference design's keys, listed first (pcpc.config's "valid keys")."""
    RESUME_MAY_CHANGE = RunConfig.RESUME_MAY_CHANGE + (
        "outer_loop_steps", "max_epochs", "num_workers", "backend", "eval_interval", "eval_batches",
        "eval_batch_size", "sample_tokens",
    )
    """How long it runs and how it is watched; the worker count is checked against the checkpoint's
    worker states, and a cosine schedule's real decay length is checked as a derived value."""

    def __post_init__(self):
        super().__post_init__()
        if self.sync != "diloco":
            raise ValueError(f"sync {self.sync!r}: this is a DiLoCo config (pcpc/kinds.py routes \"sync\": "
                             f"\"ddp\" to the data-parallel loop)")
        check_positive(self, "outer_learning_rate")
        check_at_least(self, 1, "tau", "outer_loop_steps", "max_epochs")
        if not 0.0 <= self.nesterov_momentum < 1.0:
            raise ValueError(f"nesterov_momentum must be in [0, 1), got {self.nesterov_momentum}")
        if self.init_from is not None and not self.init_from:
            raise ValueError("init_from must not be empty (a DiLoCo run directory, or null)")
        if self.peft is not None:
            from pcpc.exporters.peft import default_targets, targets

            mcfg = self.model_config()
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
        return self.scheduled_lr(it, self.decay_steps(rounds))


@dataclass(frozen=True, kw_only=True)
class DDPConfig(PretrainConfig):
    """One data-parallel pretraining run (`"sync": "ddp"`): the gradients all-reduced every step, as DDP."""

    sync: str = "ddp"
    """ddp: this loop (the key that routes a file to it)."""
    max_steps: int = 1000
    """Optimizer steps."""
    tokens_per_step: int | None = None
    """Tokens per optimizer step over all workers, reached by gradient accumulation: a multiple of
    workers x batch_size x block_size (null: one micro-batch per worker). The GPT-2 recipe's 524,288."""
    sample_interval: int = 0
    """Sample sample_tokens of text from sample_prompt every this many steps into samples.jsonl (0: never)."""
    sample_prompt: str | None = None
    """The text samples start from (null: the tokenizer's end-of-text id, else a newline)."""

    RESUME_MAY_CHANGE = RunConfig.RESUME_MAY_CHANGE + (
        "max_steps", "backend", "eval_interval", "eval_batches", "eval_batch_size", "sample_tokens",
        "sample_interval", "sample_prompt",
    )
    """How long it runs and how it is watched; the worker count is checked through the accumulation it gives,
    and a cosine schedule's decay length as a derived value."""

    def __post_init__(self):
        super().__post_init__()
        if self.sync != "ddp":
            raise ValueError(f"sync {self.sync!r}: this is a data-parallel config (\"sync\": \"ddp\")")
        check_at_least(self, 1, "max_steps")
        check_at_least(self, 0, "sample_interval")
        if self.tokens_per_step is not None:
            check_at_least(self, 1, "tokens_per_step")

    def accumulation(self, world: int, block_size: int) -> int:
        """Micro-batches per worker per step: tokens_per_step / (world x batch_size x block_size)."""
        micro = world * self.batch_size * block_size
        if self.tokens_per_step is None:
            return 1
        if self.tokens_per_step % micro:
            from pcpc.errors import UserError

            raise UserError(f"tokens_per_step: {self.tokens_per_step:,} is not a multiple of {world} workers x "
                            f"batch_size {self.batch_size} x block_size {block_size} = {micro:,} tokens; use "
                            f"{max(1, round(self.tokens_per_step / micro)) * micro:,}")
        return self.tokens_per_step // micro

    def decay_steps(self) -> int:
        """cosine: the step where the rate reaches the floor (lr_decay_steps, else max_steps)."""
        return self.lr_decay_steps if self.lr_decay_steps is not None else self.max_steps

    def lr_at(self, it: int) -> float:
        """The learning rate of 0-based step `it`."""
        return self.scheduled_lr(it, self.decay_steps())


def parse_experiment(raw: dict, where: str = "config") -> DiLoCoConfig:
    """DiLoCoConfig from a decoded JSON object; errors name `where` and the field."""
    return from_dict(DiLoCoConfig, raw, where=where)


def load_experiment(path: str | Path) -> DiLoCoConfig:
    """Read and validate a DiLoCo experiment JSON file."""
    return parse_experiment(load_json(path), where=str(path))

