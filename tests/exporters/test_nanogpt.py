"""The functional nanoGPT against an nn.Module nanoGPT (model.py style) with the same weights."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pcpc.errors import UserError
from pcpc.exporters import nanogpt


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        C = cfg.n_embd
        self.cfg = cfg
        self.ln_1 = nn.LayerNorm(C, bias=cfg.bias)
        self.attn = nn.Module()
        self.attn.c_attn = nn.Linear(C, 3 * C, bias=cfg.bias)
        self.attn.c_proj = nn.Linear(C, C, bias=cfg.bias)
        self.ln_2 = nn.LayerNorm(C, bias=cfg.bias)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(C, 4 * C, bias=cfg.bias)
        self.mlp.c_proj = nn.Linear(4 * C, C, bias=cfg.bias)

    def forward(self, x):
        B, T, C = x.shape
        nh = self.cfg.n_head
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(B, T, C))
        act = nn.GELU() if self.cfg.activation == "gelu" else nn.ReLU()
        return x + self.mlp.c_proj(act(self.mlp.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
                wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
                h=nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)]),
                ln_f=nn.LayerNorm(cfg.n_embd, bias=cfg.bias),
            )
        )
        self.tied = cfg.tie_embeddings
        if not self.tied:
            self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx):
        t = self.transformer
        x = t.wte(idx) + t.wpe(torch.arange(idx.shape[1]))
        for block in t.h:
            x = block(x)
        x = t.ln_f(x)
        return x @ t.wte.weight.T if self.tied else self.lm_head(x)


VARIANTS = [
    ("nanogpt-small", {}),
    ("nanogpt-medium", {"n_layer": 2}),
    ("nanogpt-small", {"activation": "gelu", "tie_embeddings": False, "bias": True}),
]


@pytest.mark.parametrize("preset, overrides", VARIANTS)
def test_forward_matches_module(preset, overrides):
    cfg = nanogpt.make_config(preset, **overrides)
    params = nanogpt.init_params(cfg, seed=1)
    ref = GPT(cfg)
    # Same names and order as nn.Module.named_parameters(): the documented weight order.
    assert list(params) == [n for n, _ in ref.named_parameters()]
    ref.load_state_dict(params, strict=True)
    idx = torch.randint(0, cfg.vocab_size, (3, cfg.block_size), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nanogpt.forward(params, idx, cfg), ref(idx), rtol=1e-5, atol=1e-5)
    short = idx[:, : cfg.block_size // 2]
    torch.testing.assert_close(nanogpt.forward(params, short, cfg), ref(short), rtol=1e-5, atol=1e-5)


def test_presets_sizes():
    small = nanogpt.make_config("nanogpt-small")
    assert (small.block_size, small.n_embd, small.n_layer, small.n_head, small.vocab_size) == (32, 64, 2, 8, 65)
    medium = nanogpt.make_config("nanogpt-medium")
    n_medium = sum(math.prod(s) for s in nanogpt.param_shapes(medium).values())
    assert 3.2e6 < n_medium < 3.4e6  # ~3.3M as the reference design says


def test_init_is_seeded_and_documented():
    cfg = nanogpt.make_config("nanogpt-small", bias=True)
    a, b, c = (nanogpt.init_params(cfg, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])
    assert torch.all(a["transformer.h.0.attn.c_attn.bias"] == 0)
    assert torch.all(a["transformer.h.0.ln_1.weight"] == 1)
    std = a["transformer.h.0.mlp.c_proj.weight"].std().item()
    assert abs(std - 0.02 / math.sqrt(2 * cfg.n_layer)) < 2e-3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_embd": 60}, r"n_embd \(60\) must be divisible by n_head \(8\)"),
        ({"activation": "swish"}, r"activation must be one of relu, gelu; got 'swish'"),
        ({"n_layer": 0}, r"n_layer must be >= 1"),
        ({"n_layers": 2}, r"unknown key 'n_layers'; valid keys: block_size"),
        ({"bias": "yes"}, r"nanogpt-small config.bias: expected true or false"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        nanogpt.make_config("nanogpt-small", **overrides)


def test_unknown_preset_lists_valid():
    with pytest.raises(UserError, match=r"unknown nanogpt preset 'nanogpt-large'; valid: nanogpt-small, nanogpt-medium"):
        nanogpt.make_config("nanogpt-large")
