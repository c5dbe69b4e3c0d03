"""DiLoCo: `pcpc run` (compiled modules) vs the same loop in plain PyTorch eager, side by side.

The eager loop here is also the reference implementation the tests compare
`pcpc run` against. It shares nothing with pcpc's loop but the model
definition (pcpc.exporters.nanogpt.forward and init_params) and the data
order (pcpc.runtime.train.data: tokenizer, shards, seeded batches, validation
batches). The rest is textbook PyTorch:

    inner   torch.optim.AdamW (weight decay on 2-D+ params only, as nanoGPT),
            F.cross_entropy, loss.backward(), clip_grad_norm_, nanoGPT's get_lr
    outer   torch.optim.SGD(nesterov=True) stepping the global params with the
            averaged pseudo-gradient theta_global - theta_local as their .grad
    comms   torch.distributed all_reduce (gloo), one tensor per parameter

Both systems run W worker processes with one compute thread each (IREE task
topology 1 / torch.set_num_threads(1) on this 2-core machine), the same
config, rounds and evaluation schedule. Reported: wall time of the whole
command (process start to exit; pcpc's modules are built beforehand) and
training tokens/s (the round loop, evaluation included), the ratio pcpc /
eager, and both final validation losses. Then pcpc's loop per inner step
against the bare compiled train_step (inputs uploaded once, the loss read
back) in W processes at once and alone: what the loop itself costs.

    .venv/bin/python bench/diloco.py                      # 20 rounds of experiments/nanogpt_small.json
    .venv/bin/python bench/diloco.py --rounds 100         # the full experiment: quality comparison too
    .venv/bin/python bench/diloco.py --repeat 3           # alternate the systems 3 times, report medians
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pcpc.mlir import cpu as target_cpu

target_cpu.match_torch()  # with PCPC_CPU=znver3, torch runs AVX2 too (before it is imported)

import numpy as np
import torch
import torch.nn.functional as F

from pcpc.exporters import nanogpt
from pcpc.runtime.train.data import load_dataset, val_batches

REPO = Path(__file__).resolve().parent.parent


def get_lr(exp, it: int) -> float:
    """nanoGPT's get_lr (train.py), or the constant rate."""
    if exp.lr_schedule == "constant":
        return exp.learning_rate
    lr, warmup = exp.learning_rate, exp.warmup_steps
    decay_iters = exp.lr_decay_steps if exp.lr_decay_steps is not None else exp.outer_loop_steps * exp.tau
    min_lr = exp.min_learning_rate if exp.min_learning_rate is not None else lr / 10
    if it < warmup:
        return lr * (it + 1) / (warmup + 1)
    if it > decay_iters:
        return min_lr
    ratio = (it - warmup) / (decay_iters - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)


class ReferenceWorker:
    """One DiLoCo worker in eager PyTorch: local params, a torch AdamW, its data shard."""

    def __init__(self, exp, cfg, data, rank: int, world: int, init: dict):
        self.exp, self.cfg = exp, cfg
        self.params = {k: v.detach().clone().requires_grad_() for k, v in init.items()}
        self.sampler = data.sampler(rank, world, cfg.block_size, exp.batch_size, exp.seed)
        self.opt = self._adamw()

    def _adamw(self):
        decay = [p for p in self.params.values() if p.dim() >= 2]
        no_decay = [p for p in self.params.values() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": self.exp.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.exp.learning_rate, betas=(self.exp.beta1, self.exp.beta2),
                                 eps=1e-8)

    def run_round(self, global_params: dict, r: int) -> tuple[list[torch.Tensor], float]:
        """tau inner steps from global_params; returns (pseudo-gradient per param, mean loss)."""
        exp = self.exp
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(global_params[k])
        if not exp.persist_inner_state:
            self.opt = self._adamw()
        total = 0.0
        for k in range(exp.tau):
            step = r * exp.tau + k
            x, y = (torch.from_numpy(a) for a in self.sampler.batch(step))
            for group in self.opt.param_groups:
                group["lr"] = get_lr(exp, step)
            logits = nanogpt.forward(self.params, x, self.cfg)  # (B, T, V)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            if exp.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.params.values(), exp.grad_clip)
            self.opt.step()
            total += loss.item()
        with torch.no_grad():
            delta = [global_params[k] - p for k, p in self.params.items()]
        return delta, total / exp.tau


class ReferenceOuter:
    """The global params and torch's Nesterov SGD over them."""

    def __init__(self, exp, init: dict):
        self.params = {k: v.detach().clone().requires_grad_() for k, v in init.items()}
        mu = exp.nesterov_momentum
        self.opt = torch.optim.SGD(self.params.values(), lr=exp.outer_learning_rate, momentum=mu,
                                   nesterov=mu > 0)

    def step(self, delta: list[torch.Tensor]) -> None:
        for p, d in zip(self.params.values(), delta):
            p.grad = d.clone()
        self.opt.step()


