"""The run skeleton: what every kind of run does around its loop.

A loop (runtime/train/diloco.py, runtime/rl/grpo.py, runtime/rl/dpo.py) is a
`Loop` subclass. It supplies its config, its plan (the launcher-side
checks and builds), its setup, one step, its state and its finish; the
skeleton does the rest, the same way for every kind:

    launcher (`pcpc run`)                        every process of the run
    ---------------------                        ------------------------
    plan: loop checks the config and data,       join the process group, install the stop signals
      ctx.claim(...) takes the run directory       rank 0: load the checkpoint (--resume)
      (new / --resume / --overwrite) and writes  start = loop.setup(checkpoint)
      status.json, the loop builds its modules   rank 0: open the metrics log (cut back to start)
      and writes config.json                     for step in start..steps:
    launch the processes (torchrun: this one)        record = loop.step(step)
      a dead worker stops the run, or relaunches     stop = loop.agree_stop(signal seen)
      from the checkpoint (--max-restarts)           rank 0: log the record
    status.json: failed (kind, message) when         every checkpoint_interval, at the end, on stop:
      a worker died or the plan failed                   rank 0 saves loop.state(); status.json
                                                     stop: break
                                                 summary = loop.finish(done, stopped)
                                                 rank 0: summary.json, curves, status.json

A config error is found in the plan, before any process starts, and is
never retried. The loop module imports this one, never the other way round:
the skeleton reaches a loop through the class it is handed.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pcpc.errors import UserError
from pcpc.runtime.run import checkpoint
from pcpc.runtime.run.checkpoint import Checkpoint
from pcpc.runtime.run.config import RunConfig
from pcpc.runtime.run.deltas import DeltaLog
from pcpc.runtime.run.launch import (Report, WorkerFailure, env_rank, init_process_group, launch_local,
                                     under_torchrun)
from pcpc.runtime.run.metrics import MetricsLog
from pcpc.runtime.run.rundir import RunDir
from pcpc.runtime.run.signals import StopRequest
from pcpc.runtime.run.status import StatusFile


@dataclass(frozen=True)
class RunSpec:
    """What every process of a run needs (picklable: it crosses the process spawn)."""

    loop: type
    """The Loop subclass."""
    cfg: RunConfig
    config_path: str
    run_dir: str
    plan: object
    """The loop's own plan (what its plan() returned)."""
    trajectory: dict
    steps: int
    """Planned steps (rounds, iterations)."""
    resume: bool
    quiet: bool
    launcher_owns_status: bool
    """True when a `pcpc run` launcher watches the processes (and records their failure)."""

    @property
    def resume_command(self) -> str:
        return f"pcpc run {self.config_path} --resume --out {self.run_dir}"


