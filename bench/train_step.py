"""Tokens/s of one nanoGPT training step: compiled pcpc module vs torch eager vs torch.compile.

One step = forward + backward + global-norm clipping (1.0) + AdamW, on the
same model (pcpc.exporters.nanogpt.forward), batch, data and thread count:

    pcpc           the `train_step` function of the module built by
                   pcpc.mlir.build (weights and optimizer state device-resident,
                   outputs fed back as the next step's inputs)
    eager          forward + F.cross_entropy, autograd, clip_grad_norm_,
                   torch.optim.AdamW (decay on matrices only, as nanoGPT)
    torch.compile  the same: loss graph torch.compile'd, clipping + optimizer
                   step torch.compile'd (the recipe of the torch docs)

Timing: each system is warmed up, then R rounds of N steps; the rounds of the
systems are interleaved (so background load hits all alike), each after a
50 ms pause, and the median round gives the step time (the best round and the
process CPU time per step are printed too: on a shared machine they show what
load did). IREE runs on `--threads` task workers and torch with
torch.set_num_threads(--threads). Also reported: export and compile seconds of
a fresh build, the time of a no-op rebuild, torch.compile's warm-up, and the
first step's loss of each system (same init and batch: they must agree).
`--compute-dtype bfloat16` runs all three with nanoGPT's bf16 matmuls;
`--accuracy STEPS` compares bf16 with fp32 compute instead of timing.

    .venv/bin/python bench/train_step.py                  # both presets, 2 threads
    .venv/bin/python bench/train_step.py --threads 1 --models small --rounds 9
    .venv/bin/python bench/train_step.py --compute-dtype bfloat16
    .venv/bin/python bench/train_step.py --accuracy 300   # bf16 vs fp32 on tiny Shakespeare
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pcpc.mlir import cpu as target_cpu

target_cpu.match_torch()  # with PCPC_CPU=znver3, torch runs AVX2 too (before it is imported)

import numpy as np

MODELS = {"small": ("nanogpt-small", 64), "medium": ("nanogpt-medium", 32)}
LR = 1e-3
PAUSE_S = 0.05
"""Idle time before each timed round."""


@dataclass
class Result:
    """One model's measurements; times in seconds, keyed by system name."""

    model: str
    batch: int
    tokens_per_step: int
    seconds: dict[str, float] = field(default_factory=dict)
    """Median step time per system."""
    rounds: dict[str, list[float]] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    """Median process CPU time per step (all threads); less sensitive to other load than wall time."""
    cpu_rounds: dict[str, list[float]] = field(default_factory=dict)
    build: dict[str, float] = field(default_factory=dict)
    first_loss: dict[str, float] = field(default_factory=dict)


def make_batch(cfg, batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, cfg.vocab_size, size=(batch, cfg.block_size + 1), dtype=np.int64)
    return np.ascontiguousarray(data[:, :-1]), np.ascontiguousarray(data[:, 1:])


def pcpc_step(target, out_dir: Path, cfg, x, y, threads: int, result: Result) -> tuple[Callable, Callable]:
    """Build (timed, then a timed no-op rebuild); return (run one compiled train_step, sync -> loss)."""
    from pcpc.exporters.nanogpt import init_params
    from pcpc.mlir.build import build
    from pcpc.runtime.module import CompiledModule, to_host

    r = build(target, out_dir)
    result.build.update({k: round(v, 3) for k, v in r.seconds.items()})
    for _ in range(3):  # a source edited meanwhile (e.g. by a concurrent checkout) makes a rebuild real
        t0 = time.perf_counter()
        r = build(target, out_dir)
        result.build["noop_rebuild"] = round(time.perf_counter() - t0, 4)
        if not r.ran:
            break
    else:
        raise RuntimeError(f"{target.name}: three rebuilds in a row were not no-ops ({r.ran})")

    mod = CompiledModule(r.vmfb, threads=threads)
    params = [p.numpy() for p in init_params(cfg, seed=0).values()]
    zeros = [np.zeros_like(p) for p in params]
    n = len(params)
    state = mod.upload_all(params) + mod.upload_all(zeros) + mod.upload_all(zeros)
    xd, yd = mod.upload(x), mod.upload(y)
    lr = np.float32(LR)
    step = [0]
    last = [None]  # only the latest loss: a result array can keep its whole call's output block alive

    def run() -> None:
        step[0] += 1
        out = mod("train_step", *state, np.float32(step[0]), lr, xd, yd)
        state[:] = out[len(out) - 3 * n:]  # after the loss (and a MoE model's router statistics)
        last[0] = out[0]

    def sync() -> float:
        return float(to_host(last[0]))

    run()
    result.first_loss["pcpc"] = sync()
    return run, sync


