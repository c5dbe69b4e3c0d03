"""Plain-PyTorch references for the GRPO / DPO numerics tests.

An HF transformers Qwen2ForCausalLM with the same weights, log-probs picked
with log_softmax + gather, and TRL's loss formulas written out again here,
independently of pcpc.autodiff, so the compiled modules are checked against
a second implementation rather than against themselves. trl_reference.py
runs TRL's own trainer code beside these.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import transformers

from pcpc.exporters import qwen2

B, T = 4, 16
L = T - 1
OVERRIDES = {"num_hidden_layers": 1}
TOL = 1e-5


@pytest.fixture(scope="session")
def rl_module(tmp_path_factory):
    """One tiny compiled module with every RL function (built once per session)."""
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import rl_target
    from pcpc.runtime.module import CompiledModule

    target = rl_target(
        "test-rl-numerics", "qwen2-tiny", model_overrides=OVERRIDES, batch_size=B, seq_len=T,
        functions=["token_logprobs", "sequence_logps", "grpo_value_and_grad", "dpo_value_and_grad",
                   "grad_clip_coef", "adamw", "outer"],
    )
    # a fixed folder: a second test module asking for it finds the build up to date
    return CompiledModule(build(target, tmp_path_factory.getbasetemp() / "rl_numerics").vmfb)


WINDOW = 12
"""setup's rows hold at most 12 completion targets (rows of 3 + 12, 3 + 6, 5 + 10, 5 + 1 tokens)."""


@pytest.fixture(scope="session")
def window_module(tmp_path_factory):
    """The scoring functions with the head on each row's completion window only (recipe completion_len)."""
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import rl_target
    from pcpc.runtime.module import CompiledModule

    target = rl_target("test-rl-window", "qwen2-tiny", model_overrides=OVERRIDES, batch_size=B, seq_len=T,
                       completion_len=WINDOW, functions=["token_logprobs", "sequence_logps", "grpo_value_and_grad",
                                                         "dpo_value_and_grad"])
    return CompiledModule(build(target, tmp_path_factory.getbasetemp() / "rl_window").vmfb)


def prefix_target():
    """The scoring functions of window_module with rows sharing their first 3 tokens (shared_prefix [2, 3]):
    GRPO's groups of 2 consecutive rows, DPO's pairs (rows i and B/2 + i)."""
    from pcpc.mlir.targets import rl_target

    return rl_target("test-rl-prefix", "qwen2-tiny", model_overrides=OVERRIDES, batch_size=B, seq_len=T,
                     completion_len=WINDOW, shared_prefix=[2, 3],
                     functions=["token_logprobs", "grpo_value_and_grad", "sequence_logps", "dpo_value_and_grad"])


@pytest.fixture(scope="session")
def prefix_module(tmp_path_factory):
    """prefix_target's module (built once per session)."""
    from pcpc.mlir.build import build
    from pcpc.runtime.module import CompiledModule

    return CompiledModule(build(prefix_target(), tmp_path_factory.getbasetemp() / "rl_prefix").vmfb)


@pytest.fixture(scope="module")
def setup():
    """Weights (scaled up: a peaked policy), a perturbed reference, ids and a completion mask."""
    cfg = qwen2.make_config("qwen2-tiny", **OVERRIDES)
    params = qwen2.init_params(cfg, seed=3)
    # Larger than HF's init so the policy is far from uniform and gradients are not tiny.
    params = {k: v * 4 if v.dim() == 2 else v for k, v in params.items()}
    ref_params = {k: v + 0.01 * torch.randn(v.shape, generator=torch.Generator().manual_seed(7)) for k, v in params.items()}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (B, T), generator=gen)
    prompt_len = torch.tensor([3, 3, 5, 5])
    comp_len = torch.tensor([12, 6, 10, 1])  # completion targets per row (padding after)
    t = torch.arange(L)
    mask = ((t >= prompt_len[:, None] - 1) & (t < (prompt_len + comp_len)[:, None] - 1)).float()
    return cfg, params, ref_params, ids, mask


def np_params(params):
    return [p.numpy() for p in params.values()]


def hf_model(cfg: qwen2.Qwen2Config, params: dict[str, torch.Tensor]) -> transformers.Qwen2ForCausalLM:
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
        attn_implementation="eager",
    )
    model = transformers.Qwen2ForCausalLM(hf_cfg).float()
    state = dict(params)
    if cfg.tie_word_embeddings:
        state["lm_head.weight"] = params["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True)
    if cfg.tie_word_embeddings:
        model.tie_weights()
    return model.train()


def token_logps(model, ids: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """(B, T) -> (B, T-1): log p(ids[t+1] | ids[:t+1]) at temperature."""
    logits = model(input_ids=ids).logits[:, :-1] / temperature
    return torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:, None]).squeeze(-1)


def grpo_loss(logp, old, ref, adv, mask, beta, eps_low, eps_high, loss_type, max_len, bias_correction_kl=True):
    """TRL GRPOTrainer._compute_loss (token-level importance sampling); bias_correction_kl as TRL's
    use_bias_correction_kl (default True): the KL times the importance ratio."""
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    coef_1 = torch.exp(logp - old)
    if bias_correction_kl:
        kl = kl * coef_1
    coef_2 = torch.clamp(coef_1, 1 - eps_low, 1 + eps_high)
    per_token = -torch.min(coef_1 * adv[:, None], coef_2 * adv[:, None]) + beta * kl
    if loss_type == "grpo":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if loss_type == "dapo":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    return (per_token * mask).sum() / (per_token.size(0) * max_len)


def dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, chosen_tokens=None, rejected_tokens=None):
    """TRL DPOTrainer._compute_loss for sigmoid (no label smoothing), hinge and ipo, on (P,) sequence sums.

    ipo divides each side's log-ratio by its completion token count (chosen_tokens, rejected_tokens); the
    rewards beta * (logp - ref) are on the sums for every loss type.
    """
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (chosen_ratio - rejected_ratio))
    else:
        delta = chosen_ratio / chosen_tokens.clamp(min=1.0) - rejected_ratio / rejected_tokens.clamp(min=1.0)
        losses = (delta - 1 / (2 * beta)) ** 2
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


def rel_err(got, want) -> float:
    got = torch.as_tensor(got, dtype=torch.float64)
    want = torch.as_tensor(want, dtype=torch.float64)
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-12))
