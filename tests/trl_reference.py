"""TRL 1.16.0's own loss code, run with a minimal stand-in `self`, for the GRPO / DPO numerics tests.

rl_reference.py writes TRL's formulas out again by hand; this module runs TRL's methods themselves:
GRPOTrainer._compute_loss and _get_per_token_logps_and_entropies, the advantage / frac_reward_zero_std part
of GRPOTrainer._generate_and_score_completions (generation and reward functions stubbed out), and
DPOTrainer._compute_loss. The models are HF Qwen2ForCausalLMs carrying TRL's fused LM head
(trl.trainer.utils.add_fused_lm_head, installed as the trainers install it), so TRL computes the log-probs,
the temperature scaling and the masking too. The stand-in `self` has only the attributes those methods read,
set as the trainers' __init__ sets them from the config; the config is the GRPOConfig / DPOConfig dataclass
defaults (read from the fields, no TrainingArguments built) with the test's overrides. A changed TRL
definition then shows up as a failing test, not as silent drift; TRL is pinned (pyproject's test extra).

Single process, train mode, no gradient accumulation, no vLLM, no entropy bonus, no MoE aux loss, no PEFT.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from collections import defaultdict, deque
from types import SimpleNamespace

import torch
import trl
from trl.trainer.utils import add_fused_lm_head

from rl_reference import hf_model

TRL_VERSION = "1.16.0"


class SingleProcessAccelerator:
    """accelerate.Accelerator as a single process sees it: gathers and reductions are the identity."""

    device = torch.device("cpu")
    num_processes = 1
    process_index = 0
    is_main_process = True
    sync_gradients = True

    def gather(self, x):
        return x

    gather_for_metrics = gather

    def reduce(self, x, reduction="sum"):
        return x

    def autocast(self):
        return contextlib.nullcontext()

    def unwrap_model(self, model):
        return model


def config(config_cls, **overrides) -> SimpleNamespace:
    """`config_cls`'s dataclass defaults with overrides, as a namespace (no TrainingArguments.__post_init__)."""
    values = {}
    for f in dataclasses.fields(config_cls):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    unknown = sorted(set(overrides) - set(values))
    if unknown:
        raise ValueError(f"{config_cls.__name__} has no fields {unknown}")
    return SimpleNamespace(**{**values, **overrides})


def trl_model(cfg, params, temperature: float = 1.0, outputs=("log_probs",)):
    """The HF Qwen2 model of `params` (train mode) with TRL's fused LM head."""
    model = hf_model(cfg, params)
    add_fused_lm_head(model, temperature=temperature, outputs=outputs)
    return model


def _metrics():
    return {"train": defaultdict(list), "eval": defaultdict(list)}


# ---------------------------------------------------------------------------------------------------- GRPO


def grpo_self(model, **overrides) -> SimpleNamespace:
    """Stand-in GRPOTrainer for _compute_loss and _get_per_token_logps_and_entropies (GRPOConfig + overrides)."""
    args = config(trl.GRPOConfig, **{"steps_per_generation": 1, **overrides})
    self = SimpleNamespace(args=args, model=model, accelerator=SingleProcessAccelerator(), _metrics=_metrics())
    # as GRPOTrainer.__init__ sets them
    self.beta = args.beta
    self.loss_type = args.loss_type
    self.epsilon_low = args.epsilon
    self.epsilon_high = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    self.importance_sampling_level = args.importance_sampling_level
    self.top_entropy_quantile = args.top_entropy_quantile
    self.off_policy_mask_threshold = args.off_policy_mask_threshold
    self.use_vllm = args.use_vllm
    self.max_completion_length = args.max_completion_length
    self.temperature = args.temperature
    self.entropy_coef = args.entropy_coef
    self.use_adaptive_entropy = args.use_adaptive_entropy
    self._entropy_bonus_enabled = self.entropy_coef != 0.0 or self.use_adaptive_entropy
    self.aux_loss_enabled = False  # dense model
    self.current_gradient_accumulation_steps = args.gradient_accumulation_steps
    self._get_per_token_logps_and_entropies = types.MethodType(
        trl.GRPOTrainer._get_per_token_logps_and_entropies, self)
    return self


def grpo_per_token_logps(trainer, model, prompt_ids, completion_ids, completion_mask):
    """TRL's per-token log-probs (B, C) of the completion tokens (0 on padding), with grad if `model` has it."""
    input_ids = torch.cat([prompt_ids, completion_ids], 1)
    attention_mask = torch.cat([torch.ones_like(prompt_ids), completion_mask], 1)
    logps, _, _ = trainer._get_per_token_logps_and_entropies(model, input_ids, attention_mask,
                                                             completion_ids.size(1))
    return logps


