"""The functional nanoGPT and its variants against nn.Module references (tests/nanogpt_reference.py) with the
same weights: forward, gradients, routing, the layers against torch's and HF's own, config errors."""

import math

import pytest
import torch

from nanogpt_reference import GPT, RMSNorm, params_of, reference, rel_err
from pcpc.errors import UserError
from pcpc.exporters import nanogpt

MOE = {"num_experts": 4, "top_k": 2}
VARIANTS = {
    "small": ("nanogpt-small", {}),
    "medium": ("nanogpt-medium", {"n_layer": 2}),
    "gelu-untied-bias": ("nanogpt-small", {"mlp": "gelu", "tie_embeddings": False, "bias": True}),
    "swiglu": ("nanogpt-small", {"mlp": "swiglu"}),
    "rmsnorm": ("nanogpt-small", {"norm": "rmsnorm", "norm_eps": 1e-6}),
    "rope": ("nanogpt-small", {"positions": "rope", "rope_theta": 500.0}),
    "moe": ("nanogpt-small", {"moe": MOE}),
    "moe-every-2-gelu-bias": ("nanogpt-small", {"n_layer": 4, "mlp": "gelu", "bias": True,
                                                "moe": {**MOE, "every": 2, "top_k": 1}}),
    "all": ("nanogpt-small", {"mlp": "swiglu", "norm": "rmsnorm", "positions": "rope", "moe": MOE}),
    "moe-capacity-no-drops": ("nanogpt-small", {"moe": {**MOE, "capacity_factor": 2.0}}),
    "moe-capacity-1.0": ("nanogpt-small", {"moe": {**MOE, "capacity_factor": 1.0}}),
    "moe-capacity-0.5-swiglu": ("nanogpt-small", {"mlp": "swiglu", "moe": {**MOE, "capacity_factor": 0.5}}),
    "gpt-nano": ("gpt-nano", {"block_size": 16, "vocab_size": 97}),
}


def batch(cfg, rows=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randint(0, cfg.vocab_size, (rows, cfg.block_size), generator=gen),
            torch.randint(0, cfg.vocab_size, (rows, cfg.block_size), generator=gen))


@pytest.mark.parametrize("case", list(VARIANTS))
def test_forward_matches_the_module(case):
    preset, overrides = VARIANTS[case]
    cfg = nanogpt.make_config(preset, **overrides)
    params = nanogpt.init_params(cfg, seed=1)
    ref = reference(cfg, params)
    if cfg.moe is None:  # same names and order as nn.Module.named_parameters(): the documented weight order
        assert list(params) == [n for n, _ in ref.named_parameters()]
    idx, _ = batch(cfg)
    assert rel_err(nanogpt.forward(params, idx, cfg), ref(idx)) < 1e-5
    short = idx[:, : cfg.block_size // 2]
    assert rel_err(nanogpt.forward(params, short, cfg), ref(short)) < 1e-5


@pytest.mark.parametrize("case", ["swiglu", "rmsnorm", "rope", "moe", "all", "moe-capacity-1.0",
                                  "moe-capacity-0.5-swiglu"])
def test_loss_and_gradients_match_the_module(case):
    """The training loss (cross-entropy, plus the aux and z losses with experts) and every gradient."""
    from pcpc.mlir.nanogpt_functions import make_loss, make_moe_loss

    preset, overrides = VARIANTS[case]
    cfg = nanogpt.make_config(preset, **overrides)
    params = nanogpt.init_params(cfg, seed=2)
    x, y = batch(cfg)
    ref = reference(cfg, params)
    want, ce, aux, z, loads = ref.loss(x, y)
    want.backward()
    want_grads = params_of({n: p.grad for n, p in ref.named_parameters()}, params)
    leaves = {k: v.clone().requires_grad_(True) for k, v in params.items()}
    if cfg.moe is None:
        got = make_loss(cfg)(leaves, x, y)
    else:
        got, got_ce, got_aux, got_z, got_loads = make_moe_loss(cfg)(leaves, x, y)
        assert rel_err(got_ce, ce) < 1e-5 and rel_err(got_aux, aux) < 1e-5 and rel_err(got_z, z) < 1e-5
        assert torch.equal(got_loads, loads)
    assert rel_err(got, want) < 1e-5
    got.backward()
    for name, leaf in leaves.items():
        assert rel_err(leaf.grad, want_grads[name]) < 1e-5, name


def test_rmsnorm_is_torchs():
    x = torch.randn(4, 7, 64, generator=torch.Generator().manual_seed(0))
    ours, theirs = RMSNorm(64, 1e-5), torch.nn.RMSNorm(64, eps=1e-5)
    with torch.no_grad():
        w = torch.rand(64) + 0.5
        ours.weight.copy_(w), theirs.weight.copy_(w)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-6, atol=1e-6)
    cfg = nanogpt.make_config("nanogpt-small", norm="rmsnorm")
    torch.testing.assert_close(nanogpt._norm({"n.weight": w}, "n", x, cfg), theirs(x), rtol=1e-6, atol=1e-6)