class Loop:
    """One kind of run. Subclasses set the class attributes and implement plan, setup, step, state, finish."""

    kind: ClassVar[str]
    """Registry name ("diloco", "grpo", "dpo"), also the checkpoint's kind."""
    title: ClassVar[str]
    """How messages name it ("DiLoCo", "GRPO")."""
    unit: ClassVar[str] = "step"
    """What one step is called ("round", "iteration")."""
    roles: ClassVar[str] = ""
    """Who the ranks are, for error messages (", rank 0 is the learner ...")."""
    files: ClassVar[tuple[str, ...]] = ()
    """Run-directory files the loop writes besides the skeleton's (cleared on --overwrite)."""
    shows_gradients: ClassVar[bool] = False
    """True when step() hands each batch's gradients to run.gradients() (delta_log.fisher_batches needs it)."""

    # --- the launcher side

    @classmethod
    def world_size(cls, cfg) -> int:
        """Processes `pcpc run` starts on this machine."""
        return 1

    @classmethod
    def plan(cls, cfg, ctx: "Launch"):
        """Check the config and its inputs, ctx.claim() the run directory, build; returns the plan."""
        raise NotImplementedError

    @classmethod
    def check_inputs(cls, cfg, config_dir: Path) -> None:
        """Raise a UserError if a file the run reads is missing (pcpc batch validate calls this)."""

    @classmethod
    def explain_change(cls, key: str, now, then) -> str | None:
        """Why a changed trajectory value blocks a resume, when the plain message would not say."""
        return None

    # --- every process

    def __init__(self, run: "Run"):
        self.run, self.cfg, self.plan = run, run.spec.cfg, run.spec.plan
        self.rank, self.world = run.rank, run.world

    def backend(self) -> str:
        """torch.distributed backend of the process group."""
        return "gloo"

    def threads(self) -> int:
        """IREE / torch CPU threads of this process."""
        return self.cfg.threads or (os.cpu_count() or 1)

    def drives(self) -> bool:
        """True on the ranks that run the step loop; the others serve() (GRPO's rollout workers)."""
        return True

    def serve(self) -> None:
        raise NotImplementedError

    def setup(self, resume: Checkpoint | None) -> int:
        """Open modules and data, restore `resume` (rank 0 only; others get None); returns the first step."""
        raise NotImplementedError

    def layout(self) -> dict:
        """The metrics log's columns, panels, png, title, postfix (MetricsLog keywords)."""
        raise NotImplementedError

    def step(self, i: int) -> dict | None:
        """Run step i (0-based); rank 0 returns its metrics record."""
        raise NotImplementedError

    def agree_stop(self, requested: bool) -> bool:
        """Whether the run stops after this step, given this process's stop request."""
        return requested

    def state(self) -> dict | None:
        """The checkpoint state (rank 0; may be collective: every driving rank calls it)."""
        raise NotImplementedError

    def finish(self, done: int, stopped: bool) -> dict | None:
        """After the last step: rank 0 returns the summary (and says how it went)."""
        raise NotImplementedError

    def weights(self) -> tuple[list[str], list]:
        """Rank 0: (names, host arrays) of the trained weights now (every weight, or an adapter's): what a
        delta log records (runtime/run/deltas.py)."""
        raise UserError(f"delta_log: {self.title} runs cannot log their weights")


# ---------------------------------------------------------------------------
# the launcher side


class Launch:
    """What a loop's plan() uses: the config, where the run goes, and the run directory once claimed."""

    def __init__(self, loop: type, cfg, config_path: str, run_dir: Path, rank: int, world: int, *,
                 resume: bool, overwrite: bool, quiet: bool, say):
        self.loop, self.cfg, self.config_path = loop, cfg, str(config_path)
        self.dir, self.rank, self.world = RunDir(run_dir), rank, world
        self.resume, self.overwrite, self.quiet = resume, overwrite, quiet
        self.say = say if rank == 0 and not quiet else (lambda msg: None)
        self.status: StatusFile | None = None
        self.steps: int | None = None
        self.trajectory: dict = {}

    @property
    def config_dir(self) -> Path:
        return Path(self.config_path).parent

    def claim(self, steps: int, derived: dict | None = None) -> None:
        """Take the run directory (rank 0): new, --resume (trajectory checked) or --overwrite; status running.

        derived: values the loop computes from the config that shape the run (checked on resume too).
        """
        self.steps, self.trajectory = steps, self.cfg.trajectory(derived)
        if self.rank != 0:
            return
        ck = self.dir.claim(self.loop.kind, self.trajectory, resume=self.resume, overwrite=self.overwrite,
                            unit=self.loop.unit, loop_files=self.loop.files, explain=self.loop.explain_change)
        self.status = StatusFile.start(self.dir.path, self.loop.kind, self.config_path, steps, self.loop.unit,
                                       step=ck.step if ck else 0)
        self.status.update()

    def write_config(self, **resolved) -> None:
        """config.json: the config (secrets redacted) and what the plan resolved (modules, sizes)."""
        if self.rank == 0:
            self.dir.write_json("config.json", {"kind": self.loop.kind, "experiment": self.cfg.public_dict(),
                                                "config_path": self.config_path, "world": self.world, **resolved})

    def write_text(self, name: str, text: str) -> None:
        if self.rank == 0:
            self.dir.write_text(name, text)

    def fail(self, e: BaseException, message: str | None = None) -> None:
        if self.status is not None:
            self.status.refresh().failed(error_kind(e), message or _one_line(e))


def error_kind(e: BaseException) -> str:
    if isinstance(e, WorkerFailure):
        return e.kind
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    return Report.of(e).kind


def _one_line(e: BaseException) -> str:
    return str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"


