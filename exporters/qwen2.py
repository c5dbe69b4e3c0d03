"""Qwen2 as pure functions over a params dict keyed by the HF parameter names.

Covers the Qwen2 family (Qwen2, Qwen2.5, any config.json with
model_type "qwen2"): grouped-query attention, RMSNorm, SwiGLU MLP, biases on
q/k/v (none on o_proj or the MLP), tied or untied lm_head, rotary positions
with the config's rope_theta.

Public API (stable; the GRPO/DPO recipes build on it):

    cfg = config_from_hf(json.load(open("config.json")))   # or make_config("qwen2.5-0.5b")
    shapes = param_shapes(cfg)          # {name: shape} in HF named_parameters() order
    params = init_params(cfg, seed=0)   # seeded random weights (HF's init scheme)
    logits = forward(params, input_ids, position_ids, cfg, attention_mask=None)   # (B, T, V)
    logits, cache_k, cache_v = forward_cached(params, input_ids, position_ids, cache_k, cache_v, cfg)
    logp = token_logprobs(logits, input_ids)                # (B, T-1) log p(x[t+1] | x[:t+1])

Parameter order is HF's `named_parameters()` with the tied lm_head once:
    model.embed_tokens.weight,
    model.layers.{i}.self_attn.{q,k,v}_proj.{weight,bias}, self_attn.o_proj.weight,
    model.layers.{i}.mlp.{gate,up,down}_proj.weight,
    model.layers.{i}.{input,post_attention}_layernorm.weight,
    model.norm.weight, lm_head.weight (only when untied)
(for 0.5B: 24 * 12 + 2 = 290 tensors). Linear weights are (out_features, in_features).

Positions are inputs: RoPE is computed from `position_ids` (no buffers), and
causal masking is derived from positions inside the function.

KV cache layout (forward_cached): two tensors, keys and values, each

    (n_layer, batch, n_kv_head, max_seq, head_dim)   float32

Slot s of a row holds the key/value of that row's token at position s. A call
with tokens at positions p writes their keys/values into slots p (a
`where`-mask update, not index_copy_, which IREE cannot compile), then each
token attends to slots 0..p of its row — including its own, written in the
same call. A token with a negative position is padding: it writes nothing and
its output is meaningless. Positions within a row must be distinct. So a batch
of prompts is left-padded with position -1, and every row's last column is
its last real token.

Precision: parameters may be float32 or bfloat16. Linear layers run in the
weight dtype (activations cast to it); the residual stream, RMSNorm, RoPE,
softmax and logits are float32 (for float32 weights this is HF's fp32 math).
A training module may ask for bf16 products over float32 weights instead
(`compute_dtype`: mixed precision, as torch's CPU autocast).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from pcpc.config import from_dict
from pcpc.errors import UserError
from pcpc.exporters.precision import mixed_linear


@dataclass(frozen=True)
class Qwen2Config:
    """Architecture of a Qwen2-family model (the fields of HF's config.json that matter)."""

    vocab_size: int = 151936
    """Token ids (rows of embed_tokens and lm_head)."""
    hidden_size: int = 896
    """Residual stream width."""
    intermediate_size: int = 4864
    """SwiGLU MLP inner width."""
    num_hidden_layers: int = 24
    """Decoder layers."""
    num_attention_heads: int = 14
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    head_dim: Optional[int] = None
    """Per-head width; None means hidden_size // num_attention_heads."""
    max_position_embeddings: int = 32768
    """Longest position the model was trained for (bounds the KV-cache capacity)."""
    rope_theta: float = 1000000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    tie_word_embeddings: bool = True
    """lm_head shares embed_tokens.weight (no separate lm_head.weight parameter)."""

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "max_position_embeddings"):
            if getattr(self, name) < 1:
                raise ValueError(f"qwen2 config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"qwen2 config: num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"qwen2 config: hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}) when head_dim is not given"
            )
        if self.dim_head % 2:
            raise ValueError(f"qwen2 config: head_dim must be even for RoPE, got {self.dim_head}")
        if self.rope_theta <= 0 or self.rms_norm_eps <= 0:
            raise ValueError("qwen2 config: rope_theta and rms_norm_eps must be > 0")

    @property
    def dim_head(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return asdict(self)


# Qwen2.5-0.5B-Instruct's public config.json (the arch fields).
PRESETS = {
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    # Tiny shapes for tests and smoke builds.
    "qwen2-tiny": dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    ),
    "qwen2-tiny-untied": dict(
        vocab_size=384, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
        num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=512,
        rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
    ),
}


