"""Qwen2.5-0.5B-shaped generation: pcpc (fp32, bf16 weights) vs HF transformers eager, in one run.

    .venv/bin/python bench/generate.py [--new-tokens 64] [--prompt-len 128] [--artifacts DIR]

Random weights at the 0.5B shape (no download needed). Steps, in order:
  1. memory bandwidth: numpy streaming reads over 2.4 GB (1 and 2 threads, and a BLAS sgemv; best); at the
     start and right before and after each pcpc contender's run (it moves by tens of percent over
     minutes on a shared VM); decode must read every weight once per token, so a contender's floor
     tok/s = the best bandwidth around its run / weight bytes
  2. export + compile qwen-generation (and -bf16) into a fresh directory (timed), unless --artifacts
  3. random weights written as flat binaries (the `pcpc export` format); for the resident modules
     also packed into the layout their matmuls read, as `pcpc export --resident` does (timed)
  4. each contender in its own subprocess (so peak memory is its own): warm-up, then a
     --prompt-len prompt and --new-tokens greedy decode steps (decode tok/s), then the prompt's
     prefill alone, best of PREFILL_REPEATS (prefill tok/s)
Prints tok/s, peak RSS and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from pcpc.runtime.metrics import peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
PREFILL_REPEATS = 3
"""Prefill tok/s is the best of this many prompt passes, the same for every contender."""


def bandwidth_gbs(nbytes: int = 2_400_000_000, repeats: int = 3) -> dict:
    """Best streaming-read bandwidth (GB/s) over an nbytes array with 1 and 2 threads, and by sgemv.

    Reductions that keep up with memory (max over float32, bitwise-or over uint64; a float32
    sum is compute-bound on one core here); numpy releases the GIL inside them.
    """
    a = np.ones(nbytes // 4, np.float32)
    kernels = (np.max, lambda p: np.bitwise_or.reduce(p.view(np.uint64)))
    out = {}
    for threads in (1, 2):
        parts = np.array_split(a, threads)
        best = float("inf")
        for kernel in kernels:
            for _ in range(repeats):
                ts = [threading.Thread(target=kernel, args=(p,)) for p in parts]
                t0 = time.perf_counter()
                for t in ts:
                    t.start()
                for t in ts:
                    t.join()
                best = min(best, time.perf_counter() - t0)
        out[threads] = a.nbytes / best / 1e9
    rows = a[: a.size // 4096 * 4096].reshape(-1, 4096)  # BLAS matrix-vector product (numpy's threads):
    vec = np.ones(4096, np.float32)                      # the access pattern of decode, and often the fastest
    times = [_seconds(rows.__matmul__, vec) for _ in range(repeats)]
    out["sgemv"] = rows.nbytes / min(times) / 1e9
    del a, rows
    return out


def _seconds(fn, *args) -> float:
    t0 = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t0


def random_weights(specs, seed=0):
    """(name, f32 array) per parameter, HF's init scheme: N(0, 0.02), biases 0, norms 1 (one at a time)."""
    rng = np.random.default_rng(seed)
    for s in specs:
        if s.name.endswith(".bias"):
            yield s.name, np.zeros(s.shape, np.float32)
        elif "norm" in s.name:
            yield s.name, np.ones(s.shape, np.float32)
        else:
            yield s.name, rng.standard_normal(s.shape, dtype=np.float32) * np.float32(0.02)


def child_pcpc(vmfb: str, weights: str, prompt_len: int, new_tokens: int) -> dict:
    from pcpc.runtime import generate as gen

    t0 = time.perf_counter()
    model = gen.QwenModel.load(vmfb, weights)
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 150000, prompt_len).tolist()
    gen.generate(model, [prompt[:16]], 4, eos_ids=[])  # warm-up: threads, first touch of the weights
    res = gen.generate(model, [prompt], new_tokens, eos_ids=[])
    cache = lambda: model.new_cache(1, prompt_len + new_tokens)  # the cache generate() ran on
    prefill_s = min(_seconds(gen.prefill, model, [prompt], 1, cache()) for _ in range(PREFILL_REPEATS))
    return {
        "load_s": load_s,
        "prefill_tok_s": prompt_len / prefill_s,
        "decode_tok_s": res.decode_steps / res.decode_seconds,
        "peak_rss": peak_rss_bytes(),
        "tokens": res.tokens[0][:8],
    }


