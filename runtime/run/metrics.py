"""One metrics log for every run, with sinks: progress, metrics.jsonl, metrics.csv, PNG curves, W&B.

Only the process that owns the run directory (rank 0) opens a `MetricsLog`.
Each step (a round, an iteration) records one dict with fixed columns; the
log hands it to every sink:

    Progress     a live tqdm bar on a terminal; into a file, a pipe or a batch log one plain line
                 at the first and last step and whenever ~30 s have passed (no carriage-return frames)
    JsonlSink    metrics.jsonl, one JSON object per line, flushed per record
    CsvSink      metrics.csv, the same columns
    PngSink      the loop's curves (one panel per group of columns), drawn at the end
    WandbSink    W&B, when wandb_project is set and wandb is installed and logged in; otherwise the
                 run says why, once, and logs locally. The API key reaches wandb through this
                 process's environment only: never printed, never written.

On resume the files are first cut back to the checkpoint's step (atomically,
`truncate_jsonl`), so a killed and resumed run leaves the same rows as an
uninterrupted one; the same function cuts any other per-step JSONL log
(GRPO's samples.jsonl).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Sequence

PLAIN_INTERVAL_S = 30.0
"""Seconds between two plain progress lines (output that is not a terminal)."""


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL file, skipping a line cut short by SIGKILL."""
    out = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def truncate_jsonl(path: str | Path, key: str, last: int) -> list[dict]:
    """Keep the records with rec[key] <= last (atomic rewrite); returns them."""
    from pcpc.mlir.build import write_atomic

    path = Path(path)
    records = [r for r in read_jsonl(path) if r.get(key, math.inf) <= last]
    if path.exists() or records:
        write_atomic(path, "".join(json.dumps(r) + "\n" for r in records))
    return records


class JsonlSink:
    def __init__(self, path: Path):
        self.file = open(path, "a")

    def record(self, rec: dict) -> None:
        self.file.write(json.dumps(rec) + "\n")
        self.file.flush()

    def close(self, summary=None) -> None:
        self.file.close()


class CsvSink:
    def __init__(self, path: Path, columns: Sequence[str], records: list[dict]):
        from pcpc.mlir.build import write_atomic

        buf = io.StringIO()
        w = csv.DictWriter(buf, list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(records)
        write_atomic(path, buf.getvalue())  # header + the kept rows, then append
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, list(columns), extrasaction="ignore")

    def record(self, rec: dict) -> None:
        self.writer.writerow(rec)
        self.file.flush()

    def close(self, summary=None) -> None:
        self.file.close()


class PngSink:
    """Curves of the run, one panel per (ylabel, columns) against column `x`; drawn once, at close."""

    def __init__(self, path: Path, panels, x: str, title: str, records: list[dict]):
        self.path, self.panels, self.x, self.title, self.records = path, panels, x, title, records

    def record(self, rec: dict) -> None:
        pass  # the log's record list is shared

    def close(self, summary=None) -> None:
        if self.records:
            plot(self.records, self.panels, self.x, self.path, self.title)


