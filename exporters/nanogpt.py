"""nanoGPT as pure functions over a params dict, with the variants of the ablations users run.

No module state: `forward(params, idx, cfg)` reads every weight from `params`,
so the same function can be traced for inference, differentiated by
pcpc.autodiff and lowered with all weights as function inputs.

Variants (NanoGPTConfig fields; the defaults are today's nanoGPT, bit for bit):

    mlp        relu | gelu: c_fc (4C) -> act -> c_proj, as nanoGPT
               swiglu: w2(silu(w1 x) * w3 x), hidden = 8/3 C rounded up to multiple_of (llama)
    norm       layernorm | rmsnorm (x / rms(x) * weight, eps norm_eps; weight only), every block
               norm and the final one
    positions  learned (a wpe table) | rope (rotary on q and k from the positions arange(T), theta
               rope_theta; no wpe table)
    moe        null (dense MLP) | MoEConfig: the MLP of every `every`-th block becomes num_experts
               experts of the same kind and a linear router (top_k experts per token)

Parameter names and order follow nanoGPT's `named_parameters()`:
    transformer.wte.weight, transformer.wpe.weight (learned positions only),
    transformer.h.{i}.{ln_1, attn.c_attn, attn.c_proj, ln_2}.{weight,bias},
    transformer.h.{i}.mlp.{c_fc, c_proj} | mlp.{w1, w2, w3}   (dense MLP, by `mlp`)
    transformer.h.{i}.mlp.router.weight (E, C) and mlp.experts.{c_fc, c_proj | w1, w2, w3}.{weight,bias}
        with a leading expert axis E                           (MoE blocks)
    transformer.ln_f.{weight,bias}, lm_head.weight (only when untied)
Linear weights are stored (out_features, in_features), as nn.Linear does;
norms have a bias only with bias=True and layernorm.

Initialisation (seeded, as nanoGPT): every Linear and Embedding weight
~ N(0, 0.02), routers and experts included; the residual projections
(attn.c_proj, mlp.c_proj, mlp.w2) use std 0.02 / sqrt(2 * n_layer); biases
zero; norm weights 1.

The MoE layer has static shapes (it lowers through iree-turbine like the rest):
every expert is computed for every token as one batched contraction, and the
outputs are combined with weights that are zero outside each token's top_k
(renormalised over the top_k, as Mixtral). The top_k are picked by k rounds
of argmax, compared against arange (no topk/one_hot: they break make_fx or
lower badly). Its losses, averaged over the MoE blocks:
    aux (Switch)  E * sum_i f_i * P_i, f_i the fraction of the N*top_k token slots routed to
                  expert i, P_i its mean router probability: 1 at perfect balance
    z (ST-MoE)    mean over tokens of logsumexp(router logits)^2
`forward_with_aux` returns them and each MoE block's expert loads (the f_i).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from pcpc.config import check_at_least, check_choice, from_dict
from pcpc.errors import UserError
from pcpc.exporters.precision import COMPUTE_DTYPES, mixed_linear

MLPS = ("relu", "gelu", "swiglu")
NORMS = ("layernorm", "rmsnorm")
POSITIONS = ("learned", "rope")


@dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts MLP (the `moe` field of NanoGPTConfig)."""

    num_experts: int = 4
    """Experts per MoE block (each an MLP of the model's `mlp` kind)."""
    top_k: int = 2
    """Experts each token is sent to; their outputs are combined with the renormalised router weights."""
    every: int = 1
    """An MoE MLP in every this-many-th block (blocks every-1, 2*every-1, ...); 1: every block."""
    aux_loss_coef: float = 0.01
    """Weight of the load-balancing loss (Switch Transformer: alpha * N * sum f_i P_i; 1 at balance)."""
    z_loss_coef: float = 0.001
    """Weight of the router z-loss (ST-MoE: mean logsumexp(logits)^2)."""
    capacity_factor: float | None = None
    """null: every expert computes every token, weighted zero outside its top_k (exact, no token is
    dropped). A number: capacity dispatch, each expert computes only the tokens routed to it, at most
    ceil(capacity_factor * tokens * top_k / num_experts) of them per call, in token order; a token past an
    expert's capacity skips that expert (Switch Transformer). num_experts / top_k never drops."""

    def __post_init__(self):
        check_at_least(self, 1, "num_experts", "top_k", "every")
        check_at_least(self, 0.0, "aux_loss_coef", "z_loss_coef")
        if self.capacity_factor is not None and not self.capacity_factor > 0:
            raise ValueError(f"capacity_factor must be > 0 or null, got {self.capacity_factor}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")


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
    mlp: str = "relu"
    """MLP: relu | gelu (exact erf form, as nn.GELU): 4C hidden; swiglu: gated SiLU, ~8/3 C hidden."""
    multiple_of: int = 32
    """swiglu: the hidden width int(2 * 4C / 3) is rounded up to a multiple of this (llama)."""
    norm: str = "layernorm"
    """Normalisation of every block and the final one: layernorm | rmsnorm."""
    norm_eps: float = 1e-5
    """Epsilon of the norms."""
    positions: str = "learned"
    """Position encoding: learned (a wpe table of block_size rows) | rope (rotary q and k, no table)."""
    rope_theta: float = 10000.0
    """rope: the base of the rotary frequencies."""
    moe: MoEConfig | None = None
    """null: a dense MLP in every block; an object (MoEConfig): Mixture-of-Experts MLPs."""
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
        for name in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "multiple_of"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        check_choice(self, "mlp", MLPS)
        check_choice(self, "norm", NORMS)
        check_choice(self, "positions", POSITIONS)
        check_choice(self, "compute_dtype", tuple(COMPUTE_DTYPES))
        if not self.norm_eps > 0 or not self.rope_theta > 0:
            raise ValueError(f"norm_eps and rope_theta must be > 0, got {self.norm_eps}, {self.rope_theta}")
        if self.positions == "rope" and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"positions \"rope\" rotates pairs: the head size n_embd / n_head "
                             f"({self.n_embd // self.n_head}) must be even")
        if self.moe is not None and self.moe.every > self.n_layer:
            raise ValueError(f"moe.every ({self.moe.every}) is more than n_layer ({self.n_layer}): no block "
                             f"would have experts")

    @property
    def hidden(self) -> int:
        """Width of the MLP's hidden layer."""
        if self.mlp != "swiglu":
            return 4 * self.n_embd
        h = int(2 * 4 * self.n_embd / 3)
        return self.multiple_of * -(-h // self.multiple_of)

    def is_moe(self, layer: int) -> bool:
        """True if block `layer` has a Mixture-of-Experts MLP."""
        return self.moe is not None and (layer + 1) % self.moe.every == 0

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.n_layer) if self.is_moe(i)]

    def to_dict(self) -> dict:
        return asdict(self)