def trl_grpo(cfg, params, ref_params, prompt_ids, completion_ids, completion_mask, advantages, old=None, **overrides):
    """GRPOTrainer._compute_loss on prompts (B, P) and right-padded completions (B, C).

    old: the old policy's per-token log-probs (B, C), or None (on-policy: TRL takes the current ones, detached).
    overrides: GRPOConfig fields (beta, loss_type, epsilon, epsilon_high, temperature, use_bias_correction_kl,
    max_completion_length, ...). The reference's log-probs come from TRL's _get_per_token_logps_and_entropies
    on a fused-head model of ref_params, as _generate_and_score_completions gets them.
    Returns (loss, grads {name: tensor}, metrics {name: float}, ref_per_token_logps (B, C)).
    """
    temperature = overrides.get("temperature", 1.0)
    model = trl_model(cfg, params, temperature, outputs=("log_probs", "entropy"))  # GRPOTrainer's outputs
    trainer = grpo_self(model, **overrides)
    with torch.no_grad():
        ref = grpo_per_token_logps(trainer, trl_model(cfg, ref_params, temperature), prompt_ids, completion_ids,
                                   completion_mask)
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids), "completion_ids": completion_ids,
              "completion_mask": completion_mask, "advantages": advantages,
              "num_items_in_batch": completion_mask.sum()}
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = ref
    if old is not None:
        inputs["old_per_token_logps"] = old
    loss = trl.GRPOTrainer._compute_loss(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics, ref


def trl_advantages(rewards: torch.Tensor, group_size: int, scale_rewards: str):
    """TRL's advantages (N,) and frac_reward_zero_std for rewards (N,) of one reward function, groups in a row.

    Runs GRPOTrainer._generate_and_score_completions with _generate and _calculate_rewards stubbed (beta 0 and
    one update per generation, so no reference or old-policy forward), and reads what it returns and logs.
    """
    n = rewards.numel()
    # pad_to_multiple_of: "auto" is None off Neuron (GRPOConfig.__post_init__)
    args = config(trl.GRPOConfig, num_generations=group_size, scale_rewards=scale_rewards, steps_per_generation=1,
                  per_device_train_batch_size=n, pad_to_multiple_of=None)
    trainer = SimpleNamespace(
        args=args, accelerator=SingleProcessAccelerator(), model=SimpleNamespace(training=True,
                                                                              is_gradient_checkpointing=False),
        _metrics=_metrics(), environment_factories=None, tools=None, environments=None,
        _tokenizer=SimpleNamespace(pad_token_id=0), pad_to_multiple_of=args.pad_to_multiple_of,
        mask_truncated_completions=args.mask_truncated_completions, num_iterations=args.num_iterations,
        use_vllm=args.use_vllm, beta=args.beta, num_generations=args.num_generations,
        multi_objective_aggregation=args.multi_objective_aggregation, scale_rewards=args.scale_rewards,
        reward_weights=torch.ones(1), reward_func_names=["reward"], log_multimodal=args.log_multimodal,
        _pending_extra_logs=defaultdict(list), _pending_metrics=defaultdict(list),
        _logs={"images": deque(), "prompt": deque(), "completion": deque(), "rewards": defaultdict(deque),
               "advantages": deque(), "extra": defaultdict(deque)},
        # one-token prompts and completions; the rewards are given
        _generate=lambda prompts: ([[1]] * len(prompts), [[2]] * len(prompts), None, ["c"] * len(prompts), None,
                                   {}, None, None),
        _calculate_rewards=lambda inputs, prompts, completions, ids: rewards.float().view(-1, 1),
    )
    out = trl.GRPOTrainer._generate_and_score_completions(trainer, [{"prompt": "p"}] * n)
    return out["advantages"], trainer._metrics["train"]["frac_reward_zero_std"][-1]


# ---------------------------------------------------------------------------------------------------- DPO


def dpo_self(model, ref_model, **overrides) -> SimpleNamespace:
    """Stand-in DPOTrainer for _compute_loss (DPOConfig + overrides; the reference computed in the call)."""
    args = config(trl.DPOConfig, **overrides)
    self = SimpleNamespace(args=args, model=model, ref_model=ref_model, accelerator=SingleProcessAccelerator(),
                           _metrics=_metrics(), _total_train_tokens=0, _tp_size=1)
    # as DPOTrainer.__init__ sets them
    self.beta = args.beta
    self.precompute_ref_logps = args.precompute_ref_log_probs
    self.loss_types = args.loss_type
    self.loss_weights = args.loss_weights or [1.0] * len(self.loss_types)
    self.ld_alpha = args.ld_alpha
    self.f_divergence_type = args.f_divergence_type
    self.f_alpha_divergence_coef = args.f_alpha_divergence_coef
    self.label_smoothing = args.label_smoothing
    self.use_weighting = args.use_weighting
    self.aux_loss_enabled = False
    return self


def trl_dpo(cfg, params, ref_params, input_ids, attention_mask, completion_mask, **overrides):
    """DPOTrainer._compute_loss on rows (B, T): chosen rows, then rejected; completion_mask (B, T) over tokens.

    overrides: DPOConfig fields (beta, loss_type as a list, ...). The reference log-probs are computed inside
    from a fused-head model of ref_params (precompute_ref_log_probs False, TRL's default).
    Returns (loss, grads {name: tensor}, metrics {name: float}).
    """
    model = trl_model(cfg, params, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))  # DPOTrainer's
    trainer = dpo_self(model, trl_model(cfg, ref_params), **overrides)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}
    loss = trl.DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.detach(), grads, metrics
