"""Compiled Qwen2 modules against HF transformers, on tiny random models saved as HF directories.

Each case's module (prefill_bs{B} + decode_bs{B}) is built once per session
(tests/qwen_helpers.py); weights go HF safetensors -> flat binary -> zero-copy
device arrays, the path `pcpc export` / `pcpc generate` take.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qwen_helpers import CASES, MAX_SEQ, build_case, build_loss_module, hf_model, make_hf_dir, rel_err, session_root

from pcpc.errors import UserError
from pcpc.mlir.compile import DATA_TILING
from pcpc.exporters import hf_weights, qwen2
from pcpc.mlir.signature import load_meta
from pcpc.runtime import generate as gen
from pcpc.runtime.module import CompiledModule, to_host


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return session_root(tmp_path_factory)


def write_weights(root, case, result, cfg):
    meta = load_meta(result.meta)
    # not the name `pcpc export` writes: test_qwen_cli shares this artifacts dir
    path = result.vmfb.with_name(result.vmfb.name.removesuffix(".vmfb") + ".test-weights.bin")
    if not path.is_file():
        hf_dir = make_hf_dir(root, case)
        tensors = hf_weights.read_safetensors(hf_dir)
        ordered = list(hf_weights.ordered_tensors(tensors, qwen2.param_shapes(cfg), cfg.tie_word_embeddings, "t"))
        hf_weights.write_flat(path, ordered, "float32", meta.parameter_bytes)
    return path


@pytest.fixture(scope="module")
def models(root):
    """models(case, batch_sizes) -> (QwenModel, Qwen2Config, HF model), cached per module."""
    cache = {}

    def get(case, batch_sizes=(1,)):
        key = (case, tuple(batch_sizes))
        if key not in cache:
            result, cfg = build_case(root, case, batch_sizes)
            model = gen.QwenModel.load(result.vmfb, write_weights(root, case, result, cfg))
            cache[key] = (model, cfg, hf_model(case))
        return cache[key]

    return get


def prompt_ids(n, seed=0):
    return torch.randint(3, 300, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def hf_greedy(hf, prompt, n):
    """HF transformers' own greedy generate, no EOS stop."""
    hf.generation_config.eos_token_id = None  # else generate falls back to the model's EOS
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=n, do_sample=False, pad_token_id=0)
    assert out.shape[1] == len(prompt) + n
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf_and_prefill_equals_decode(case, models):
    model, cfg, hf = models(case)
    ids = prompt_ids(19, seed=1)
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()  # (T, V)
    # Token by token through decode_bs1: every position's logits.
    cache = model.new_cache(1)
    step_logits = []
    for t, tok in enumerate(ids):
        logits, cache = gen.decode_one_token(model, np.array([tok]), np.array([t]), cache)
        step_logits.append(logits[0])
    assert rel_err(np.stack(step_logits), ref) < 1e-4
    # The whole prompt through prefill (19 tokens -> 3 chunks of 8, left-padded with position -1).
    pre_logits, pre_cache = gen.prefill(model, [ids], 1, model.new_cache(1))
    assert rel_err(pre_logits[0], ref[-1]) < 1e-4
    assert rel_err(pre_logits[0], step_logits[-1]) < 1e-5
    for got, want in zip(pre_cache, cache):
        got, want = to_host(got)[..., : len(ids), :], to_host(want)[..., : len(ids), :]
        assert rel_err(got, want) < 1e-5
        assert got.shape == (cfg.num_hidden_layers, 1, cfg.num_key_value_heads, len(ids), cfg.dim_head)


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_32_tokens_identical_to_hf_generate(case, models):
    model, _, hf = models(case)
    prompt = prompt_ids(11, seed=2)
    ours = gen.generate(model, [prompt], 32, gen.SamplingConfig(), eos_ids=[])
    assert ours.tokens[0] == hf_greedy(hf, prompt, 32)
    assert ours.finished == [False]


def test_batch_of_prompts_matches_single_prompt_generation(models):
    model, _, hf = models("gqa-tied", (1, 2))
    prompts = [prompt_ids(5, seed=3), prompt_ids(13, seed=4), prompt_ids(9, seed=5)]  # groups of 2, then 1
    out = gen.generate(model, prompts, 16, gen.SamplingConfig(), eos_ids=[])
    assert [g["batch"] for g in out.per_group] == [2, 1]
    for p, toks in zip(prompts, out.tokens):
        assert toks == hf_greedy(hf, p, 16)


def test_stops_at_eos(models):
    model, _, hf = models("gqa-tied")
    prompt = prompt_ids(7, seed=6)
    free = hf_greedy(hf, prompt, 12)
    eos = free[5]
    out = gen.generate(model, [prompt], 12, gen.SamplingConfig(), eos_ids=[eos])
    assert out.tokens[0] == free[: free.index(eos)]
    assert out.finished == [True]


