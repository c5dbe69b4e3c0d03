"""DiLoCo training of a nanoGPT preset through compiled modules, on torch.distributed.

Round r, on each of W workers (DiLoCo, Douillard et al. 2023):

    θ_local ← θ_global
    tau × train_step(θ_local, m, v, step, lr, x, y)   compiled forward + backward + AdamW; weights and
                                                      moments stay device arrays between the steps
    Δ_w = θ_global − θ_local                          the pseudo-gradient
    Δ = mean_w Δ_w                                    one all-reduce of one flat fp32 buffer
    θ_global, b ← outer_step(θ_global, b, Δ, lr, μ)   compiled Nesterov: b ← μb + Δ, θ ← θ − lr(Δ + μb)

Every worker applies the same outer step to the same Δ, so the global
parameters stay identical everywhere without a broadcast. Only the
pseudo-gradient crosses the network: once per tau inner steps, 1/tau of
what per-step data-parallel training would all-reduce.

`run_experiment` is what `pcpc run` calls: it resolves the data and the model
(building the modules on first use), prepares the run directory and launches
the workers; each runs `train_diloco`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError
from pcpc.experiment import DiLoCoExperiment
from pcpc.runtime import checkpoint
from pcpc.runtime.data import load_dataset, val_batches, WorkerSampler
from pcpc.runtime.launch import WorkerFailure, env_rank, init_process_group, launch_local, under_torchrun

FUNCTIONS = ["train_step", "eval_loss", "outer_step", "logits"]
KNOWN_DATASETS = {"tiny_shakespeare.txt": "tiny_shakespeare", "enwik8.txt": "enwik8"}
RUN_FILES = ("metrics.jsonl", "metrics.csv", "loss.png", "summary.json", "sample.txt")


@dataclass(frozen=True)
class WorkerPlan:
    """What every worker needs to know (picklable: it crosses the process spawn)."""

    exp: DiLoCoExperiment
    config_path: str
    run_dir: str
    vmfb: str
    tokenizer: str
    resume: bool
    quiet: bool = False


def preset_of(model_path: str | Path) -> str:
    """models/nanogpt_small.mlir -> nanogpt-small."""
    return Path(model_path).stem.replace("_", "-")


def made_by_pcpc(mlir: Path) -> bool:
    """True if `mlir` has pcpc's export record next to it and the record's hash matches the file."""
    from pcpc.mlir.build import paths_for, sha256_file

    sidecar = paths_for(mlir.stem, mlir.parent)[1]
    try:
        record = json.loads(sidecar.read_text())
        return record.get("mlir_sha256") == sha256_file(mlir) and "export_key" in record
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def resolve_model(exp: DiLoCoExperiment, vocab_size: int, say=print):
    """Build (or find cached) the modules model_path names; returns the BuildResult."""
    from pcpc.exporters.nanogpt import PRESETS
    from pcpc.mlir.build import build
    from pcpc.mlir.targets import nanogpt_target

    path = Path(exp.model_path)
    if path.exists() and not made_by_pcpc(path):
        raise UserError(
            f"model_path: {path} was not produced by pcpc (no matching export record "
            f".{path.stem}.export.json next to it). pcpc does not differentiate MLIR: it derives train_step and "
            f"outer_step from an exporter's functional PyTorch model (torch.func + make_fx) before lowering, and an "
            f"arbitrary MLIR file has no such source. Move the file away, or point model_path at a new path named "
            f"after a preset ({', '.join(p.replace('-', '_') + '.mlir' for p in PRESETS)}) and pcpc builds it there."
        )
    preset = preset_of(path)
    if preset not in PRESETS:
        raise UserError(
            f"model_path: {path.name!r} does not name a nanoGPT preset (the file stem picks it); valid: "
            f"{', '.join(p.replace('-', '_') + '.mlir' for p in PRESETS)}"
        )
    target = nanogpt_target(
        path.stem, preset, exp.batch_size, eval_batch_size=exp.eval_batch_size,
        model_overrides={"vocab_size": vocab_size},
        optimizer={"beta1": exp.beta1, "beta2": exp.beta2, "weight_decay": exp.weight_decay,
                   "grad_clip": exp.grad_clip},
        functions=FUNCTIONS,
    )
    if not (path.with_suffix(".vmfb")).exists():
        say(f"building {path.with_suffix('.vmfb')} ({preset}, batch {exp.batch_size}; once, cached afterwards)")
    with warnings.catch_warnings():  # tracing's FutureWarnings are noise to someone running an experiment
        warnings.simplefilter("ignore", FutureWarning)
        return build(target, path.parent, compile_target=exp.target, log=lambda m: say("  " + m))


def tokenizer_kind(exp: DiLoCoExperiment) -> str:
    if exp.tokenizer != "auto":
        return exp.tokenizer
    from pcpc.exporters.nanogpt import PRESETS

    return "byte" if PRESETS.get(preset_of(exp.model_path), {}).get("vocab_size") == 256 else "char"


def check_data(exp: DiLoCoExperiment) -> None:
    path = Path(exp.data_path)
    if path.is_file():
        return
    hint = f"place the text file at {path}"
    if path.name in KNOWN_DATASETS:
        hint = (f"run `pcpc data fetch {KNOWN_DATASETS[path.name]}` (or copy {path.name} to {path})")
    raise UserError(f"data_path: {path} not found (relative to {Path.cwd()}); {hint}")


def prepare_run_dir(run_dir: Path, exp: DiLoCoExperiment, world: int, resume: bool, overwrite: bool) -> None:
    """Refuse to clobber a run by accident; check a resume is compatible."""
    ckpt = checkpoint.path_in(run_dir)
    if resume:
        if not ckpt.is_file():
            raise UserError(f"--resume: no checkpoint at {ckpt}; start the run without --resume")
        checkpoint.check_compatible(checkpoint.load(ckpt), dataclasses.asdict(exp), world, ckpt)
        return
    if ckpt.is_file() and not overwrite:
        raise UserError(
            f"{run_dir} already holds a run (checkpoint after round {checkpoint.peek_round(run_dir)}); pass --resume "
            f"to continue it, --out DIR to start a new run elsewhere, or --overwrite to start this one over"
        )
    for name in RUN_FILES:
        (run_dir / name).unlink(missing_ok=True)
    ckpt.unlink(missing_ok=True)


def run_experiment(config_path: str, exp: DiLoCoExperiment, *, resume: bool = False, out_dir: str | None = None,
                   overwrite: bool = False, max_restarts: int = 0, quiet: bool = False, say=print) -> dict:
    """`pcpc run`: resolve data and model, prepare the run dir, launch the workers; rank 0's summary."""
    run_dir = Path(out_dir) if out_dir else Path("runs") / Path(config_path).stem
    torchrun = under_torchrun()
    rank, world, _ = env_rank() if torchrun else (0, exp.num_workers, exp.num_workers)
    check_data(exp)
    if rank == 0:  # before the build: fail fast (other nodes' ranks receive the state from rank 0)
        prepare_run_dir(run_dir, exp, world, resume, overwrite)
    kind = tokenizer_kind(exp)
    tok = load_dataset(exp.data_path, kind).tokenizer
    built = resolve_model(exp, tok.vocab_size, say if rank == 0 else (lambda m: None))
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "vocab.json").write_text(tok.to_json())
        resolved = {"experiment": exp.public_dict(), "config_path": str(config_path), "workers": world,
                    "tokenizer": kind, "vocab_size": tok.vocab_size, "vmfb": str(built.vmfb)}
        (run_dir / "config.json").write_text(json.dumps(resolved, indent=1) + "\n")
    plan = WorkerPlan(exp, str(config_path), str(run_dir), str(built.vmfb), kind, resume, quiet)
    if torchrun:
        return train_diloco(rank, world, plan)
    for attempt in range(max_restarts + 1):
        try:
            return launch_local(train_diloco, plan, world, say=say)[0]
        except WorkerFailure as e:
            done = checkpoint.peek_round(run_dir)
            if attempt == max_restarts:
                again = f"`pcpc run {config_path} --resume{' --out ' + str(run_dir) if out_dir else ''}`"
                where = (f"the last checkpoint is after round {done}: continue with {again}" if done is not None
                         else "no checkpoint was written yet")
                raise WorkerFailure(f"{e}. The run stopped; {where}") from None
            where = f"the checkpoint after round {done}" if done is not None else "the start (no checkpoint yet)"
            say(f"{e}; restarting ({attempt + 1} of {max_restarts}) from {where}")
            plan = dataclasses.replace(plan, resume=done is not None)
    raise AssertionError("unreachable")