@torch.no_grad()
def reference_val_loss(params: dict, cfg, batches) -> float:
    losses = []
    for x, y in batches:
        logits = nanogpt.forward(params, torch.from_numpy(x), cfg)
        losses.append(F.cross_entropy(logits.view(-1, logits.size(-1)), torch.from_numpy(y).view(-1)).item())
    return float(np.mean(losses))


def setup(exp, world: int):
    """(model config, dataset, initial params, validation batches) as pcpc run resolves them."""
    from pcpc.runtime.train.diloco import resolve_tokenizer

    data = load_dataset(exp.dataset, resolve_tokenizer(exp), exp.seed)
    cfg = exp.model_config(data.tokenizer.vocab_size)
    init = nanogpt.init_params(cfg, exp.seed)
    val = val_batches(data.val, cfg.block_size, exp.eval_batch_size, exp.eval_batches)
    return cfg, data, init, val


def reference_diloco(exp, world: int, rounds: int) -> dict:
    """Simulate `world` workers in this process, one after the other (for the tests)."""
    cfg, data, init, val = setup(exp, world)
    workers = [ReferenceWorker(exp, cfg, data, r, world, init) for r in range(world)]
    outer = ReferenceOuter(exp, init)
    train_losses = []
    for r in range(rounds):
        results = [w.run_round(outer.params, r) for w in workers]
        mean = [sum(ds) / world for ds in zip(*(d for d, _ in results))]
        outer.step(mean)
        train_losses.append(sum(loss for _, loss in results) / world)
    params = {k: v.detach().numpy().copy() for k, v in outer.params.items()}
    return {"params": params, "train_losses": train_losses, "val_loss": reference_val_loss(outer.params, cfg, val)}


