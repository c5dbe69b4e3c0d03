"""The GRPO experiment config: what `pcpc run experiments/qwen_rl_test.json` reads.

The reference design's fields (model_path, training_model_path, weights_path,
tokenizer, learning_rate, nesterov_momentum, grpo_config {num_iterations,
group_size, learning_rate, beta, prompt_file, num_prompts}, rollout_config
{max_tokens, temperature, top_p, batch_size}, wandb_project, wandb_run_name)
come first, so its config runs unchanged; everything else is optional with
a documented default. Loading is strict: unknown keys, wrong types and
out-of-range values are UserErrors naming the file and the field.

How the two learning rates are used, as the reference describes them:
grpo_config.learning_rate is the policy-gradient (AdamW) rate of each
update; the top-level learning_rate and nesterov_momentum drive an outer
Nesterov step applied, once per iteration, to that iteration's
pseudo-gradient (policy before minus policy after the update), as DiLoCo's
outer loop does. learning_rate 1.0 with nesterov_momentum 0.0 is exactly
plain GRPO (the outer step is then skipped).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pcpc.autodiff.grpo import LOSS_TYPES, SCALE_REWARDS
from pcpc.config import check_at_least, check_choice, from_dict, redacted_dict

TARGETS = ("llvm-cpu", "cuda", "rocm", "vulkan")
BACKENDS = ("auto", "gloo")
INIT_WEIGHTS = ("hf", "random")
SECRET_FIELDS = ("wandb_api_key",)


@dataclass(frozen=True)
class GRPOSection:
    """grpo_config: the algorithm."""

    num_iterations: int = 1
    """GRPO iterations; each one generates, scores and updates (rollouts = num_prompts x group_size)."""
    group_size: int = 4
    """Completions sampled per prompt; advantages are relative within a group (>= 2)."""
    learning_rate: float = 1e-6
    """Policy-gradient learning rate: AdamW's rate for each update."""
    beta: float = 0.1
    """KL penalty coefficient against the frozen initial policy (k3 estimator); 0 skips the reference model."""
    prompt_file: str = "data/rl_prompts.bin"
    """Binary prompt file ([n:u32] then [len:u32][tokens:u64 x len] per prompt); written from the
    reference's five test prompts if missing."""
    num_prompts: int = 1
    """Prompts per iteration, taken in file order and wrapping around."""
    epsilon: float = 0.2
    """Lower clip range of the importance ratio: clamp(ratio, 1 - epsilon, 1 + epsilon_high)."""
    epsilon_high: float | None = None
    """Upper clip range (DAPO's clip-higher); null means epsilon."""
    loss_type: str = "grpo"
    """Token aggregation: grpo (mean per sequence, then over sequences), dapo (mean over all completion
    tokens), dr_grpo (sum / (rows x max_tokens))."""
    scale_rewards: str = "group"
    """Advantage scaling: (r - group mean) / (std + 1e-4) with the std of the group, of the batch, or none."""
    updates_per_iteration: int = 1
    """Optimizer steps on each batch of rollouts (TRL's num_iterations, mu); > 1 computes the old policy's
    log-probs once and clips the ratio against them."""
    reward_funcs: tuple[str, ...] = ("default",)
    """Reward functions: built-ins (default, arithmetic_exact_match), module:function, or file.py:function
    (relative to the config file); each is called with prompts, completions, completion_ids."""
    reward_weights: tuple[float, ...] | None = None
    """Weight of each reward function in the total (null: all 1.0)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay (matrices and embeddings only)."""
    max_grad_norm: float = 1.0
    """Clip each update's global gradient norm to this (0: off)."""

    def __post_init__(self):
        check_at_least(self, 1, "num_iterations", "num_prompts", "updates_per_iteration")
        if self.group_size < 2:
            raise ValueError(f"group_size must be >= 2 (advantages compare completions within a group), "
                             f"got {self.group_size}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        check_at_least(self, 0.0, "beta", "weight_decay", "max_grad_norm")
        if not 0.0 < self.epsilon < 1.0:
            raise ValueError(f"epsilon must be in (0, 1), got {self.epsilon}")
        if self.epsilon_high is not None and not self.epsilon_high > 0:
            raise ValueError(f"epsilon_high must be > 0 or null, got {self.epsilon_high}")
        check_choice(self, "loss_type", LOSS_TYPES)
        check_choice(self, "scale_rewards", SCALE_REWARDS)
        if not self.prompt_file:
            raise ValueError("prompt_file must not be empty")
        if not self.reward_funcs:
            raise ValueError("reward_funcs must name at least one reward function")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(f"reward_weights has {len(self.reward_weights)} entries for "
                             f"{len(self.reward_funcs)} reward_funcs; give one weight per function")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def eps_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


@dataclass(frozen=True)
class RolloutSection:
    """rollout_config: how the workers sample completions."""

    max_tokens: int = 128
    """Most tokens generated per completion (generation stops earlier at EOS)."""
    temperature: float = 0.7
    """Sampling temperature (> 0); the loss scores log-probs at the same temperature, as TRL does."""
    top_p: float = 0.9
    """Nucleus sampling: sample from the smallest set of tokens whose probability reaches top_p (1.0: off)."""
    batch_size: int = 4
    """Sequences per compiled generation call on a worker; a multiple of grpo_config.group_size."""

    def __post_init__(self):
        check_at_least(self, 1, "max_tokens", "batch_size")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 (GRPO needs sampled completions), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class GRPOExperiment:
    """One GRPO run of a Qwen2-family model: rollout workers plus a learner, on torch.distributed."""

    # --- the reference design's fields ---
    model_path: str
    """Generation module artifact (.mlir): prefill_bs{B} / decode_bs{B} are built there (with .vmfb and
    .meta.json) when missing or stale, for the rollout batch size and lengths."""
    training_model_path: str
    """Learner module artifact (.vmfb): token log-probs, the GRPO train step derived by pcpc.autodiff (loss,
    gradients and AdamW in one call) and the outer step; built there when missing or stale."""
    weights_path: str
    """Flat fp32 weight file (parameter order of meta.json, no header); exported from the model's HF weights
    when missing (or initialised at random with init_weights "random")."""
    tokenizer: str = "qwen"
    """qwen (the model's HF tokenizer), bytes (UTF-8 bytes as ids, id 0 is EOS; for toy models), or the
    path of a HF tokenizer directory."""
    learning_rate: float = 1.0
    """Outer-loop learning rate applied to each iteration's pseudo-gradient (1.0 with momentum 0: plain GRPO)."""
    nesterov_momentum: float = 0.0
    """Outer Nesterov momentum, in [0, 1)."""
    grpo_config: GRPOSection = field(default_factory=GRPOSection)
    """The algorithm (see GRPOSection)."""
    rollout_config: RolloutSection = field(default_factory=RolloutSection)
    """Sampling (see RolloutSection)."""
    wandb_project: str | None = None
    """Weights & Biases project; null logs locally only."""
    wandb_run_name: str | None = None
    """W&B run name (null: W&B picks one)."""

    # --- optional fields ---
    model: str = "qwen2.5-0.5b"
    """Architecture: a preset of exporters/qwen2.py, or a local HF directory of a Qwen2-family model."""
    model_overrides: dict = field(default_factory=dict)
    """Qwen2Config fields applied on top of the preset (toy models)."""
    init_weights: str = "hf"
    """How weights_path is made when missing: hf (export the model's HF weights) or random (seeded init)."""
    eos_token_ids: tuple[int, ...] | None = None
    """Token ids that end a completion (null: the tokenizer's EOS and the chat end-of-turn token)."""
    num_workers: int = 1
    """Rollout worker processes `pcpc run` launches next to the learner (under torchrun: WORLD_SIZE - 1)."""
    seed: int = 0
    """Seeds sampling (each rollout batch's seed derives from it, the iteration and the batch) and random init."""
    checkpoint_interval: int = 10
    """Checkpoint every this many iterations (and always after the last); 0: only at the end."""
    target: str = "llvm-cpu"
    """Compile target and device of the modules: llvm-cpu (this host's CPU), cuda, rocm, vulkan."""
    backend: str = "auto"
    """torch.distributed backend: auto (gloo: prompts, completions and weights cross as host memory), gloo."""
    threads: int | None = None
    """IREE CPU threads per process (null: all cores for the learner, cores / num_workers per worker)."""
    timeout_s: float = 1800.0
    """Collective timeout: bounds how long the learner waits for a worker that stopped answering (a local
    worker that dies is noticed within seconds by the launcher)."""
    wandb_entity: str | None = None
    """W&B team or user (null: your default entity)."""
    wandb_api_key: str | None = field(default=None, repr=False)
    """W&B API key (or WANDB_API_KEY / `wandb login`); never printed or written to the run directory."""

    def __post_init__(self):
        for name in ("model_path", "training_model_path", "weights_path", "tokenizer", "model"):
            if not getattr(self, name):
                raise ValueError(f"{name} must not be empty")
        if Path(self.model_path).suffix != ".mlir":
            raise ValueError(f"model_path must name a .mlir build artifact (e.g. models/qwen_rl_generation.mlir), "
                             f"got {self.model_path!r}")
        if Path(self.training_model_path).suffix != ".vmfb":
            raise ValueError(f"training_model_path must name a .vmfb build artifact (e.g. "
                             f"models/qwen_grpo_training.vmfb), got {self.training_model_path!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.nesterov_momentum < 1.0:
            raise ValueError(f"nesterov_momentum must be in [0, 1), got {self.nesterov_momentum}")
        g, r = self.grpo_config, self.rollout_config
        if r.batch_size % g.group_size:
            raise ValueError(f"rollout_config.batch_size ({r.batch_size}) must be a multiple of "
                             f"grpo_config.group_size ({g.group_size}): a rollout batch holds whole groups")
        check_at_least(self, 1, "num_workers")
        check_at_least(self, 0, "seed", "checkpoint_interval")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")
        check_choice(self, "target", TARGETS)
        check_choice(self, "backend", BACKENDS)
        check_choice(self, "init_weights", INIT_WEIGHTS)

    @property
    def outer_step_active(self) -> bool:
        """False when the outer step is the identity (lr 1, momentum 0) and is skipped."""
        return not (self.learning_rate == 1.0 and self.nesterov_momentum == 0.0)

    @property
    def rollouts_per_iteration(self) -> int:
        return self.grpo_config.num_prompts * self.grpo_config.group_size

    def public_dict(self) -> dict:
        """All fields, secrets redacted: what is printed, saved in the run directory and sent to W&B."""
        return redacted_dict(self, SECRET_FIELDS)


def parse_grpo(raw: dict, where: str = "config") -> GRPOExperiment:
    """GRPOExperiment from a decoded JSON object; errors name `where` and the field."""
    return from_dict(GRPOExperiment, raw, where=where)