def test_sampling_is_seeded_and_reproducible(models):
    model, _, _ = models("mqa-tied")
    prompt = prompt_ids(6, seed=7)
    runs = [gen.generate(model, [prompt], 12, gen.SamplingConfig(1.0, 0.9, seed=s), eos_ids=[]).tokens[0]
            for s in (11, 11, 12)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_weights_are_device_resident_not_copied(models):
    """The module reads the imported host memory directly: changing it changes the result
    (so no per-call or load-time copy of the weights exists), and caches come back as device arrays."""
    model, _, _ = models("mqa-tied")
    cache = model.new_cache(1)
    logits0, cache1 = gen.decode_one_token(model, np.array([5]), np.array([0]), cache)
    assert all(type(c).__name__ == "DeviceArray" for c in cache1)
    emb = model.weights[0]._pcpc_host  # model.embed_tokens.weight, tied with lm_head
    saved = emb.copy()
    try:
        emb *= 2.0
        logits1, _ = gen.decode_one_token(model, np.array([5]), np.array([0]), cache)
    finally:
        emb[...] = saved
    assert rel_err(logits1, logits0) > 0.1


def test_capacity_and_vocabulary_errors(models):
    model, _, _ = models("mqa-tied")
    with pytest.raises(UserError, match=rf"needs {MAX_SEQ + 1} positions but the module's KV cache holds {MAX_SEQ}"):
        gen.generate(model, [[5] * 10], MAX_SEQ - 9)
    with pytest.raises(UserError, match="token id 999 outside the vocabulary"):
        gen.generate(model, [[5, 999]], 4)
    with pytest.raises(UserError, match="--top-p must be in"):
        gen.SamplingConfig(1.0, 0.0)


def test_forward_loss_matches_torch(root):
    case = "mha-untied"
    result = build_loss_module(root, case, batch=2, seq=12)
    hf = hf_model(case)
    mod = CompiledModule(result.vmfb)
    ids = torch.tensor([prompt_ids(12, seed=8), prompt_ids(12, seed=9)])
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0  # left padding in row 1
    weights = torch.tensor([0.3, -0.7])
    with torch.no_grad():
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = hf(ids, attention_mask=mask, position_ids=pos).logits
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
        tm = (mask[:, 1:] * mask[:, :-1]).float()
        want = (weights * (-(logp * tm).sum(-1) / tm.sum(-1))).sum()
    params = [p.detach().numpy() for p in hf.parameters()]
    (got,) = mod.call_host("forward_loss", *params, ids.numpy(), mask.numpy(), weights.numpy())
    assert rel_err(got, want) < 1e-5


SHORT = 24
"""The resident module's smaller KV cache (prefill_bs1_kv24 / decode_bs1_kv24)."""


@pytest.fixture(scope="module")
def resident(root):
    """The gqa-tied case as a resident module (weights as parameter-backed globals, packed by data
    tiling at load) exactly as `pcpc export --resident` builds it, + its weight file."""
    from pcpc.cmd_qwen import model_target
    from pcpc.mlir.build import build
    from qwen_helpers import PREFILL_LEN

    target, cfg = model_target(str(make_hf_dir(root, "gqa-tied")), "float32", [1], PREFILL_LEN, MAX_SEQ, resident=True,
                               cache_sizes=[SHORT])
    assert DATA_TILING in target.llvm_cpu_flags
    result = build(target, root / "artifacts")
    return result, write_weights(root, "gqa-tied", result, cfg)


def test_resident_module_matches_hf(resident, models):
    result, weights = resident
    meta = load_meta(result.meta)
    assert all(a.role != "param" for sig in meta.functions.values() for a in sig.args)
    assert [p.name for p in meta.parameters] == list(qwen2.param_shapes(models("gqa-tied")[1]))
    model = gen.QwenModel.load(result.vmfb, weights)
    assert model.module.resident and model.weights == []
    _, _, hf = models("gqa-tied")
    prompt = prompt_ids(11, seed=2)
    assert gen.generate(model, [prompt], 32, eos_ids=[]).tokens[0] == hf_greedy(hf, prompt, 32)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt])).logits[0, -1].numpy()
    logits, cache = gen.prefill(model, [prompt], 1, model.new_cache(1))
    assert rel_err(logits[0], ref) < 1e-4
    # decode attends over the cache prefill wrote (the step IREE's dispatch-creation data tiling got wrong)
    step, _ = gen.decode_one_token(model, np.array([7]), np.array([len(prompt)]), cache)
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + [7]])).logits[0, -1].numpy()
    assert rel_err(step[0], ref) < 1e-4


class _Calls:
    """A CompiledModule stand-in that records the entry points called."""

    def __init__(self, module):
        self.module, self.names = module, []

    def __getattr__(self, name):
        return getattr(self.module, name)

    def __call__(self, name, *args):
        self.names.append(name)
        return self.module(name, *args)


