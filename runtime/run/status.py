"""`status.json`: the one file that says how a run stands, rewritten atomically.

Written at the start of a run, at each checkpoint, on every restart and at
the end. It holds

    kind, config_path, run_dir     what runs where
    state                          running, completed, failed or stopped
    pid, host, pid_start           the process that owns the run (the `pcpc run` launcher, or rank 0
                                   under torchrun) and its start time in clock ticks since boot
    started_at, updated_at, ended_at   ISO 8601 UTC times
    step, steps_planned, unit      progress ("round", "iteration", "step")
    restarts                       relaunches after a dead worker (--max-restarts)
    last_metrics                   the last metrics record
    error                          on failure {"kind", "message"}

A run counts as completed only when its own status says so. A run killed
with SIGKILL cannot say anything: its file still says running, with a pid
that is gone. `read_status` is what every reader uses: it reports such a run
as failed (error kind "died"), telling a reused pid apart by its start time.
"""

from __future__ import annotations

import calendar
import json
import os
import socket
import time
from pathlib import Path

FILE = "status.json"
STATES = ("running", "completed", "failed", "stopped")
VERSION = 1


ISO = "%Y-%m-%dT%H:%M:%SZ"


def now_iso() -> str:
    return time.strftime(ISO, time.gmtime())


def seconds_between(start: str, end: str | None = None) -> float:
    """Seconds from one status time to another (or to now)."""
    t0 = calendar.timegm(time.strptime(start, ISO))
    t1 = calendar.timegm(time.strptime(end, ISO)) if end else time.time()
    return max(0.0, t1 - t0)


def _stat(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), None if it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_start_ticks(pid: int) -> int | None:
    """Start time of `pid` in clock ticks since boot (/proc/PID/stat field 22), None if it is gone."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def pid_alive(pid: int, start_ticks: int | None) -> bool:
    """True if process `pid` runs and, when start_ticks is known, is the same process (not a reused pid).
    A zombie (dead, not yet reaped by its parent) is not alive."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, owned by someone else
    fields = _stat(pid)
    if fields is None:
        return start_ticks is None  # no /proc: trust kill(0)
    return fields[0] != "Z" and (start_ticks is None or int(fields[19]) == start_ticks)


class StatusFile:
    """The owner's handle on a run's status.json: every change rewrites the whole file atomically."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    @classmethod
    def start(cls, run_dir, kind: str, config_path: str, steps_planned: int | None, unit: str,
              step: int = 0) -> "StatusFile":
        """A new status, state running, owned by this process."""
        pid = os.getpid()
        return cls(Path(run_dir) / FILE, dict(
            version=VERSION, kind=kind, config_path=str(config_path), run_dir=str(run_dir), state="running",
            pid=pid, host=socket.gethostname(), pid_start=process_start_ticks(pid), started_at=now_iso(),
            updated_at=now_iso(), ended_at=None, step=step, steps_planned=steps_planned, unit=unit, restarts=0,
            last_metrics=None, error=None))

    @classmethod
    def attach(cls, run_dir) -> "StatusFile":
        """The status as the owner last wrote it, to update (another process of the same run)."""
        path = Path(run_dir) / FILE
        return cls(path, json.loads(path.read_text()))

    def refresh(self) -> "StatusFile":
        """Take in what another process of the run wrote since (rank 0's progress), before updating."""
        try:
            self.data = json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            pass
        return self

    def update(self, **fields) -> None:
        from pcpc.mlir.build import write_atomic

        assert fields.get("state", self.data["state"]) in STATES, fields
        self.data.update(fields, updated_at=now_iso())
        if self.data["state"] != "running":
            self.data["ended_at"] = self.data["updated_at"]
        write_atomic(self.path, json.dumps(self.data, indent=1, default=_jsonable) + "\n")

    def failed(self, kind: str, message: str, **fields) -> None:
        self.update(state="failed", error={"kind": kind, "message": message}, **fields)


def _jsonable(x):
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"{type(x).__name__} is not JSON serializable")


def read_status(run_dir: str | Path) -> dict | None:
    """The run's status as readers must take it, or None if it never started.

    A run whose file says running but whose owner is gone (on this host) is
    reported as failed, error kind "died"; `recorded_state` keeps what the
    file said. A file that cannot be parsed reads as failed, kind "unreadable".
    """
    path = Path(run_dir) / FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return {"state": "failed", "recorded_state": None, "error": {"kind": "unreadable", "message": str(e)}}
    data["recorded_state"] = data.get("state")
    if data.get("state") == "running" and data.get("host") == socket.gethostname() \
            and not pid_alive(int(data["pid"]), data.get("pid_start")):
        data["state"] = "failed"
        data["error"] = {"kind": "died", "message": f"the run's process {data['pid']} is gone without recording an "
                                                    f"end (killed, e.g. SIGKILL or out of memory)"}
    return data
