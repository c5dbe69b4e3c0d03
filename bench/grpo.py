"""One GRPO iteration's two halves, pcpc (compiled modules) vs plain PyTorch eager (HF transformers), in one run.

    .venv/bin/python bench/grpo.py [--shapes tiny,0.5b] [--group 4] [--prompt-len 16] [--max-tokens 32] [--reps 3]
                                   [--repeat 1] [--no-shared-prefix] [--compute-dtype bfloat16]

Random weights (no download). For each shape, each contender runs in its own
subprocess (so its peak memory is its own) and measures, after a warm-up:

  rollout   group_size completions of max_tokens tokens for one prompt, top-p 0.9 at temperature 0.7
            (EOS disabled so both generate exactly max_tokens): tokens / s
            pcpc: prefill_bs{G} + decode_bs{G} (runtime/rl/rollout.generate_completions)
            eager: HF Qwen2ForCausalLM.generate(do_sample=True, ...)
  learner   one GRPO update on those G rows (prompt + completion, beta 0.04, loss grpo): seconds
            pcpc: token_logprobs(reference) + grpo_value_and_grad (loss, torch.func gradients) + AdamW chunk
                  by chunk (runtime/rl/update.py), as the learner runs it; the reference is a module of its
                  own whose weights are packed once from a flat weight file, as a run's (from 2026-12-07 on;
                  before, the training module's token_logprobs re-packed them on every call)
            eager: reference forward (no_grad) + policy forward + TRL's loss + backward + clip + torch AdamW
            Both run the LM head on the completion positions only (pcpc: the recipe's completion_len; eager:
            HF's logits_to_keep, as TRL's GRPOTrainer calls it), from 2026-12-07 on; on every position before.
            pcpc computes the group's prompt once, not once per row (the recipe's shared_prefix, as a run
            does; exact), from 2026-12-07 on; --no-shared-prefix computes it per row, as eager does.

--compute-dtype bfloat16: the learners' matmuls in bf16 over fp32 weights, pcpc through the recipe's compute_dtype,
eager under torch.autocast (for CPUs with avx512_bf16; elsewhere both emulate bf16).

Prints both, the ratios (eager time / pcpc time) and the learner's peak RSS (from when its weights are
loaded: the set-up's garbage is returned first and the peak reset, see start_peak_rss). Build time of
the modules is reported separately (built once, cached). On a shared, busy
machine use --repeat N: the contenders then alternate N times and the medians
of their per-round bests are compared (the load average is printed too).
Both sides run with pcpc's malloc policy (runtime/host_memory.py: freed memory stays in the process, so a
step does not fault its transients back in; measured from 2026-12-07 on, eager ran with glibc's default before).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from pcpc.mlir import cpu as target_cpu

target_cpu.match_torch()  # with PCPC_CPU=znver3, torch runs AVX2 too (before it is imported)

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PRESETS = {"tiny": "qwen2-tiny", "0.5b": "qwen2.5-0.5b"}
TEMPERATURE, TOP_P, BETA = 0.7, 0.9, 0.04


def shared_prefix(group: int, prompt_len: int, shared: bool = True) -> dict:
    """The recipe's shared_prefix: every row holds the one prompt (a GRPO group), so the learner computes its
    positions once, as a run does (runtime/rl/grpo.py); {} with --no-shared-prefix."""
    return {"shared_prefix": [group, prompt_len]} if shared and group > 1 else {}


def targets(preset: str, group: int, prompt_len: int, max_tokens: int, shared: bool = True,
            compute_dtype: str = "float32"):
    from pcpc.mlir.targets import GRPO_FUNCTIONS, qwen_target, rl_target

    T = prompt_len + max_tokens
    gen = qwen_target(f"bench-grpo-gen-{preset}", preset, batch_sizes=[group], prefill_len=prompt_len, max_seq=T)
    bf16 = compute_dtype != "float32"
    train = rl_target(f"bench-grpo-train-{preset}{'-bf16' if bf16 else ''}", preset, batch_size=group, seq_len=T,
                      completion_len=max_tokens, functions=GRPO_FUNCTIONS, **shared_prefix(group, prompt_len, shared),
                      **({"compute_dtype": compute_dtype} if bf16 else {}))
    return gen, train


def trl_logps(model, ids, width: int):
    """Log-probs (B, width) of the last `width` tokens of ids (B, T) at TEMPERATURE, as TRL's GRPOTrainer
    computes them: the model's logits for the last width + 1 positions only (logits_to_keep), the last one
    dropped."""
    import torch

    logits = model(input_ids=ids, logits_to_keep=width + 1).logits[:, :-1] / TEMPERATURE
    return torch.gather(torch.log_softmax(logits, -1), 2, ids[:, -width:, None]).squeeze(-1)


def inputs(preset: str, group: int, prompt_len: int, seed: int = 0):
    import torch

    from pcpc.exporters import qwen2

    cfg = qwen2.make_config(preset)
    params = qwen2.init_params(cfg, seed)
    prompt = torch.randint(1, cfg.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(seed)).tolist()
    return cfg, params, prompt


def group_rows(cfg, prompt, a) -> np.ndarray:
    """Learner rows (a.group, T) without a rollout, the same for every contender: one group's prompt (the
    shared_prefix module computes it once), then random completion tokens."""
    T = a.prompt_len + a.max_tokens
    ids = np.random.default_rng(1).integers(1, cfg.vocab_size, (a.group, T)).astype(np.int64)
    ids[:, :a.prompt_len] = prompt
    return ids


def aligned_host(params) -> list[np.ndarray]:
    """64-byte aligned host copies of the weights, which the CPU device reads in place, as a run does."""
    from pcpc.exporters.hf_weights import aligned_empty

    host = []
    for p in params.values():
        buf = aligned_empty(max(p.numel() * 4, 4))[:p.numel() * 4].view(np.float32).reshape(p.shape)
        buf[...] = p.numpy()
        host.append(buf)
    return host


def peak_rss_gb() -> float:
    from pcpc.runtime.host_memory import peak_rss_bytes

    return peak_rss_bytes() / 1e9


def start_peak_rss() -> None:
    """Measure the peak RSS from here on: the harness's set-up garbage (torch's random init, then the aligned
    copies made from it) goes back to the OS (malloc_trim) and VmHWM is reset (/proc/self/clear_refs 5), so
    the peak is the learner's, with its weights loaded, as in a run that reads them from a file."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # not Linux/glibc: the peak then includes the set-up