_MINGPT = dict(block_size=128, vocab_size=50304, mlp="gelu", bias=True, tie_embeddings=False)
_GPT2 = dict(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768, mlp="gelu", bias=True)

PRESETS = {
    "nanogpt-small": dict(block_size=32, vocab_size=65, n_layer=2, n_head=8, n_embd=64),
    "nanogpt-medium": dict(block_size=128, vocab_size=256, n_layer=4, n_head=8, n_embd=256),
    # GPT-2 124M as build-nanogpt trains it (vocab padded to 50304); and its MoE form, as the reference's
    # GPTConfig(use_moe=True, num_experts=2) with top-2 routing.
    "gpt2-124m": _GPT2,
    "gpt2-124m-moe": {**_GPT2, "moe": {"num_experts": 2, "top_k": 2}},
    # minGPT's model_type shapes (GELU, biases, an untied head; vocab and block come from the data).
    "gpt-nano": {**_MINGPT, "n_layer": 3, "n_head": 3, "n_embd": 48},
    "gpt-micro": {**_MINGPT, "n_layer": 4, "n_head": 4, "n_embd": 128},
    "gpt-mini": {**_MINGPT, "n_layer": 6, "n_head": 6, "n_embd": 192},
}


def make_config(preset: str, where: str | None = None, **overrides) -> NanoGPTConfig:
    """Preset plus overrides; unknown keys and wrong types are errors naming the key (under `where`)."""
    if preset not in PRESETS:
        raise UserError(f"{where + ': ' if where else ''}unknown nanogpt preset {preset!r}; valid: "
                        f"{', '.join(PRESETS)}")
    return from_dict(NanoGPTConfig, {**PRESETS[preset], **overrides}, where=where or f"{preset} config")