def test_generation_runs_on_the_smallest_cache_that_fits(resident, models):
    """A short generation prefills and decodes on the kv24 cache, a longer one on the full one; both
    match HF (the smaller cache's attention is the same computation over fewer slots)."""
    result, weights = resident
    model = gen.QwenModel.load(result.vmfb, weights)
    assert model.capacities == [SHORT, MAX_SEQ]
    assert [c.shape[3] for c in model.new_cache(1, SHORT)] == [SHORT, SHORT]
    assert model.new_cache(1, SHORT + 1)[0].shape[3] == MAX_SEQ and model.new_cache(1)[0].shape[3] == MAX_SEQ
    _, _, hf = models("gqa-tied")
    prompt = prompt_ids(11, seed=6)
    model.module = _Calls(model.module)
    for n, step in ((SHORT - len(prompt), f"_bs1_kv{SHORT}"), (SHORT - len(prompt) + 1, "_bs1")):
        model.module.names.clear()
        assert gen.generate(model, [prompt], n, eos_ids=[]).tokens[0] == hf_greedy(hf, prompt, n)
        assert set(model.module.names) == {"prefill" + step, "decode" + step}


def test_cache_sizes_are_checked():
    from pcpc.cmd_qwen import model_target
    from pcpc.mlir import qwen_functions

    with pytest.raises(UserError, match=r"--cache-size 4: must lie in \[--prefill-len, --max-seq\) = \[8, 64\)"):
        model_target("qwen2.5-0.5b", "float32", [1], 8, 64, cache_sizes=[4])
    with pytest.raises(UserError, match=r"--cache-size 64: must lie"):
        model_target("qwen2.5-0.5b", "float32", [1], 8, 64, cache_sizes=[16, 64])
    target, _ = model_target("qwen2.5-0.5b", "float32", [1], 128, None)
    assert target.config["cache_sizes"] == [256] and target.config["max_seq"] == 1024
    assert "cache_sizes" not in model_target("qwen2.5-0.5b", "float32", [1], 128, None, cache_sizes=[0])[0].config
    assert "cache_sizes" not in model_target("qwen2.5-0.5b", "float32", [1], 8, 200)[0].config
    with pytest.raises(ValueError, match=r"cache_sizes entries must be integers in \[prefill_len, max_seq\)"):
        qwen_functions.check_config({"model": "qwen2-tiny", "prefill_len": 8, "max_seq": 64, "cache_sizes": [64]})


def test_resident_module_needs_a_matching_weight_file(resident, tmp_path):
    result, _ = resident
    bare = CompiledModule(result.vmfb)  # inspectable without weights, not callable
    assert bare.resident and "decode_bs1" in bare.meta.functions
    with pytest.raises(UserError, match="its weights are module parameters; load it with the flat weight file"):
        bare("decode_bs1", np.zeros((1, 1), np.int64), np.zeros((1, 1), np.int64), *[np.zeros(s.shape, np.float32)
             for s in bare.meta.functions["decode_bs1"].args[2:]])
    short = tmp_path / "short.bin"
    short.write_bytes(b"\0" * 64)
    with pytest.raises(UserError, match=r"short.bin: weight file is 64 bytes but the module's parameters need [\d,]+ bytes"):
        CompiledModule(result.vmfb, parameters=short)


def test_resident_weights_are_packed_once_per_weight_file(resident, tmp_path):
    """The build writes the module's encoder; loading packs the weight file once (a .packed file next to
    it, remade when the weights change or the file is damaged) and serves the packed weights from it."""
    import shutil

    from pcpc.mlir.build import encoder_path_for
    from pcpc.runtime import pack

    result, weights = resident
    meta = load_meta(result.meta)
    assert meta.provenance.encoder_sha256 and encoder_path_for(result.vmfb).is_file()
    own = tmp_path / "weights.bin"
    shutil.copy(weights, own)
    assert pack.packed_entries(own, meta) is None
    packed, entries = pack.ensure_packed(result.vmfb, meta, own)
    assert packed.is_file() and entries and all(e["offset"] % pack.ALIGN == 0 for e in entries)
    stamp = packed.stat().st_mtime_ns
    prompt = prompt_ids(9, seed=4)
    first = gen.generate(gen.QwenModel.load(result.vmfb, own), [prompt], 8, eos_ids=[]).tokens[0]
    assert packed.stat().st_mtime_ns == stamp  # up to date: not packed again

    data = bytearray(own.read_bytes())
    data[:4] = np.float32(3.0).tobytes()  # the weights change: the packed file is stale
    own.write_bytes(bytes(data))
    assert pack.packed_entries(own, meta) is None
    with open(packed, "r+b") as f:  # damaged: its size no longer matches its record
        f.truncate(100)
    pack.ensure_packed(result.vmfb, meta, own)
    assert pack.packed_entries(own, meta) is not None and packed.stat().st_size > 100
    own.write_bytes(weights.read_bytes())
    assert gen.generate(gen.QwenModel.load(result.vmfb, own), [prompt], 8, eos_ids=[]).tokens[0] == first

    encoder = encoder_path_for(result.vmfb)
    saved = encoder.read_bytes()
    try:
        encoder.write_bytes(b"not the encoder")
        with pytest.raises(UserError, match="not the encoder this module was built with; rebuild"):
            pack.pack(result.vmfb, meta, own)
    finally:
        encoder.write_bytes(saved)