def reference_module(train_t, host: list[np.ndarray], out_dir: Path, threads: int):
    """The learner's frozen reference as a run loads it (runtime/rl/policy.py start_reference / pack_reference):
    its own module, the weights read from a flat weight file (written here once, next to the modules) and
    packed once for it."""
    from pcpc.exporters.hf_weights import write_flat
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import reference_target
    from pcpc.runtime.module import CompiledModule
    from pcpc.runtime.rl.policy import pack_reference

    vmfb = build(reference_target(train_t), out_dir).vmfb
    weights = out_dir / f"{train_t.name}-weights.bin"
    same = weights.is_file() and weights.stat().st_size == sum(h.nbytes for h in host)
    if same:  # the seeded weights of an earlier run: check them (cheap next to writing and re-packing 2 GB)
        flat, at = np.memmap(weights, np.float32, "r"), 0
        for h in host:
            same = same and np.array_equal(flat[at:at + h.size], h.reshape(-1))
            at += h.size
        del flat
    if not same:
        write_flat(weights, [(str(i), h) for i, h in enumerate(host)], "float32", sum(h.nbytes for h in host))
    said = []
    if not pack_reference(vmfb, weights, said.append):
        sys.exit(said[-1])
    return CompiledModule(vmfb, threads=threads, parameters=weights)


def dense_optimizer(train_t, mod, out_dir: Path, threads: int):
    """The full fine-tuning optimizer a run uses: the chunked AdamW, in place through the training target's
    optimizer module (runtime/rl/update.py). The policy's weights must be its own: nothing else may share them."""
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import optimizer_target
    from pcpc.runtime.module import CompiledModule
    from pcpc.runtime.rl.update import ChunkedOptimizer

    return ChunkedOptimizer(mod, CompiledModule(build(optimizer_target(train_t), out_dir).vmfb, threads=threads))


