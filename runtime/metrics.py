"""What a training run shows and records: progress bar, JSONL + CSV metrics, loss curve, W&B.

Only rank 0 creates a `RunLog`. Every round appends one record (the same
columns to metrics.jsonl and metrics.csv, and to W&B when it is on). On
resume the files are cut back to the checkpoint's round, so a killed and
resumed run leaves the same rows as an uninterrupted one. W&B is used when
`wandb_project` is set and wandb is installed and logged in; otherwise the
run says why, once, and logs locally. The API key is passed to wandb through
the process environment only: never printed, never written to the run dir.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

COLUMNS = (
    "round", "inner_step", "train_loss", "val_loss", "lr", "tokens", "elapsed_s", "tokens_per_s",
    "allreduce_bytes_per_worker", "data_parallel_bytes_per_worker",
)


def truncate_records(run_dir: Path, last_round: int) -> list[dict]:
    """Keep the records of rounds <= last_round (both files); returns them."""
    path = Path(run_dir) / "metrics.jsonl"
    records = []
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # a line cut by SIGKILL
                    continue
                if rec["round"] <= last_round:
                    records.append(rec)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    with open(Path(run_dir) / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, COLUMNS)
        w.writeheader()
        w.writerows({k: r.get(k) for k in COLUMNS} for r in records)
    return records


def plot_losses(records: list[dict], path: Path, title: str) -> None:
    """Train loss per round and validation loss, against inner steps; written as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    ax.plot([r["inner_step"] for r in records], [r["train_loss"] for r in records], label="train (mean of round)")
    val = [r for r in records if r.get("val_loss") is not None]
    ax.plot([r["inner_step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    ax.set_xlabel("inner step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _open_wandb(exp, run_dir: Path, say):
    """A wandb run, or None after saying why not (once)."""
    if not exp.wandb_project:
        return None
    try:
        import wandb
    except ImportError:
        say(f"W&B: wandb is not installed (pip install wandb); logging locally to {run_dir}")
        return None
    key = exp.wandb_api_key or os.environ.get("WANDB_API_KEY")
    if key:
        os.environ["WANDB_API_KEY"] = key  # this process only; wandb reads it, nothing writes it down
    elif not _wandb_logged_in(wandb):
        say(f"W&B: not logged in (run `wandb login`, set WANDB_API_KEY or wandb_api_key); logging locally to {run_dir}")
        return None
    try:
        return wandb.init(project=exp.wandb_project, entity=exp.wandb_entity, name=exp.wandb_run_name,
                          config=exp.public_dict(), dir=str(run_dir), resume="allow")
    except Exception as e:  # network down, bad key: the run goes on, locally
        why = (str(e).splitlines() or [""])[0][:200].replace(key or "\0", "<redacted>")
        say(f"W&B: could not start a run ({type(e).__name__}: {why}); logging locally to {run_dir}")
        return None


def finish_run(run_dir: Path, summary: dict | None, wandb_run) -> None:
    """Write summary.json (and the W&B summary), then close the W&B run if there is one."""
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if wandb_run is not None:
            wandb_run.summary.update(summary)
    if wandb_run is not None:
        wandb_run.finish()


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


class RunLog:
    """Rank 0's view of the run: a tqdm bar over inner steps, per-round records, the end summary."""

    def __init__(self, exp, run_dir: Path, rounds: int, start_round: int, tokens_per_step: int,
                 records: list[dict], quiet: bool = False):
        import threading

        from tqdm import tqdm

        # tqdm's default lock is a multiprocessing RLock (a named semaphore); a SIGKILLed worker would
        # leave it to the resource tracker, which then warns. One process writes here: a thread lock will do.
        tqdm.set_lock(threading.RLock())
        self.exp, self.run_dir, self.rounds = exp, Path(run_dir), rounds
        self.start_round, self.tokens_per_step = start_round, tokens_per_step
        self.records = records
        self.quiet = quiet
        self.bar = None
        self.wandb = None
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._csv_file = open(self.run_dir / "metrics.csv", "a", newline="")
        self._csv = csv.DictWriter(self._csv_file, COLUMNS)

    def start(self) -> None:
        """Open W&B (or say why not) and the progress bar; call after the run's opening lines."""
        from tqdm import tqdm

        self.wandb = _open_wandb(self.exp, self.run_dir, self.say)
        tau = self.exp.tau
        self.bar = tqdm(total=self.rounds * tau, initial=self.start_round * tau, unit="step", dynamic_ncols=True,
                        disable=self.quiet, desc=f"round {self.start_round + 1}/{self.rounds}",
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}")
        self._t0 = time.perf_counter()
        self._steps_at_t0 = self.start_round * tau

    def say(self, msg: str) -> None:
        if not self.quiet:
            from tqdm import tqdm

            tqdm.write(msg)

    def inner_step(self, round_: int, step: int, loss: float) -> None:
        done = step + 1 - self._steps_at_t0
        rate = done * self.tokens_per_step / max(1e-9, time.perf_counter() - self._t0)
        last_val = next((r["val_loss"] for r in reversed(self.records) if r.get("val_loss") is not None), None)
        self.bar.set_description_str(f"round {round_ + 1}/{self.rounds}", refresh=False)
        self.bar.set_postfix_str(f"loss {loss:.3f}" + (f" val {last_val:.3f}" if last_val is not None else "")
                                 + f" {rate / 1e3:.1f}k tok/s", refresh=False)
        self.bar.update(1)

    def round_end(self, record: dict) -> None:
        record = {k: record.get(k) for k in COLUMNS}
        self.records.append(record)
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        self._csv.writerow(record)
        self._csv_file.flush()
        if record["val_loss"] is not None:
            self.say(f"round {record['round']:>4}  step {record['inner_step']:>6}  train {record['train_loss']:.4f}"
                     f"  val {record['val_loss']:.4f}")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if v is not None}, step=record["inner_step"])

    def close(self, summary: dict | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
        self._jsonl.close()
        self._csv_file.close()
        if self.records:
            plot_losses(self.records, self.run_dir / "loss.png", f"DiLoCo {Path(self.exp.model_path).stem}")
        finish_run(self.run_dir, summary, self.wandb)


def peak_rss_bytes() -> int:
    """This process's peak resident set size (VmHWM). Not getrusage's ru_maxrss: Linux carries that over
    from the parent across fork + exec, so a child started by a large process reports the parent's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