def start(loop: type, cfg, config_path: str, *, out_dir: str | None = None, resume: bool = False,
          overwrite: bool = False, max_restarts: int = 0, quiet: bool = False, say=print) -> dict | None:
    """`pcpc run`: plan, then run the processes (or this one, under torchrun); rank 0's summary."""
    run_dir = Path(out_dir) if out_dir else Path("runs") / Path(config_path).stem
    torchrun = under_torchrun()
    rank, world = env_rank()[:2] if torchrun else (0, loop.world_size(cfg))
    ctx = Launch(loop, cfg, config_path, run_dir, rank, world, resume=resume, overwrite=overwrite, quiet=quiet,
                 say=say)
    try:
        if getattr(cfg.delta_log, "fisher_batches", None) and not loop.shows_gradients:
            raise UserError(f"delta_log.fisher_batches: {loop.title} runs do not compute separate gradients (their "
                            f"compiled step fuses them with the update); GRPO and DPO runs sum them")
        plan = loop.plan(cfg, ctx)
        assert ctx.steps is not None, f"{loop.__name__}.plan did not claim the run directory"
    except BaseException as e:
        ctx.fail(e)
        raise
    spec = RunSpec(loop, cfg, str(config_path), str(run_dir), plan, ctx.trajectory, ctx.steps, resume, quiet,
                   launcher_owns_status=not torchrun)
    if torchrun:
        return run_process(rank, world, spec)
    return _launch(spec, world, max_restarts, ctx)


def _launch(spec: RunSpec, world: int, max_restarts: int, ctx: Launch) -> dict | None:
    """Local processes; a dead worker stops the run, or relaunches it from the last checkpoint."""
    loop = spec.loop
    for attempt in range(max_restarts + 1):
        try:
            return launch_local(run_process, spec, world, say=ctx.say, unit=loop.unit)[0]
        except WorkerFailure as e:
            done = checkpoint.peek_step(spec.run_dir, loop.kind)
            if e.kind == "user_error":  # a mistake in the input: relaunching cannot help
                failure = UserError(f"{loop.title} run failed{loop.roles}: {e}", details=e.details)
                ctx.fail(failure)
                raise failure from None
            where = f"the checkpoint after {loop.unit} {done}" if done is not None else "the start (no checkpoint yet)"
            if attempt == max_restarts:
                hint = (f"the last checkpoint is after {loop.unit} {done}: continue with `{spec.resume_command}`"
                        if done is not None else "no checkpoint was written yet")
                failure = WorkerFailure(f"{loop.title} run failed{loop.roles}: {e}. The run stopped; {hint}",
                                        e.kind, e.details)
                ctx.fail(failure, str(failure))
                raise failure from None
            ctx.say(f"{e}; restarting ({attempt + 1} of {max_restarts}) from {where}")
            ctx.status.refresh().update(restarts=attempt + 1)
            spec = dataclasses.replace(spec, resume=done is not None)
        except BaseException as e:
            ctx.fail(e)
            raise
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------
# every process


