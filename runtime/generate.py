"""Token generation through a compiled Qwen2 module (gpt-fast style verbs).

    model = QwenModel.load("artifacts/qwen-generation.vmfb", "artifacts/qwen-generation.weights.bin")
    result = generate(model, [[9707, 11, 1879]], max_tokens=32, sampling=SamplingConfig(0.7, 0.9, seed=0),
                      eos_ids=[151645])

The module exports prefill_bs{B} and decode_bs{B} (mlir/qwen_functions.py), and
possibly the same pair on smaller KV caches (prefill_bs{B}_kv{C}): decode reads
and rewrites its whole cache every step, so a generation runs on the smallest
cache that holds its prompt and new tokens (`QwenModel.new_cache`); the steps
pick their entry point from the cache they are given.
Weights are imported into the runtime once, without a copy (aligned host
arrays wrapped as device buffers), and passed to every call as device
arrays; the KV cache lives on the device and each call's cache output is the
next call's input. Per token only the token ids, positions and the logits
row (B x vocab) cross to the host: nothing of size O(weights) is copied.

Batches: prompts are left-padded with position -1 (padding writes nothing to
the cache, see exporters/qwen2.py), so each row's last prefill column is its
last real token and row b decodes at its own position. Prompts longer than
the module's prefill length go in several prefill calls. Rows stop at EOS.
Sampling (temperature, nucleus top-p) runs on the host from a seeded numpy
generator: the same seed gives the same tokens.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pcpc.errors import UserError
from pcpc.mlir.signature import load_meta, meta_path_for, step_name
from pcpc.runtime.module import CompiledModule, is_resident, to_host


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen from the logits."""

    temperature: float = 0.0
    """Softmax temperature; 0 means greedy (argmax)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the most likely tokens whose mass reaches top_p (1.0 keeps all)."""
    seed: int = 0
    """Seed of the sampling generator (numpy PCG64)."""

    def __post_init__(self):
        if not self.temperature >= 0:
            raise UserError(f"--temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")


def import_host_array(mod: CompiledModule, array: np.ndarray):
    """Wrap an aligned, C-contiguous host array as a device array without copying.

    The local-task (CPU) device reads host memory directly; the array must
    stay alive as long as the device array (it is kept on the result).
    Unaligned memory crashes IREE's kernels, so only 64-byte aligned arrays
    are accepted (exporters.hf_weights.aligned_empty / read_flat make them).
    """
    import iree.runtime as rt
    from iree.runtime.array_interop import map_dtype_to_element_type

    if not array.flags.c_contiguous or array.ctypes.data % 64:
        raise ValueError("import_host_array needs a C-contiguous, 64-byte aligned array")
    memory = rt.MemoryType.HOST_LOCAL | rt.MemoryType.DEVICE_VISIBLE
    buf = mod.device.allocator.import_host_allocation(array, memory, rt.BufferUsage.DEFAULT)
    view = rt.HalBufferView(buf, array.shape, map_dtype_to_element_type(array.dtype))
    out = rt.DeviceArray(mod.device, view, override_dtype=array.dtype)
    out._pcpc_host = array  # keep the memory alive with the device array
    return out


