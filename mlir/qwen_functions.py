"""The functions a Qwen2 module exports, built from a recipe config.

Config keys (all JSON):
    model            preset name (exporters/qwen2.py PRESETS), or omitted when hf_config is given
    hf_config        a HF config.json dict (any Qwen2-family model); wins over `model`
    model_overrides  dict of Qwen2Config fields applied on top
    dtype            weight dtype: float32 (default) | bfloat16
    batch_sizes      list of B; one prefill_bs{B} and decode_bs{B} per B (default [1])
    prefill_len      P, tokens per prefill call (default 128)
    max_seq          S, KV-cache capacity in positions (default 1024)
    cache_sizes      smaller KV-cache capacities exported as well, each with its own prefill / decode pair
                     (default none); the runtime runs a generation on the smallest cache that holds
                     prompt + new tokens, since decode reads (and rewrites) the whole cache every step
    loss_batch_size  rows of forward_loss (default 1)
    loss_seq_len     T of forward_loss (default 128)
    functions        subset of ("prefill", "decode", "forward_loss"); default prefill + decode
    resident         true: weights are module globals backed by named parameters (loaded once from
                     the flat weight file when the module loads) instead of leading call arguments;
                     the exported contract stays the all-weights-as-inputs module (resident false)

Every function takes all weights first, in `qwen2.param_shapes` order:

    prefill_bs{B}  (*params, tokens (B,P) i64, positions (B,P) i64, cache_k, cache_v)
                   -> logits (B,V) f32 of the last column, cache_k', cache_v'
    decode_bs{B}   (*params, tokens (B,1) i64, positions (B,1) i64, cache_k, cache_v)
                   -> logits (B,V) f32, cache_k', cache_v'
    prefill_bs{B}_kv{C}, decode_bs{B}_kv{C}
                   the same on a cache of capacity C, for each C in cache_sizes
    forward_loss   (*params, input_ids (B,T) i64, attention_mask (B,T) i64, weights (B,) f32) -> loss

cache_k / cache_v are (n_layer, B, n_kv_head, S, head_dim) f32 (layout and
padding rules: exporters/qwen2.py). forward_loss is
    sum_b weights[b] * mean_t NLL(input_ids[b, t+1] | input_ids[b, :t+1])
over the targets whose token and predecessor both have mask 1 (a row with no
such target contributes 0); uniform weights 1/B give the mean per-sequence
loss, per-sequence advantages give a policy-gradient surrogate.
"""

from __future__ import annotations

import torch

from pcpc.config import from_dict
from pcpc.exporters import qwen2
from pcpc.mlir.lower import ExportFunction
from pcpc.mlir.signature import TensorSpec, step_name

FUNCTIONS = ("prefill", "decode", "forward_loss")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
KEYS = ("model", "hf_config", "model_overrides", "dtype", "batch_sizes", "prefill_len", "max_seq", "cache_sizes",
        "loss_batch_size", "loss_seq_len", "functions", "resident")


def model_config(config: dict) -> qwen2.Qwen2Config:
    """The Qwen2Config a recipe config describes."""
    overrides = config.get("model_overrides", {})
    if config.get("hf_config") is not None:
        base = qwen2.config_from_hf(config["hf_config"], where="hf_config").to_dict()
        return from_dict(qwen2.Qwen2Config, {**base, **overrides}, where="hf_config")
    return qwen2.make_config(config["model"], **overrides)


def check_config(config: dict) -> None:
    """Reject unknown keys and impossible sizes with errors naming the key."""
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise ValueError(f"qwen recipe: unknown keys {unknown}; valid: {', '.join(KEYS)}")
    if config.get("dtype", "float32") not in DTYPES:
        raise ValueError(f"qwen recipe: dtype must be one of {', '.join(DTYPES)}; got {config['dtype']!r}")
    bad = [f for f in config.get("functions", ()) if f not in FUNCTIONS]
    if bad:
        raise ValueError(f"qwen recipe: unknown functions {bad}; valid: {', '.join(FUNCTIONS)}")
    for key in ("prefill_len", "max_seq", "loss_batch_size", "loss_seq_len"):
        if key in config and (not isinstance(config[key], int) or config[key] < 1):
            raise ValueError(f"qwen recipe: {key} must be a positive integer, got {config[key]!r}")
    P, S = config.get("prefill_len", 128), config.get("max_seq", 1024)
    if P > S:
        raise ValueError("qwen recipe: prefill_len must be <= max_seq")
    for c in config.get("cache_sizes", ()):
        if not isinstance(c, int) or not P <= c < S:
            raise ValueError(f"qwen recipe: cache_sizes entries must be integers in [prefill_len, max_seq) "
                             f"= [{P}, {S}), got {c!r}")


