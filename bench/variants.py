"""Train-step tokens/s of the model variants: pcpc's compiled module vs the eager nn.Module reference.

The variants of exporters/nanogpt.py at the nanogpt-small shape (batch 64), one at a time, each in one run
with its peers, 2 threads each, interleaved rounds, medians (bench/train_step.py's harness):

    pcpc           the variant's compiled train_step (forward + backward + clip + AdamW), device-resident
    eager          tests/nanogpt_reference.py: the variant written as ordinary nn.Modules, the way nanoGPT,
                   Llama and Mixtral write the layers (MoE: a loop over the experts with index_select /
                   index_add_ on the tokens each one was given), autograd, clip_grad_norm_, torch AdamW
    torch.compile  the same eager module, torch.compile'd (loss graph and optimizer step)

Targets: every nanogpt-small-shaped variant >= 1.5x eager; MoE (4 experts, top 2) >= 1.3x the eager MoE.
`--gpt2 B` instead times one train step of gpt2-124m at batch B (block 1024) against eager, each in a
process of its own, and reports tokens/s and peak RSS (VmHWM).

    .venv/bin/python bench/variants.py
    .venv/bin/python bench/variants.py --variants moe,all --no-torch-compile
    .venv/bin/python bench/variants.py --gpt2 4
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pcpc.mlir import cpu as target_cpu

target_cpu.match_torch()  # with PCPC_CPU=znver3, torch runs AVX2 too (before it is imported)


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the eager reference lives with the tests that check against it

MOE = {"num_experts": 4, "top_k": 2}
VARIANTS = {
    "baseline": {},
    "gelu": {"mlp": "gelu"},
    "swiglu": {"mlp": "swiglu"},
    "rmsnorm": {"norm": "rmsnorm"},
    "rope": {"positions": "rope"},
    "llama-style": {"mlp": "swiglu", "norm": "rmsnorm", "positions": "rope"},
    "moe": {"moe": MOE},
    "moe-capacity": {"moe": {**MOE, "capacity_factor": 1.25}},
    "all": {"mlp": "swiglu", "norm": "rmsnorm", "positions": "rope", "moe": MOE},
    "all-capacity": {"mlp": "swiglu", "norm": "rmsnorm", "positions": "rope",
                     "moe": {**MOE, "capacity_factor": 1.25}},
}
TARGET = {name: 1.3 for name, v in VARIANTS.items() if "moe" in v}
"""Speed-up over eager each variant must reach: 1.3x with experts (against the eager loop over experts),
else 1.5x."""


def _harness():
    if "bench_train_step" in sys.modules:
        return sys.modules["bench_train_step"]
    spec = importlib.util.spec_from_file_location("bench_train_step", ROOT / "bench" / "train_step.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def eager_step(cfg, x, y, compiled: bool):
    """(run one step of the nn.Module reference, sync -> loss, first loss)."""
    import torch

    from nanogpt_reference import reference
    from pcpc.exporters.nanogpt import init_params

    model = reference(cfg, init_params(cfg, seed=0))
    params = list(model.parameters())
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def loss_fn(x, y):
        return model.loss(x, y)[0]

    def update():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    if compiled:
        loss_fn, update = torch.compile(loss_fn), torch.compile(update, fullgraph=False)
    last = [None]

    def run():
        loss = loss_fn(xt, yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update()
        last[0] = loss

    def sync():
        return float(last[0].detach())

    run()
    return run, sync, sync()


def bench_variant(name: str, args, out_dir: Path, h) -> dict:
    from pcpc.exporters.nanogpt import make_config
    from pcpc.mlir.targets import nanogpt_target

    cfg = make_config("nanogpt-small", **VARIANTS[name])
    x, y = h.make_batch(cfg, args.batch)
    res = h.Result(f"nanogpt-small {name}", args.batch, args.batch * cfg.block_size)
    target = nanogpt_target(f"variant-{name}-b{args.batch}", "nanogpt-small", args.batch,
                            model_overrides=VARIANTS[name], functions=["train_step"])
    systems = {"pcpc": h.pcpc_step(target, out_dir, cfg, x, y, args.threads, res)}
    run, sync, res.first_loss["eager"] = eager_step(cfg, x, y, compiled=False)
    systems["eager"] = (run, sync)
    if not args.no_torch_compile:
        t0 = time.perf_counter()
        run, sync, res.first_loss["torch.compile"] = eager_step(cfg, x, y, compiled=True)
        res.build["torch_compile"] = round(time.perf_counter() - t0, 3)
        systems["torch.compile"] = (run, sync)
    res.rounds, res.cpu_rounds = h.time_systems(systems, args.steps, args.rounds, args.warmup)
    res.seconds = {k: statistics.median(v) for k, v in res.rounds.items()}
    res.cpu_seconds = {k: statistics.median(v) for k, v in res.cpu_rounds.items()}
    return res


def gpt2_child(who: str, batch: int, steps: int, threads: int, out_dir: str) -> dict:
    """One contender of --gpt2, in this (child) process: best step seconds and peak RSS."""
    import torch

    from pcpc.exporters.nanogpt import make_config
    from pcpc.runtime.host_memory import peak_rss_bytes
    from pcpc.mlir.targets import nanogpt_target

    torch.set_num_threads(threads)
    h = _harness()
    cfg = make_config("gpt2-124m")
    x, y = h.make_batch(cfg, batch)
    res = h.Result("gpt2-124m", batch, batch * cfg.block_size)
    if who == "pcpc":
        target = nanogpt_target(f"gpt2-124m-b{batch}", "gpt2-124m", batch, functions=["train_step"])
        t0 = time.perf_counter()
        run, sync = h.pcpc_step(target, Path(out_dir), cfg, x, y, threads, res)
        build_s = time.perf_counter() - t0
    else:
        run, sync, _ = eager_step(cfg, x, y, compiled=False)
        build_s = 0.0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        run()
        loss = sync()
        times.append(time.perf_counter() - t0)
    return {"best_s": min(times), "median_s": statistics.median(times), "loss": loss, "build_s": build_s,
            "tokens": batch * cfg.block_size, "peak_rss_gb": peak_rss_bytes() / 2**30, **res.build}


def bench_gpt2(args, out_dir: Path) -> str:
    rows = {}
    for who in ("pcpc", "eager"):
        cmd = [sys.executable, __file__, "--gpt2-child", who, "--gpt2", str(args.gpt2), "--steps", str(args.steps),
               "--threads", str(args.threads), "--artifacts", str(out_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode:
            raise SystemExit(f"{who}: {proc.stderr[-2000:]}")
        rows[who] = json.loads(proc.stdout.strip().splitlines()[-1])
    p, e = rows["pcpc"], rows["eager"]
    return "\n".join([
        f"gpt2-124m train step, batch {args.gpt2} x 1024 tokens, {args.threads} threads, best of {args.steps}",
        "| system | s/step | tokens/s | peak RSS GB | loss after the steps |", "|---|---|---|---|---|",
        *[f"| {w} | {r['best_s']:.2f} | {r['tokens'] / r['best_s']:,.0f} | {r['peak_rss_gb']:.2f} | {r['loss']:.4f} |"
          for w, r in rows.items()],
        f"pcpc vs eager: {e['best_s'] / p['best_s']:.2f}x; pcpc build: export {p.get('export', 0):.1f} s, "
        f"compile {p.get('compile', 0):.1f} s",
    ])


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma list of: " + ", ".join(VARIANTS))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round (--gpt2: steps timed)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--no-torch-compile", action="store_true")
    ap.add_argument("--artifacts", default="", help="build cache dir (default: a fresh temp dir)")
    ap.add_argument("--gpt2", type=int, default=0, metavar="BATCH", help="time gpt2-124m at this batch instead")
    ap.add_argument("--gpt2-child", choices=("pcpc", "eager"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.compute_dtype = "float32"  # the harness's report names it
    if args.gpt2_child:
        print(json.dumps(gpt2_child(args.gpt2_child, args.gpt2, args.steps, args.threads, args.artifacts)))
        return
    with tempfile.TemporaryDirectory(prefix="pcpc-bench-") as tmp:
        out_dir = Path(args.artifacts or tmp)
        if args.gpt2:
            print(f"{datetime.date.today()} {target_cpu.summary()}\n" + bench_gpt2(args, out_dir))
            return
        import torch

        torch.set_num_threads(args.threads)
        h = _harness()
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
        load = os.getloadavg()[0]
        results = [bench_variant(n, args, out_dir, h) for n in names]
    print(h.report(results, args, (load, os.getloadavg()[0])))
    print("\n| variant | pcpc vs eager | target | pcpc vs torch.compile |\n|---|---|---|---|")
    for name, r in zip(names, results):
        ratio = r.seconds["eager"] / r.seconds["pcpc"]
        compiled = (f"{r.seconds['torch.compile'] / r.seconds['pcpc']:.2f}x" if "torch.compile" in r.seconds
                    else "-")
        want = TARGET.get(name, 1.5)
        print(f"| {name} | {ratio:.2f}x | >= {want}x {'met' if ratio >= want else 'NOT met'} | {compiled} |")


if __name__ == "__main__":
    from pcpc.runtime.host_memory import use_in_this_process

    use_in_this_process()  # as in `pcpc` itself: CPU modules keep their freed pages (runtime/host_memory.py)
    main()