def _mlp_shapes(cfg: NanoGPTConfig, experts: int | None) -> dict[str, tuple[int, ...]]:
    """The MLP's weights (relative names), with a leading expert axis for an MoE block."""
    C, H = cfg.n_embd, cfg.hidden
    lead = () if experts is None else (experts,)
    mats = ({"w1": (H, C), "w2": (C, H), "w3": (H, C)} if cfg.mlp == "swiglu"
            else {"c_fc": (H, C), "c_proj": (C, H)})
    out = {}
    for name, (n_out, n_in) in mats.items():
        out[f"{name}.weight"] = (*lead, n_out, n_in)
        if cfg.bias:
            out[f"{name}.bias"] = (*lead, n_out)
    return out


def param_shapes(cfg: NanoGPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's shape, in the documented (named_parameters) order."""
    C, V, T = cfg.n_embd, cfg.vocab_size, cfg.block_size
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (V, C)}
    if cfg.positions == "learned":
        shapes["transformer.wpe.weight"] = (T, C)

    def linear(name, n_in, n_out):
        shapes[f"{name}.weight"] = (n_out, n_in)
        if cfg.bias:
            shapes[f"{name}.bias"] = (n_out,)

    def norm(name):
        shapes[f"{name}.weight"] = (C,)
        if cfg.bias and cfg.norm == "layernorm":
            shapes[f"{name}.bias"] = (C,)

    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1")
        linear(f"{p}.attn.c_attn", C, 3 * C)
        linear(f"{p}.attn.c_proj", C, C)
        norm(f"{p}.ln_2")
        if cfg.is_moe(i):
            shapes[f"{p}.mlp.router.weight"] = (cfg.moe.num_experts, C)
            shapes.update({f"{p}.mlp.experts.{k}": v for k, v in _mlp_shapes(cfg, cfg.moe.num_experts).items()})
        else:
            shapes.update({f"{p}.mlp.{k}": v for k, v in _mlp_shapes(cfg, None).items()})
    norm("transformer.ln_f")
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (V, C)
    return shapes


RESIDUAL_PROJECTIONS = ("attn.c_proj.weight", "mlp.c_proj.weight", "mlp.w2.weight", "experts.c_proj.weight",
                        "experts.w2.weight")
"""Weights that write into the residual stream: initialised with std 0.02 / sqrt(2 * n_layer)."""


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
            std = proj_std if name.endswith(RESIDUAL_PROJECTIONS) else 0.02
            params[name] = torch.randn(shape, generator=gen) * std
    return params


def _matmul_weight(x, weight, cfg, bias=None):
    """x @ weight.T (+ bias) with the matmul in cfg.compute_dtype; the result in x's dtype."""
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    if dtype == x.dtype:
        return F.linear(x, weight, bias)
    return mixed_linear(x, weight, bias, dtype)


def _linear(params, name, x, cfg):
    return _matmul_weight(x, params[f"{name}.weight"], cfg, params.get(f"{name}.bias"))


def _norm(params, name, x, cfg):
    weight = params[f"{name}.weight"]
    if cfg.norm == "rmsnorm":
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * weight
    return F.layer_norm(x, (x.shape[-1],), weight, params.get(f"{name}.bias"), cfg.norm_eps)


