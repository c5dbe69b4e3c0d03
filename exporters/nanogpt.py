"""nanoGPT as pure functions over a params dict.

No module state: `forward(params, idx, cfg)` reads every weight from `params`,
so the same function can be traced for inference, differentiated by
pcpc.autodiff and lowered with all weights as function inputs.

Parameter names and order follow nanoGPT's `named_parameters()`:
    transformer.wte.weight, transformer.wpe.weight,
    transformer.h.{i}.{ln_1,attn.c_attn,attn.c_proj,ln_2,mlp.c_fc,mlp.c_proj}.{weight,bias},
    transformer.ln_f.{weight,bias}, lm_head.weight (only when untied)
Linear weights are stored (out_features, in_features), as nn.Linear does.

Initialisation (seeded, as nanoGPT): every Linear and Embedding weight
~ N(0, 0.02); the residual projections (attn.c_proj, mlp.c_proj) use
std 0.02 / sqrt(2 * n_layer); biases zero; LayerNorm weight 1, bias 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pcpc.config import check_choice, from_dict
from pcpc.errors import UserError


@dataclass(frozen=True)
class NanoGPTConfig:
    """Architecture of a nanoGPT model."""

    block_size: int = 32
    """Context length in tokens (also the size of the learned position table)."""
    vocab_size: int = 65
    """Number of token ids."""
    n_layer: int = 2
    """Transformer blocks."""
    n_head: int = 8
    """Attention heads; n_embd must be divisible by it."""
    n_embd: int = 64
    """Residual stream width."""
    activation: str = "relu"
    """MLP non-linearity: relu | gelu (exact erf form, as nn.GELU)."""
    norm: str = "layernorm"
    """Normalisation layer: layernorm."""
    positions: str = "learned"
    """Position encoding: learned (a wpe table of block_size rows)."""
    bias: bool = False
    """Biases in Linear and LayerNorm layers."""
    tie_embeddings: bool = True
    """Share wte with the lm_head (no separate lm_head.weight)."""
    compute_dtype: str = "float32"
    """Input dtype of the weight matmuls (every Linear and the lm_head): float32 | bfloat16.
    bfloat16 rounds both operands and the product to bf16, accumulating in fp32 (torch autocast's
    rule for linear layers); weights, optimizer state, norms, attention, softmax and the loss stay
    fp32. About 1.6x faster on a CPU with avx512_bf16; opt-in (bench/NOTES.md has its accuracy)."""

    def __post_init__(self):
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        check_choice(self, "activation", ("relu", "gelu"))
        check_choice(self, "norm", ("layernorm",))
        check_choice(self, "positions", ("learned",))
        check_choice(self, "compute_dtype", tuple(COMPUTE_DTYPES))

    def to_dict(self) -> dict:
        return asdict(self)


COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


PRESETS = {
    "nanogpt-small": dict(block_size=32, vocab_size=65, n_layer=2, n_head=8, n_embd=64),
    "nanogpt-medium": dict(block_size=128, vocab_size=256, n_layer=4, n_head=8, n_embd=256),
}


def make_config(preset: str, **overrides) -> NanoGPTConfig:
    """Preset plus overrides; unknown keys and wrong types are errors naming the key."""
    if preset not in PRESETS:
        raise UserError(f"unknown nanogpt preset {preset!r}; valid: {', '.join(PRESETS)}")
    return from_dict(NanoGPTConfig, {**PRESETS[preset], **overrides}, where=f"{preset} config")


def param_shapes(cfg: NanoGPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, in the documented (named_parameters) order."""
    C, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C)}

    def linear(name, n_in, n_out):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if cfg.bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name):
        shapes[f"{name}.weight"] = (C,)
        if cfg.bias:
            shapes[f"{name}.bias"] = (C,)

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1")
        linear(f"{p}.attn.c_attn", C, 3 * C)
        linear(f"{p}.attn.c_proj", C, C)
        norm(f"{p}.ln_2")
        linear(f"{p}.mlp.c_fc", C, 4 * C)
        linear(f"{p}.mlp.c_proj", 4 * C, C)
    norm("transformer.ln_f")
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def init_params(cfg: NanoGPTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded nanoGPT initialisation (see module docstring)."""
    gen = torch.Generator().manual_seed(seed)
    proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".bias"):
            params[name] = torch.zeros(shape)
        elif ".ln_" in name:
            params[name] = torch.ones(shape)
        else:
            std = proj_std if name.endswith("c_proj.weight") else 0.02
            params[name] = torch.randn(shape, generator=gen) * std
    return params


def _matmul_weight(x, weight, cfg, bias=None):
    """x @ weight.T (+ bias) with the matmul in cfg.compute_dtype; the result in x's dtype."""
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    if dtype == x.dtype:
        return F.linear(x, weight, bias)
    y = F.linear(x.to(dtype), weight.to(dtype)).to(x.dtype)
    return y if bias is None else y + bias


def _linear(params, name, x, cfg):
    return _matmul_weight(x, params[f"{name}.weight"], cfg, params.get(f"{name}.bias"))


def _norm(params, name, x):
    C = x.shape[-1]
    return F.layer_norm(x, (C,), params[f"{name}.weight"], params.get(f"{name}.bias"), 1e-5)


def _attention(params, name, x, cfg):
    B, T, C = x.shape
    nh, hs = cfg.n_head, C // cfg.n_head
    q, k, v = _linear(params, f"{name}.c_attn", x, cfg).split(C, dim=2)
    q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    # Math-form attention: SDPA lowers to a CPU flash kernel IREE cannot compile
    # inside a traced training graph. The causal mask comes from arange, not a buffer.
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, T, T)
    pos = torch.arange(T, device=x.device)
    causal = pos[:, None] >= pos[None, :]  # (T, T)
    att = att.masked_fill(~causal, float("-inf")).softmax(dim=-1)
    y = (att @ v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    return _linear(params, f"{name}.c_proj", y, cfg)


def _mlp(params, name, x, cfg):
    h = _linear(params, f"{name}.c_fc", x, cfg)  # (B, T, 4C)
    h = F.gelu(h) if cfg.activation == "gelu" else F.relu(h)
    return _linear(params, f"{name}.c_proj", h, cfg)


def forward(params: dict[str, torch.Tensor], idx: torch.Tensor, cfg: NanoGPTConfig) -> torch.Tensor:
    """Logits (B, T, vocab) for token ids idx (B, T), T <= block_size."""
    B, T = idx.shape
    pos = torch.arange(T, device=idx.device)
    x = F.embedding(idx, params["transformer.wte.weight"]) + F.embedding(pos, params["transformer.wpe.weight"])
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        x = x + _attention(params, f"{p}.attn", _norm(params, f"{p}.ln_1", x), cfg)  # (B, T, C)
        x = x + _mlp(params, f"{p}.mlp", _norm(params, f"{p}.ln_2", x), cfg)  # (B, T, C)
    x = _norm(params, "transformer.ln_f", x)
    head = params["transformer.wte.weight"] if cfg.tie_embeddings else params["lm_head.weight"]
    return _matmul_weight(x, head, cfg)  # (B, T, vocab)