class Run:
    """One process's part of the run: its stop request; on rank 0 the metrics log, status and checkpoints."""

    def __init__(self, spec: RunSpec, rank: int, world: int):
        self.spec, self.rank, self.world = spec, rank, world
        self.dir = RunDir(spec.run_dir)
        self.stop = StopRequest()
        self.log: MetricsLog | None = None
        self.deltas: DeltaLog | None = None
        self.status: StatusFile | None = None
        self._t0, self._elapsed0 = time.perf_counter(), 0.0

    def say(self, msg: str) -> None:
        if self.log is not None:
            self.log.say(msg)
        elif self.rank == 0 and not self.spec.quiet:
            print(msg, flush=True)

    def elapsed(self) -> float:
        """Seconds of training so far, across resumes."""
        return self._elapsed0 + time.perf_counter() - self._t0

    def open(self, loop: Loop, start: int, resume: Checkpoint | None) -> None:
        """Rank 0: the metrics log (cut back to `start`) and the status; the clock continues the checkpoint's."""
        self._t0, self._elapsed0 = time.perf_counter(), (resume.clock.get("elapsed_s", 0.0) if resume else 0.0)
        if self.rank != 0:
            return
        self.log = MetricsLog(self.dir.path, self.spec.cfg, unit=loop.unit, total=self.spec.steps, start=start,
                              quiet=self.spec.quiet, **loop.layout())
        self.status = (StatusFile.attach(self.dir.path) if (self.dir.path / "status.json").is_file()
                       else StatusFile.start(self.dir.path, loop.kind, self.spec.config_path, self.spec.steps,
                                             loop.unit, step=start))
        self.status.update(state="running", step=start)
        if self.spec.cfg.delta_log is not None:
            self.deltas = DeltaLog(self.dir.path, *loop.weights(), start=start,
                                   fisher_batches=self.spec.cfg.delta_log.fisher_batches, say=self.say)

    def gradients(self, step: int, grads: list) -> None:
        """A loop's step shows one batch's gradients of the trained weights (before the optimizer consumes
        them): the delta log sums their squares while it wants them (delta_log.fisher_batches)."""
        if self.deltas is not None and self.deltas.wants_gradients:
            self.deltas.add_gradients(step, grads)

    def save(self, loop: Loop, done: int, record: dict | None) -> None:
        """A checkpoint after `done` steps (loop.state() may be collective: every driving rank calls this)."""
        state = loop.state()
        if self.rank != 0:
            return
        checkpoint.save(self.dir.checkpoint, Checkpoint(loop.kind, done, state, self.spec.trajectory,
                                                        {"elapsed_s": self.elapsed()}))
        self.status.update(step=done, last_metrics=record)

    def close(self, loop: Loop, done: int, stopped: bool, summary: dict | None) -> dict | None:
        """Rank 0: summary.json, the curves, the final status and the stop message."""
        if self.rank != 0:
            return None
        if self.deltas is not None and not stopped:
            self.deltas.finish(self.say)
        summary = {"kind": loop.kind, **(summary or {}), "stopped": stopped, "run_dir": str(self.dir.path)}
        self.log.close(summary)
        self.dir.write_json("summary.json", summary)
        self.status.update(state="stopped" if stopped else "completed", step=done,
                           last_metrics=self.log.records[-1] if self.log.records else None)
        if stopped:
            self.say(f"stopped after {loop.unit} {done} (checkpoint saved): continue with "
                     f"`{self.spec.resume_command}`")
        return summary


def every(interval: int, done: int) -> bool:
    return bool(interval) and done % interval == 0


def run_process(rank: int, world: int, spec: RunSpec):
    """The body of every process of a run (a spawned worker, or this process under torchrun)."""
    import torch
    import torch.distributed as dist

    run = Run(spec, rank, world)
    loop = spec.loop(run)
    try:
        torch.set_num_threads(loop.threads())
        backend = loop.backend()
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        init_process_group(backend, spec.cfg.timeout_s)
        # On an exception the process group is left to close with the process, after the launcher has the
        # report: closing it first would make the peers fail first, and their "connection closed" would
        # read as the cause.
        result = loop.serve() if not loop.drives() else _drive(loop, run)
        dist.destroy_process_group()
        return result
    except BaseException as e:
        if rank == 0 and not spec.launcher_owns_status and (Path(spec.run_dir) / "status.json").is_file():
            StatusFile.attach(spec.run_dir).failed(error_kind(e), _one_line(e))  # torchrun: rank 0 owns it
        raise
    finally:
        run.stop.restore()


def _drive(loop: Loop, run: Run):
    """The step loop, the same for every kind of run."""
    spec = run.spec
    resume = checkpoint.load(run.dir.checkpoint, loop.kind) if spec.resume and run.rank == 0 else None
    start = loop.setup(resume)
    run.open(loop, start, resume)
    del resume
    done, stopped = start, False
    for i in range(start, spec.steps):
        record = loop.step(i)
        done = i + 1
        stopped = loop.agree_stop(run.stop.requested)
        if run.log is not None:
            record = run.log.record(record)
        if run.deltas is not None and spec.cfg.delta_log.due(done):
            run.deltas.log(done, loop.weights()[1])
        if done == spec.steps or stopped or every(spec.cfg.checkpoint_interval, done):
            run.save(loop, done, record)
        if stopped:
            break
    return run.close(loop, done, stopped, loop.finish(done, stopped))