def torch_step(cfg, x, y, compiled: bool) -> tuple[Callable, Callable, float]:
    """(run one eager or torch.compile'd step, sync -> loss, the first step's loss)."""
    import torch
    import torch.nn.functional as F

    from pcpc.exporters.nanogpt import forward, init_params

    params = {k: v.clone().requires_grad_() for k, v in init_params(cfg, seed=0).items()}
    groups = [
        {"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
        {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=LR, betas=(0.9, 0.95), eps=1e-8)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    V = cfg.vocab_size

    def loss_fn(params, x, y):
        return F.cross_entropy(forward(params, x, cfg).view(-1, V), y.view(-1))

    def update():
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        opt.step()

    if compiled:
        loss_fn = torch.compile(loss_fn)
        update = torch.compile(update, fullgraph=False)
    last = [None]

    def run() -> None:
        loss = loss_fn(params, xt, yt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        update()
        last[0] = loss

    def sync() -> float:
        return float(last[0].detach())

    run()
    return run, sync, float(last[0].detach())


def time_systems(systems: dict, steps: int, rounds: int, warmup: int):
    """Interleaved rounds; returns (wall, process CPU) seconds per step of each round, per system."""
    for run, sync in systems.values():
        for _ in range(warmup):
            run()
        sync()
    times = {name: [] for name in systems}
    cpu = {name: [] for name in systems}
    for _ in range(rounds):
        for name, (run, sync) in systems.items():
            # torch's OpenMP workers keep spinning a few ms after their last op; let them go idle
            # so that time is not charged to the next system's round (the first pcpc step after an
            # eager round measured 12.4 vs 9.2 ms).
            time.sleep(PAUSE_S)
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(steps):
                run()
            sync()
            times[name].append((time.perf_counter() - t0) / steps)
            cpu[name].append((time.process_time() - c0) / steps)
    return times, cpu


def bench_model(key: str, args, out_dir: Path) -> Result:
    import torch

    from pcpc.exporters.nanogpt import make_config
    from pcpc.mlir.targets import get_target, nanogpt_target

    preset, default_batch = MODELS[key]
    batch = args.batch or default_batch
    overrides = {"compute_dtype": args.compute_dtype}
    cfg = make_config(preset, **overrides)
    if batch == default_batch and args.compute_dtype == "float32":
        target = get_target(preset)  # what `make nanogpt-small.vmfb` builds: all six functions, timed as such
    else:
        target = nanogpt_target(f"bench-{preset}-b{batch}-{args.compute_dtype}", preset, batch_size=batch,
                                model_overrides=overrides, functions=["train_step"])
    x, y = make_batch(cfg, batch)
    res = Result(preset, batch, batch * cfg.block_size)

    systems = {}
    systems["pcpc"] = pcpc_step(target, out_dir, cfg, x, y, args.threads, res)
    run, sync, loss = torch_step(cfg, x, y, compiled=False)
    systems["eager"] = (run, sync)
    res.first_loss["eager"] = loss
    if not args.no_torch_compile:
        t0 = time.perf_counter()
        run, sync, loss = torch_step(cfg, x, y, compiled=True)
        res.build["torch_compile"] = round(time.perf_counter() - t0, 3)
        systems["torch.compile"] = (run, sync)
        res.first_loss["torch.compile"] = loss
    torch.manual_seed(0)
    res.rounds, res.cpu_rounds = time_systems(systems, args.steps, args.rounds, args.warmup)
    res.seconds = {k: statistics.median(v) for k, v in res.rounds.items()}
    res.cpu_seconds = {k: statistics.median(v) for k, v in res.cpu_rounds.items()}
    return res


def text_batches(cfg, batch: int, steps: int, data_path: str, seed: int = 0):
    """`steps` (x, y) batches of random windows of a text file (chars for vocab 65, bytes for 256)."""
    raw = Path(data_path).read_bytes()
    if cfg.vocab_size >= 256:
        ids = np.frombuffer(raw, dtype=np.uint8).astype(np.int64)
    else:
        chars = sorted(set(raw))
        if len(chars) > cfg.vocab_size:
            raise SystemExit(f"{data_path}: {len(chars)} distinct bytes, more than vocab {cfg.vocab_size}")
        ids = np.searchsorted(np.array(chars), np.frombuffer(raw, dtype=np.uint8)).astype(np.int64)
    rng = np.random.default_rng(seed)
    T = cfg.block_size
    for _ in range(steps):
        starts = rng.integers(0, len(ids) - T - 1, size=batch)
        win = np.stack([ids[s : s + T + 1] for s in starts])
        yield np.ascontiguousarray(win[:, :-1]), np.ascontiguousarray(win[:, 1:])


def accuracy(key: str, args, out_dir: Path) -> str:
    """bfloat16 vs float32 compute: gradients at init, then the loss over a short training run."""
    from pcpc.exporters.nanogpt import init_params, make_config
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import nanogpt_target
    from pcpc.runtime.module import CompiledModule, to_host

    preset, batch = MODELS[key]
    batch = args.batch or batch
    mods, cfg = {}, None
    for dtype in ("float32", "bfloat16"):
        cfg = make_config(preset, compute_dtype=dtype)
        target = nanogpt_target(f"acc-{preset}-b{batch}-{dtype}", preset, batch_size=batch,
                                model_overrides={"compute_dtype": dtype}, functions=["value_and_grad", "train_step"])
        mods[dtype] = CompiledModule(build(target, out_dir).vmfb, threads=args.threads)
    params = [p.numpy() for p in init_params(cfg, seed=0).values()]
    n = len(params)
    batches = list(text_batches(cfg, batch, args.accuracy + 1, args.data))
    x0, y0 = batches.pop()
    vg = {k: [to_host(a) for a in m("value_and_grad", *params, x0, y0)] for k, m in mods.items()}
    g32 = np.concatenate([g.ravel() for g in vg["float32"][1:]])
    g16 = np.concatenate([g.ravel() for g in vg["bfloat16"][1:]])
    grad_err = float(np.linalg.norm(g16 - g32) / np.linalg.norm(g32))
    cos = float(g16 @ g32 / (np.linalg.norm(g16) * np.linalg.norm(g32)))
    losses = {}
    for dtype, mod in mods.items():
        state = mod.upload_all(params) + mod.upload_all([np.zeros_like(p) for p in params]) * 2
        out, curve = None, []
        for i, (x, y) in enumerate(batches):
            out = mod("train_step", *state, np.float32(i + 1), np.float32(args.accuracy_lr), x, y)
            state = out[1 : 1 + 3 * n]
            curve.append(float(to_host(out[0])))
        losses[dtype] = np.array(curve)
    tail = max(1, len(batches) // 10)
    f32, b16 = losses["float32"], losses["bfloat16"]
    return (
        f"| {preset} | {batch} | {vg['float32'][0]:.5f} / {vg['bfloat16'][0]:.5f} | {grad_err:.2e} | {cos:.6f} | "
        f"{len(batches)} | {f32[-tail:].mean():.4f} / {b16[-tail:].mean():.4f} | {np.abs(f32 - b16).max():.4f} |"
    )


def report(results: list[Result], args, loads: tuple) -> str:
    lines = [
        f"date {datetime.date.today()}  {target_cpu.summary()}  "
        f"threads {args.threads}  compute {args.compute_dtype}  steps/round {args.steps}  rounds {args.rounds} (median)  "
        f"load average before/after {loads[0]:.2f}/{loads[1]:.2f}",
        "",
        "| model | batch | system | ms/step | tokens/s | pcpc speed-up | best round ms | speed-up (best) "
        "| CPU ms/step | speed-up (CPU time) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        base, cbase = r.seconds["pcpc"], r.cpu_seconds["pcpc"]
        bbase = min(r.rounds["pcpc"])
        for name, s in r.seconds.items():
            c, b = r.cpu_seconds[name], min(r.rounds[name])
            pcpc = name == "pcpc"
            lines.append(
                f"| {r.model} | {r.batch} | {name} | {s * 1e3:.1f} | {r.tokens_per_step / s:,.0f} | "
                f"{'' if pcpc else f'{s / base:.2f}x'} | {b * 1e3:.1f} | {'' if pcpc else f'{b / bbase:.2f}x'} | "
                f"{c * 1e3:.1f} | {'' if pcpc else f'{c / cbase:.2f}x'} |"
            )
    lines += ["", "| model | export s | compile s | no-op rebuild s | torch.compile warm-up s | first loss pcpc / eager |",
              "|---|---|---|---|---|---|"]
    for r in results:
        b = r.build
        lines.append(
            f"| {r.model} | {b.get('export', float('nan')):.2f} | {b.get('compile', float('nan')):.2f} | "
            f"{b['noop_rebuild']:.4f} | {b.get('torch_compile', float('nan')):.1f} | "
            f"{r.first_loss['pcpc']:.6f} / {r.first_loss['eager']:.6f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,medium", help="comma list of: " + ", ".join(MODELS))
    ap.add_argument("--batch", type=int, default=0, help="override the batch size (default: 64 small, 32 medium)")
    ap.add_argument("--threads", type=int, default=2, help="IREE task workers and torch threads")
    ap.add_argument("--steps", type=int, default=10, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=7, help="timed rounds per system (median is reported)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per system before timing")
    ap.add_argument("--artifacts", default="", help="build cache dir (default: a fresh temp dir, so export and "
                    "compile are timed)")
    ap.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                    help="nanoGPT compute_dtype of every system (bfloat16: weight matmuls in bf16)")
    ap.add_argument("--no-torch-compile", action="store_true", help="skip the torch.compile baseline")
    ap.add_argument("--json", default="", help="also write the results as JSON here")
    ap.add_argument("--accuracy", type=int, default=0, metavar="STEPS",
                    help="instead of timing: compare bfloat16 with float32 compute (gradients at init, then "
                    "STEPS compiled train steps on --data)")
    ap.add_argument("--accuracy-lr", type=float, default=1e-3, help="learning rate of the --accuracy runs")
    ap.add_argument("--data", default="/work/shared/data/tiny_shakespeare.txt", help="text for --accuracy")
    args = ap.parse_args(argv)
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    bad = [k for k in keys if k not in MODELS]
    if bad:
        ap.error(f"--models: unknown {bad}; valid: {', '.join(MODELS)}")

    import torch

    torch.set_num_threads(args.threads)
    if args.accuracy:
        with tempfile.TemporaryDirectory(prefix="pcpc-bench-") as tmp:
            rows = [accuracy(k, args, Path(args.artifacts or tmp)) for k in keys]
        print(f"date {datetime.date.today()}  bfloat16 vs float32 compute, lr {args.accuracy_lr}, data {args.data}\n")
        print("| model | batch | loss at init f32 / bf16 | grad rel. error | grad cosine | steps | "
              "last-10% mean loss f32 / bf16 | max abs loss diff |")
        print("|---|---|---|---|---|---|---|---|")
        print("\n".join(rows))
        return
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pcpc-bench-") as tmp:
        out_dir = Path(args.artifacts or tmp)
        results = [bench_model(k, args, out_dir) for k in keys]
    text = report(results, args, (load_before, os.getloadavg()[0]))
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))


if __name__ == "__main__":
    from pcpc.runtime.host_memory import use_in_this_process

    use_in_this_process()  # as in `pcpc` itself: CPU modules keep their freed pages (runtime/host_memory.py)
    main()