def child_hf(prompt_len: int, new_tokens: int) -> dict:
    import torch
    import transformers

    from pcpc.exporters import qwen2

    torch.set_num_threads(os.cpu_count() or 1)
    cfg = qwen2.make_config("qwen2.5-0.5b")
    hc = transformers.Qwen2Config(**{k: v for k, v in cfg.to_dict().items() if k != "head_dim"},
                                  eos_token_id=None, bos_token_id=None, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(hc).eval()
    model.generation_config.eos_token_id = None
    ids = torch.tensor([np.random.default_rng(1).integers(0, 150000, prompt_len).tolist()])
    mask = torch.ones_like(ids)

    def timed(n, x=ids, m=mask):
        t0 = time.perf_counter()
        with torch.no_grad():
            out = model.generate(x, attention_mask=m, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        return time.perf_counter() - t0, out

    timed(4, ids[:, :16], mask[:, :16])  # warm-up
    t_prefill, _ = timed(1)
    t_all, out = timed(1 + new_tokens)
    with torch.no_grad():  # the prompt's forward pass with a fresh cache, as generate's first step runs it
        prefill_s = min(_seconds(lambda: model(ids, attention_mask=mask, use_cache=True, logits_to_keep=1))
                        for _ in range(PREFILL_REPEATS))
    return {
        "prefill_tok_s": prompt_len / prefill_s,
        "decode_tok_s": new_tokens / (t_all - t_prefill),
        "peak_rss": peak_rss_bytes(),
        "tokens": out[0, prompt_len : prompt_len + 8].tolist(),
    }


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"child {args[0]} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--artifacts", default=None, help="Reuse builds in DIR (default: a fresh temp dir, timed).")
    ap.add_argument("--skip", default="", help="Comma list of contenders to skip: pcpc-fp32-res, pcpc-bf16-res, pcpc-bf16, hf")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        out = child_hf(*map(int, rest)) if kind == "hf" else child_pcpc(rest[0], rest[1], *map(int, rest[2:]))
        print(json.dumps(out))
        return

    from pcpc.exporters import hf_weights
    from pcpc.mlir.build import build
    from pcpc.mlir.signature import load_meta
    from pcpc.mlir.targets import get_target

    skip = set(filter(None, args.skip.split(",")))
    print(f"# bench/generate.py  {time.strftime('%Y-%m-%d %H:%M')}  cpus={os.cpu_count()}  "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} decode steps, greedy, batch 1")
    bw = bandwidth_gbs()
    print(f"memory read bandwidth: {bw[1]:.1f} GB/s (1 thread), {bw[2]:.1f} GB/s (2 threads), "
          f"{bw['sgemv']:.1f} GB/s (sgemv)")

    work = Path(tempfile.mkdtemp(prefix="pcpc-bench-gen-"))
    art = Path(args.artifacts) if args.artifacts else work / "artifacts"
    rows = {}
    # (label, target, weight dtype); the first is the exported contract module (weights as inputs)
    variants = [("pcpc-fp32", "qwen-generation", "float32"),
                ("pcpc-fp32-res", "qwen-generation-resident", "float32"),
                ("pcpc-bf16-res", "qwen-generation-resident-bf16", "bfloat16"),
                ("pcpc-bf16", "qwen-generation-bf16", "bfloat16")]
    variants = [v for v in variants if v[0] not in skip]
    weight_files = {}
    try:
        for label, target, dtype in variants:
            t0 = time.perf_counter()
            result = build(get_target(target), art)
            secs = result.seconds
            print(f"{target}: export {secs.get('export', 0):.1f}s + compile {secs.get('compile', 0):.1f}s "
                  f"(total {time.perf_counter() - t0:.1f}s{'; cached' if not result.ran else ''})", flush=True)
            meta = load_meta(result.meta)
            if dtype not in weight_files:
                weight_files[dtype] = work / f"weights-{dtype}.bin"
                hf_weights.write_flat(weight_files[dtype], random_weights(meta.parameters), dtype, meta.parameter_bytes)
            if meta.provenance.encoder_sha256:  # as `pcpc export --resident` does: pack once, before generating
                from pcpc.runtime.pack import ensure_packed

                t0 = time.perf_counter()
                ensure_packed(result.vmfb, meta, weight_files[dtype])
                print(f"{target}: weights packed in {time.perf_counter() - t0:.1f}s", flush=True)
            before = bandwidth_gbs()
            r = run_child(["pcpc", str(result.vmfb), str(weight_files[dtype]), str(args.prompt_len), str(args.new_tokens)])
            after = bandwidth_gbs()
            r["weight_bytes"] = meta.parameter_bytes
            r["bandwidth"] = max(*before.values(), *after.values())
            print(f"{label}: bandwidth right before / after its run {max(before.values()):.1f} / "
                  f"{max(after.values()):.1f} GB/s", flush=True)
            rows[label] = r
        if "hf" not in skip:
            rows["hf-eager"] = run_child(["hf", str(args.prompt_len), str(args.new_tokens)])
            rows["hf-eager"]["weight_bytes"] = rows["pcpc-fp32"]["weight_bytes"]
    finally:
        shutil.rmtree(work, ignore_errors=True)  # random weight files and (without --artifacts) the builds

    fp32_bytes = rows["pcpc-fp32"]["weight_bytes"]
    print(f"\n{'':14s} {'decode tok/s':>12s} {'prefill tok/s':>13s} {'peak RSS GB':>11s} {'RSS/weights':>11s}  first tokens")
    for label, r in rows.items():
        print(f"{label:14s} {r['decode_tok_s']:12.2f} {r['prefill_tok_s']:13.1f} {r['peak_rss'] / 1e9:11.2f} "
              f"{r['peak_rss'] / r['weight_bytes']:11.2f}  {r['tokens'][:4]}")
    ref = rows["pcpc-fp32"]["tokens"]
    mismatched = [label for label, r in rows.items() if label.startswith("pcpc") and r["tokens"] != ref]
    print("greedy tokens of every pcpc variant equal the fp32 contract module's: "
          + ("yes" if not mismatched else f"NO ({', '.join(mismatched)} differ: check the build)"))
    print(f"\nfp32 floor = best bandwidth measured right before and after the contender's run / "
          f"{fp32_bytes / 1e9:.2f} GB of weights per token")
    hf = rows.get("hf-eager")
    for label in ("pcpc-fp32", "pcpc-fp32-res"):
        if label not in rows:
            continue
        r = rows[label]
        floor = r["bandwidth"] * 1e9 / fp32_bytes
        print(f"{label:14s} decode / floor   {r['decode_tok_s'] / floor:.2f}   (target >= 0.85; floor {floor:.2f} tok/s)")
        if hf:
            print(f"{label:14s} decode / HF      {r['decode_tok_s'] / hf['decode_tok_s']:.2f}   (target >= 2)")
            print(f"{label:14s} prefill / HF     {r['prefill_tok_s'] / hf['prefill_tok_s']:.2f}   (target >= 1.5)")
        print(f"{label:14s} peak RSS / weight bytes {r['peak_rss'] / fp32_bytes:.2f}   (target <= 1.3)")
    for label, base in (("pcpc-bf16-res", "pcpc-fp32"), ("pcpc-bf16-res", "pcpc-fp32-res"), ("pcpc-bf16", "pcpc-fp32")):
        if label in rows and base in rows:
            print(f"{label} decode / {base} decode  {rows[label]['decode_tok_s'] / rows[base]['decode_tok_s']:.2f}"
                  f"   (target >= 1.8)")

if __name__ == "__main__":
    main()