def test_rope_is_hf_llamas_and_depends_on_relative_position_only():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    T, hs, theta = 16, 8, 10000.0
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, T, hs, generator=gen), torch.randn(2, 3, T, hs, generator=gen)
    cos, sin = nanogpt.rope_tables(T, hs, theta)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    torch.testing.assert_close(nanogpt.apply_rope(q, cos, sin), want_q)
    torch.testing.assert_close(nanogpt.apply_rope(k, cos, sin), want_k)
    # <rope(q, m), rope(k, n)> depends on m - n: one query and key vector at every position
    qv, kv = torch.randn(hs, generator=gen), torch.randn(hs, generator=gen)
    rq = nanogpt.apply_rope(qv.expand(1, 1, T, hs), cos, sin)[0, 0]
    rk = nanogpt.apply_rope(kv.expand(1, 1, T, hs), cos, sin)[0, 0]
    dots = rq @ rk.T  # (T, T)
    for d in range(-3, 4):
        diag = torch.diagonal(dots, d)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("T", [1, 32, 100, 128, 200, 256, 515])
def test_causal_attention_is_torchs_with_and_without_blocks(T):
    gen = torch.Generator().manual_seed(T)
    q, k, v = (torch.randn(2, 3, T, 8, dtype=torch.float64, generator=gen).requires_grad_() for _ in range(3))
    g = torch.randn(2, 3, T, 8, dtype=torch.float64, generator=gen)
    ours = nanogpt.causal_attention(q, k, v)
    grads = torch.autograd.grad((ours * g).sum(), (q, k, v))
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    want_grads = torch.autograd.grad((want * g).sum(), (q, k, v))
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("T, blocks", [(64, 1), (127, 1), (128, 2), (256, 4), (1024, 4)])
def test_causal_attention_scores_only_the_keys_a_block_of_queries_sees(T, blocks):
    from torch.fx.experimental.proxy_tensor import make_fx

    x = torch.empty(1, 2, T, 8)
    gm = make_fx(nanogpt.causal_attention, tracing_mode="fake")(x, x, x)
    softmax = (torch.ops.aten.softmax.int, torch.ops.aten._softmax.default)
    scores = [tuple(n.meta["val"].shape[-2:]) for n in gm.graph.nodes
              if n.op == "call_function" and n.target in softmax]
    bounds = [(i * T // blocks, (i + 1) * T // blocks) for i in range(blocks)]
    assert scores == [(hi - lo, hi) for lo, hi in bounds]


def test_swiglu_hidden_width_is_llamas():
    for C, multiple, want in ((64, 32, 192), (768, 256, 2048), (4096, 256, 11008), (48, 32, 128)):
        assert nanogpt.make_config("nanogpt-small", n_embd=C, n_head=4, mlp="swiglu", multiple_of=multiple).hidden \
            == want


def test_moe_routing_is_exactly_top_k_and_the_references_choice():
    gen = torch.Generator().manual_seed(0)
    probs = torch.randn(500, 6, generator=gen).softmax(-1)  # tie-free
    for k in (1, 2, 3, 6):
        mask = nanogpt.top_k_mask(probs, k)
        assert torch.all(mask.sum(-1) == k) and torch.all((mask == 0) | (mask == 1))
        chosen = torch.zeros_like(probs).scatter(1, probs.topk(k, dim=-1).indices, 1.0)
        assert torch.equal(mask, chosen)
    tied = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.1, 0.4, 0.4, 0.1]])
    assert nanogpt.top_k_mask(tied, 2).tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]  # ties: the lower index
    cfg = nanogpt.make_config("nanogpt-small", **VARIANTS["moe"][1])
    params = nanogpt.init_params(cfg, seed=3)
    x, _ = batch(cfg)
    ref = reference(cfg, params)
    ref(x)
    _, _, _, loads = nanogpt.forward_with_aux(params, x, cfg)
    for block, load in zip(ref.moe_blocks(), loads):  # the same experts per token, so the same loads
        assert torch.equal(block.stats[2], load)
        assert abs(float(load.sum()) - 1.0) < 1e-6


