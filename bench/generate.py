"""Qwen2.5-0.5B-shaped generation: pcpc (fp32, bf16 weights) vs HF transformers eager, in one run.

    .venv/bin/python bench/generate.py [--new-tokens 64] [--prompt-len 128] [--rounds 3] [--artifacts DIR]

Random weights at the 0.5B shape (no download needed). Steps, in order:
  1. export + compile qwen-generation (and the resident and bf16 variants) into a fresh directory
     (timed), unless --artifacts
  2. random weights written as flat binaries (the `pcpc export` format); for the resident modules
     also packed into the layout their matmuls read, as `pcpc export --resident` does (timed)
  3. every contender (the pcpc modules, HF eager) in its own subprocess, all loaded at once and
     warmed up (so each one's peak memory is its own)
  4. --rounds rounds; in each, every contender in turn runs a --prompt-len prompt and --new-tokens
     greedy decode steps (decode tok/s) and the prompt's prefill alone (prefill tok/s), with a
     memory-bandwidth probe before each contender and after the last. The probe: streaming reads
     over 2.4 GB (numpy reductions with 1 and 2 threads, a BLAS sgemv; the best). Decode must read
     every weight once per token, so a contender's floor in a round = the best probe right before
     and after its run / weight bytes.
The VM's memory bandwidth moves by tens of percent within seconds (two regimes, ~45-50 and ~70 GB/s,
bench/NOTES_generate.md), so every ratio is taken within a round, between runs seconds apart, and
the median over rounds is reported. Prints tok/s, peak RSS and the ratios the targets are stated in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from pcpc.mlir import cpu as target_cpu

target_cpu.match_torch()  # with PCPC_CPU=znver3, torch runs AVX2 too (before it is imported)

import numpy as np

from pcpc.runtime.host_memory import peak_rss_bytes

ROOT = Path(__file__).resolve().parents[1]
REPLY = "@@"
"""Prefix of a child's JSON replies on stdout (libraries may print there too)."""


