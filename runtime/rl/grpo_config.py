"""The GRPO experiment config: what `pcpc run experiments/qwen_rl_test.json` reads.

The reference design's fields (model_path, training_model_path, weights_path,
tokenizer, learning_rate, nesterov_momentum, grpo_config {num_iterations,
group_size, learning_rate, beta, prompt_file, num_prompts}, rollout_config
{max_tokens, temperature, top_p, batch_size}, wandb_project, wandb_run_name)
are all accepted, so its config runs unchanged (the model, weight and
tokenizer fields are RLConfig's, runtime/rl/setup.py; seed, target, threads,
checkpoint_interval, timeout_s and W&B the shared RunConfig's); everything
else is optional with a documented default. Loading is strict: unknown keys, wrong types and
out-of-range values are UserErrors naming the file and the field.

How the two learning rates are used, as the reference describes them:
grpo_config.learning_rate is the policy-gradient (AdamW) rate of each
update; the top-level learning_rate and nesterov_momentum drive an outer
Nesterov step applied, once per iteration, to that iteration's
pseudo-gradient (policy before minus policy after the update), as DiLoCo's
outer loop does. learning_rate 1.0 with nesterov_momentum 0.0 is exactly
plain GRPO (the outer step is then skipped). The reference's own test config
(experiments/qwen_rl_test.json: learning_rate 1e-5, momentum 0.9) so moves
the policy by 1.9e-5 of an AdamW step, which rounds away in fp32 for almost
every weight; the run says so when it starts (`outer_step_note`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pcpc.autodiff.grpo import LOSS_TYPES, SCALE_REWARDS
from pcpc.config import check_at_least, check_choice, from_dict
from pcpc.runtime.rl.setup import RLConfig

BACKENDS = ("auto", "gloo")


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
    reference's five test prompts if missing. Not read when the config has a dataset section."""
    num_prompts: int = 1
    """Prompts per iteration, taken in file (or dataset subset) order and wrapping around."""
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
    """Reward functions: built-ins (default, arithmetic_exact_match, math_exact_match, countdown),
    module:function, or file.py:function (relative to the config file); each is called with prompts,
    completions, completion_ids, and, with a dataset section, the row's columns by name (answer, nums, ...)."""
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
    use_bias_correction_kl: bool = True
    """Multiply the KL term by the importance ratio (TRL's default since 1.x, DeepSeek-V3.2): the KL gradient
    becomes the unbiased reverse-KL gradient. It changes the gradient even on-policy, where the ratio is 1."""

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


@dataclass(frozen=True, kw_only=True)
class GRPOConfig(RLConfig):
    """One GRPO run of a Qwen2-family model: rollout workers plus a learner, on torch.distributed."""

    # --- the reference design's fields ---
    model_path: str
    """Generation module artifact (.mlir): prefill_bs{B} / decode_bs{B} are built there (with .vmfb and
    .meta.json) when missing or stale, for the rollout batch size and lengths."""
    learning_rate: float = 1.0
    """Outer-loop learning rate applied to each iteration's pseudo-gradient (1.0 with momentum 0: plain GRPO)."""
    nesterov_momentum: float = 0.0
    """Outer Nesterov momentum, in [0, 1)."""
    grpo_config: GRPOSection = field(default_factory=GRPOSection)
    """The algorithm (see GRPOSection)."""
    rollout_config: RolloutSection = field(default_factory=RolloutSection)
    """Sampling (see RolloutSection)."""

    # --- optional fields (and RLConfig's: training_model_path, weights_path, tokenizer, model, ...) ---
    num_workers: int = 1
    """Rollout worker processes `pcpc run` launches next to the learner (under torchrun: WORLD_SIZE - 1)."""
    seed: int = 0
    """Seeds sampling (each rollout batch's seed derives from it, the iteration and the batch) and random init."""
    backend: str = "auto"
    """torch.distributed backend: auto (gloo: prompts, completions and weights cross as host memory), gloo."""
    timeout_s: float = 1800.0
    """Collective timeout: bounds how long the learner waits for a worker that stopped answering (a local
    worker that dies is noticed within seconds by the launcher)."""

    RESUME_MAY_CHANGE = RLConfig.RESUME_MAY_CHANGE + (
        "grpo_config.num_iterations", "num_workers", "backend", "model_path",
    )
    """How long it runs, how many workers share the rollouts (each batch is seeded on its own, so the
    count changes nothing), and where the artifacts live (they are built from the config)."""

    def __post_init__(self):
        super().__post_init__()
        if Path(self.model_path).suffix != ".mlir":
            raise ValueError(f"model_path must name a .mlir build artifact (e.g. models/qwen_rl_generation.mlir), "
                             f"got {self.model_path!r}")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.nesterov_momentum < 1.0:
            raise ValueError(f"nesterov_momentum must be in [0, 1), got {self.nesterov_momentum}")
        g, r = self.grpo_config, self.rollout_config
        if r.batch_size % g.group_size:
            raise ValueError(f"rollout_config.batch_size ({r.batch_size}) must be a multiple of "
                             f"grpo_config.group_size ({g.group_size}): a rollout batch holds whole groups")
        check_at_least(self, 1, "num_workers")
        check_choice(self, "backend", BACKENDS)
        dpo_only = [k for k in ("chosen", "rejected") if self.dataset is not None and k in self.dataset.columns]
        if dpo_only:
            raise ValueError(f"dataset.columns.{dpo_only[0]}: GRPO reads prompt (and hands answer and every other "
                             f"column to the reward functions); chosen and rejected are DPO's")

    @property
    def outer_step_active(self) -> bool:
        """False when the outer step is the identity (lr 1, momentum 0) and is skipped."""
        return not (self.learning_rate == 1.0 and self.nesterov_momentum == 0.0)

    def outer_step_note(self) -> str | None:
        """One line for the start of a run whose outer step barely moves the policy, or None."""
        first = self.learning_rate * (1 + self.nesterov_momentum)  # b = Δ, θ -= lr (Δ + μ b) on iteration 1
        if not self.outer_step_active or first >= 0.1:
            return None
        return (f"note: learning_rate {self.learning_rate:g} is the outer rate on each iteration's pseudo-gradient "
                f"(the reference's reading), so the first iteration moves the policy by {first:.2g} of its AdamW "
                f"step; for plain GRPO set learning_rate 1.0 and nesterov_momentum 0.0")

    @property
    def rollouts_per_iteration(self) -> int:
        return self.grpo_config.num_prompts * self.grpo_config.group_size


def parse_grpo(raw: dict, where: str = "config") -> GRPOConfig:
    """GRPOConfig from a decoded JSON object; errors name `where` and the field."""
    return from_dict(GRPOConfig, raw, where=where)