@dataclass
class QwenModel:
    """A compiled generation module, its device-resident weights and its geometry."""

    module: CompiledModule
    weights: list
    batch_sizes: list[int]
    prefill_len: int
    max_seq: int
    vocab_size: int
    capacities: list[int]
    """KV-cache capacities with a prefill / decode pair for every batch size, ascending; the last is max_seq."""

    @classmethod
    def from_module(cls, module: CompiledModule, weights: list) -> "QwenModel":
        fns = module.meta.functions
        sizes = sorted(int(m.group(1)) for n in fns if (m := re.fullmatch(r"decode_bs(\d+)", n)))
        sizes = [b for b in sizes if f"prefill_bs{b}" in fns]
        if not sizes:
            raise UserError(f"{module.path}: exports no prefill_bs{{B}} / decode_bs{{B}} pair; not a generation module")
        pre = fns[f"prefill_bs{sizes[0]}"]
        n = 0 if module.resident else len(module.meta.parameters)
        if len(weights) != n:
            raise UserError(f"{module.path}: {len(weights)} weight arrays given, the module takes {n}")
        tokens = next(a for a in pre.args if a.name == "tokens")
        max_seq = pre.args[-1].shape[3]
        smaller = {int(m.group(1)) for n in fns if (m := re.fullmatch(r"decode_bs\d+_kv(\d+)", n))}
        capacities = sorted(c for c in smaller if all(step_name(k, b, c, max_seq) in fns
                                                         for b in sizes for k in ("prefill", "decode")))
        return cls(module, list(weights), sizes, tokens.shape[1], max_seq, pre.results[0].shape[-1],
                   capacities + [max_seq])

    @classmethod
    def load(cls, vmfb: str | Path, weights_file: str | Path, threads: int | None = None) -> "QwenModel":
        """Load the module and its flat weight file (size checked against meta.json).

        A module taking its weights as arguments gets them imported without a copy
        (aligned host arrays); a resident module loads them as its parameters.
        """
        from pcpc.exporters.hf_weights import read_flat

        if is_resident(load_meta(meta_path_for(Path(vmfb)))):
            return cls.from_module(CompiledModule(vmfb, threads=threads, parameters=weights_file), [])
        module = CompiledModule(vmfb, threads=threads)
        meta = module.meta
        arrays = read_flat(Path(weights_file), meta.parameters, meta.parameter_bytes)
        weights = []
        for spec, arr in zip(meta.parameters, arrays):
            if spec.dtype == "bfloat16":
                import ml_dtypes

                arr = arr.view(ml_dtypes.bfloat16)
            weights.append(import_host_array(module, arr))
        return cls.from_module(module, weights)

    def new_cache(self, batch: int, positions: int | None = None) -> tuple:
        """Zeroed KV cache (keys, values) on the device for batch size `batch`: the smallest
        capacity that holds `positions` (default: the full max_seq)."""
        need = self.max_seq if positions is None else positions
        capacity = next((c for c in self.capacities if c >= need), self.max_seq)
        spec = self.module.meta.functions[self.step("decode", batch, capacity)].args[-1]
        zeros = np.zeros(spec.shape, np.float32)
        return self.module.upload(zeros), self.module.upload(zeros)

    def step(self, kind: str, batch: int, capacity: int) -> str:
        """Name of the prefill / decode entry point for this batch size and cache capacity."""
        return step_name(kind, batch, capacity, self.max_seq)


def _capacity(cache: tuple) -> int:
    return int(cache[0].shape[3])  # (L, B, n_kv, capacity, head_dim)


# ---------------------------------------------------------------------------
# the verbs


