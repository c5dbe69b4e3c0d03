"""The functional Qwen2 (exporters/qwen2.py) in eager torch against HF transformers, and sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_helpers import CASES, hf_model, rel_err

from pcpc.errors import UserError
from pcpc.exporters import qwen2
from pcpc.mlir.qwen_functions import weighted_nll
from pcpc.runtime import generate as gen


def params_of(hf):
    return {n: p.detach() for n, p in hf.named_parameters()}


@pytest.mark.parametrize("case", list(CASES))
def test_config_and_parameter_order_match_hf(case):
    hf = hf_model(case)
    cfg = qwen2.config_from_hf(hf.config.to_dict())
    shapes = qwen2.param_shapes(cfg)
    assert [(n, tuple(p.shape)) for n, p in hf.named_parameters()] == list(shapes.items())
    assert cfg.tie_word_embeddings == CASES[case]["tie_word_embeddings"]
    assert cfg.rope_theta == CASES[case]["rope_theta"]


def test_qwen25_05b_preset_shape():
    cfg = qwen2.make_config("qwen2.5-0.5b")
    shapes = qwen2.param_shapes(cfg)
    assert len(shapes) == 290  # 24 layers x 12 + embed + final norm, tied lm_head once
    assert qwen2.num_params(cfg) == 494_032_768
    assert qwen2.cache_shape(cfg, 1, 1024) == (24, 1, 2, 1024, 64)


@pytest.mark.parametrize("case", list(CASES))
def test_forward_matches_hf_with_left_padding(case):
    hf = hf_model(case)
    cfg = qwen2.config_from_hf(hf.config.to_dict())
    ids = torch.randint(0, 320, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :3] = 0
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = qwen2.forward(params_of(hf), ids, None, cfg, attention_mask=mask)
    real = mask.bool()
    assert rel_err(got[real], ref[real]) < 1e-5


def test_cache_padding_writes_nothing_and_chunks_compose():
    hf = hf_model("gqa-tied")
    cfg = qwen2.config_from_hf(hf.config.to_dict())
    p = params_of(hf)
    ids = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(1))
    S = 16
    k0 = torch.full(qwen2.cache_shape(cfg, 1, S), 7.0)  # sentinel: slots nobody writes keep it
    with torch.no_grad():
        ref = hf(ids).logits[0, -1]
        # 9 tokens as a 4-token chunk left-padded to 6 (positions -1, -1, 0..3), then 5 more.
        toks = torch.cat([torch.zeros(1, 2, dtype=torch.long), ids[:, :4]], 1)
        pos = torch.tensor([[-1, -1, 0, 1, 2, 3]])
        _, k1, v1 = qwen2.forward_cached(p, toks, pos, k0, k0.clone(), cfg, last_only=True)
        assert torch.all(k1[:, :, :, 4:] == 7.0)
        logits, k2, _ = qwen2.forward_cached(p, ids[:, 4:], torch.arange(4, 9)[None], k1, v1, cfg, last_only=True)
    assert rel_err(logits[0], ref) < 1e-5
    assert torch.all(k2[:, :, :, 9:] == 7.0)


def test_weighted_nll_uniform_weights_is_mean_cross_entropy():
    hf = hf_model("mqa-tied")
    cfg = qwen2.config_from_hf(hf.config.to_dict())
    ids = torch.randint(0, 320, (3, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss = weighted_nll(params_of(hf), ids, torch.ones(3, 8, dtype=torch.long), torch.full((3,), 1 / 3), cfg)
        ref = torch.nn.functional.cross_entropy(hf(ids).logits[:, :-1].reshape(-1, 320), ids[:, 1:].reshape(-1))
    assert rel_err(loss, ref) < 1e-5


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type must be 'qwen2'"),
        ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn' is not supported"),
        ({"hidden_act": "gelu"}, "hidden_act must be 'silu'"),
        ({"num_key_value_heads": 3}, "must be divisible by num_key_value_heads"),
        ({"hidden_size": "big"}, r"config.json.hidden_size: expected an integer"),
    ],
)
def test_config_errors_name_the_field(change, message):
    base = hf_model("gqa-tied").config.to_dict()
    with pytest.raises(UserError, match=message):
        qwen2.config_from_hf({**base, **change})


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(UserError, match="valid: qwen2.5-0.5b"):
        qwen2.make_config("qwen3")


def brute_force_nucleus(logits, temperature, top_p):
    p = torch.softmax(torch.tensor(logits, dtype=torch.float64) / temperature, -1)
    order = torch.argsort(p, descending=True, stable=True)
    before = torch.cumsum(p[order], 0) - p[order]
    return set(order[before < top_p].tolist())


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_matches_brute_force(top_p):
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(5000).astype(np.float32) * 3
    ids, probs = gen.logits_to_probs(logits, 0.8, top_p)
    assert set(ids.tolist()) == brute_force_nucleus(logits, 0.8, top_p)
    assert abs(probs.sum() - 1) < 1e-9


def test_sampling_frequencies_follow_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    rng = np.random.default_rng(1)
    cfg = gen.SamplingConfig(temperature=1.0, top_p=0.8, seed=0)
    draws = np.array([gen.sample(logits[None], rng, cfg)[0] for _ in range(4000)])
    # nucleus {0, 1} (0.5 + 0.3 reaches 0.8), renormalised to 0.625 / 0.375
    assert set(draws.tolist()) == {0, 1}
    assert abs((draws == 0).mean() - 0.625) < 0.03
    assert gen.sample(logits[None], rng, gen.SamplingConfig())[0] == 0  # temperature 0: argmax