def run_pcpc(a) -> dict:
    from pcpc.autodiff.grpo import loss_type_weights
    from pcpc.mlir.build import build
    from pcpc.runtime.generate import QwenModel, import_host_array
    from pcpc.runtime.rl.rows import pack_rows
    from pcpc.runtime.module import CompiledModule, to_host
    from pcpc.runtime.rl.rollout import SamplingPlan, generate_completions

    preset = PRESETS[a.shape]
    gen_t, train_t = targets(preset, a.group, a.prompt_len, a.max_tokens, not a.no_shared_prefix, a.compute_dtype)
    out_dir = Path(a.artifacts)
    t0 = time.perf_counter()
    gen_b, train_b = build(gen_t, out_dir), build(train_t, out_dir)
    build_s = time.perf_counter() - t0
    cfg, params, prompt = inputs(preset, a.group, a.prompt_len)
    host = aligned_host(params)
    del params
    threads = os.cpu_count()

    gen = CompiledModule(gen_b.vmfb, threads=threads)
    model = QwenModel.from_module(gen, [import_host_array(gen, h) for h in host])
    plan = SamplingPlan(str(gen_b.vmfb), a.max_tokens, TEMPERATURE, TOP_P, (), threads)
    rows = [prompt] * a.group
    comps = generate_completions(model, rows, plan, seed=0)  # warm-up
    times = []
    for r in range(a.reps):
        t0 = time.perf_counter()
        comps = generate_completions(model, rows, plan, seed=r + 1)
        times.append(time.perf_counter() - t0)
    tokens = sum(len(c) for c in comps)
    rollout = {"tokens": tokens, "best_s": min(times), "tok_s": tokens / min(times)}
    del model, gen

    mod = CompiledModule(train_b.vmfb, threads=threads)
    opt = dense_optimizer(train_t, mod, out_dir, threads)
    ref = reference_module(train_t, host, out_dir, threads)  # the learner's frozen reference
    P = [import_host_array(mod, h) for h in host]  # the policy's weights, which AdamW writes in place (as a run)
    M = mod.upload_all([np.zeros(h.shape, np.float32) for h in host])
    V = mod.upload_all([np.zeros(h.shape, np.float32) for h in host])
    del host
    start_peak_rss()
    T = a.prompt_len + a.max_tokens
    ids, mask = pack_rows(rows, comps, T, 0)
    adv = np.linspace(-1.0, 1.5, a.group, dtype=np.float32)
    zeros = np.zeros((a.group, T - 1), np.float32)
    sel = np.asarray(loss_type_weights("grpo"), np.float32)

    def step(k):
        ref_logp = ref("token_logprobs", ids, mask, np.float32(TEMPERATURE))[0]
        out = mod("grpo_value_and_grad", *P, ids, mask, adv, zeros, ref_logp, sel, np.float32(BETA),
                  np.float32(0.2), np.float32(0.2), np.float32(TEMPERATURE), np.float32(a.max_tokens), np.float32(0),
                  np.float32(1))  # use_old 0, bias_correction_kl 1 (TRL's default)
        loss = float(to_host(out[0]))
        grads = list(out[5:])
        del out
        opt.step(P, M, V, grads, k, 1e-6)
        return loss

    step(1)  # warm-up
    times = []
    for k in range(a.reps):
        t0 = time.perf_counter()
        loss = step(k + 2)
        times.append(time.perf_counter() - t0)
    return {"rollout": rollout, "learner": {"best_s": min(times), "loss": loss}, "build_s": build_s,
            "peak_rss_gb": peak_rss_gb(), "threads": threads}


def run_eager(a) -> dict:
    import torch
    import transformers

    from pcpc.runtime.host_memory import keep_freed_memory

    keep_freed_memory()  # pcpc's malloc policy on this side too (runtime/host_memory.py): an even comparison
    torch.set_num_threads(os.cpu_count())
    preset = PRESETS[a.shape]
    cfg, params, prompt = inputs(preset, a.group, a.prompt_len)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings)

    def model_with(p):
        m = transformers.Qwen2ForCausalLM(hf_cfg).float()
        m.load_state_dict({**p, "lm_head.weight": p["model.embed_tokens.weight"]}, strict=True)
        m.tie_weights()
        return m

    policy = model_with(params).eval()
    x = torch.tensor([prompt] * a.group)
    kw = dict(do_sample=True, temperature=TEMPERATURE, top_p=TOP_P, top_k=0, max_new_tokens=a.max_tokens,
              min_new_tokens=a.max_tokens, eos_token_id=None, pad_token_id=0, attention_mask=torch.ones_like(x))
    with torch.no_grad():
        policy.generate(x, **kw)  # warm-up
        times = []
        for r in range(a.reps):
            torch.manual_seed(r)
            t0 = time.perf_counter()
            seqs = policy.generate(x, **kw)
            times.append(time.perf_counter() - t0)
    tokens = int((seqs.shape[1] - x.shape[1]) * a.group)
    rollout = {"tokens": tokens, "best_s": min(times), "tok_s": tokens / min(times)}

    ref = model_with(params).eval()
    del params
    start_peak_rss()
    policy.train()
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, betas=(0.9, 0.999), weight_decay=0.0)
    ids = seqs
    mask = torch.ones(a.group, a.max_tokens)  # every row: the prompt, then max_tokens completion tokens
    adv = torch.linspace(-1.0, 1.5, a.group)

    def logps(model):
        if a.compute_dtype == "float32":
            return trl_logps(model, ids, a.max_tokens)
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the mixed precision TRL's bf16=True gives on a CPU
            return trl_logps(model, ids, a.max_tokens).float()

    def step():
        with torch.no_grad():
            ref_lp = logps(ref)
        lp = logps(policy)
        ratio = torch.exp(lp - lp.detach())
        kl = (torch.exp(ref_lp - lp) - (ref_lp - lp) - 1) * ratio  # TRL's use_bias_correction_kl default
        per_tok = -torch.min(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.2) * adv[:, None]) + BETA * kl
        loss = ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        return float(loss)

    step()  # warm-up
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"rollout": rollout, "learner": {"best_s": min(times), "loss": loss}, "peak_rss_gb": peak_rss_gb(),
            "threads": torch.get_num_threads()}


