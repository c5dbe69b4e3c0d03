"""An eager nanoGPT written as ordinary nn.Modules, the way nanoGPT, minGPT, Llama and Mixtral write these
layers: the reference the functional exporter (pcpc.exporters.nanogpt) and its compiled modules are checked
against. It shares no code with the exporter.

    RMSNorm   Llama's: x * rsqrt(mean(x^2) + eps) * weight
    RoPE      HF Llama's rotate_half form: cos/sin of t * theta^(-2i/d), q*cos + rotate_half(q)*sin
    SwiGLU    Llama's FeedForward: w2(silu(w1 x) * w3 x)
    MoE       Mixtral's sparse block: softmax router, topk, renormalised weights, a loop over the experts
              with index_select / index_add_ on the tokens each one was given (with a capacity factor, the
              first tokens in token order, as Switch)
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def norm(cfg):
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rope_cos_sin(T: int, dim: int, theta: float):
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    freqs = torch.outer(torch.arange(T).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.cfg = cfg
        self.c_attn = nn.Linear(C, 3 * C, bias=cfg.bias)
        self.c_proj = nn.Linear(C, C, bias=cfg.bias)

    def forward(self, x):
        B, T, C = x.shape
        nh = self.cfg.n_head
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        if self.cfg.positions == "rope":
            cos, sin = rope_cos_sin(T, C // nh, self.cfg.rope_theta)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).reshape(B, T, C))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.act = nn.GELU() if cfg.mlp == "gelu" else nn.ReLU()

    def forward(self, x):
        return self.c_proj(self.act(self.c_fc(x)))


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hidden = int(2 * (4 * cfg.n_embd) / 3)
        hidden = cfg.multiple_of * ((hidden + cfg.multiple_of - 1) // cfg.multiple_of)
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def dense_mlp(cfg):
    return SwiGLU(cfg) if cfg.mlp == "swiglu" else MLP(cfg)


class SparseMoE(nn.Module):
    """Mixtral's sparse MoE block, with the Switch load-balancing and ST-MoE z losses."""

    def __init__(self, cfg):
        super().__init__()
        self.E, self.k, self.capacity_factor = cfg.moe.num_experts, cfg.moe.top_k, cfg.moe.capacity_factor
        self.router = nn.Linear(cfg.n_embd, self.E, bias=False)
        self.experts = nn.ModuleList([dense_mlp(cfg) for _ in range(self.E)])
        self.stats = None

    def forward(self, x):
        B, T, C = x.shape
        xf = x.reshape(-1, C)
        logits = self.router(xf)
        probs = F.softmax(logits, dim=-1)
        weights, chosen = torch.topk(probs, self.k, dim=-1)  # (N, k)
        weights = weights / weights.sum(-1, keepdim=True)
        out = torch.zeros_like(xf)
        cap = xf.shape[0] if self.capacity_factor is None else \
            min(xf.shape[0], math.ceil(self.capacity_factor * xf.shape[0] * self.k / self.E))
        for e, expert in enumerate(self.experts):
            rows, slot = torch.where(chosen == e)  # in token order
            rows, slot = rows[:cap], slot[:cap]  # Switch's capacity: the tokens past it skip the expert
            if rows.numel():
                y = expert(xf.index_select(0, rows)) * weights[rows, slot, None]
                out = out.index_add(0, rows, y)
        counts = torch.stack([(chosen == e).sum() for e in range(self.E)]).float()
        load = counts / (xf.shape[0] * self.k)
        aux = self.E * (load * probs.mean(0)).sum()
        z = (torch.logsumexp(logits, dim=-1) ** 2).mean()
        self.stats = (aux, z, load, chosen)
        return out.reshape(B, T, C)


class Block(nn.Module):
    def __init__(self, cfg, moe: bool):
        super().__init__()
        self.ln_1 = norm(cfg)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = norm(cfg)
        self.mlp = SparseMoE(cfg) if moe else dense_mlp(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        every = cfg.moe.every if cfg.moe is not None else 0
        layers = dict(wte=nn.Embedding(cfg.vocab_size, cfg.n_embd))
        if cfg.positions == "learned":
            layers["wpe"] = nn.Embedding(cfg.block_size, cfg.n_embd)
        layers["h"] = nn.ModuleList([Block(cfg, bool(every) and (i + 1) % every == 0) for i in range(cfg.n_layer)])
        layers["ln_f"] = norm(cfg)
        self.transformer = nn.ModuleDict(layers)
        self.cfg = cfg
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx)
        if "wpe" in t:
            x = x + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        x = t.ln_f(x)
        return x @ t.wte.weight.T if self.cfg.tie_embeddings else self.lm_head(x)

    def moe_blocks(self):
        return [b.mlp for b in self.transformer.h if isinstance(b.mlp, SparseMoE)]

    def loss(self, idx, targets):
        """The training loss the exporter's modules use: cross-entropy + aux and z losses (mean over MoE
        blocks); returns (loss, ce, aux, z, loads)."""
        ce = F.cross_entropy(self(idx).flatten(0, 1), targets.flatten())
        blocks = self.moe_blocks()
        if not blocks:
            return ce, ce, None, None, None
        aux = torch.stack([b.stats[0] for b in blocks]).mean()
        z = torch.stack([b.stats[1] for b in blocks]).mean()
        m = self.cfg.moe
        return ce + m.aux_loss_coef * aux + m.z_loss_coef * z, ce, aux, z, torch.stack([b.stats[2] for b in blocks])


def state_dict_of(params: dict, cfg) -> dict:
    """The exporter's params as this module's state dict: stacked experts (E, ...) split per expert."""
    out = {}
    for name, value in params.items():
        if ".mlp.experts." in name:
            head, rest = name.split(".mlp.experts.")
            for e in range(value.shape[0]):
                out[f"{head}.mlp.experts.{e}.{rest}"] = value[e]
        else:
            out[name] = value
    return out


def params_of(grads: dict, params: dict) -> dict:
    """A state-dict-keyed dict (e.g. gradients) back in the exporter's layout and order."""
    out = {}
    for name, value in params.items():
        if ".mlp.experts." in name:
            head, rest = name.split(".mlp.experts.")
            out[name] = torch.stack([grads[f"{head}.mlp.experts.{e}.{rest}"] for e in range(value.shape[0])])
        else:
            out[name] = grads[name]
    return out


def reference(cfg, params: dict) -> GPT:
    """The nn.Module with the exporter's weights."""
    model = GPT(cfg)
    model.load_state_dict(state_dict_of(params, cfg), strict=True)
    return model


def rel_err(got, want) -> float:
    got, want = (torch.as_tensor(t).detach().to(torch.float64) for t in (got, want))
    return float((got - want).norm() / max(float(want.norm()), 1e-30))

