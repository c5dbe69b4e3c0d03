"""`pcpc batch run FILE`: run a batch's experiments as `pcpc run` processes, in parallel slots, on this
machine or as Slurm jobs (runtime/batch/executors.py).

    runs/<batch>/                    (or --out DIR)
        batch_status.json            the runner's record: every run's state, command, log, times (atomic)
        configs/<name>.json          each experiment's whole config, as `pcpc run` reads it
        logs/<name>.log              each run's output (every attempt appended)
        <name>/                      each run's directory (runtime/run/rundir.py: status.json, metrics, ...)

A run is completed only when its own status.json says so (runtime/run/status.py).
With --skip-completed the runner skips those, resumes (--resume) the ones that
stopped or failed after a checkpoint, and starts the others over; that is also
how a batch continues after the runner itself was killed (its local runs die with
it: PR_SET_PDEATHSIG; Slurm jobs go on, and are found still running). Without it,
an output tree that already holds runs is refused unless --overwrite. One runner per output tree (a lock file). Ctrl+C stops the
running runs after their current step (they checkpoint) and records them as
stopped; a second Ctrl+C kills them. A failed run does not stop the batch; the
end says which failed and the command that retries them.
"""

from __future__ import annotations

import fcntl
import json
import os
import shlex
import signal
import socket
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pcpc.errors import UserError
from pcpc.runtime.batch.executors import Executor, SlurmOptions, threads_per_run
from pcpc.runtime.batch.spec import Batch, Experiment, rebase_paths
from pcpc.runtime.run import checkpoint as ckpt_mod
from pcpc.runtime.run.status import now_iso, read_status, seconds_between

STATUS = "batch_status.json"


@dataclass
class Options:
    out: Path
    parallel: int = 1
    gpu_ids: tuple[str, ...] = ()
    skip_completed: bool = False
    overwrite: bool = False
    progress: bool = True
    say: object = print
    executor: str = "local"
    slurm: SlurmOptions | None = None


@dataclass
class Job:
    """One experiment's run: what to do and how."""

    exp: Experiment
    action: str
    """start, resume (from its checkpoint) or skip (completed)."""
    run_dir: Path
    config: Path
    log: Path
    threads: int
    shape: str
    """The config without its seed and W&B fields: runs of one shape take about as long."""
    raw: dict = field(default_factory=dict)
    """The config written for `pcpc run` (paths rebased, automatic W&B tags)."""

    def argv(self, slot_env: dict | None = None) -> list[str]:
        args = [sys.executable, "-m", "pcpc.cli", "run", str(self.config), "--out", str(self.run_dir),
                "--set", f"threads={self.threads}"]
        if self.action == "resume":
            args.append("--resume")
        elif self.action == "start":
            args.append("--overwrite")  # what was there (a run that never checkpointed) is this run's own
        return args


def out_dir(batch: Batch, out: str | Path | None) -> Path:
    return Path(out) if out else Path("runs") / batch.name


def shape_of(raw: dict) -> str:
    return json.dumps({k: v for k, v in raw.items() if k != "seed" and not k.startswith("wandb")}, sort_keys=True)


def wandb_labels(exp: Experiment, raw: dict) -> dict:
    """Automatic W&B tags and group, when the experiment logs to W&B and set none itself."""
    if not raw.get("wandb_project"):
        return {}
    model = raw.get("model")
    size = model if isinstance(model, str) else (model or {}).get("preset") if isinstance(model, dict) else None
    size = size or Path(str(raw.get("model_path", "model"))).stem
    tags = [size, *exp.name.split("_")]
    out = {}
    if "wandb_tags" not in raw:
        out["wandb_tags"] = sorted(set(tags), key=tags.index)
    if "wandb_group" not in raw:
        out["wandb_group"] = f"{size}_{exp.group}"
    if "wandb_run_name" not in raw or raw.get("wandb_run_name") is None:
        out["wandb_run_name"] = exp.name
    return out