class StopRequest:
    """SIGINT/SIGTERM set a flag the workers share at the next all-reduce, so all stop after the same round.

    A repeat within 2 s is the same request arriving twice (terminal and launcher); a later one kills.
    """

    def __init__(self):
        self.requested, self._at = False, 0.0
        self._old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _on_signal(self, signum, frame):
        if self.requested and time.monotonic() - self._at > 2.0:
            raise KeyboardInterrupt
        self.requested, self._at = True, self._at or time.monotonic()

    def restore(self):
        for s, h in self._old.items():
            signal.signal(s, h)


def train_diloco(rank: int, world: int, plan: WorkerPlan) -> dict | None:
    """One worker's part of the run; rank 0 returns the summary."""
    import torch
    import torch.distributed as dist

    exp = plan.exp
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    threads = exp.threads or max(1, (os.cpu_count() or 1) // local_world)
    torch.set_num_threads(threads)
    backend = exp.backend if exp.backend != "auto" else ("nccl" if exp.target == "cuda" else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    init_process_group(backend, exp.timeout_s)
    stop = StopRequest()
    try:
        return _train(rank, world, plan, threads, backend, stop)
    finally:
        stop.restore()
        dist.destroy_process_group()


@dataclass
class _Setup:
    """What a worker opens before its first round."""

    mod: object
    specs: tuple
    block: int
    tokenizer: object
    sampler: WorkerSampler
    my_val: list
    rounds: int


def _open(plan: WorkerPlan, rank: int, world: int, threads: int) -> _Setup:
    from pcpc.runtime.module import CompiledModule

    exp = plan.exp
    mod = CompiledModule(plan.vmfb, threads=threads)
    block = _model_config(mod).block_size
    data = load_dataset(exp.data_path, plan.tokenizer)
    sampler = WorkerSampler(data.train, rank, world, block, exp.batch_size, exp.seed)
    my_val = val_batches(data.val, block, exp.eval_batch_size, exp.eval_batches)[rank::world]
    rounds = min(exp.outer_loop_steps, exp.max_epochs * sampler.steps_per_epoch // exp.tau)
    if rounds < 1:
        raise UserError(f"max_epochs: {exp.max_epochs} epochs of {sampler.steps_per_epoch} steps is less than "
                        f"one round of tau={exp.tau} steps")
    return _Setup(mod, mod.meta.parameters, block, data.tokenizer, sampler, my_val, rounds)


def _train(rank: int, world: int, plan: WorkerPlan, threads: int, backend: str, stop: StopRequest) -> dict | None:
    """The loop, top to bottom: rounds of tau compiled inner steps, one all-reduce, one compiled outer step."""
    from pcpc.runtime.metrics import RunLog, truncate_records
    from pcpc.runtime.module import to_host

    exp, tau = plan.exp, plan.exp.tau
    s = _open(plan, rank, world, threads)
    mod, n, rounds = s.mod, len(s.specs), s.rounds
    state = _initial_state(plan, rank, world, mod)
    G_host, counters, start = state["params"], state["counters"], state["round"]
    G, Bm = mod.upload_all(G_host), mod.upload_all(state["momentum"])  # global params, outer momentum
    M, V, adam_step = mod.upload_all(state["m"]), mod.upload_all(state["v"]), state["adam_step"]
    rng = np.random.default_rng(exp.seed)  # text sampling
    rng.bit_generator.state = state["rng_state"] or rng.bit_generator.state
    sizes = [int(np.prod(spec.shape)) for spec in s.specs]
    flat = np.zeros(sum(sizes) + 2, np.float32)  # [Δ of every param, mean train loss, stop flag]
    traffic = {"allreduce_bytes_per_worker": flat.nbytes, "data_parallel_bytes_per_worker": sum(sizes) * 4 * tau}
    tokens_per_step = world * exp.batch_size * s.block
    log = None
    if rank == 0:
        log = RunLog(exp, Path(plan.run_dir), rounds, start, tokens_per_step, truncate_records(plan.run_dir, start),
                     quiet=plan.quiet)
        _announce(log, plan, world, backend, s, start, traffic)
        log.start()
    val, stopped, done, t0 = None, False, start, time.perf_counter() - counters["elapsed_s"]
    for r in range(start, rounds):
        if not exp.persist_inner_state:
            M, V, adam_step = mod.upload_all(state["zeros"]), mod.upload_all(state["zeros"]), 0
        P, loss_sum = G, 0.0
        for k in range(tau):
            step = r * tau + k  # the same on every worker: data position and schedule index
            adam_step += 1
            loss, *rest = mod("train_step", *P, *M, *V, np.float32(adam_step), np.float32(exp.lr_at(step)),
                              *s.sampler.batch(step))
            P, M, V = rest[:n], rest[n:2 * n], rest[2 * n:]
            loss_sum += float(to_host(loss))
            if log:
                log.inner_step(r, step, loss_sum / (k + 1))
        # Δ = θ_global − θ_local, averaged over the workers in one all-reduce of one flat buffer.
        _pack(flat, [g.reshape(-1) - to_host(p).reshape(-1) for g, p in zip(G_host, P)])
        flat[-2], flat[-1] = loss_sum / tau, float(stop.requested)
        _all_reduce_mean(flat, world, backend)
        out = mod("outer_step", *G, *Bm, *_unpack(flat, s.specs, sizes), np.float32(exp.outer_learning_rate),
                  np.float32(exp.nesterov_momentum))
        G, Bm = out[:n], out[n:]
        G_host = [to_host(g) for g in G]
        done, stopped, last = r + 1, bool(flat[-1] > 0), r + 1 == rounds
        val = _evaluate(mod, G, s.my_val, backend) if last or stopped or _every(exp.eval_interval, done) else None
        counters = {"elapsed_s": time.perf_counter() - t0, "tokens": counters["tokens"] + tokens_per_step * tau}
        if log:
            log.round_end(dict(
                round=done, inner_step=done * tau, train_loss=float(flat[-2]), val_loss=val, lr=exp.lr_at(step),
                tokens=counters["tokens"], elapsed_s=round(counters["elapsed_s"], 3),
                tokens_per_s=round(counters["tokens"] / counters["elapsed_s"], 1), **traffic))
        if last or stopped or _every(exp.checkpoint_interval, done):
            inner = {"m": [to_host(a) for a in M], "v": [to_host(a) for a in V], "adam_step": adam_step,
                     "next_step": done * tau}
            _save_checkpoint(plan, rank, world, done, G_host, [to_host(b) for b in Bm], inner,
                             rng.bit_generator.state, counters)
        if stopped:
            break
    if val is None:  # nothing left to train (a resumed, finished run): evaluate what there is
        val = _evaluate(mod, G, s.my_val, backend)
    if rank == 0:
        return _finish(log, plan, s, G, rng, world, done, val, stopped, counters, traffic)
    return None


def _every(interval: int, done: int) -> bool:
    return bool(interval) and done % interval == 0


def _pack(flat: np.ndarray, arrays: list[np.ndarray]) -> None:
    offset = 0
    for a in arrays:
        flat[offset:offset + a.size] = a
        offset += a.size


def _unpack(flat: np.ndarray, specs, sizes) -> list[np.ndarray]:
    """Views of flat shaped like the parameters (no copy)."""
    ends = np.cumsum(sizes)
    return [flat[e - n:e].reshape(spec.shape) for e, n, spec in zip(ends, sizes, specs)]


def _all_reduce_mean(array: np.ndarray, world: int, backend: str) -> None:
    """In place: the mean of `array` over the workers (nccl reduces a CUDA copy)."""
    import torch
    import torch.distributed as dist

    t = torch.from_numpy(array)
    if backend == "nccl":
        dev = t.cuda()
        dist.all_reduce(dev)
        t.copy_(dev.cpu())
    else:
        dist.all_reduce(t)
    array /= world


def _finish(log, plan, s: _Setup, G, rng, world, done, val, stopped, counters, traffic) -> dict:
    """Rank 0: sample text, write the summary and the loss curve, say how it went."""
    exp = plan.exp
    sample = "" if stopped or not exp.sample_tokens else _sample_text(s.mod, G, s.tokenizer, s.block,
                                                                      exp.sample_tokens, rng)
    summary = {
        "rounds": done, "rounds_planned": s.rounds, "inner_steps_per_worker": done * exp.tau, "workers": world,
        "final_val_loss": val, "final_train_loss": log.records[-1]["train_loss"] if log.records else None,
        "tokens": counters["tokens"], "train_seconds": round(counters["elapsed_s"], 3),
        "tokens_per_s": round(counters["tokens"] / max(counters["elapsed_s"], 1e-9), 1),
        "allreduce_bytes_per_worker_per_round": traffic["allreduce_bytes_per_worker"],
        "data_parallel_bytes_per_worker_per_round": traffic["data_parallel_bytes_per_worker"],
        "stopped": stopped, "run_dir": plan.run_dir,
    }
    if sample:
        (Path(plan.run_dir) / "sample.txt").write_text(sample)
    log.close(summary)
    _report(log, summary, sample, plan)
    return summary


def _model_config(mod):
    from pcpc.exporters.nanogpt import make_config

    cfg = mod.meta.provenance.config
    return make_config(cfg["model"], **cfg.get("model_overrides", {}))


def _initial_state(plan: WorkerPlan, rank: int, world: int, mod) -> dict:
    """Rank 0 loads the checkpoint (or initialises); every worker receives it and keeps its own inner state."""
    import torch.distributed as dist

    from pcpc.exporters.nanogpt import init_params

    box = [None]
    if rank == 0:
        if plan.resume:
            box[0] = checkpoint.load(checkpoint.path_in(plan.run_dir))
        else:
            params = [p.numpy() for p in init_params(_model_config(mod), plan.exp.seed).values()]
            box[0] = {"round": 0, "params": params, "momentum": [np.zeros_like(p) for p in params],
                      "workers": None, "rng_state": None, "counters": {"elapsed_s": 0.0, "tokens": 0}}
    dist.broadcast_object_list(box, src=0)
    state = box[0]
    zeros = [np.zeros_like(p) for p in state["params"]]
    mine = state["workers"][rank] if state["workers"] else {"m": zeros, "v": zeros, "adam_step": 0}
    return {**state, "m": mine["m"], "v": mine["v"], "adam_step": mine["adam_step"], "zeros": zeros}


def _evaluate(mod, G, batches, backend: str) -> float:
    """Mean validation loss over all workers' shares of the fixed validation batches."""
    from pcpc.runtime.module import to_host

    total = sum(float(to_host(mod("eval_loss", *G, x, y)[0])) for x, y in batches)
    sums = np.array([total, len(batches)], np.float64)
    _all_reduce_mean(sums, 1, backend)  # sums over workers (mean over 1 = the sum)
    return float(sums[0] / sums[1])


def _save_checkpoint(plan, rank, world, round_, params, momentum, inner, rng_state, counters) -> None:
    """Gather every worker's inner state to rank 0, which writes one file atomically."""
    import torch.distributed as dist

    gathered = [None] * world if rank == 0 else None
    dist.gather_object(inner, gathered, dst=0)
    if rank == 0:
        checkpoint.save(checkpoint.path_in(plan.run_dir), round_=round_, params=params, momentum=momentum,
                        workers=gathered, config=dataclasses.asdict(plan.exp), rng_state=rng_state,
                        counters=counters)


def _sample_text(mod, G, tokenizer, block: int, n_tokens: int, rng, temperature: float = 1.0) -> str:
    """Sample n_tokens from the final model with the compiled `logits` function (one row of block tokens)."""
    from pcpc.runtime.module import to_host

    start = tokenizer.encode("\n")[0] if tokenizer.kind == "byte" or "\n" in tokenizer.chars else 0
    ids = [int(start)]
    for _ in range(n_tokens):
        ctx = ids[-block:]
        idx = np.zeros((1, block), np.int64)
        idx[0, :len(ctx)] = ctx  # positions after the context are ignored (causal attention)
        logits = to_host(mod("logits", *G, idx)[0])[0, len(ctx) - 1].astype(np.float64) / temperature
        p = np.exp(logits - logits.max())
        ids.append(int(rng.choice(len(p), p=p / p.sum())))
    return tokenizer.decode(ids)


def _announce(log, plan, world, backend, s: _Setup, start_round, traffic) -> None:
    exp, payload, dp = plan.exp, traffic["allreduce_bytes_per_worker"], traffic["data_parallel_bytes_per_worker"]
    n_params = sum(int(np.prod(spec.shape)) for spec in s.specs)
    log.say(f"DiLoCo: {Path(exp.model_path).stem} ({n_params:,} params), {world} workers ({backend}), "
            f"tau {exp.tau}, {s.rounds} rounds; run dir {plan.run_dir}")
    if s.rounds < exp.outer_loop_steps:
        log.say(f"  max_epochs {exp.max_epochs} limits the run to {s.rounds} rounds "
                f"({s.sampler.steps_per_epoch} steps per epoch of a worker's shard)")
    log.say(f"  each worker all-reduces {_bytes(payload)} per round; per-step data parallel would all-reduce "
            f"{_bytes(dp)} over the same {exp.tau} steps ({dp / payload:.1f}x more)")
    if start_round:
        log.say(f"  resuming after round {start_round}")


def _report(log, summary, sample, plan) -> None:
    if summary["stopped"]:
        log.say(f"stopped after round {summary['rounds']} (checkpoint saved): continue with "
                f"`pcpc run {plan.config_path} --resume --out {plan.run_dir}`")
        return
    if sample:
        log.say("sample:\n" + sample)
    log.say(f"done: {summary['rounds']} rounds, val loss {summary['final_val_loss']:.4f}, "
            f"{summary['tokens_per_s'] / 1e3:.1f}k tok/s over {summary['train_seconds']:.1f}s; "
            f"metrics, loss.png and checkpoint in {plan.run_dir}")


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