def _median_round(rs: list[dict]) -> dict:
    """Medians over rounds of the per-round best rollout tok/s and learner seconds; max peak RSS."""
    return {"rollout": {"tok_s": float(np.median([r["rollout"]["tok_s"] for r in rs]))},
            "learner": {"best_s": float(np.median([r["learner"]["best_s"] for r in rs])), "loss": rs[-1]["learner"]["loss"]},
            "peak_rss_gb": max(r["peak_rss_gb"] for r in rs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,0.5b")
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-shared-prefix", action="store_true",
                    help="the pcpc learner computes the group's prompt once per row, as the eager peer does")
    ap.add_argument("--repeat", type=int, default=1, help="alternate the contenders this many times (medians)")
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="the learner's matmuls: bfloat16 = pcpc's compute_dtype, eager under torch.autocast")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--contender", choices=("pcpc", "eager"), help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error(f"--repeat: expected 1 or more, got {a.repeat}")
    if a.contender:
        print(json.dumps(run_pcpc(a) if a.contender == "pcpc" else run_eager(a)))
        return
    print(f"bench/grpo.py  {time.strftime('%Y-%m-%d %H:%M')}  {target_cpu.summary()}; "
          f"load average {os.getloadavg()[0]:.1f}; group {a.group}, prompt {a.prompt_len}, "
          f"{a.max_tokens} new tokens, best of {a.reps}; the pcpc learner computes "
          f"{'every row' if a.no_shared_prefix else 'the shared prompt once per group'}; learner matmuls in "
          f"{a.compute_dtype}")
    for shape in a.shapes.split(","):
        rounds = {"pcpc": [], "eager": []}
        for _ in range(a.repeat):
            for who in ("pcpc", "eager"):
                cmd = [sys.executable, __file__, "--contender", who, "--shape", shape, "--group", str(a.group),
                       "--prompt-len", str(a.prompt_len), "--max-tokens", str(a.max_tokens), "--reps", str(a.reps),
                       "--artifacts", a.artifacts, "--compute-dtype", a.compute_dtype] + \
                    ["--no-shared-prefix"] * a.no_shared_prefix
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode != 0:
                    sys.exit(f"{who} {shape} failed:\n{proc.stderr[-3000:]}")
                rounds[who].append(json.loads(proc.stdout.strip().splitlines()[-1]))
        p, e = (_median_round(rounds[w]) for w in ("pcpc", "eager"))
        print(f"\n[{shape}] ({PRESETS[shape]}; pcpc modules built/checked in {rounds['pcpc'][0]['build_s']:.1f}s; "
              f"load average {os.getloadavg()[0]:.1f}; median of {a.repeat} alternating round(s))")
        if a.repeat > 1:
            for w in ("pcpc", "eager"):
                print(f"  {w} rounds: rollout tok/s {[round(r['rollout']['tok_s'], 1) for r in rounds[w]]}, "
                      f"learner s {[round(r['learner']['best_s'], 3) for r in rounds[w]]}")
        print(f"  {'':22s}{'pcpc':>12s}{'eager (HF)':>14s}{'ratio':>9s}")
        print(f"  {'rollout tok/s':22s}{p['rollout']['tok_s']:12.1f}{e['rollout']['tok_s']:14.1f}"
              f"{p['rollout']['tok_s'] / e['rollout']['tok_s']:8.2f}x")
        print(f"  {'learner step s':22s}{p['learner']['best_s']:12.3f}{e['learner']['best_s']:14.3f}"
              f"{e['learner']['best_s'] / p['learner']['best_s']:8.2f}x")
        print(f"  {'peak RSS GB':22s}{p['peak_rss_gb']:12.2f}{e['peak_rss_gb']:14.2f}")
        print(f"  loss at the timed step: pcpc {p['learner']['loss']:.6f}, eager {e['learner']['loss']:.6f}")


if __name__ == "__main__":
    from pcpc.runtime.host_memory import use_in_this_process

    use_in_this_process()  # as in `pcpc` itself: CPU modules keep their freed pages (runtime/host_memory.py)
    main()