def test_capacity_dispatch_drops_the_tokens_past_capacity_and_only_those():
    """capacity_factor 0.5: each expert takes the first ceil(0.5 * N * k / E) of its tokens; the dense form and
    a capacity that holds every token give the same output; a token dropped by both its experts passes the
    MLP unchanged (zero)."""
    base = nanogpt.make_config("nanogpt-small", moe=MOE)
    params = nanogpt.init_params(base, seed=4)
    x = torch.randn(2, 32, 64, generator=torch.Generator().manual_seed(1))
    p = {k.replace("transformer.h.0.mlp.", "m."): v for k, v in params.items() if ".h.0.mlp." in k}
    dense = nanogpt._moe(p, "m", x, base)[0]
    full = nanogpt._moe(p, "m", x, nanogpt.make_config("nanogpt-small", moe={**MOE, "capacity_factor": 2.0}))[0]
    assert rel_err(full, dense) < 1e-6
    half_cfg = nanogpt.make_config("nanogpt-small", moe={**MOE, "capacity_factor": 0.5})
    assert nanogpt.capacity(half_cfg, 64) == 16
    half = nanogpt._moe(p, "m", x, half_cfg)[0].reshape(64, 64)
    chosen = nanogpt.top_k_mask(torch.nn.functional.linear(x.reshape(64, 64), p["m.router.weight"]).softmax(-1), 2)
    kept = (chosen > 0) & (chosen.cumsum(0) <= 16)  # (N, E): the first 16 tokens of each expert
    dropped = ~kept.any(-1)
    assert dropped.any() and torch.all(half[dropped] == 0)
    assert not torch.allclose(half[~dropped], dense.reshape(64, 64)[~dropped])  # some lost one of two experts


def test_aux_loss_is_one_at_perfect_balance():
    """E * sum_i f_i * P_i with uniform loads and probabilities is 1 (Switch, HF's convention); the z-loss of
    uniform router logits is log(E)^2."""
    E, C = 4, 8
    cfg = nanogpt.make_config("nanogpt-small", n_embd=C, n_head=2, moe={"num_experts": E, "top_k": 1})
    params = {k.replace("transformer.h.0.mlp.", "m."): v for k, v in nanogpt.init_params(cfg).items()
              if ".h.0.mlp." in k}
    params["m.router.weight"] = torch.eye(E, C)  # token t leans (by 1e-3) to expert t % E: all get 2 tokens
    x = torch.zeros(1, 2 * E, C)
    x[0, torch.arange(2 * E), torch.arange(2 * E) % E] = 1e-3
    _, aux, z, load = nanogpt._moe(params, "m", x, cfg)
    assert torch.allclose(load, torch.full((E,), 1 / E)) and abs(float(aux) - 1.0) < 1e-3
    assert abs(float(z) - math.log(E) ** 2) < 1e-2