def plan(batch: Batch, selected: list[Experiment], opts: Options) -> list[Job]:
    """The job of every selected experiment; refuses an output tree that holds runs unless told what to do."""
    from pcpc.kinds import load_config

    jobs, held = [], []
    for exp in selected:
        raw = rebase_paths({**exp.raw, **wandb_labels(exp, exp.raw)}, batch.path.parent)
        loop, cfg = load_config(raw, where=f"{batch.path}: {exp.name}")
        run_dir = opts.out / exp.name
        status = read_status(run_dir)
        has_ckpt = ckpt_mod.path_in(run_dir).is_file()
        if status is not None and status["state"] == "completed" and opts.skip_completed:
            action = "skip"
        elif opts.skip_completed and has_ckpt and status is not None and status["state"] != "running":
            action = "resume"
        else:
            action = "start"
            if status is not None and status["state"] == "running" and opts.skip_completed:
                raise UserError(f"{exp.name}: {run_dir} is still running (pid {status['pid']}); wait for it or "
                                f"stop it first")
            if (has_ckpt or status is not None) and not opts.overwrite and not opts.skip_completed:
                held.append(exp.name)
        threads = threads_per_run(opts.executor, opts.slurm, opts.parallel, loop.world_size(cfg))
        jobs.append(Job(exp, action, run_dir, opts.out / "configs" / f"{exp.name}.json",
                        opts.out / "logs" / f"{exp.name}.log", threads, shape_of(exp.raw), raw))
    if held:
        raise UserError(f"{opts.out} already holds runs of this batch ({', '.join(held[:5])}"
                        f"{', ...' if len(held) > 5 else ''}); pass --skip-completed to continue the batch, "
                        f"--overwrite to start them over, or --out DIR")
    return jobs


def estimate(job: Job, out: Path) -> float | None:
    """Median seconds of the completed runs of the same shape in the output tree, or None."""
    seconds = []
    if not out.is_dir():
        return None
    for cfg_file in (out / "configs").glob("*.json"):
        status = read_status(out / cfg_file.stem)
        if not status or status["state"] != "completed" or not status.get("ended_at"):
            continue
        try:
            if shape_of(json.loads(cfg_file.read_text())) != job.shape:
                continue
        except (OSError, json.JSONDecodeError):
            continue
        seconds.append(seconds_between(status["started_at"], status["ended_at"]))
    return statistics.median(seconds) if seconds else None


def hms(s: float) -> str:
    s = int(s)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class BatchStatus:
    """The runner's record, rewritten atomically after every change of state."""

    def __init__(self, out: Path, batch: Batch):
        self.path = out / STATUS
        self.data = {"batch": batch.name, "file": str(batch.path), "pid": os.getpid(), "host": socket.gethostname(),
                     "started_at": now_iso(), "updated_at": now_iso(), "state": "running", "runs": {}}
        if self.path.is_file():  # keep the history of earlier runners (their runs' records)
            try:
                self.data["runs"] = json.loads(self.path.read_text()).get("runs", {})
            except (OSError, json.JSONDecodeError):
                pass

    def set(self, name: str | None = None, **fields) -> None:
        from pcpc.mlir.build import write_atomic

        if name is None:
            self.data.update(fields)
        else:
            self.data["runs"].setdefault(name, {}).update(fields)
        self.data["updated_at"] = now_iso()
        write_atomic(self.path, json.dumps(self.data, indent=1) + "\n")


def _lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".batch.lock", "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "?"
        f.close()
        raise UserError(f"{out}: another `pcpc batch run` (pid {holder}) is running this output tree; wait for it, "
                        f"or use --out DIR") from None
    f.seek(0)
    f.truncate()
    f.write(str(os.getpid()))
    f.flush()
    return f


