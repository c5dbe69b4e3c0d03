"""Where a batch's runs execute: local processes (the default), or Slurm jobs through submitit.

Both start the same `pcpc run` command with its output appended to the run's log,
and hand the runner a `Handle`: poll() for the exit code, interrupt() to ask the run
to stop after its current step (it checkpoints), kill() to end it now.

    local            a process group per run on this machine; runs die with the runner
    slurm            one Slurm job per run (submitit), --partition / --time-min / --gpus-per-run / --cpus-per-run;
                     jobs outlive the runner, so a later --skip-completed finds them still running
    submitit-local   submitit's local executor: the Slurm code path on this machine (try a batch before a cluster)
"""

from __future__ import annotations

import os
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from pcpc.errors import UserError
from pcpc.runtime.run.launch import die_with_parent

EXECUTORS = ("local", "slurm", "submitit-local")


@dataclass
class SlurmOptions:
    partition: str | None = None
    time_min: int = 240
    gpus_per_run: int = 0
    cpus_per_run: int | None = None
    """CPUs per job (and the run's threads); default: this machine's cores split over --parallel."""


def _own_group_and_die_with_parent() -> None:
    os.setsid()  # Ctrl+C at the terminal reaches the runner only; it passes the request on once
    die_with_parent()


class LocalHandle:
    def __init__(self, argv: list[str], log: Path, env: dict):
        with open(log, "a") as f:
            self.proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, preexec_fn=_own_group_and_die_with_parent)
        self.ident = {"pid": self.proc.pid}

    def poll(self) -> int | None:
        return self.proc.poll()

    def _signal(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def interrupt(self) -> None:
        self._signal(signal.SIGINT)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)


def run_logged(argv: list[str], log: str, env: dict) -> int:
    """The function a Slurm (submitit) job runs: `pcpc run` with its output appended to the log; the first SIGINT
    or SIGTERM (scancel, the runner's stop) is passed on to it, so it stops after its step and checkpoints.
    It runs in a session of its own, so it can finish that step when the job's own process is killed
    early (submitit's local controller kills it a second after a Ctrl+C; Slurm kills the whole job)."""
    with open(log, "a") as f:
        proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **env}, start_new_session=True)

    forwarded = []

    def forward(signum, frame):
        # one stop request, however many ways it arrives (the terminal's Ctrl+C, the controller passing it on,
        # the runner's own stop): a second SIGINT would tell the run to kill its workers. Killing is the
        # runner's second Ctrl+C, which kills the run's owner directly.
        if forwarded:
            return
        forwarded.append(signum)
        try:
            proc.send_signal(signal.SIGINT)
        except ProcessLookupError:
            pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class SubmititHandle:
    def __init__(self, executor, argv: list[str], log: Path, env: dict, cluster: str):
        self.cluster = cluster
        self.job = executor.submit(run_logged, argv, str(log), env)
        self.ident = {"job_id": str(self.job.job_id)}
        self._rc = None

    def poll(self) -> int | None:
        if self._rc is not None:
            return self._rc
        if not self.job.done():
            return None
        try:
            self._rc = int(self.job.result())
        except Exception:  # the job itself failed: cancelled, timed out, node lost (its log says which)
            self._rc = 1
        return self._rc

    def interrupt(self) -> None:
        if self.cluster == "slurm":
            # a signal to the job's processes, not a cancel: the run stops after its step and checkpoints
            subprocess.run(["scancel", "--signal=INT", str(self.job.job_id)], check=False,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        else:
            proc = getattr(self.job, "_process", None)  # submitit's local controller: it forwards SIGTERM
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.job.cancel(check=False)


def threads_per_run(kind: str, slurm: SlurmOptions | None, parallel: int, world_size: int) -> int:
    """Each run's CPU threads: a Slurm job's CPUs, or this machine's cores split over the parallel runs."""
    if kind == "slurm" and slurm and slurm.cpus_per_run:
        return max(1, slurm.cpus_per_run // max(1, world_size))
    return max(1, (os.cpu_count() or 1) // max(1, parallel) // max(1, world_size))


class Executor:
    """Starts runs: `start(argv, log, env, slot)` -> a handle."""

    def __init__(self, kind: str, out: Path, slurm: SlurmOptions | None = None):
        if kind not in EXECUTORS:
            raise UserError(f"--executor: expected one of {', '.join(EXECUTORS)}; got {kind!r}")
        self.kind, self.slurm = kind, slurm or SlurmOptions()
        self._submitit = None
        if kind != "local":
            try:
                import submitit
            except ImportError:
                raise UserError(f"--executor {kind} needs submitit: pip install submitit==1.5.4") from None
            cluster = "slurm" if kind == "slurm" else "local"
            ex = submitit.AutoExecutor(folder=str(out / "submitit" / "%j"), cluster=cluster)
            params = {"timeout_min": self.slurm.time_min, "name": "pcpc"}
            if self.slurm.cpus_per_run:
                params["cpus_per_task"] = self.slurm.cpus_per_run
            if self.slurm.gpus_per_run:
                params["gpus_per_node"] = self.slurm.gpus_per_run
            if kind == "slurm":
                if self.slurm.partition:
                    params["slurm_partition"] = self.slurm.partition
                params["slurm_signal_delay_s"] = 120  # USR2 two minutes before the limit (ignored by pcpc run)
            ex.update_parameters(**params)
            self._submitit, self.cluster = ex, cluster

    def start(self, argv: list[str], log: Path, env: dict):
        if self._submitit is None:
            return LocalHandle(argv, log, {**os.environ, **env})
        return SubmititHandle(self._submitit, argv, log, env, self.cluster)