def rope_tables(T: int, hs: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin), each (T, hs): position t's angles t * theta^(-2i/hs), i < hs/2, laid out twice (the
    rotate-half layout of GPT-NeoX and HF Llama). Computed from arange: no state, no buffer."""
    inv = theta ** (-torch.arange(0, hs, 2, device=device, dtype=torch.float32) / hs)  # (hs/2,)
    angles = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None, :]  # (T, hs/2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, hs)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x (B, nh, T, hs): x * cos + rotate_half(x) * sin."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)  # (B, nh, T, hs)
    return x * cos + rotated * sin


ATTENTION_BLOCK_ROWS = 64
"""Query rows per block of `causal_attention`: T // 64 blocks, at most ATTENTION_MAX_BLOCKS."""
ATTENTION_MAX_BLOCKS = 4


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(hs), causal) v over (B, nh, T, hs), as plain tensor ops that exports trace (IREE
    cannot compile torch's fused CPU kernel, F.scaled_dot_product_attention, inside a training graph).

    It skips most masked scores, as a flash kernel does: the queries go in blocks of 64 rows (at most
    ATTENTION_MAX_BLOCKS blocks), and the block of rows [lo, hi) scores only the keys [0, hi), about
    (1 + 1/n) / 2 of the T x T products and score passes for n blocks. Forward and backward of the attention
    alone, compiled, one IREE worker (bench/NOTES.md): T = 128 (nanogpt-medium, 2 blocks) 33 against 46 ms in
    one piece; T = 256 (4 blocks) 23 against 45 ms. Below 128 tokens it is one piece. Eager runs it too, so
    both sides of the benches compute the same thing."""
    T, hs = q.shape[-2], q.shape[-1]
    n = max(1, min(ATTENTION_MAX_BLOCKS, T // ATTENTION_BLOCK_ROWS))
    outs = []
    for i in range(n):
        lo, hi = i * T // n, (i + 1) * T // n
        qi, ki, vi = (q, k, v) if n == 1 else (q[..., lo:hi, :], k[..., :hi, :], v[..., :hi, :])
        att = (qi @ ki.transpose(-2, -1)) * (1.0 / math.sqrt(hs))  # (B, nh, rows, hi)
        # The mask comes from arange, not a buffer.
        visible = torch.arange(lo, hi, device=q.device)[:, None] >= torch.arange(hi, device=q.device)[None, :]
        outs.append(att.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ vi)  # (B, nh, rows, hs)
    return outs[0] if n == 1 else torch.cat(outs, dim=-2)


def _attention(params, name, x, cfg, lin):
    B, T, C = x.shape
    nh, hs = cfg.n_head, C // cfg.n_head
    q, k, v = lin(params, f"{name}.c_attn", x).split(C, dim=2)
    q = q.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    k = k.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    v = v.view(B, T, nh, hs).transpose(1, 2)  # (B, nh, T, hs)
    if cfg.positions == "rope":
        cos, sin = rope_tables(T, hs, cfg.rope_theta, x.device)  # (T, hs) each
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    y = causal_attention(q, k, v).transpose(1, 2).reshape(B, T, C)  # (B, T, C)
    return lin(params, f"{name}.c_proj", y)


def _act(h, cfg):
    return F.gelu(h) if cfg.mlp == "gelu" else F.relu(h)


def _mlp(params, name, x, cfg, lin):
    if cfg.mlp == "swiglu":
        gate, up = lin(params, f"{name}.w1", x), lin(params, f"{name}.w3", x)  # (B, T, H)
        return lin(params, f"{name}.w2", F.silu(gate) * up)
    h = _act(lin(params, f"{name}.c_fc", x), cfg)  # (B, T, 4C)
    return lin(params, f"{name}.c_proj", h)


def _experts_linear(params, name, x, cfg):
    """Every expert's Linear at once: x (E, N, in) -> (E, N, out), weight (E, out, in)."""
    dtype = COMPUTE_DTYPES[cfg.compute_dtype]
    w = params[f"{name}.weight"]
    y = torch.matmul(x.to(dtype), w.to(dtype).transpose(1, 2)).to(x.dtype)  # (E, N, out)
    bias = params.get(f"{name}.bias")
    return y if bias is None else y + bias[:, None, :]


def _experts(params, name, xe, cfg):
    """Every expert's MLP on its own rows: xe (E, rows, C) -> (E, rows, C)."""
    if cfg.mlp == "swiglu":
        h = F.silu(_experts_linear(params, f"{name}.w1", xe, cfg)) * _experts_linear(params, f"{name}.w3", xe, cfg)
        return _experts_linear(params, f"{name}.w2", h, cfg)
    return _experts_linear(params, f"{name}.c_proj", _act(_experts_linear(params, f"{name}.c_fc", xe, cfg), cfg), cfg)


def _all_experts(params, name, xf, gates, cfg):
    """Every expert on every token as two plain matmuls: the experts' input layers side by side,
    (N, C) @ (C, E*H), the gates folded into the hidden activations, then (N, E*H) @ (E*H, C) sums the
    weighted experts. xf (N, C), gates (N, E) -> (N, C)."""
    N, C = xf.shape
    E = gates.shape[1]

    def wide(layer):  # (E, H, C) -> the (N, E, H) input layer of every expert
        w, b = params[f"{name}.{layer}.weight"], params.get(f"{name}.{layer}.bias")
        h = _matmul_weight(xf, w.reshape(-1, C), cfg, None if b is None else b.reshape(-1))  # (N, E*H)
        return h.reshape(N, E, -1)

    if cfg.mlp == "swiglu":
        h, down = F.silu(wide("w1")) * wide("w3"), "w2"
    else:
        h, down = _act(wide("c_fc"), cfg), "c_proj"
    w2 = params[f"{name}.{down}.weight"]  # (E, C, H)
    y = _matmul_weight((h * gates.unsqueeze(-1)).reshape(N, -1), w2.permute(1, 0, 2).reshape(C, -1), cfg)  # (N, C)
    b2 = params.get(f"{name}.{down}.bias")  # (E, C): each expert's output bias, weighted
    return y if b2 is None else y + gates @ b2


def capacity(cfg, tokens: int) -> int:
    """Slots per expert per call with capacity dispatch."""
    m = cfg.moe
    return min(tokens, math.ceil(m.capacity_factor * tokens * m.top_k / m.num_experts))


def _dispatch(params, name, xf, chosen, gates, cfg):
    """Capacity dispatch: expert e computes the first `capacity` tokens routed to it (token order), gathered
    into (E, capacity, C); the outputs are scattered back, weighted. Static shapes: a slot without a token
    holds token 0 at weight 0. xf (N, C), chosen / gates (N, E) -> (N, C)."""
    N, C = xf.shape
    E, cap = chosen.shape[1], capacity(cfg, N)
    slot = chosen.cumsum(0) - 1  # (N, E): the place of each token in its expert's queue
    kept = (chosen > 0) & (slot < cap)  # (N, E)
    # slot_token[e, s]: the token in expert e's slot s (0 where the slot stays empty)
    flat = torch.where(kept, torch.arange(E, device=xf.device) * cap + slot, E * cap).reshape(-1)  # (N*E,)
    tokens = torch.arange(N, device=xf.device).unsqueeze(1).expand(N, E).reshape(-1)  # (N*E,)
    flat = flat.long()
    slot_token = xf.new_zeros(E * cap + 1, dtype=torch.int64).index_put((flat,), tokens)[:-1]  # (E*cap,)
    filled = xf.new_zeros(E * cap + 1).index_put((flat,), xf.new_ones(N * E))[:-1]  # (E*cap,) 1: a token
    weight = torch.where(kept, gates, 0.0).t().reshape(-1)  # (E*N,) per (expert, token)
    w = weight[torch.arange(E, device=xf.device).repeat_interleave(cap) * N + slot_token] * filled  # (E*cap,)
    out = _experts(params, name, xf[slot_token].reshape(E, cap, C), cfg)  # (E, cap, C)
    return xf.new_zeros(N, C).index_put((slot_token,), out.reshape(E * cap, C) * w.unsqueeze(-1), accumulate=True)


def top_k_mask(probs: torch.Tensor, k: int) -> torch.Tensor:
    """(N, E) float mask, 1 on each row's k largest entries: k rounds of argmax against arange (static
    shapes, no topk/one_hot). Ties go to the lower expert index, as torch.topk's do on CPU."""
    experts = torch.arange(probs.shape[-1], device=probs.device)
    mask = torch.zeros_like(probs)
    remaining = probs.detach()
    for _ in range(k):
        pick = (remaining.argmax(-1, keepdim=True) == experts).to(probs.dtype)  # (N, E)
        mask = mask + pick
        remaining = remaining.masked_fill(pick > 0, float("-inf"))
    return mask


def _moe(params, name, x, cfg):
    """A Mixture-of-Experts MLP on x (B, T, C): (output (B, T, C), aux loss, z loss, expert loads (E,))."""
    B, T, C = x.shape
    m = cfg.moe
    xf = x.reshape(B * T, C)  # (N, C)
    logits = _matmul_weight(xf, params[f"{name}.router.weight"], cfg).float()  # (N, E)
    probs = logits.softmax(-1)  # (N, E)
    chosen = top_k_mask(probs, m.top_k)  # (N, E), top_k ones per row
    gates = probs * chosen
    gates = gates / gates.sum(-1, keepdim=True)  # renormalised over the chosen experts (Mixtral)
    if m.capacity_factor is None:  # every expert on every token, zero weight outside the top_k
        y = _all_experts(params, f"{name}.experts", xf, gates, cfg)
    else:
        y = _dispatch(params, f"{name}.experts", xf, chosen, gates, cfg)
    load = chosen.mean(0) / m.top_k  # (E,) fraction of the token slots each expert takes
    aux = m.num_experts * (load * probs.mean(0)).sum()
    # logsumexp by hand (aten.logsumexp does not lower to IREE); the shift is detached, which leaves the
    # gradient unchanged and keeps max's backward (a scatter torch-mlir crashes on) out of the graph
    mx = logits.detach().amax(-1, keepdim=True)  # (N, 1)
    z = ((mx.squeeze(-1) + (logits - mx).exp().sum(-1).log()) ** 2).mean()
    return y.reshape(B, T, C), aux, z, load


def linear_layers(cfg: NanoGPTConfig) -> list[tuple[str, str, int, int]]:
    """(module name, its last name, out, in) of every dense Linear in the blocks, in parameter order: the ones
    an adapter can target (exporters/peft.py); the experts of MoE blocks and the head are not among them."""
    C, H = cfg.n_embd, cfg.hidden
    out = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        out += [(f"{p}.attn.c_attn", "c_attn", 3 * C, C), (f"{p}.attn.c_proj", "c_proj", C, C)]
        if cfg.is_moe(i):
            continue
        if cfg.mlp == "swiglu":
            out += [(f"{p}.mlp.w1", "w1", H, C), (f"{p}.mlp.w2", "w2", C, H), (f"{p}.mlp.w3", "w3", H, C)]
        else:
            out += [(f"{p}.mlp.c_fc", "c_fc", H, C), (f"{p}.mlp.c_proj", "c_proj", C, H)]
    return out


def _trunk(params: dict[str, torch.Tensor], idx: torch.Tensor, cfg: NanoGPTConfig, linear=None):
    """(logits (B, T, vocab), [(aux, z, load) of each MoE block]). `linear(params, name, x)`: the blocks'
    Linear layers (default: the plain one; exporters/peft.py's linear_fn adds an adapter)."""
    lin = linear or (lambda p, name, x: _linear(p, name, x, cfg))
    B, T = idx.shape
    x = F.embedding(idx, params["transformer.wte.weight"])  # (B, T, C)
    if cfg.positions == "learned":
        x = x + F.embedding(torch.arange(T, device=idx.device), params["transformer.wpe.weight"])
    moe = []
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}"
        x = x + _attention(params, f"{p}.attn", _norm(params, f"{p}.ln_1", x, cfg), cfg, lin)  # (B, T, C)
        h = _norm(params, f"{p}.ln_2", x, cfg)
        if cfg.is_moe(i):
            h, *stats = _moe(params, f"{p}.mlp", h, cfg)
            moe.append(stats)
        else:
            h = _mlp(params, f"{p}.mlp", h, cfg, lin)
        x = x + h  # (B, T, C)
    x = _norm(params, "transformer.ln_f", x, cfg)
    head = params["transformer.wte.weight"] if cfg.tie_embeddings else params["lm_head.weight"]
    return _matmul_weight(x, head, cfg), moe  # (B, T, vocab)


def forward(params: dict[str, torch.Tensor], idx: torch.Tensor, cfg: NanoGPTConfig, linear=None) -> torch.Tensor:
    """Logits (B, T, vocab) for token ids idx (B, T), T <= block_size."""
    return _trunk(params, idx, cfg, linear)[0]


def forward_with_aux(params: dict[str, torch.Tensor], idx: torch.Tensor, cfg: NanoGPTConfig, linear=None):
    """(logits (B, T, vocab), aux loss, z loss, loads (MoE blocks, E)): the losses are the mean over the
    MoE blocks; a model without experts has no MoE blocks (use `forward`)."""
    logits, moe = _trunk(params, idx, cfg, linear)
    assert moe, "forward_with_aux: the model has no MoE blocks"
    aux, z, loads = zip(*moe)
    return logits, torch.stack(aux).mean(), torch.stack(z).mean(), torch.stack(loads)