class BandwidthProbe:
    """Best streaming-read bandwidth (GB/s) over one nbytes array: 1 and 2 threads, and by sgemv.

    Reductions that keep up with memory (max over float32, bitwise-or over uint64; a float32
    sum is compute-bound on one core here); numpy releases the GIL inside them. The array is
    allocated once and reused by every probe.
    """

    def __init__(self, nbytes: int = 2_400_000_000):
        self.a = np.ones(nbytes // 4, np.float32)

    def __call__(self, repeats: int = 3) -> dict:
        kernels = (np.max, lambda p: np.bitwise_or.reduce(p.view(np.uint64)))
        out = {}
        for threads in (1, 2):
            parts = np.array_split(self.a, threads)
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
            out[threads] = self.a.nbytes / best / 1e9
        rows = self.a[: self.a.size // 4096 * 4096].reshape(-1, 4096)  # BLAS matrix-vector product (numpy's
        vec = np.ones(4096, np.float32)                                # threads): decode's access pattern
        out["sgemv"] = rows.nbytes / min(_seconds(rows.__matmul__, vec) for _ in range(repeats)) / 1e9
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


def _prompt(prompt_len: int) -> list[int]:
    return np.random.default_rng(1).integers(0, 150000, prompt_len).tolist()


class PcpcContender:
    """A compiled generation module (greedy, batch 1) with its weight file."""

    def __init__(self, vmfb: str, weights: str, prompt_len: int, new_tokens: int):
        from pcpc.runtime import generate as gen

        self.gen, self.prompt, self.positions = gen, _prompt(prompt_len), prompt_len + new_tokens
        self.model = gen.QwenModel.load(vmfb, weights)
        gen.generate(self.model, [self.prompt[:16]], 4, eos_ids=[])  # warm-up: threads, first touch of the weights

    def decode(self, n: int) -> dict:
        res = self.gen.generate(self.model, [self.prompt], n, eos_ids=[])
        return {"tok_s": res.decode_steps / res.decode_seconds, "tokens": res.tokens[0][:8]}

    def prefill(self) -> dict:
        cache = self.model.new_cache(1, self.positions)  # the cache generate() runs on
        return {"tok_s": len(self.prompt) / _seconds(self.gen.prefill, self.model, [self.prompt], 1, cache)}


class HFContender:
    """HF transformers eager Qwen2ForCausalLM at the 0.5B shape (its default init), `generate` greedy."""

    def __init__(self, prompt_len: int):
        import torch
        import transformers

        from pcpc.exporters import qwen2

        torch.set_num_threads(os.cpu_count() or 1)
        cfg = qwen2.make_config("qwen2.5-0.5b")
        hc = transformers.Qwen2Config(**{k: v for k, v in cfg.to_dict().items() if k != "head_dim"},
                                      eos_token_id=None, bos_token_id=None, pad_token_id=0)
        torch.manual_seed(0)
        self.torch, self.model = torch, transformers.Qwen2ForCausalLM(hc).eval()
        self.model.generation_config.eos_token_id = None
        self.ids = torch.tensor([_prompt(prompt_len)])
        self.mask = torch.ones_like(self.ids)
        self._generate(4, self.ids[:, :16], self.mask[:, :16])  # warm-up

    def _generate(self, n, ids=None, mask=None):
        ids = self.ids if ids is None else ids
        mask = self.mask if mask is None else mask
        t0 = time.perf_counter()
        with self.torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      pad_token_id=0)
        return time.perf_counter() - t0, out

    def decode(self, n: int) -> dict:
        t_prefill, _ = self._generate(1)  # generate's own first step, timed apart
        t_all, out = self._generate(1 + n)
        return {"tok_s": n / (t_all - t_prefill), "tokens": out[0, self.ids.shape[1] : self.ids.shape[1] + 8].tolist()}

    def prefill(self) -> dict:
        """The prompt's forward pass with a fresh cache, as generate's first step runs it."""
        with self.torch.no_grad():
            secs = _seconds(lambda: self.model(self.ids, attention_mask=self.mask, use_cache=True, logits_to_keep=1))
        return {"tok_s": self.ids.shape[1] / secs}


def serve(contender) -> None:
    """Child process: answer `decode N`, `prefill` and `stats` lines on stdin with JSON lines on stdout."""
    print(REPLY + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "decode":
            out = contender.decode(int(args[0]))
        elif cmd == "prefill":
            out = contender.prefill()
        else:
            out = {"peak_rss": peak_rss_bytes()}
        print(REPLY + json.dumps(out), flush=True)


class Child:
    """A contender in its own process (so its peak memory is its own), kept alive between rounds."""

    def __init__(self, args: list[str]):
        self.log = tempfile.TemporaryFile("w+")
        self.proc = subprocess.Popen([sys.executable, __file__, "--child", *args], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True, cwd=ROOT)
        self._reply(args[0])

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply(command)

    def _reply(self, what: str) -> dict:
        for line in self.proc.stdout:
            if line.startswith(REPLY):
                return json.loads(line[len(REPLY):])
        self.log.seek(0)
        raise RuntimeError(f"child failed at {what!r}:\n{self.log.read()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait()
        self.log.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--artifacts", default=None, help="Reuse builds in DIR (default: a fresh temp dir, timed).")
    ap.add_argument("--skip", default="", help="Comma list of contenders to skip: pcpc-fp32-res, pcpc-bf16-res, pcpc-bf16, hf")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        serve(HFContender(int(rest[0])) if kind == "hf" else PcpcContender(rest[0], rest[1], *map(int, rest[2:])))
        return

    from pcpc.exporters import hf_weights
    from pcpc.mlir.build import build
    from pcpc.mlir.signature import load_meta
    from pcpc.mlir.targets import get_target

    skip = set(filter(None, args.skip.split(",")))
    print(f"# bench/generate.py  {time.strftime('%Y-%m-%d %H:%M')}  cpus={os.cpu_count()}  "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} decode steps, greedy, batch 1, {args.rounds} rounds")
    work = Path(tempfile.mkdtemp(prefix="pcpc-bench-gen-"))
    art = Path(args.artifacts) if args.artifacts else work / "artifacts"
    # (label, target, weight dtype); the first is the exported contract module (weights as inputs)
    variants = [("pcpc-fp32", "qwen-generation", "float32"),
                ("pcpc-fp32-res", "qwen-generation-resident", "float32"),
                ("pcpc-bf16-res", "qwen-generation-resident-bf16", "bfloat16"),
                ("pcpc-bf16", "qwen-generation-bf16", "bfloat16")]
    variants = [v for v in variants if v[0] not in skip]
    weight_files, weight_bytes, children = {}, {}, {}
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
            weight_bytes[label] = meta.parameter_bytes
            children[label] = Child(["pcpc", str(result.vmfb), str(weight_files[dtype]), str(args.prompt_len),
                                     str(args.new_tokens)])
        if "hf" not in skip:
            children["hf-eager"] = Child(["hf", str(args.prompt_len)])
            weight_bytes["hf-eager"] = weight_bytes["pcpc-fp32"]
        rounds = run_rounds(children, args.rounds, args.new_tokens)
        stats = {label: child.ask("stats") for label, child in children.items()}
    finally:
        for child in children.values():
            child.close()
        shutil.rmtree(work, ignore_errors=True)  # random weight files and (without --artifacts) the builds
    report(rounds, stats, weight_bytes)


def run_rounds(children: dict, n_rounds: int, new_tokens: int) -> list[dict]:
    """Per round and contender: decode and prefill tok/s, first tokens, and the bandwidth right before
    and after its run (the probe after one contender is the probe before the next)."""
    probe = BandwidthProbe()
    rounds = []
    before = probe()
    for r in range(n_rounds):
        row = {}
        for label, child in children.items():
            decode, prefill = child.ask(f"decode {new_tokens}"), child.ask("prefill")
            after = probe()
            row[label] = {"decode": decode["tok_s"], "prefill": prefill["tok_s"], "tokens": decode["tokens"],
                          "bandwidth": max(*before.values(), *after.values())}
            print(f"round {r + 1} {label:14s} decode {decode['tok_s']:6.2f} tok/s  prefill {prefill['tok_s']:6.1f} "
                  f"tok/s  bandwidth before / after {max(before.values()):.1f} / {max(after.values()):.1f} GB/s "
                  f"(after: 1 thread {after[1]:.1f}, 2 threads {after[2]:.1f}, sgemv {after['sgemv']:.1f})", flush=True)
            before = after
        rounds.append(row)
    return rounds


def report(rounds: list[dict], stats: dict, weight_bytes: dict) -> None:
    def median(label, key):
        return statistics.median(row[label][key] for row in rounds)

    def ratio(label, base, key):
        return statistics.median(row[label][key] / row[base][key] for row in rounds)

    fp32_bytes = weight_bytes["pcpc-fp32"]
    print(f"\nmedians over {len(rounds)} rounds")
    print(f"{'':14s} {'decode tok/s':>12s} {'prefill tok/s':>13s} {'peak RSS GB':>11s} {'RSS/weights':>11s}  first tokens")
    for label in stats:
        rss = stats[label]["peak_rss"]
        print(f"{label:14s} {median(label, 'decode'):12.2f} {median(label, 'prefill'):13.1f} "
              f"{rss / 1e9:11.2f} {rss / weight_bytes[label]:11.2f}  {rounds[-1][label]['tokens'][:4]}")
    ref = rounds[-1]["pcpc-fp32"]["tokens"]
    mismatched = [label for label in stats if label.startswith("pcpc") and any(r[label]["tokens"] != ref for r in rounds)]
    print("greedy tokens of every pcpc variant equal the fp32 contract module's: "
          + ("yes" if not mismatched else f"NO ({', '.join(mismatched)} differ: check the build)"))
    print(f"\nfp32 floor = best bandwidth right before and after the contender's run / {fp32_bytes / 1e9:.2f} GB of "
          f"weights per token; each ratio is taken within a round, then the median over rounds")
    for label in ("pcpc-fp32", "pcpc-fp32-res"):
        if label not in stats:
            continue
        per_round = [row[label]["decode"] / (row[label]["bandwidth"] * 1e9 / fp32_bytes) for row in rounds]
        print(f"{label:14s} decode / floor   {statistics.median(per_round):.2f}   (target >= 0.85; rounds "
              f"{' '.join(f'{x:.2f}' for x in per_round)})")
        if "hf-eager" in stats:
            print(f"{label:14s} decode / HF      {ratio(label, 'hf-eager', 'decode'):.2f}   (target >= 2)")
            print(f"{label:14s} prefill / HF     {ratio(label, 'hf-eager', 'prefill'):.2f}   (target >= 1.5)")
        print(f"{label:14s} peak RSS / weight bytes {stats[label]['peak_rss'] / fp32_bytes:.2f}   (target <= 1.3)")
    for label, base in (("pcpc-bf16-res", "pcpc-fp32"), ("pcpc-bf16-res", "pcpc-fp32-res"), ("pcpc-bf16", "pcpc-fp32")):
        if label in stats and base in stats:
            print(f"{label} decode / {base} decode  {ratio(label, base, 'decode'):.2f}   (target >= 1.8)")


if __name__ == "__main__":
    from pcpc.runtime.host_memory import use_in_this_process

    use_in_this_process()  # as in `pcpc` itself: CPU modules keep their freed pages (runtime/host_memory.py)
    main()