def make_config(preset: str, **overrides) -> Qwen2Config:
    """Preset plus overrides; unknown keys and wrong types are errors naming the key."""
    if preset not in PRESETS:
        raise UserError(f"unknown qwen2 preset {preset!r}; valid: {', '.join(PRESETS)}")
    return from_dict(Qwen2Config, {**PRESETS[preset], **overrides}, where=f"{preset} config")


def config_from_hf(hf: dict, where: str = "config.json") -> Qwen2Config:
    """Qwen2Config from a HF config.json dict (transformers 4.x or 5.x layout).

    Fields outside the architecture (torch_dtype, bos/eos ids, ...) are
    ignored; features this exporter does not implement (sliding-window
    attention, RoPE scaling, another activation) are errors.
    """
    if not isinstance(hf, dict):
        raise UserError(f"{where}: expected a JSON object")
    model_type = hf.get("model_type")
    if model_type != "qwen2":
        raise UserError(f"{where}: model_type must be 'qwen2' (a Qwen2-family model), got {model_type!r}")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise UserError(f"{where}: hidden_act must be 'silu', got {act!r}")
    if hf.get("use_sliding_window", False):
        raise UserError(f"{where}: use_sliding_window=true is not supported (sliding-window attention)")
    rope = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    for src in (rope, scaling):
        kind = src.get("rope_type", src.get("type", "default"))
        if kind != "default":
            raise UserError(f"{where}: rope type {kind!r} is not supported (only default RoPE)")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    fields = {
        "vocab_size": hf.get("vocab_size"),
        "hidden_size": hf.get("hidden_size"),
        "intermediate_size": hf.get("intermediate_size"),
        "num_hidden_layers": hf.get("num_hidden_layers"),
        "num_attention_heads": hf.get("num_attention_heads"),
        "num_key_value_heads": hf.get("num_key_value_heads", hf.get("num_attention_heads")),
        "head_dim": hf.get("head_dim"),
        "max_position_embeddings": hf.get("max_position_embeddings", 32768),
        "rope_theta": theta,
        "rms_norm_eps": hf.get("rms_norm_eps", 1e-6),
        "tie_word_embeddings": hf.get("tie_word_embeddings", False),
    }
    missing = [k for k, v in fields.items() if v is None and k != "head_dim"]
    if missing:
        raise UserError(f"{where}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    return from_dict(Qwen2Config, fields, where=where)


def param_shapes(cfg: Qwen2Config) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape in HF named_parameters() order (tied lm_head once)."""
    C, V, F_ = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size
    q_out = cfg.num_attention_heads * cfg.dim_head
    kv_out = cfg.num_key_value_heads * cfg.dim_head
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, C)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes[f"{p}.self_attn.q_proj.weight"] = (q_out, C)
        shapes[f"{p}.self_attn.q_proj.bias"] = (q_out,)
        shapes[f"{p}.self_attn.k_proj.weight"] = (kv_out, C)
        shapes[f"{p}.self_attn.k_proj.bias"] = (kv_out,)
        shapes[f"{p}.self_attn.v_proj.weight"] = (kv_out, C)
        shapes[f"{p}.self_attn.v_proj.bias"] = (kv_out,)
        shapes[f"{p}.self_attn.o_proj.weight"] = (C, q_out)
        shapes[f"{p}.mlp.gate_proj.weight"] = (F_, C)
        shapes[f"{p}.mlp.up_proj.weight"] = (F_, C)
        shapes[f"{p}.mlp.down_proj.weight"] = (C, F_)
        shapes[f"{p}.input_layernorm.weight"] = (C,)
        shapes[f"{p}.post_attention_layernorm.weight"] = (C,)
    shapes["model.norm.weight"] = (C,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


def num_params(cfg: Qwen2Config) -> int:
    return sum(math.prod(s) for s in param_shapes(cfg).values())


def init_params(cfg: Qwen2Config, seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Seeded random weights with HF's scheme: Linear/Embedding ~ N(0, 0.02), biases 0, norms 1."""
    gen = torch.Generator().manual_seed(seed)
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith(".bias"):
            t = torch.zeros(shape)
        elif "norm" in name:
            t = torch.ones(shape)
        else:
            t = torch.randn(shape, generator=gen) * 0.02
        params[name] = t.to(dtype)
    return params


def cache_shape(cfg: Qwen2Config, batch: int, max_seq: int) -> tuple[int, ...]:
    """Shape of each of the two KV-cache tensors (keys, values)."""
    return (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_seq, cfg.dim_head)


# ---------------------------------------------------------------------------
# layers


def _linear(params, name, x, bias=True, compute_dtype=None):
    """x (..., in) @ weight.T + bias, as a 2-D matmul on a contiguous input.

    A non-contiguous 3-D input (attention output after its transpose) would
    trace to a batch matmul whose weight IREE transposes in memory on every
    call; flattening to (rows, in) keeps it a plain matmul reading the weight once.
    """
    w = params[f"{name}.weight"]
    b = params.get(f"{name}.bias") if bias else None
    return _matmul(x.reshape(-1, x.shape[-1]), w, b, compute_dtype).view(*x.shape[:-1], w.shape[0])  # (..., out)


def _matmul(rows, w, b, compute_dtype=None):
    """rows (N, in, float32) @ w.T (+ b), float32. The product runs in the weight's dtype, or in `compute_dtype`
    over float32 weights (exporters/precision.py: torch's CPU autocast, the bias added in fp32 after)."""
    if compute_dtype is None or compute_dtype == w.dtype:
        return F.linear(rows.to(w.dtype), w, b).float()
    return mixed_linear(rows, w, b, compute_dtype)


def _rms_norm(params, name, x, eps):
    var = x.pow(2).mean(-1, keepdim=True)
    return params[f"{name}.weight"].float() * (x * torch.rsqrt(var + eps))


def _rope(position_ids, head_dim, theta):
    """cos, sin (B, 1, T, head_dim) for integer positions (B, T), as HF computes them in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device) / head_dim))
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
    return emb.cos()[:, None], emb.sin()[:, None]


def _rotate(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _qkv(params, p, x, rope, cfg, linear=_linear):
    """q (B, nh, T, hd), k and v (B, nkv, T, hd), RoPE (cos, sin) applied to q and k."""
    B, T, _ = x.shape
    hd = cfg.dim_head
    q = linear(params, f"{p}.q_proj", x).view(B, T, cfg.num_attention_heads, hd).transpose(1, 2)
    k = linear(params, f"{p}.k_proj", x).view(B, T, cfg.num_key_value_heads, hd).transpose(1, 2)
    v = linear(params, f"{p}.v_proj", x).view(B, T, cfg.num_key_value_heads, hd).transpose(1, 2)
    cos, sin = rope
    return _rotate(q, cos, sin), _rotate(k, cos, sin), v


def _attend(q, k, v, visible, cfg):
    """Grouped-query attention in math form.

    q (B, nh, T, hd); k, v (B, nkv, S, hd); visible (B, T, S) bool -> (B, T, nh*hd).
    Query heads are grouped per KV head by a reshape, so K and V are never
    repeated in memory. Masked scores get the dtype minimum (not -inf), so a
    row with nothing visible (padding) gives finite garbage instead of NaN.
    """
    B, nh, T, hd = q.shape
    nkv, S = k.shape[1], k.shape[2]
    g = nh // nkv
    qg = q.reshape(B, nkv, g * T, hd)  # (B, nkv, g*T, hd): heads of one group are contiguous
    att = (qg @ k.transpose(-2, -1)) * (1.0 / math.sqrt(hd))  # (B, nkv, g*T, S)
    att = att.view(B, nkv, g, T, S)
    att = att.masked_fill(~visible[:, None, None], torch.finfo(att.dtype).min).softmax(dim=-1)
    y = att.view(B, nkv, g * T, S) @ v  # (B, nkv, g*T, hd)
    return y.view(B, nh, T, hd).transpose(1, 2).reshape(B, T, nh * hd)


def _mlp(params, p, x, linear=_linear):
    return linear(params, f"{p}.down_proj", F.silu(linear(params, f"{p}.gate_proj", x)) * linear(params, f"{p}.up_proj", x))


def _embed(params, input_ids):
    return F.embedding(input_ids, params["model.embed_tokens.weight"]).float()  # (B, T, C)


def _head(params, x, cfg, compute_dtype=None):
    x = _rms_norm(params, "model.norm", x, cfg.rms_norm_eps)
    # a tied model's head is the embedding, unless the caller hands it as lm_head.weight
    w = params["lm_head.weight"] if "lm_head.weight" in params or not cfg.tie_word_embeddings \
        else params["model.embed_tokens.weight"]
    return _matmul(x.reshape(-1, x.shape[-1]), w, None, compute_dtype).view(*x.shape[:-1], w.shape[0])  # (B, T, V)


def _cache_slots(position_ids, S):
    """sel (B, T, S) float: token t goes to slot s; written (B, 1, S, 1) bool: slot s gets a token;
    real (B, 1, T, 1) bool: the token has a position >= 0 (padding is zeroed before the scatter, so
    even a non-finite padding value cannot leak into a slot through 0 * x)."""
    slots = torch.arange(S, device=position_ids.device)
    sel = position_ids[:, :, None] == slots  # (B, T, S); negative positions match no slot
    return sel.float(), sel.any(dim=1)[:, None, :, None], (position_ids >= 0)[:, None, :, None]


def _write_cache(cache, new, slots):
    """cache (B, nkv, S, hd) with new (B, nkv, T, hd) written at the slots of `_cache_slots`.

    A where-mask update (index_copy_ does not compile): slot s of row b takes
    the token whose position is s; slots without a token keep their value.
    """
    sel, written, real = slots
    if new.shape[2] == 1:
        scattered = new  # (B, nkv, 1, hd) broadcasts over S
    else:
        new = torch.where(real, new, torch.zeros((), dtype=new.dtype))
        scattered = torch.einsum("bts,bhtd->bhsd", sel, new)  # (B, nkv, S, hd)
    return torch.where(written, scattered, cache)


# ---------------------------------------------------------------------------
# entry points


def forward(
    params: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    position_ids: torch.Tensor | None,
    cfg: Qwen2Config,
    attention_mask: torch.Tensor | None = None,
    linear=_linear,
    head_rows: torch.Tensor | None = None,
    shared_prefix: tuple[int, int] | None = None,
    compute_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Logits (B, T, V) float32 for a full sequence (no cache; training and scoring).

    input_ids (B, T) int64. position_ids (B, T) int64, or None for
    `cumsum(attention_mask) - 1` (0..T-1 without a mask; left padding gets
    position 0 as HF's generate does). attention_mask (B, T), 1 = real token,
    0 = padding; token i attends to tokens j <= i whose mask is 1.
    linear(params, name, x, bias=True) is every q/k/v/o and MLP projection (an adapter's: exporters/peft.py).
    head_rows (B, R, S) float, one-hot rows over the first S <= T positions: the head runs on those R
    positions of each row only, and the logits are (B, R, V) (an RL learner scores completion tokens:
    autodiff/grpo.py `completion_window`).
    shared_prefix (G, P): the rows come in groups of G consecutive rows whose first P tokens are the same (a
    GRPO group: one prompt's completions). Those P positions are computed once per group, not G times, and
    the group's rows attend to them: the same logits for 1/G of the prefix's work. The caller guarantees the
    rows agree; no position_ids or attention_mask with it.
    compute_dtype (torch.bfloat16): the LM head's product in that dtype (see `_matmul`); the projections are
    `linear`'s (qwen2._linear takes the same argument).
    """
    B, T = input_ids.shape
    if shared_prefix is not None:
        if position_ids is not None or attention_mask is not None:
            raise ValueError("forward: shared_prefix takes no position_ids or attention_mask")
        x = _shared_prefix_hidden(params, input_ids, cfg, linear, *shared_prefix)
    else:
        idx = torch.arange(T, device=input_ids.device)
        visible = (idx[None, :] <= idx[:, None])[None].expand(B, T, T)  # (B, T, T)
        if attention_mask is not None:
            keep = attention_mask.to(torch.bool)
            visible = visible & keep[:, None, :]
            if position_ids is None:
                position_ids = (keep.long().cumsum(-1) - 1).clamp(min=0)
        if position_ids is None:
            position_ids = idx[None].expand(B, T)
        rope = _rope(position_ids, cfg.dim_head, cfg.rope_theta)
        x = _layers(params, _embed(params, input_ids), rope, lambda q, k, v: _attend(q, k, v, visible, cfg), cfg,
                    linear)
    if head_rows is not None:
        x = torch.bmm(head_rows, x[:, :head_rows.shape[2]])  # (B, R, C): each selected row exactly
    return _head(params, x, cfg, compute_dtype)


def _layers(params, x, rope, attend, cfg, linear):
    """The transformer blocks on hidden states x (B, T, C); attend(q, k, v) -> (B, T, nh*hd)."""
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(params, f"{p}.input_layernorm", x, cfg.rms_norm_eps)
        q, k, v = _qkv(params, f"{p}.self_attn", h, rope, cfg, linear)
        x = x + linear(params, f"{p}.self_attn.o_proj", attend(q, k, v), bias=False)
        x = x + _mlp(params, f"{p}.mlp", _rms_norm(params, f"{p}.post_attention_layernorm", x, cfg.rms_norm_eps),
                     linear)
    return x


def _shared_prefix_hidden(params, input_ids, cfg, linear, group: int, prefix: int):
    """Final hidden states (B, T, C) of rows whose groups of `group` share their first `prefix` tokens.

    The distinct positions are one row of R = N*P + B*S tokens (N = B/G groups, P = prefix, S = T - P):
    each group's prefix once, then every row's suffix. Norms, projections and the MLP are per token, so they
    run on those R rows as they are; attention splits them: a prefix attends causally within itself, a
    row's suffix to its group's prefix and causally to itself.
    """
    B, T = input_ids.shape
    G, P = group, prefix
    if G < 1 or B % G or not 1 <= P < T:
        raise ValueError(f"forward: shared_prefix ({G}, {P}) needs G dividing the batch ({B}) and 1 <= P < T ({T})")
    N, S = B // G, T - P
    dev = input_ids.device
    ids = torch.cat([input_ids[::G, :P].reshape(-1), input_ids[:, P:].reshape(-1)])[None]  # (1, R)
    pos = torch.cat([torch.arange(P, device=dev).repeat(N), torch.arange(P, T, device=dev).repeat(B)])[None]
    rope = _rope(pos, cfg.dim_head, cfg.rope_theta)  # (1, 1, R, hd)
    tri = torch.arange(P, device=dev)
    own = (tri[None, :] <= tri[:, None])[None].expand(N, P, P)
    sfx = torch.arange(T, device=dev)
    seen = (sfx[None, :] <= sfx[P:, None])[None].expand(B, S, T)  # suffix token s sees positions <= P + s

    def fan(t):  # (N, ...) -> (B, ...): each group's tensor for each of its rows
        return t[:, None].expand(N, G, *t.shape[1:]).reshape(B, *t.shape[1:])

    def split(t, rows, length):  # (1, h, R, hd) -> the prefix part (N, h, P, hd) or the suffix part (B, h, S, hd)
        part = t[0, :, :N * P] if rows == N else t[0, :, N * P:]
        return part.reshape(t.shape[1], rows, length, t.shape[3]).transpose(0, 1)

    def attend(q, k, v):
        kp, vp = split(k, N, P), split(v, N, P)
        yp = _attend(split(q, N, P), kp, vp, own, cfg)  # (N, P, nh*hd)
        ys = _attend(split(q, B, S), torch.cat([fan(kp), split(k, B, S)], 2), torch.cat([fan(vp), split(v, B, S)], 2),
                     seen, cfg)  # (B, S, nh*hd)
        return torch.cat([yp.reshape(N * P, -1), ys.reshape(B * S, -1)])[None]  # (1, R, nh*hd)

    x = _layers(params, _embed(params, ids), rope, attend, cfg, linear)[0]  # (R, C)
    return torch.cat([fan(x[:N * P].view(N, P, -1)), x[N * P:].view(B, S, -1)], 1)  # (B, T, C)


def forward_cached(
    params: dict[str, torch.Tensor],
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    cfg: Qwen2Config,
    last_only: bool = False,
    linear=_linear,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One prefill chunk or decode step against the KV cache (layout in the module docstring).

    input_ids, position_ids (B, T) int64; cache_k, cache_v (L, B, nkv, S, hd).
    Returns logits (B, T, V) — or (B, V) of the last column when last_only —
    and the updated caches. Token at position p sees cache slots 0..p of its row.
    """
    S = cache_k.shape[3]
    slots = torch.arange(S, device=input_ids.device)
    visible = slots[None, None, :] <= position_ids[:, :, None]  # (B, T, S)
    rope = _rope(position_ids, cfg.dim_head, cfg.rope_theta)
    slots = _cache_slots(position_ids, S)
    x = _embed(params, input_ids)
    new_k, new_v = [], []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}"
        h = _rms_norm(params, f"{p}.input_layernorm", x, cfg.rms_norm_eps)
        q, k, v = _qkv(params, f"{p}.self_attn", h, rope, cfg, linear)
        ck = _write_cache(cache_k[i], k, slots)  # (B, nkv, S, hd)
        cv = _write_cache(cache_v[i], v, slots)
        new_k.append(ck)
        new_v.append(cv)
        x = x + linear(params, f"{p}.self_attn.o_proj", _attend(q, ck, cv, visible, cfg), bias=False)
        x = x + _mlp(params, f"{p}.mlp", _rms_norm(params, f"{p}.post_attention_layernorm", x, cfg.rms_norm_eps),
                     linear)
    if last_only:
        x = x[:, -1:]
    logits = _head(params, x, cfg)
    return (logits[:, -1] if last_only else logits), torch.stack(new_k), torch.stack(new_v)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | prefix) for t < T-1: (B, T-1) float32.

    Picks the target by comparing with arange(V) (no gather / one_hot), which
    traces and differentiates cleanly.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    vocab = torch.arange(logits.shape[-1], device=logits.device)
    picked = input_ids[:, 1:, None] == vocab  # (B, T-1, V)
    return (logp * picked).sum(-1)