def run_batch(batch: Batch, selected: list[Experiment], opts: Options) -> dict:
    """Take the output tree (one runner at a time), plan, and run the jobs `opts.parallel` at a time;
    returns {name: final state}."""
    from pcpc.mlir.build import write_atomic

    lock = _lock(opts.out)
    try:
        jobs = plan(batch, selected, opts)
    except BaseException:
        lock.close()
        raise
    try:
        executor = Executor(opts.executor, opts.out, opts.slurm)
    except BaseException:
        lock.close()
        raise
    status = BatchStatus(opts.out, batch)
    (opts.out / "logs").mkdir(parents=True, exist_ok=True)
    for job in jobs:
        write_atomic(job.config, json.dumps(job.raw, indent=1) + "\n")
        status.set(job.exp.name, state="skipped" if job.action == "skip" else "pending", action=job.action,
                   command=shlex.join(job.argv()), log=str(job.log), run_dir=str(job.run_dir), group=job.exp.group)
    pending = [j for j in jobs if j.action != "skip"]
    view = _View(len(jobs), len(jobs) - len(pending), opts)
    running: dict[str, tuple[object, Job, int]] = {}
    stop = []
    old = signal.signal(signal.SIGINT, lambda *a: stop.append(1))
    old_term = signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    slots = list(range(opts.parallel))
    finals = {j.exp.name: "skipped" for j in jobs if j.action == "skip"}
    try:
        while running or (pending and not stop):
            if stop and running and len(stop) == 1 and not getattr(view, "stopping", False):
                view.stopping = True
                opts.say("stopping the running runs after their current step (Ctrl+C again kills them)")
                for handle, _, _ in running.values():
                    handle.interrupt()
            if len(stop) > 1 and not getattr(view, "killed", False):
                view.killed = True
                for handle, job, _ in running.values():
                    handle.kill()
                    _kill_owner(job.run_dir)
            while pending and slots and not stop:
                job = pending.pop(0)
                running[job.exp.name] = _start(job, slots.pop(0), opts, status, executor)
                view.started(job.exp.name)
            for name, (handle, job, slot) in list(running.items()):
                returncode = handle.poll()
                if returncode is None or _owner_alive(job.run_dir):
                    continue  # a run is over when its own status says so, not when its job is
                del running[name]
                slots.append(slot)
                run_status = read_status(job.run_dir) or {}
                state = run_status.get("state") or ("failed" if returncode else "completed")
                if returncode and state in ("running", "completed"):
                    state = "failed"  # its own status could not say (killed, or it failed before claiming)
                finals[name] = state
                status.set(name, state=state, exit_code=returncode, ended_at=now_iso(),
                           error=(run_status.get("error") or None))
                view.ended(name, state)
            time.sleep(0.2)
    finally:
        signal.signal(signal.SIGINT, old)
        signal.signal(signal.SIGTERM, old_term)
        for job in pending:
            finals.setdefault(job.exp.name, "not started")
        status.set(state="interrupted" if stop else "done", ended_at=now_iso())
        view.close()
        lock.close()
    return finals


def _owner_alive(run_dir: Path) -> dict | None:
    """The run's status while a process of this host still owns it (read_status checks the pid)."""
    s = read_status(run_dir)
    return s if s and s["state"] == "running" and s.get("host") == socket.gethostname() else None


def _kill_owner(run_dir: Path) -> None:
    s = _owner_alive(run_dir)
    if s:
        try:
            os.kill(int(s["pid"]), signal.SIGKILL)  # its workers die with it
        except (ProcessLookupError, PermissionError, ValueError):
            pass


def _start(job: Job, slot: int, opts: Options, status: BatchStatus, executor: Executor):
    env = {}
    if opts.gpu_ids:
        env["CUDA_VISIBLE_DEVICES"] = opts.gpu_ids[slot % len(opts.gpu_ids)]
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a") as log:
        log.write(f"\n=== {now_iso()} {job.action}: {shlex.join(job.argv())}\n")
    handle = executor.start(job.argv(), job.log, env)
    attempts = status.data["runs"].get(job.exp.name, {}).get("attempts", 0) + 1
    status.set(job.exp.name, state="running", **handle.ident, started_at=now_iso(), attempts=attempts,
               slot=slot, gpu=env.get("CUDA_VISIBLE_DEVICES"), executor=opts.executor)
    return handle, job, slot


class _View:
    """What the person running the batch sees: a bar over the runs on a terminal, a line per change elsewhere."""

    def __init__(self, total: int, done: int, opts: Options):
        self.total, self.done, self.opts, self.counts = total, done, opts, {}
        self.t0, self.running = time.perf_counter(), []
        self.bar = None
        if opts.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=done, unit="run", dynamic_ncols=True, desc="batch")

    def _say(self, msg: str) -> None:
        if not self.opts.progress:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"running {', '.join(self.running) or '-'}", refresh=False)
            self.bar.write(msg)
        else:
            self.opts.say(msg)

    def started(self, name: str) -> None:
        self.running.append(name)
        self._say(f"[{self.done}/{self.total}] started {name}")

    def ended(self, name: str, state: str) -> None:
        self.running.remove(name)
        self.done += 1
        self.counts[state] = self.counts.get(state, 0) + 1
        elapsed = time.perf_counter() - self.t0
        finished_here = sum(self.counts.values())  # runs this runner saw end: the rate of the rest
        eta = f", eta {hms(elapsed / finished_here * (self.total - self.done))}" if self.total > self.done else ""
        self._say(f"[{self.done}/{self.total}] {name}: {state} ({hms(elapsed)} in{eta})")
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
