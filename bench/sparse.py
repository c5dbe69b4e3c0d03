"""Sparse fine-tuning at the Qwen2.5-0.5B shape: the optimizer step alone, dense against sparse, and the whole
GRPO learner step with a 99% mask against the dense one, in one run.

    .venv/bin/python bench/sparse.py [--shape 0.5b] [--sparsities 90,95,97.5,99,99.75] [--reps 5]
                                     [--learner-sparsity 99] [--repeat 1] [--group 4] [--prompt-len 16]
                                     [--max-tokens 32]

Random weights, gradients and masks (uniform at each sparsity; no download). Each contender runs in its own
subprocess, so its peak memory is its own:

  optimizer   dense: the chunked AdamW over every weight as the learner runs it (grad_clip_coef, then the
              optimizer module's adamw_inplace_K, runtime/rl/update.py); sparse: the sparse module's in-place
              AdamW over the mask (three calls, each over every group of tensors: grad gathers the masked
              gradient and its part of the clip norm, adamw steps the compact entries, scatter writes them).
              Steady-state medians of --reps steps, build and load excluded.
  learner     reference log-probs + grpo_value_and_grad + the optimizer step (bench/grpo.py's rows and loss),
              dense against a --learner-sparsity mask: best step time and peak RSS (from the weights' load,
              bench/grpo.py start_peak_rss). On a noisy machine use --repeat N: the dense and sparse learners
              then alternate N times and each figure is the median of its N. `--sparsities ""` skips the
              optimizer table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pcpc.mlir import cpu as target_cpu

target_cpu.match_torch()  # with PCPC_CPU=znver3, torch runs AVX2 too (before it is imported)

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]


def _bench_module(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"bench_{name}", HERE / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


grpo = _bench_module("grpo")
ROOT = grpo.ROOT


def _training_module(a):
    from pcpc.mlir.build import build

    _, train_t = grpo.targets(grpo.PRESETS[a.shape], a.group, a.prompt_len, a.max_tokens)
    return build(train_t, Path(a.artifacts)), train_t


def _random_mask(specs, sparsity: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {s.name: rng.random(s.shape, dtype=np.float32) >= sparsity / 100 for s in specs}


def _sparse_optimizer(a, mod, train_t, sparsity: float):
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import sparse_target
    from pcpc.runtime.module import CompiledModule
    from pcpc.runtime.rl.sparse import SparseOptimizer, layout

    tensors, groups = layout(_random_mask(mod.meta.parameters, sparsity), mod.meta.parameters, "bench")
    from pcpc.mlir.rl_functions import RL_OPTIMIZER

    optimizer = {**RL_OPTIMIZER, **train_t.config.get("optimizer", {})}  # the training module's AdamW
    target = sparse_target(f"bench-sparse-{a.shape}-{sparsity:g}", [g.key for g in groups], optimizer)
    t0 = time.perf_counter()
    built = build(target, Path(a.artifacts))
    opt = SparseOptimizer(CompiledModule(built.vmfb, threads=os.cpu_count()), tensors, groups)
    return opt, time.perf_counter() - t0


def run_optimizer(a) -> dict:
    """Dense chunked AdamW against the sparse step at each sparsity, on the same weights and gradients."""
    from pcpc.runtime.module import CompiledModule

    built, train_t = _training_module(a)
    mod = CompiledModule(built.vmfb, threads=os.cpu_count())
    specs = mod.meta.parameters
    rng = np.random.default_rng(0)
    P = mod.upload_all([rng.standard_normal(s.shape, dtype=np.float32) * 0.02 for s in specs])
    G = mod.upload_all([rng.standard_normal(s.shape, dtype=np.float32) * 1e-3 for s in specs])

    def timed(opt, M, V):
        times = []
        for k in range(a.reps + 1):  # the first is a warm-up
            t0 = time.perf_counter()
            opt.step(P, M, V, list(G), k + 1, 1e-5)
            times.append(time.perf_counter() - t0)
        return float(np.median(times[1:]))

    dense = grpo.dense_optimizer(train_t, mod, Path(a.artifacts), os.cpu_count())  # in place, as the runs use it
    out = {"dense_s": timed(dense, mod.upload_all(dense.zeros()), mod.upload_all(dense.zeros())),
           "params": int(sum(np.prod(s.shape) for s in specs)), "sparse": {}}
    for sp in a.sparsities:
        opt, build_s = _sparse_optimizer(a, mod, train_t, sp)
        nnz = sum(t.n for t in opt.tensors)
        out["sparse"][str(sp)] = {"s": timed(opt, opt.upload_state(opt.zeros()), opt.upload_state(opt.zeros())),
                                  "nnz": nnz, "build_s": round(build_s, 1)}
    return out


def run_learner(a) -> dict:
    """One GRPO learner step (reference, gradient, optimizer), dense or with a mask (a.sparsity > 0)."""
    from pcpc.autodiff.grpo import loss_type_weights
    from pcpc.runtime.generate import import_host_array
    from pcpc.runtime.module import CompiledModule, to_host

    built, train_t = _training_module(a)
    cfg, params, prompt = grpo.inputs(grpo.PRESETS[a.shape], a.group, a.prompt_len)
    host = grpo.aligned_host(params)
    del params
    mod = CompiledModule(built.vmfb, threads=os.cpu_count())
    ref = grpo.reference_module(train_t, host, Path(a.artifacts), os.cpu_count())  # as a run loads it
    if a.sparsity:
        opt, _ = _sparse_optimizer(a, mod, train_t, a.sparsity)
        P = mod.upload_all(host)  # the sparse step writes into its own copy (as the run does)
    else:
        opt = grpo.dense_optimizer(train_t, mod, Path(a.artifacts), os.cpu_count())
        P = [import_host_array(mod, h) for h in host]  # AdamW writes into these in place, as the run does
    del host
    M, V = opt.upload_state(opt.zeros()), opt.upload_state(opt.zeros())
    grpo.start_peak_rss()
    T = a.prompt_len + a.max_tokens
    ids = grpo.group_rows(cfg, prompt, a)  # one group's prompt: the module computes it once (shared_prefix)
    mask = np.zeros((a.group, T - 1), np.float32)
    mask[:, a.prompt_len - 1:] = 1.0
    adv = np.linspace(-1.0, 1.5, a.group, dtype=np.float32)
    zeros = np.zeros((a.group, T - 1), np.float32)
    sel = np.asarray(loss_type_weights("grpo"), np.float32)

    def step(k):
        ref_logp = ref("token_logprobs", ids, mask, np.float32(grpo.TEMPERATURE))[0]
        out = mod("grpo_value_and_grad", *P, ids, mask, adv, zeros, ref_logp, sel, np.float32(grpo.BETA),
                  np.float32(0.2), np.float32(0.2), np.float32(grpo.TEMPERATURE), np.float32(a.max_tokens),
                  np.float32(0), np.float32(1))
        loss = float(to_host(out[0]))
        grads = list(out[5:])
        del out
        opt.step(P, M, V, grads, k, 1e-5)
        return loss

    step(1)
    times = []
    for k in range(a.reps):
        t0 = time.perf_counter()
        step(k + 2)
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "peak_rss_gb": grpo.peak_rss_gb()}


def build_learners(a) -> dict:
    """Builds (or finds) every module the learner rounds load, in a process of its own: a round that exported
    one itself would count the export's leftovers in its peak RSS (a fresh checkout's first sparse round
    read 10.8 GB, the next ones 8.4)."""
    from pcpc.runtime.module import CompiledModule

    built, train_t = _training_module(a)
    mod = CompiledModule(built.vmfb, threads=os.cpu_count())
    grpo.dense_optimizer(train_t, mod, Path(a.artifacts), os.cpu_count())
    _sparse_optimizer(a, mod, train_t, a.learner_sparsity)
    _, params, _ = grpo.inputs(grpo.PRESETS[a.shape], a.group, a.prompt_len)
    grpo.reference_module(train_t, grpo.aligned_host(params), Path(a.artifacts), os.cpu_count())  # + weights, packed
    return {}


def _run(who: str, a, **extra) -> dict:
    cmd = [sys.executable, __file__, "--contender", who, "--shape", a.shape, "--reps", str(a.reps), "--group",
           str(a.group), "--prompt-len", str(a.prompt_len), "--max-tokens", str(a.max_tokens), "--artifacts",
           a.artifacts, "--sparsities", ",".join(map(str, a.sparsities))]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.exit(f"{who} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="0.5b", choices=sorted(grpo.PRESETS))
    ap.add_argument("--sparsities", default="90,95,97.5,99,99.75")
    ap.add_argument("--learner-sparsity", type=float, default=99.0)
    ap.add_argument("--repeat", type=int, default=1, help="alternate the dense and sparse learners this many times "
                    "(medians)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--artifacts", default=str(ROOT / "artifacts" / "bench"))
    ap.add_argument("--contender", choices=("optimizer", "learner", "build"), help=argparse.SUPPRESS)
    ap.add_argument("--sparsity", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.repeat < 1:
        ap.error(f"--repeat: expected 1 or more, got {a.repeat}")
    a.sparsities = [float(x) for x in str(a.sparsities).split(",") if x]
    if a.contender:
        print(json.dumps({"optimizer": run_optimizer, "learner": run_learner, "build": build_learners}[a.contender](a)))
        return
    print(f"bench/sparse.py  {time.strftime('%Y-%m-%d %H:%M')}  {target_cpu.summary()}; "
          f"load average {os.getloadavg()[0]:.1f}; {grpo.PRESETS[a.shape]}, "
          f"medians of {a.reps} steps")
    if a.sparsities:
        o = _run("optimizer", a)
        print(f"\noptimizer step over {o['params']:,} weights: dense AdamW {o['dense_s'] * 1e3:.1f} ms")
        for sp, r in o["sparse"].items():
            print(f"  {float(sp):6.2f}% sparse ({r['nnz']:>11,} trained): {r['s'] * 1e3:8.2f} ms  "
                  f"{o['dense_s'] / r['s']:7.1f}x faster   (module built in {r['build_s']}s)")
    _run("build", a, **{"learner-sparsity": a.learner_sparsity})
    rounds = {"dense": [], "sparse": []}
    for _ in range(a.repeat):
        rounds["dense"].append(_run("learner", a, sparsity=0))
        rounds["sparse"].append(_run("learner", a, sparsity=a.learner_sparsity))
    if a.repeat > 1:
        for w, rs in rounds.items():
            print(f"\n  {w} learner rounds: step s {[round(r['best_s'], 3) for r in rs]}, "
                  f"peak RSS GB {[round(r['peak_rss_gb'], 2) for r in rs]}", end="")
        print()
    dense, sparse = ({k: statistics.median(r[k] for r in rs) for k in ("best_s", "peak_rss_gb")}
                     for rs in (rounds["dense"], rounds["sparse"]))
    print(f"\nGRPO learner step (group {a.group}, {a.prompt_len} + {a.max_tokens} tokens; median of {a.repeat} "
          f"alternating round(s)): dense {dense['best_s']:.3f} s, "
          f"{a.learner_sparsity:g}% sparse {sparse['best_s']:.3f} s ({dense['best_s'] / sparse['best_s']:.2f}x); "
          f"peak RSS dense {dense['peak_rss_gb']:.2f} GB, sparse {sparse['peak_rss_gb']:.2f} GB "
          f"({sparse['peak_rss_gb'] / dense['peak_rss_gb']:.2f}x)")


if __name__ == "__main__":
    from pcpc.runtime.host_memory import use_in_this_process

    use_in_this_process()
    main()
