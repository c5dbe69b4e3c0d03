"""Start the workers of a distributed run on torch.distributed; notice when one dies.

Two ways in, one worker function `target(rank, world, payload)`:

- `pcpc run` on its own launches `num_workers` local processes (spawn) with
  the usual torch.distributed environment (MASTER_ADDR/PORT, RANK,
  WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE) and watches them. When one exits
  abnormally (an exception, SIGKILL, the OOM killer) the others are given a
  few seconds to report and are then killed, and `WorkerFailure` says which
  worker died how. Workers die with their launcher (PR_SET_PDEATHSIG), so a
  killed `pcpc run` leaves no orphans training on.
- under `torchrun` (its environment is present) the worker runs in this
  process; torchrun's agent watches the processes, and the collective
  timeout bounds how long a survivor waits for a peer that stopped answering.

No home-made networking: the workers talk through torch.distributed only.
"""

from __future__ import annotations

import os
import queue as queue_mod
import re
import signal
import socket
import time
from datetime import timedelta
from dataclasses import dataclass
from typing import Callable


class WorkerFailure(RuntimeError):
    """A worker process failed or died; the message names it and how.

    kind: "user_error" when the first failure was a UserError raised in a worker (a mistake in the
    input: relaunching cannot help), "died" when a worker was killed or exited without a report,
    else "error". details: every worker's full report, tracebacks included (--debug prints them).
    """

    def __init__(self, message: str, kind: str = "error", details: str = ""):
        super().__init__(message)
        self.kind, self.details = kind, details


def under_torchrun() -> bool:
    """True when torchrun (or another launcher) has set this process's rank environment."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR"))


def env_rank() -> tuple[int, int, int]:
    """(rank, world_size, local_world_size) from the launcher's environment."""
    world = int(os.environ["WORLD_SIZE"])
    return int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_WORLD_SIZE", world))


