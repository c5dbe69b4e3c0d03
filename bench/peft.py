"""GRPO with a LoRA adapter: pcpc's compiled adapter learner against HF peft + PyTorch eager, in one run.

    .venv/bin/python bench/peft.py [--shapes tiny,0.5b] [--r 16] [--group 4] [--prompt-len 16] [--max-tokens 32]
                                   [--reps 3] [--repeat 1] [--no-shared-prefix]

Random weights (no download); the shapes, rows and loss of bench/grpo.py. Each contender runs in its own
subprocess, so its peak memory is its own:

  pcpc-lora   the learner alone: reference log-probs (the base with the initial adapter) + grpo_value_and_grad
              (adapter gradients only) + AdamW on the adapter
  pcpc-lora-rollout   merge_K (the adapter folded into the base, block by block) + the generation module,
              against the same generation with the base weights alone
  pcpc-full   bench/grpo.py's pcpc contender: full fine-tuning (every weight, both moments)
  eager-peft  peft.get_peft_model(LoraConfig(r, alpha 2r, q/k/v/o/gate/up/down)) on HF Qwen2: reference forward
              with the adapter disabled, policy forward, TRL's loss, backward, clip, torch AdamW on the adapter

Prints the learner step (eager / pcpc), rollout tokens/s with the adapter against the base, and the learners'
peak RSS (pcpc-lora against pcpc-full; each from when its weights are loaded, bench/grpo.py start_peak_rss).
Every contender runs with pcpc's malloc policy (runtime/host_memory.py), eager too (from 2026-12-07 on).
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

HERE = Path(__file__).resolve().parent
# `python bench/peft.py` puts bench/ first on the path, where this file would shadow the peft library
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


base_bench = _bench_module("grpo")  # bench/grpo.py: shapes, inputs, the full fine-tuning contender

ROOT = base_bench.ROOT
TEMPERATURE, TOP_P, BETA = base_bench.TEMPERATURE, base_bench.TOP_P, base_bench.BETA
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_section(r: int) -> dict:
    return {"type": "lora", "r": r, "lora_alpha": 2 * r, "target_modules": TARGETS}


def _lora_modules(a):
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import GRPO_FUNCTIONS, rl_target

    preset = base_bench.PRESETS[a.shape]
    T = a.prompt_len + a.max_tokens
    gen_t, _ = base_bench.targets(preset, a.group, a.prompt_len, a.max_tokens)
    train_t = rl_target(f"bench-peft-train-{preset}-r{a.r}", preset, batch_size=a.group, seq_len=T,
                        completion_len=a.max_tokens, functions=[*GRPO_FUNCTIONS, "merge"], peft=peft_section(a.r),
                        **base_bench.shared_prefix(a.group, a.prompt_len, not a.no_shared_prefix))
    t0 = time.perf_counter()
    gen_b, train_b = build(gen_t, Path(a.artifacts)), build(train_t, Path(a.artifacts))
    return gen_b, train_b, time.perf_counter() - t0


def _trained_policy(mod, host, cfg, a):
    from pcpc.exporters import peft
    from pcpc.runtime.rl.policy import AdapterPolicy

    policy = AdapterPolicy(mod, host, cfg, peft.from_config(peft_section(a.r)), seed=0, state=None,
                           base_model=base_bench.PRESETS[a.shape])
    # a trained adapter (B = 0 would make the merge a no-op in value, not in cost)
    policy.P[:] = mod.upload_all([np.full(s.shape, 0.01, np.float32) for s in mod.meta.parameters])
    return policy


def run_pcpc_lora_rollout(a) -> dict:
    """Rollout tokens/s: the generation module with the base weights, and with the adapter merged in (merge_K
    + the weights a rollout worker receives, uploaded: the same on both sides)."""
    from pcpc.runtime.generate import QwenModel
    from pcpc.runtime.module import CompiledModule, host_view
    from pcpc.runtime.rl.rollout import SamplingPlan, generate_completions

    gen_b, train_b, _ = _lora_modules(a)
    cfg, params, prompt = base_bench.inputs(base_bench.PRESETS[a.shape], a.group, a.prompt_len)
    host = base_bench.aligned_host(params)
    del params
    threads = os.cpu_count()
    mod = CompiledModule(train_b.vmfb, threads=threads)
    policy = _trained_policy(mod, host, cfg, a)
    gen = CompiledModule(gen_b.vmfb, threads=threads)
    plan = SamplingPlan(str(gen_b.vmfb), a.max_tokens, TEMPERATURE, TOP_P, (), threads)
    rows = [prompt] * a.group

    def rollout(weights_fn):
        times, comps = [], None
        for r in range(a.reps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            model = QwenModel.from_module(gen, [gen.upload(host_view(w)) for w in weights_fn()])
            comps = generate_completions(model, rows, plan, seed=r)
            times.append(time.perf_counter() - t0)
            del model
        tokens = sum(len(c) for c in comps)
        return {"tokens": tokens, "best_s": min(times[1:]), "tok_s": tokens / min(times[1:])}

    return {"rollout_base": rollout(lambda: host), "rollout_adapter": rollout(policy.rollout_weights)}


def run_pcpc_lora(a) -> dict:
    """The learner alone (its own process, so the peak RSS is the learner's, as in a run where the rollouts
    live in the worker processes): reference log-probs + grpo_value_and_grad + AdamW on the adapter."""
    from pcpc.autodiff.grpo import loss_type_weights
    from pcpc.runtime.module import CompiledModule, to_host
    from pcpc.runtime.rl.update import ChunkedOptimizer

    _, train_b, build_s = _lora_modules(a)
    cfg, params, prompt = base_bench.inputs(base_bench.PRESETS[a.shape], a.group, a.prompt_len)
    host = base_bench.aligned_host(params)
    del params
    mod = CompiledModule(train_b.vmfb, threads=os.cpu_count())
    policy = _trained_policy(mod, host, cfg, a)
    del host  # the policy holds the base (imported without a copy)
    base_bench.start_peak_rss()
    T = a.prompt_len + a.max_tokens
    ids = base_bench.group_rows(cfg, prompt, a)
    mask = np.zeros((a.group, T - 1), np.float32)
    mask[:, a.prompt_len - 1:] = 1.0
    opt = ChunkedOptimizer(mod)
    zeros_p = [np.zeros(s.shape, np.float32) for s in mod.meta.parameters]
    M, V = mod.upload_all(zeros_p), mod.upload_all(zeros_p)
    adv = np.linspace(-1.0, 1.5, a.group, dtype=np.float32)
    zeros = np.zeros((a.group, T - 1), np.float32)
    sel = np.asarray(loss_type_weights("grpo"), np.float32)

    def step(k):
        ref_logp = policy.reference("token_logprobs", ids, mask, np.float32(TEMPERATURE))[0]
        out = mod("grpo_value_and_grad", *policy.args(), ids, mask, adv, zeros, ref_logp, sel, np.float32(BETA),
                  np.float32(0.2), np.float32(0.2), np.float32(TEMPERATURE), np.float32(a.max_tokens), np.float32(0),
                  np.float32(1))
        loss = float(to_host(out[0]))
        grads = list(out[5:])
        del out
        opt.step(policy.P, M, V, grads, k, 1e-5)
        return loss

    step(1)
    times = []
    for k in range(a.reps):
        t0 = time.perf_counter()
        loss = step(k + 2)
        times.append(time.perf_counter() - t0)
    return {"learner": {"best_s": min(times), "loss": loss}, "build_s": build_s,
            "peak_rss_gb": base_bench.peak_rss_gb(), "trained_params": mod.meta.parameter_bytes // 4}


def run_eager_peft(a) -> dict:
    import peft
    import torch
    import transformers

    from pcpc.runtime.host_memory import keep_freed_memory

    keep_freed_memory()  # pcpc's malloc policy on this side too (runtime/host_memory.py): an even comparison
    torch.set_num_threads(os.cpu_count())
    preset = base_bench.PRESETS[a.shape]
    cfg, params, prompt = base_bench.inputs(preset, a.group, a.prompt_len)
    hf_cfg = transformers.Qwen2Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings)
    model = transformers.Qwen2ForCausalLM(hf_cfg).float()
    model.load_state_dict({**params, "lm_head.weight": params["model.embed_tokens.weight"]}, strict=True)
    model.tie_weights()
    del params
    pm = peft.get_peft_model(model, peft.LoraConfig(r=a.r, lora_alpha=2 * a.r, target_modules=TARGETS,
                                                    lora_dropout=0.0))
    with torch.no_grad():
        for _, p in pm.named_parameters():
            if p.requires_grad:
                p.fill_(0.01)
    base_bench.start_peak_rss()
    T = a.prompt_len + a.max_tokens
    ids = torch.from_numpy(base_bench.group_rows(cfg, prompt, a))
    mask = torch.ones(a.group, a.max_tokens)  # the completion tokens (TRL's layout: the prompt, then these)
    adv = torch.linspace(-1.0, 1.5, a.group)
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-5, betas=(0.9, 0.999),
                            weight_decay=0.0)

    def logps(m):
        return base_bench.trl_logps(m, ids, a.max_tokens)

    def step():
        with torch.no_grad(), pm.disable_adapter():
            ref_lp = logps(pm)
        lp = logps(pm)
        ratio = torch.exp(lp - lp.detach())
        kl = (torch.exp(ref_lp - lp) - (ref_lp - lp) - 1) * ratio
        per_tok = -torch.min(ratio * adv[:, None], torch.clamp(ratio, 0.8, 1.2) * adv[:, None]) + BETA * kl
        loss = ((per_tok * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in pm.parameters() if p.requires_grad], 1.0)
        opt.step()
        return float(loss)

    pm.train()
    step()
    times = []
    for _ in range(a.reps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"learner": {"best_s": min(times), "loss": loss}, "peak_rss_gb": base_bench.peak_rss_gb()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,0.5b")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the learners this many times (medians)")
    ap.add_argument("--no-shared-prefix", action="store_true",
                    help="the pcpc learners compute the group's prompt once per row, as the eager peer does")
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--contender", choices=("pcpc-lora", "pcpc-lora-rollout", "pcpc-full", "eager-peft"),
                    help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.compute_dtype = "float32"  # the full fine-tuning contender (bench/grpo.py's pcpc side) in fp32, as the adapters
    if a.repeat < 1:
        ap.error(f"--repeat: expected 1 or more, got {a.repeat}")
    if a.contender:
        fn = {"pcpc-lora": run_pcpc_lora, "pcpc-lora-rollout": run_pcpc_lora_rollout, "pcpc-full": base_bench.run_pcpc,
              "eager-peft": run_eager_peft}[a.contender]
        print(json.dumps(fn(a)))
        return
    print(f"bench/peft.py  {time.strftime('%Y-%m-%d %H:%M')}  {target_cpu.summary()}; "
          f"load average {os.getloadavg()[0]:.1f}; LoRA r {a.r} (alpha {2 * a.r}) on "
          f"q/k/v/o/gate/up/down; group {a.group}, prompt {a.prompt_len}, {a.max_tokens} new tokens, "
          f"best of {a.reps}; the pcpc learner computes "
          f"{'every row' if a.no_shared_prefix else 'the shared prompt once per group'}")
    for shape in a.shapes.split(","):
        rounds = {}
        order = ["pcpc-lora", "eager-peft"] * a.repeat + ["pcpc-full", "pcpc-lora-rollout"]
        for who in order:
            cmd = [sys.executable, __file__, "--contender", who, "--shape", shape, "--r", str(a.r), "--group",
                   str(a.group), "--prompt-len", str(a.prompt_len), "--max-tokens", str(a.max_tokens), "--reps",
                   str(a.reps), "--artifacts", a.artifacts] + ["--no-shared-prefix"] * a.no_shared_prefix
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                sys.exit(f"{who} {shape} failed:\n{proc.stderr[-3000:]}")
            rounds.setdefault(who, []).append(json.loads(proc.stdout.strip().splitlines()[-1]))
        res = {who: rs[0] for who, rs in rounds.items()}
        for who in ("pcpc-lora", "eager-peft"):  # medians of the alternating rounds
            res[who] = {**rounds[who][0], **base_bench._median_round([{**r, "rollout": {"tok_s": 0.0}}
                                                                      for r in rounds[who]])}
        lo, ea, fu, ro = res["pcpc-lora"], res["eager-peft"], res["pcpc-full"], res["pcpc-lora-rollout"]
        print(f"\n[{shape}] ({base_bench.PRESETS[shape]}; {lo['trained_params']:,} adapter params; modules built/"
              f"checked in {lo['build_s']:.1f}s; load average {os.getloadavg()[0]:.1f}; learners: median of "
              f"{a.repeat} alternating round(s))")
        if a.repeat > 1:
            for who in ("pcpc-lora", "eager-peft"):
                print(f"  {who} rounds: learner s {[round(r['learner']['best_s'], 3) for r in rounds[who]]}")
        print(f"  learner step s        pcpc LoRA {lo['learner']['best_s']:.3f}   peft eager {ea['learner']['best_s']:.3f}"
              f"   {ea['learner']['best_s'] / lo['learner']['best_s']:.2f}x   (pcpc full fine-tuning "
              f"{fu['learner']['best_s']:.3f})")
        print(f"  rollout tok/s         with the adapter (merge + generate) {ro['rollout_adapter']['tok_s']:.1f}   "
              f"base {ro['rollout_base']['tok_s']:.1f}   "
              f"{ro['rollout_adapter']['tok_s'] / ro['rollout_base']['tok_s']:.2f}x")
        print(f"  peak RSS GB           pcpc LoRA {lo['peak_rss_gb']:.2f}   pcpc full {fu['peak_rss_gb']:.2f}   "
              f"{lo['peak_rss_gb'] / fu['peak_rss_gb']:.2f}x   peft eager {ea['peak_rss_gb']:.2f}")
        print(f"  loss at the timed step: pcpc LoRA {lo['learner']['loss']:.6f}, "
              f"peft eager {ea['learner']['loss']:.6f}")


if __name__ == "__main__":
    from pcpc.runtime.host_memory import use_in_this_process

    use_in_this_process()
    main()