def plot(records: list[dict], panels, x: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcpc.mlir.build import atomic_path

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 4.2 if len(panels) == 1 else 2.4 * len(panels)), dpi=110,
                             sharex=True, squeeze=False)
    for ax, (label, cols) in zip(axes[:, 0], panels):
        for c in cols:
            pts = [(r[x], r[c]) for r in records if r.get(c) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=c)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel(x.replace("_", " "))
    axes[0, 0].set_title(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


class WandbSink:
    def __init__(self, run, x: str):
        self.run, self.x = run, x

    @classmethod
    def open(cls, cfg, run_dir: Path, x: str, say) -> "WandbSink | None":
        """A W&B sink, or None after saying why not (once)."""
        if not cfg.wandb_project:
            return None
        try:
            import wandb
        except ImportError:
            say(f"W&B: wandb is not installed (pip install wandb); logging locally to {run_dir}")
            return None
        key = cfg.wandb_api_key or os.environ.get("WANDB_API_KEY")
        offline = os.environ.get("WANDB_MODE") in ("offline", "dryrun")
        if key:
            os.environ["WANDB_API_KEY"] = key  # this process only; wandb reads it, nothing writes it down
        elif offline:
            say(f"W&B: offline (WANDB_MODE={os.environ['WANDB_MODE']}); the run is kept in {run_dir}/wandb for "
                f"`wandb sync`")
        elif not _wandb_logged_in(wandb):
            say(f"W&B: not logged in (run `wandb login`, set WANDB_API_KEY or wandb_api_key); logging locally "
                f"to {run_dir}")
            return None
        try:
            run = wandb.init(project=cfg.wandb_project, entity=cfg.wandb_entity, name=cfg.wandb_run_name,
                             config=cfg.public_dict(), dir=str(run_dir), resume="allow",
                             tags=list(cfg.wandb_tags) or None, group=cfg.wandb_group)
        except Exception as e:  # network down, bad key: the run goes on, locally
            why = (str(e).splitlines() or [""])[0][:200].replace(key or "\0", "<redacted>")
            say(f"W&B: could not start a run ({type(e).__name__}: {why}); logging locally to {run_dir}")
            return None
        return cls(run, x)

    def record(self, rec: dict) -> None:
        self.run.log({k: v for k, v in rec.items() if v is not None}, step=rec[self.x])

    def close(self, summary=None) -> None:
        if summary is not None:
            self.run.summary.update(summary)
        self.run.finish()


def _wandb_logged_in(wandb) -> bool:
    try:
        if getattr(getattr(wandb, "api", None), "api_key", None):
            return True
    except Exception:
        pass
    try:
        import netrc

        return bool(netrc.netrc().authenticators("api.wandb.ai"))
    except (OSError, netrc.NetrcParseError):
        return False


class Progress:
    """What a person watching sees: a live bar on a terminal, plain lines elsewhere, nothing when quiet.

    The bar counts ticks (steps x ticks_per_step: DiLoCo ticks each inner step); `say` prints a line
    without breaking the bar.
    """

    def __init__(self, unit: str, total: int, start: int, ticks_per_step: int = 1, quiet: bool = False,
                 live: bool | None = None, stream=None):
        self.unit, self.total, self.ticks = unit, total, ticks_per_step
        self.quiet = quiet
        self.stream = stream or sys.stdout
        self.live = (sys.stderr.isatty() if live is None else live) and not quiet
        self.bar, self._last_line = None, -math.inf
        self._t0, self._done0 = time.perf_counter(), start * ticks_per_step
        self._done = self._done0
        if self.live:
            import threading

            from tqdm import tqdm

            # tqdm's default lock is a multiprocessing RLock (a named semaphore); a SIGKILLed worker would
            # leave it to the resource tracker, which then warns. One process writes here: a thread lock will do.
            tqdm.set_lock(threading.RLock())
            self.bar = tqdm(total=total * ticks_per_step, initial=self._done0, unit=unit if ticks_per_step == 1
                            else "step", dynamic_ncols=True, desc=f"{unit} {start + 1}/{total}",
                            bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")

    def say(self, msg: str) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def tick(self, step: int, postfix: str) -> None:
        """One tick inside step `step` (0-based) is done."""
        self._done += 1
        self._show(step, postfix, final=False)

    def step_done(self, step: int, postfix: str) -> None:
        """Step `step` (1-based count of completed steps) is done."""
        self._done = step * self.ticks
        self._show(step - 1, postfix, final=step == self.total, first=self._last_line == -math.inf)

    def _show(self, step: int, postfix: str, final: bool, first: bool = False) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.set_description_str(f"{self.unit} {step + 1}/{self.total}", refresh=False)
            self.bar.set_postfix_str(postfix, refresh=False)
            self.bar.update(self._done - self.bar.n)
            return
        now = time.perf_counter()
        if not (final or first or now - self._last_line >= PLAIN_INTERVAL_S):
            return
        self._last_line = now
        rate = (self._done - self._done0) / max(now - self._t0, 1e-9)
        left = (self.total * self.ticks - self._done) / rate if rate > 0 else math.inf
        eta = "" if final or not math.isfinite(left) else f"  eta {_hms(left)}"
        print(f"{self.unit} {step + 1}/{self.total}  {postfix}  [{_hms(now - self._t0)}{eta}]", file=self.stream,
              flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class MetricsLog:
    """The run's metrics: fixed columns, one record per step, handed to every sink.

    columns[0] is the step column ("round" for DiLoCo, "step" for GRPO and DPO).
    panels: [(ylabel, [columns])] for the PNG; postfix: [(column, label)] for the progress line.
    """

    def __init__(self, run_dir: str | Path, cfg, columns: Sequence[str], *, unit: str, total: int, start: int,
                 panels, png: str, title: str, postfix: Sequence[tuple[str, str]], x: str | None = None,
                 ticks_per_step: int = 1, quiet: bool = False):
        self.run_dir, self.columns = Path(run_dir), list(columns)
        self.key = self.columns[0]
        self.records = truncate_jsonl(self.run_dir / "metrics.jsonl", self.key, start)
        self.latest = {k: v for r in self.records for k, v in r.items() if v is not None}  # per column
        self.postfix = list(postfix)
        self.progress = Progress(unit, total, start, ticks_per_step, quiet)
        x = x or self.key
        self.sinks = [JsonlSink(self.run_dir / "metrics.jsonl"), CsvSink(self.run_dir / "metrics.csv", self.columns,
                                                                       self.records),
                      PngSink(self.run_dir / png, panels, x, title, self.records)]
        wandb = WandbSink.open(cfg, self.run_dir, x, self.say)
        if wandb is not None:
            self.sinks.append(wandb)

    def say(self, msg: str) -> None:
        self.progress.say(msg)

    def last(self, column: str):
        """The latest non-null value of `column`, or None."""
        return self.latest.get(column)

    def tick(self, step: int, **values) -> None:
        """Progress inside step `step` (0-based): the values shown beside the bar."""
        self.progress.tick(step, self._postfix(values))

    def record(self, rec: dict) -> dict:
        rec = {k: rec.get(k) for k in self.columns}
        self.records.append(rec)
        self.latest.update((k, v) for k, v in rec.items() if v is not None)
        for sink in self.sinks:
            sink.record(rec)
        self.progress.step_done(rec[self.key], self._postfix(rec))
        return rec

    def _postfix(self, values: dict) -> str:
        parts = []
        for col, label in self.postfix:
            v = values.get(col, self.latest.get(col))
            if v is not None:
                parts.append(f"{label} {v / 1e3:.1f}k" if col.endswith("tokens_per_s") and v >= 1e4
                             else f"{label} {v:.4g}")
        return "  ".join(parts)

    def close(self, summary: dict | None = None) -> None:
        self.progress.close()
        for sink in self.sinks:
            sink.close(summary)