def prefill(model: QwenModel, prompts: Sequence[Sequence[int]], batch: int, cache: tuple):
    """Run the prompts (<= batch rows; missing rows are padding) through prefill_bs{batch}.

    Rows are left-padded to a multiple of the prefill length with position -1.
    Returns the logits (batch, V) of each row's last prompt token and the cache.
    """
    P = model.prefill_len
    longest = max(len(p) for p in prompts)
    total = -(-longest // P) * P
    tokens = np.zeros((batch, total), np.int64)
    positions = np.full((batch, total), -1, np.int64)
    for b, p in enumerate(prompts):
        tokens[b, total - len(p):] = p
        positions[b, total - len(p):] = np.arange(len(p))
    fn = model.step("prefill", batch, _capacity(cache))
    ck, cv = cache
    for c in range(0, total, P):
        logits, ck, cv = model.module(fn, *model.weights, tokens[:, c : c + P],
                                      positions[:, c : c + P], ck, cv)
    return to_host(logits), (ck, cv)


def decode_one_token(model: QwenModel, tokens: np.ndarray, positions: np.ndarray, cache: tuple):
    """One decode step: tokens, positions (batch,) int64 -> logits (batch, V) and the new cache."""
    batch = tokens.shape[0]
    fn = model.step("decode", batch, _capacity(cache))
    logits, ck, cv = model.module(fn, *model.weights, tokens.reshape(batch, 1), positions.reshape(batch, 1), *cache)
    return to_host(logits), (ck, cv)


def logits_to_probs(logits: np.ndarray, temperature: float, top_p: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(token ids, probabilities) of the nucleus of one row of logits (V,) at `temperature` > 0.

    The nucleus is the smallest set of most likely tokens whose mass reaches
    top_p (HF's TopPLogitsWarper keeps the same set). Only the candidates
    are sorted: the top 256 first, widened until they hold top_p of the mass.
    """
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    V = p.shape[0]
    if top_p >= 1.0:
        return np.arange(V), p
    k = min(V, 256)
    while True:
        cand = np.argpartition(-p, k - 1)[:k] if k < V else np.arange(V)
        if k == V or p[cand].sum() >= top_p:
            break
        k = min(V, k * 8)
    order = cand[np.argsort(-p[cand], kind="stable")]
    before = np.cumsum(p[order]) - p[order]  # mass of the more likely tokens
    keep = order[before < top_p]
    if keep.size == 0:  # non-finite logits: fall back to the most likely token
        keep = order[:1]
    return keep, p[keep] / p[keep].sum()


def sample(logits: np.ndarray, rng: np.random.Generator, sampling: SamplingConfig) -> np.ndarray:
    """Next token per row of logits (B, V): argmax at temperature 0, else nucleus sampling."""
    if sampling.temperature == 0:
        return logits.argmax(-1).astype(np.int64)
    out = np.empty(logits.shape[0], np.int64)
    for b in range(logits.shape[0]):
        ids, probs = logits_to_probs(logits[b], sampling.temperature, sampling.top_p)
        u = rng.random()
        out[b] = ids[min(np.searchsorted(np.cumsum(probs), u, side="right"), len(ids) - 1)]
    return out


@dataclass
class GenerationResult:
    """Generated tokens per prompt (EOS excluded) and timings."""

    tokens: list[list[int]]
    finished: list[bool]
    """True where the row stopped at EOS (False: it ran out of max_tokens)."""
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    decode_steps: int = 0
    prompt_tokens: int = 0
    per_group: list = field(default_factory=list)


def decode_n_tokens(model, first, positions, cache, n, rng, sampling, eos, on_token=None, rows=None):
    """Emit `first` (batch,) and decode until each row has n tokens or hit EOS.

    Row b's next token goes to position positions[b]; rows not in `rows` are
    padding (position -1). Returns (tokens per row without EOS, stopped at
    EOS per row, decode calls made).
    """
    batch = first.shape[0]
    rows = list(range(batch)) if rows is None else rows
    out = [[] for _ in range(batch)]
    done = np.array([b not in rows for b in range(batch)])
    cur, pos, steps = first.copy(), positions.copy(), 0
    for step in range(n):
        for b in rows:
            if not done[b]:
                if int(cur[b]) in eos:
                    done[b] = True
                else:
                    out[b].append(int(cur[b]))
                    if on_token:
                        on_token(b, int(cur[b]))
        if done.all() or step == n - 1:
            break
        logits, cache = decode_one_token(model, cur, np.where(done, -1, pos), cache)
        steps += 1
        cur = np.zeros(batch, np.int64)
        cur[~done] = sample(logits[~done], rng, sampling)  # padding rows' logits are garbage: never sampled
        pos = pos + 1
    return out, [bool(done[b]) and b in rows for b in range(batch)], steps


def generate(
    model: QwenModel,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    eos_ids: Sequence[int] = (),
    on_token: Callable[[int, int], None] | None = None,
) -> GenerationResult:
    """Up to max_tokens new tokens for each prompt; on_token(prompt_index, token) streams them."""
    if not prompts:
        raise UserError("generate: no prompts")
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise UserError(f"prompt {i} is empty")
        if len(p) + max_tokens > model.max_seq:
            raise UserError(
                f"prompt {i} has {len(p)} tokens; with --max-tokens {max_tokens} it needs "
                f"{len(p) + max_tokens} positions but the module's KV cache holds {model.max_seq}"
            )
        bad = [t for t in p if not 0 <= t < model.vocab_size]
        if bad:
            raise UserError(f"prompt {i}: token id {bad[0]} outside the vocabulary (0..{model.vocab_size - 1})")
    rng = np.random.default_rng(sampling.seed)
    eos = set(int(e) for e in eos_ids)
    result = GenerationResult([], [], prompt_tokens=sum(len(p) for p in prompts))
    biggest = model.batch_sizes[-1]
    for start in range(0, len(prompts), biggest):
        group = prompts[start : start + biggest]
        batch = next(b for b in model.batch_sizes if b >= len(group))
        t0 = time.perf_counter()
        cache = model.new_cache(batch, max(len(p) for p in group) + max_tokens)
        logits, cache = prefill(model, group, batch, cache)
        first = np.zeros(batch, np.int64)
        first[: len(group)] = sample(logits[: len(group)], rng, sampling)
        t1 = time.perf_counter()
        positions = np.full(batch, -1, np.int64)
        positions[: len(group)] = [len(p) for p in group]
        emit = (lambda b, tok, s=start: on_token(s + b, tok)) if on_token else None
        toks, fin, steps = decode_n_tokens(model, first, positions, cache, max_tokens, rng, sampling, eos, emit,
                                           rows=list(range(len(group))))
        t2 = time.perf_counter()
        result.tokens += toks[: len(group)]
        result.finished += fin[: len(group)]
        result.prefill_seconds += t1 - t0
        result.decode_seconds += t2 - t1
        result.decode_steps += steps
        result.per_group.append({"batch": batch, "rows": len(group), "prefill_s": t1 - t0, "decode_s": t2 - t1,
                                 "decode_steps": steps})
    return result