def test_presets_sizes():
    small = nanogpt.make_config("nanogpt-small")
    assert (small.block_size, small.n_embd, small.n_layer, small.n_head, small.vocab_size) == (32, 64, 2, 8, 65)
    count = {p: sum(math.prod(s) for s in nanogpt.param_shapes(nanogpt.make_config(p)).values())
             for p in nanogpt.PRESETS}
    assert 3.2e6 < count["nanogpt-medium"] < 3.4e6  # ~3.3M as the reference design says
    assert count["gpt2-124m"] == 124_475_904  # GPT-2 124M with the vocab padded to 50304, as build-nanogpt
    gpt2 = nanogpt.make_config("gpt2-124m")
    assert (gpt2.block_size, gpt2.n_layer, gpt2.n_head, gpt2.n_embd, gpt2.mlp, gpt2.tie_embeddings) == \
        (1024, 12, 12, 768, "gelu", True)
    moe = nanogpt.make_config("gpt2-124m-moe")
    assert moe.moe.num_experts == 2 and moe.moe_layers == list(range(12))
    for name, (layers, heads, width) in {"gpt-nano": (3, 3, 48), "gpt-micro": (4, 4, 128),
                                         "gpt-mini": (6, 6, 192)}.items():
        c = nanogpt.make_config(name)
        assert (c.n_layer, c.n_head, c.n_embd) == (layers, heads, width)


def test_init_is_seeded_and_documented():
    cfg = nanogpt.make_config("nanogpt-small", bias=True)
    a, b, c = (nanogpt.init_params(cfg, seed=s) for s in (0, 0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["transformer.wte.weight"], c["transformer.wte.weight"])
    assert torch.all(a["transformer.h.0.attn.c_attn.bias"] == 0)
    assert torch.all(a["transformer.h.0.ln_1.weight"] == 1)
    std = a["transformer.h.0.mlp.c_proj.weight"].std().item()
    assert abs(std - 0.02 / math.sqrt(2 * cfg.n_layer)) < 2e-3
    swiglu = nanogpt.init_params(nanogpt.make_config("nanogpt-small", mlp="swiglu", moe=MOE, positions="rope"))
    assert "transformer.wpe.weight" not in swiglu
    assert swiglu["transformer.h.0.mlp.experts.w1.weight"].shape == (4, 192, 64)
    assert abs(swiglu["transformer.h.0.mlp.experts.w2.weight"].std().item() - 0.01) < 2e-3


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"n_embd": 60}, r"n_embd \(60\) must be divisible by n_head \(8\)"),
        ({"mlp": "swish"}, r"mlp must be one of relu, gelu, swiglu; got 'swish'"),
        ({"norm": "batchnorm"}, r"norm must be one of layernorm, rmsnorm; got 'batchnorm'"),
        ({"positions": "alibi"}, r"positions must be one of learned, rope; got 'alibi'"),
        ({"n_layer": 0}, r"n_layer must be >= 1"),
        ({"n_layers": 2}, r"unknown key 'n_layers'; valid keys: block_size"),
        ({"bias": "yes"}, r"nanogpt-small config.bias: expected true or false"),
        ({"moe": {"num_experts": 2, "top_k": 3}}, r"top_k \(3\) must be <= num_experts \(2\)"),
        ({"moe": {"experts": 2}}, r"nanogpt-small config.moe: unknown key 'experts'; valid keys: num_experts"),
        ({"moe": {"every": 3}}, r"moe.every \(3\) is more than n_layer \(2\)"),
        ({"positions": "rope", "n_embd": 72, "n_head": 8}, r"head size n_embd / n_head \(9\) must be even"),
    ],
)
def test_config_errors(overrides, message):
    with pytest.raises(UserError, match=message):
        nanogpt.make_config("nanogpt-small", **overrides)


def test_unknown_preset_lists_valid():
    with pytest.raises(UserError, match=r"unknown nanogpt preset 'nanogpt-large'; valid: nanogpt-small, nanogpt-medium"):
        nanogpt.make_config("nanogpt-large")


def test_gpt_reference_builds_every_variant():
    for preset, overrides in VARIANTS.values():
        assert isinstance(GPT(nanogpt.make_config(preset, **overrides)), torch.nn.Module)
