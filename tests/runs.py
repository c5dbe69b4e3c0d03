"""Helpers for tests that run `pcpc run` in a subprocess and interfere with it (SIGKILL, Ctrl+C)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def wait_for_lines(path: Path, n: int, proc: subprocess.Popen, limit_s: float = 240) -> None:
    """Wait until the file at `path` has n lines (a metrics log: n steps done); the run must not end first."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit_s:
        if path.is_file() and len(path.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, f"run ended early: {proc.communicate()}"
        time.sleep(0.01)
    raise AssertionError(f"{path} did not reach {n} lines within {limit_s}s")


def workers_of(pid: int) -> list[int]:
    """Spawned worker processes of launcher `pid`, in start order (rank order)."""
    out = []
    for d in os.listdir("/proc"):
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
            cmd = Path(f"/proc/{d}/cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid and b"spawn_main" in cmd:
            out.append(int(d))
    return sorted(out)


def alive(pid: int) -> bool:
    """True if `pid` runs and is not a zombie."""
    try:
        return "Z" not in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False


def run_config_file(cfg: Path, **kw) -> dict:
    """`pcpc run CFG --out CFG-without-suffix` in this process (quiet); its summary."""
    import json

    from pcpc.kinds import run_experiment

    return run_experiment(str(cfg), json.loads(cfg.read_text()), out_dir=str(cfg.with_suffix("")), quiet=True, **kw)