def eager_worker(rank: int, world: int, payload) -> dict:
    """One process of the distributed eager DiLoCo run (the bench's contender)."""
    import torch.distributed as dist

    exp, rounds = payload
    torch.set_num_threads(1)
    os.environ.setdefault("LOCAL_WORLD_SIZE", str(world))
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=exp.timeout_s))
    cfg, data, init, val = setup(exp, world)
    worker = ReferenceWorker(exp, cfg, data, rank, world, init)
    outer = ReferenceOuter(exp, init)
    my_val = val[rank::world]
    t0 = time.perf_counter()
    val_loss = None
    for r in range(rounds):
        delta, _ = worker.run_round(outer.params, r)
        for d in delta:
            dist.all_reduce(d)
            d /= world
        outer.step(delta)
        if r + 1 == rounds or (exp.eval_interval and (r + 1) % exp.eval_interval == 0):
            t = torch.tensor([reference_val_loss(outer.params, cfg, my_val) * len(my_val), len(my_val)],
                             dtype=torch.float64)
            dist.all_reduce(t)
            val_loss = float(t[0] / t[1])
    seconds = time.perf_counter() - t0
    dist.destroy_process_group()
    tokens = rounds * exp.tau * world * exp.batch_size * cfg.block_size
    return {"train_seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds, "final_val_loss": val_loss}


def bare_worker(rank: int, world: int, payload) -> dict:
    """The compiled train_step alone, in a tight loop: inputs uploaded once, the loss read back each step
    (as the loop does). What pcpc's loop costs per inner step is measured against this, run beside as
    many others as the loop has workers."""
    from pcpc.runtime.module import CompiledModule, to_host

    vmfb, steps = payload
    mod = CompiledModule(vmfb, threads=1)
    rng = np.random.default_rng(rank)
    args = [np.float32(1.0) if not a.shape  # step and learning rate, passed as the loop does
            else mod.upload(rng.integers(0, 2, a.shape).astype(a.dtype) if "int" in a.dtype
                            else (0.02 * rng.standard_normal(a.shape)).astype(a.dtype))
            for a in mod.signature("train_step").args]
    for _ in range(5):
        to_host(mod("train_step", *args)[0])
    t0 = time.perf_counter()
    for _ in range(steps):
        to_host(mod("train_step", *args)[0])
    return {"ms_per_step": 1e3 * (time.perf_counter() - t0) / steps}


def run_bare(vmfb: Path, workers: int, steps: int) -> float:
    """ms per bare train_step with `workers` processes running it at once (the median worker's)."""
    from pcpc.runtime.run.launch import launch_local

    return statistics.median(r["ms_per_step"] for r in launch_local(bare_worker, (str(vmfb), steps), workers))


def run_pcpc(config: Path, rounds: int, out: Path) -> dict:
    cmd = [str(Path(sys.executable).parent / "pcpc"), "run", str(config), "--out", str(out), "--quiet",
           "--set", f"outer_loop_steps={rounds}", "--set", "wandb_project=null"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [0.0] + [r["elapsed_s"] for r in records]
    plain = [b - a for a, b, r in zip(ends, ends[1:], records) if r.get("val_loss") is None]  # no evaluation
    return {**json.loads((out / "summary.json").read_text()), "wall_s": wall,
            "round_s": statistics.median(plain) if plain else math.nan}


def run_eager(exp, rounds: int) -> dict:
    from pcpc.runtime.run.launch import launch_local

    t0 = time.perf_counter()
    out = launch_local(eager_worker, (exp, rounds), exp.num_workers)[0]
    return {**out, "wall_s": time.perf_counter() - t0}


def _median(results: list[dict]) -> dict:
    """The run with the median training tokens/s (its other numbers come with it)."""
    return sorted(results, key=lambda r: r["tokens_per_s"])[len(results) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(REPO / "experiments" / "nanogpt_small.json"))
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--repeat", type=int, default=1,
                    help="alternate pcpc and eager this many times and report the median (background load)")
    ap.add_argument("--out", default=None, help="where pcpc's run directories go (default: a temporary dir)")
    args = ap.parse_args()

    from pcpc.config import load_json
    from pcpc.runtime.train.config import parse_experiment
    from pcpc.runtime.train.diloco import check_data, resolve_model, resolve_tokenizer

    raw = {**load_json(args.config), "outer_loop_steps": args.rounds, "wandb_project": None}
    exp = parse_experiment(raw, where=args.config)
    check_data(exp)
    vocab = load_dataset(exp.dataset, resolve_tokenizer(exp), exp.seed).tokenizer.vocab_size
    built = resolve_model(exp, vocab)  # build outside the timing
    runs = {"pcpc": [], "eager": [], "bare": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeat):  # alternate, so background load hits both alike
            out = Path(args.out or tmp) / f"run{i}"
            shutil.rmtree(out, ignore_errors=True)
            runs["pcpc"].append(run_pcpc(Path(args.config), args.rounds, out))
            runs["eager"].append(run_eager(exp, args.rounds))
            runs["bare"].append(run_bare(built.vmfb, exp.num_workers, min(exp.tau * args.rounds, 300)))
    bare_alone = run_bare(built.vmfb, 1, 300)
    pcpc, eager = (_median(runs[k]) for k in ("pcpc", "eager"))
    print(f"DiLoCo {Path(args.config).name}: {args.rounds} rounds x tau {exp.tau}, {exp.num_workers} workers, "
          f"batch {exp.batch_size}; {target_cpu.summary()}; {datetime.date.today()}"
          + (f"; median of {args.repeat} alternating runs" if args.repeat > 1 else ""))
    print(f"{'':8s} {'wall s':>8s} {'train s':>8s} {'tok/s':>9s} {'val loss':>9s}")
    for name, r in (("pcpc", pcpc), ("eager", eager)):
        print(f"{name:8s} {r['wall_s']:8.1f} {r['train_seconds']:8.1f} {r['tokens_per_s']:9.0f} "
              f"{r['final_val_loss']:9.4f}")
    print(f"ratio pcpc/eager: tokens/s {pcpc['tokens_per_s'] / eager['tokens_per_s']:.2f}x (training loop), "
          f"wall {eager['wall_s'] / pcpc['wall_s']:.2f}x faster (whole command)")
    loop_ms = 1e3 * pcpc["train_seconds"] / (args.rounds * exp.tau)
    round_ms = 1e3 * pcpc["round_s"] / exp.tau
    bare = statistics.median(runs["bare"])
    print(f"pcpc loop per inner step: {round_ms:.1f} ms in a round without evaluation (its outer step and "
          f"all-reduce included), {loop_ms:.1f} ms over the whole run; the bare compiled train_step {bare:.1f} ms "
          f"beside {exp.num_workers - 1} more, {bare_alone:.1f} ms alone: loop / bare {round_ms / bare:.2f}x "
          f"(target <= 1.1x), {loop_ms / bare:.2f}x with evaluation")
    rel = abs(pcpc["final_val_loss"] - eager["final_val_loss"]) / eager["final_val_loss"]
    print(f"final val loss: pcpc {pcpc['final_val_loss']:.4f} vs eager {eager['final_val_loss']:.4f} "
          f"({100 * rel:.2f}% apart)")


if __name__ == "__main__":
    main()