def init_process_group(backend: str, timeout_s: float) -> None:
    """Join the process group described by the environment (env://)."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method="env://", timeout=timedelta(seconds=timeout_s))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the launcher) dies."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _entry(target, rank: int, world: int, port: int, parent: int, payload, results) -> None:
    """Body of a spawned worker: set the environment, run target, report how it ended."""
    die_with_parent()
    os.setpgrp()  # Ctrl+C reaches the launcher only, which passes it on exactly once
    if os.getppid() != parent:  # the launcher died before prctl took effect
        os._exit(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    from pcpc.runtime.host_memory import use_in_this_process

    use_in_this_process()  # a pcpc worker: CPU modules keep their freed pages (runtime/host_memory.py)
    try:
        out = target(rank, world, payload)
        results.put((rank, "ok", out))
    except KeyboardInterrupt:
        results.put((rank, "error", Report("interrupted", "interrupted")))
        raise SystemExit(130)
    except BaseException as e:  # report, then exit non-zero so the launcher sees it
        results.put((rank, "error", Report.of(e)))
        raise SystemExit(1)


@dataclass(frozen=True)
class Report:
    """How a worker failed: its error kind, one line, and the full traceback (shown with --debug)."""

    kind: str
    """user_error (a UserError: a mistake in the input), error (any other exception), interrupted."""
    message: str
    traceback: str = ""

    @classmethod
    def of(cls, e: BaseException) -> "Report":
        import traceback

        from pcpc.errors import UserError

        user = isinstance(e, UserError)
        return cls("user_error" if user else "error", str(e) if user else f"{type(e).__name__}: {e}",
                   "".join(traceback.format_exception(e)))


def _first_sentence(text: str) -> str:
    """The gist of an error: gloo's messages carry a source path and a paragraph of advice."""
    text = re.sub(r"\[/[^\]]*\.(cc|cpp|h):\d+\] ", "", text.strip().splitlines()[0] if text.strip() else "")
    text = text.split(". This is typically caused", 1)[0]
    return (text[:300] + "…") if len(text) > 300 else (text or "unknown error")


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "did not exit"
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def launch_local(target: Callable, payload, num_workers: int, grace_s: float = 5.0, say=print,
                 unit: str = "step") -> list:
    """Run target(rank, num_workers, payload) in num_workers spawned processes; results by rank.

    Ctrl+C (or SIGTERM) is passed on to the workers, which stop cleanly at
    the end of their round; a second one kills them. A repeat within 2 s is
    the same request arriving twice (the terminal's and a batch runner's or
    Slurm's), as in signals.StopRequest. Raises WorkerFailure if
    any worker fails; survivors of a dead worker are killed after grace_s.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [
        ctx.Process(target=_entry, args=(target, r, num_workers, port, os.getpid(), payload, results),
                    name=f"pcpc-worker-{r}")
        for r in range(num_workers)
    ]
    interrupts = []

    def on_signal(signum, frame):
        if interrupts and time.monotonic() - interrupts[0] < 2.0:
            return
        interrupts.append(time.monotonic())
        for p in procs:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL if len(interrupts) > 1 else signal.SIGINT)
        if len(interrupts) == 1:
            say(f"stopping after the current {unit} (press Ctrl+C again to kill the workers)")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for p in procs:
            p.start()
        reports, first_failure, stopped_by_us = _watch(procs, results, grace_s)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        results.close()
        results.join_thread()
    if all(p.exitcode == 0 for p in procs) and all(reports.get(r, ("",))[0] == "ok" for r in range(num_workers)):
        return [reports[r][1] for r in range(num_workers)]
    raise _failure(procs, reports, first_failure, stopped_by_us)


def _watch(procs, results, grace_s: float):
    """Collect the workers' reports until all have exited; once one fails, kill the rest after grace_s.

    Returns (reports {rank: ("ok", result) or ("error", Report)}, (first failed rank, when) or None,
    pids killed here)."""
    reports: dict[int, tuple[str, object]] = {}
    first_failure, stopped_by_us = None, set()
    while True:
        try:
            rank, status, value = results.get(timeout=0.1)
            reports[rank] = (status, value)
            if status == "error" and first_failure is None:  # reported before its process exits
                first_failure = (rank, time.monotonic())
        except queue_mod.Empty:
            pass
        alive = [p for p in procs if p.is_alive()]
        if not alive:
            break
        failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
        if failed and first_failure is None:
            first_failure = (failed[0], time.monotonic())
        if first_failure and time.monotonic() - first_failure[1] > grace_s:
            for p in alive:
                stopped_by_us.add(p.pid)
                p.kill()
    for p in procs:
        p.join()
    while True:  # reports sent just before exiting
        try:
            rank, status, value = results.get(timeout=0.05)
            reports[rank] = (status, value)
        except queue_mod.Empty:
            break
    return reports, first_failure, stopped_by_us


def _failure(procs, reports, first_failure, stopped_by_us) -> WorkerFailure:
    order = list(range(len(procs)))
    # The likely cause goes first: a worker killed by a signal (SIGKILL, the OOM killer; never a consequence of
    # a peer's failure, whose survivors raise "connection closed"), else the first to fail.
    killed = [r for r, p in enumerate(procs) if (p.exitcode or 0) < 0 and p.pid not in stopped_by_us
              and reports.get(r, ("",))[0] != "error"]
    cause = killed[0] if killed else first_failure[0] if first_failure is not None else None
    if cause is not None:
        order.remove(cause)
        order.insert(0, cause)
    parts, details, kinds = [], [], []
    for r in order:
        p = procs[r]
        status, report = reports.get(r, (None, None))
        if status == "error":
            parts.append(f"worker {r} (pid {p.pid}) failed: {_first_sentence(report.message)}")
            details.append(f"worker {r} (pid {p.pid}):\n{report.traceback or report.message}")
            kinds.append(report.kind)
        elif p.pid in stopped_by_us:
            parts.append(f"worker {r} (pid {p.pid}) was stopped by the launcher")
        elif p.exitcode not in (0, None) or status is None:
            parts.append(f"worker {r} (pid {p.pid}) {_describe_exit(p.exitcode)}")
            kinds.append("died")
    message = "; ".join(parts) or "the workers failed without a report"
    return WorkerFailure(message, kinds[0] if kinds else "error", "\n".join(details))