def param_specs(cfg: qwen2.Qwen2Config, dtype: str = "float32") -> list[TensorSpec]:
    return [TensorSpec(n, "param", tuple(s), dtype) for n, s in qwen2.param_shapes(cfg).items()]


def _step_fn(cfg, names, last_only):
    n = len(names)

    def step(*flat):
        params = dict(zip(names, flat[:n]))
        tokens, positions, ck, cv = flat[n:]
        return qwen2.forward_cached(params, tokens, positions, ck, cv, cfg, last_only=last_only)

    return step


def weighted_nll(params, input_ids, attention_mask, weights, cfg):
    """The forward_loss scalar (see module docstring)."""
    logits = qwen2.forward(params, input_ids, None, cfg, attention_mask=attention_mask)
    logp = qwen2.token_logprobs(logits, input_ids)  # (B, T-1)
    m = attention_mask.to(torch.float32)
    tm = m[:, 1:] * m[:, :-1]  # (B, T-1): target and its predecessor are real tokens
    per_seq = -(logp * tm).sum(-1) / tm.sum(-1).clamp(min=1.0)  # (B,)
    return (weights * per_seq).sum()


def build(config: dict) -> tuple[list[ExportFunction], list[TensorSpec]]:
    """ExportFunctions for the requested functions, and the parameter specs in order."""
    check_config(config)
    cfg = model_config(config)
    dtype = config.get("dtype", "float32")
    P, S = config.get("prefill_len", 128), config.get("max_seq", 1024)
    if S > cfg.max_position_embeddings:
        raise ValueError(f"qwen recipe: max_seq {S} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    params = param_specs(cfg, dtype)
    names = [p.name for p in params]
    wanted = config.get("functions", ["prefill", "decode"])
    fns = []

    def cache_specs(B, C):
        shape = qwen2.cache_shape(cfg, B, C)
        return [TensorSpec("cache_k", "state", shape, "float32"), TensorSpec("cache_v", "state", shape, "float32")]

    def io(B, T):
        return [TensorSpec("tokens", "data", (B, T), "int64"), TensorSpec("positions", "data", (B, T), "int64")]

    results = [("logits", "output"), ("cache_k", "state"), ("cache_v", "state")]
    n_globals = len(params) if config.get("resident", False) else 0
    for B in config.get("batch_sizes", [1]):
        if not isinstance(B, int) or B < 1:
            raise ValueError(f"qwen recipe: batch_sizes entries must be positive integers, got {B!r}")
        for C in sorted(set(config.get("cache_sizes", ())) | {S}, reverse=True):
            for kind, T in (("prefill", P), ("decode", 1)):
                if kind in wanted:
                    fns.append(ExportFunction(step_name(kind, B, C, S), _step_fn(cfg, names, True),
                                              params + io(B, T) + cache_specs(B, C), results, n_globals))
    if "forward_loss" in wanted:
        LB, LT = config.get("loss_batch_size", 1), config.get("loss_seq_len", 128)
        n = len(names)

        def forward_loss(*flat):
            return weighted_nll(dict(zip(names, flat[:n])), *flat[n:], cfg)

        data = [
            TensorSpec("input_ids", "data", (LB, LT), "int64"),
            TensorSpec("attention_mask", "data", (LB, LT), "int64"),
            TensorSpec("weights", "data", (LB,), "float32"),
        ]
        fns.append(ExportFunction("forward_loss", forward_loss, params + data, [("loss", "loss")], n_globals))
    return fns, params
