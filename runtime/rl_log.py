"""What a GRPO / DPO run shows and records: progress bar, JSONL + CSV metrics, PNG curves, W&B.

One record per iteration (GRPO) or step (DPO), keyed by `step`; the columns
are fixed when the run starts (per-reward-function columns included), so the
CSV stays rectangular. On resume the files are cut back to the checkpoint's
step, so a resumed run leaves the same rows as an uninterrupted one. W&B
goes through runtime/metrics.py's `_open_wandb` (same rules as DiLoCo: used
when wandb_project is set and wandb is installed and logged in, otherwise
said once; the API key never leaves the process environment).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Sequence


def truncate_records(run_dir: Path, columns: Sequence[str], last_step: int) -> list[dict]:
    """Keep the records with step <= last_step in metrics.jsonl and metrics.csv; returns them."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by SIGKILL
                continue
            if isinstance(rec, dict) and rec.get("step", math.inf) <= last_step:
                records.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with open(Path(run_dir) / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, list(columns))
        w.writeheader()
        w.writerows({k: r.get(k) for k in columns} for r in records)
    return records


def plot(records: list[dict], panels: Sequence[tuple[str, Sequence[str]]], path: Path, title: str) -> None:
    """One subplot per (ylabel, [columns]) panel against step; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 1, figsize=(7, 2.4 * len(panels)), dpi=110, sharex=True, squeeze=False)
    steps = [r["step"] for r in records]
    for ax, (label, cols) in zip(axes[:, 0], panels):
        for c in cols:
            ys = [r.get(c) for r in records]
            pts = [(s, y) for s, y in zip(steps, ys) if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 40 else None, label=c)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if len(cols) > 1:
            ax.legend(fontsize=8)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


class RLRunLog:
    """Rank 0's record of an RL run: tqdm bar over steps, per-step records, plots and summary at the end."""

    def __init__(self, exp, run_dir: Path, columns: Sequence[str], total: int, start: int, records: list[dict],
                 panels: Sequence[tuple[str, Sequence[str]]], title: str, postfix: Sequence[tuple[str, str]],
                 quiet: bool = False):
        from tqdm import tqdm

        from pcpc.runtime.metrics import _open_wandb

        self.run_dir, self.columns, self.records = Path(run_dir), list(columns), records
        self.panels, self.title, self.postfix, self.quiet = panels, title, postfix, quiet
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._csv_file = open(self.run_dir / "metrics.csv", "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, self.columns)
        self.bar = tqdm(total=total, initial=start, unit="it", dynamic_ncols=True, disable=quiet,
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
        self.wandb = _open_wandb(exp, self.run_dir, self.say)

    def say(self, msg: str) -> None:
        if not self.quiet:
            self.bar.write(msg)

    def step(self, record: dict) -> None:
        record = {k: record.get(k) for k in self.columns}
        self.records.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._csv.writerow(record)
        self._csv_file.flush()
        parts = [f"{label} {record[c]:.3g}" for c, label in self.postfix if record.get(c) is not None]
        self.bar.set_postfix_str("  ".join(parts), refresh=False)
        self.bar.update(1)
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record["step"])

    def close(self, summary: dict | None = None) -> None:
        self.bar.close()
        self._jsonl.close()
        self._csv_file.close()
        if self.records:
            plot(self.records, self.panels, self.run_dir / "metrics.png", self.title)
        from pcpc.runtime.metrics import finish_run

        finish_run(self.run_dir, summary, self.wandb)
