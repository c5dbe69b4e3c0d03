"""`pcpc batch status | diagnose | summary DIR`: what a batch's output tree says, read from the runs themselves.

Every report reads only each run's status.json (through read_status: a run whose
process is gone reads as failed), its metrics.jsonl and summary.json, its log,
and the runner's batch_status.json for the list of runs, their groups and logs.

    status     counts (total, completed, running, failed, stopped, not started) with durations; for the
               running runs elapsed and ETA from their step rate
    diagnose   the failures grouped by kind, with the relevant log lines and a suggested fix
    summary    SUMMARY.md: progress, the final metrics of every run and per group (mean ± std over the
               seeds), every run's curve on one figure and one per group, storage, failures
"""

from __future__ import annotations

import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path

from pcpc.errors import UserError
from pcpc.runtime.batch.runner import STATUS, hms
from pcpc.runtime.run.metrics import read_jsonl
from pcpc.config import load_json
from pcpc.runtime.run.status import read_status, seconds_between

STATES = ("completed", "running", "failed", "stopped", "not started")


@dataclass
class RunView:
    name: str
    group: str
    run_dir: Path
    log: Path
    status: dict | None
    exit_code: int | None = None
    """The runner's record of the run's exit status (what says a run failed before claiming its directory)."""

    @property
    def state(self) -> str:
        if self.status:
            return self.status["state"]
        return "failed" if self.exit_code else "not started"

    def seconds(self) -> float | None:
        s = self.status or {}
        if not s.get("started_at"):
            return None
        end = s.get("ended_at") or (s.get("updated_at") if self.state != "running" else None)
        return seconds_between(s["started_at"], end)

    def eta(self) -> float | None:
        """Seconds left at the run's step rate so far (running runs)."""
        s = self.status or {}
        step, planned, seconds = s.get("step") or 0, s.get("steps_planned"), self.seconds()
        if self.state != "running" or not step or not planned or not seconds:
            return None
        return seconds / step * (planned - step)


def load(out: str | Path) -> tuple[dict, list[RunView]]:
    """(the runner's record, a view of every run) of an output tree."""
    out = Path(out)
    path = out / STATUS
    if not path.is_file():
        raise UserError(f"{out}: not a batch output tree (no {STATUS}); give the --out of `pcpc batch run`")
    record = load_json(path)
    # the tree's own layout (out/<name>, out/logs/<name>.log), wherever it was run from
    runs = [RunView(name, r.get("group", name), out / name, out / "logs" / f"{name}.log", read_status(out / name),
                    r.get("exit_code"))
            for name, r in record.get("runs", {}).items()]
    return record, runs


def status_report(out, verbose: bool = False) -> dict:
    """The counts and per-run lines (JSON-able)."""
    record, runs = load(out)
    counts = {s: 0 for s in STATES}
    rows = []
    for run in runs:
        counts[run.state] = counts.get(run.state, 0) + 1
        s = run.status or {}
        rows.append({"name": run.name, "state": run.state, "step": s.get("step"), "steps_planned": s.get("steps_planned"),
                     "seconds": run.seconds(), "eta_s": run.eta(), "error": (s.get("error") or {}).get("kind")})
    done = [r["seconds"] for r in rows if r["state"] == "completed" and r["seconds"] is not None]
    return {"batch": record.get("batch"), "out": str(out), "total": len(runs), "counts": counts,
            "completed_seconds": {"total": sum(done), "median": statistics.median(done) if done else None},
            "runner": {"state": record.get("state"), "pid": record.get("pid")}, "runs": rows}


def format_status(rep: dict, verbose: bool = False) -> str:
    c = rep["counts"]
    lines = [f"{rep['batch']} ({rep['out']}): {rep['total']} runs: " + ", ".join(f"{c[s]} {s}" for s in STATES),
             f"  completed runs took {hms(rep['completed_seconds']['total'])} in all"
             + (f", {hms(rep['completed_seconds']['median'])} each (median)" if rep['completed_seconds']['median']
                else "")]
    for r in rep["runs"]:
        if r["state"] == "running" or verbose:
            step = f"{r['step']}/{r['steps_planned']}" if r["steps_planned"] else ""
            took = hms(r["seconds"]) if r["seconds"] is not None else ""
            eta = f" eta {hms(r['eta_s'])}" if r["eta_s"] is not None else ""
            err = f" ({r['error']})" if r["error"] else ""
            lines.append(f"  {r['name']:30s} {r['state']:12s} {step:>10s} {took:>8s}{eta}{err}")
    return "\n".join(lines)


# --- diagnose

KINDS = [
    # (kind, how to tell from the run's error kind and its log, the suggested fix)
    ("out of memory or killed", lambda k, log: k == "died" and re.search(r"SIGKILL|MemoryError|out of memory|Killed",
                                                                          log, re.I) is not None,
     "the run was killed, most often by the OOM killer: run fewer at once (--parallel), a smaller batch_size "
     "or model; then --skip-completed resumes it from its checkpoint"),
    ("dead worker", lambda k, log: k == "died",
     "a worker process died: its log says how; --skip-completed resumes the run from its last checkpoint"),
    ("compile error", lambda k, log: "iree-compile could not compile" in log,
     "iree-compile rejected the module: check target and --arch; `pcpc --debug run` shows the compiler's output"),
    ("missing weights", lambda k, log: re.search(r"weights_path: .*does not exist|Download Qwen", log) is not None,
     "download the model's HF files (the log says which and where) or set init_weights \"random\""),
    ("missing file", lambda k, log: re.search(r"not found|No such file|FileNotFoundError", log) is not None,
     "a file the run reads is missing: the log line names it (paths are relative to where the batch runs)"),
    ("NaN or divergent loss", lambda k, log: re.search(r"\bnan\b|\binf\b|NaN", log) is not None,
     "the loss diverged: lower the learning rate, add warmup, or clip gradients harder"),
    ("config error", lambda k, log: k == "user_error",
     "a mistake in the experiment's config: `pcpc batch validate FILE` names the field"),
]


def _nan_loss(run: RunView) -> bool:
    for rec in read_jsonl(run.run_dir / "metrics.jsonl")[-3:]:
        for v in rec.values():
            if isinstance(v, float) and not math.isfinite(v):
                return True
    return False


def diagnose(out, lines: int = 20) -> list[dict]:
    """Every failed (or stopped) run: its kind, the message, the last log lines, a fix."""
    _, runs = load(out)
    found = []
    for run in runs:
        if run.state not in ("failed", "stopped"):
            continue
        log = run.log.read_text(errors="replace") if run.log.is_file() else ""
        last = log.strip().splitlines()[-lines:]
        err = (run.status or {}).get("error") or ({"kind": "user_error"} if run.exit_code == 2 else {})
        text = "\n".join(last) + "\n" + str(err.get("message", ""))
        kind, fix = "stopped", "stopped by Ctrl+C or SIGTERM: --skip-completed resumes it from its checkpoint"
        if run.state == "failed":
            kind, fix = "other", "read the log"
            if _nan_loss(run):
                kind, fix = KINDS[5][0], KINDS[5][2]
            else:
                for name, test, suggestion in KINDS:
                    if test(err.get("kind"), text):
                        kind, fix = name, suggestion
                        break
        found.append({"name": run.name, "kind": kind, "message": err.get("message"), "fix": fix, "log": str(run.log),
                      "lines": last})
    return found


def format_diagnosis(found: list[dict], verbose: bool = False) -> str:
    if not found:
        return "no failed or stopped runs"
    by_kind: dict[str, list[dict]] = {}
    for f in found:
        by_kind.setdefault(f["kind"], []).append(f)
    out = []
    for kind, items in by_kind.items():
        out.append(f"{kind}: {len(items)} run(s): {', '.join(f['name'] for f in items)}")
        out.append(f"  fix: {items[0]['fix']}")
        for f in items if verbose else items[:1]:
            out.append(f"  {f['name']}: {f['message'] or ''}  ({f['log']})")
            out.extend(f"    | {line}" for line in f["lines"])
    return "\n".join(out)


# --- summary

def _final(run: RunView) -> dict:
    summary = run.run_dir / "summary.json"
    if summary.is_file():
        try:
            return json.loads(summary.read_text())
        except json.JSONDecodeError:
            pass
    return {}


def _metric_keys(finals: list[dict]) -> list[str]:
    keys = []
    for f in finals:
        for k, v in f.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys and \
                    (k.startswith(("final_", "dataset_")) or k in ("tokens_per_s", "train_seconds")):
                keys.append(k)
    return keys


def _curve(run: RunView) -> tuple[list, list, str] | None:
    recs = read_jsonl(run.run_dir / "metrics.jsonl")
    if not recs:
        return None
    x = "inner_step" if "inner_step" in recs[0] else next(iter(recs[0]))
    for y in ("val_loss", "loss", "reward_mean", "train_loss"):
        pts = [(r[x], r[y]) for r in recs if r.get(y) is not None]
        if pts:
            return [p[0] for p in pts], [p[1] for p in pts], y
    return None


def summary(out, write: bool = True) -> str:
    """SUMMARY.md of the output tree (and its PNGs); returns the markdown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pcpc.mlir.build import atomic_path, write_atomic

    out = Path(out)
    record, runs = load(out)
    rep = status_report(out)
    finals = {r.name: _final(r) for r in runs}
    keys = _metric_keys(list(finals.values()))
    md = [f"# {record.get('batch')}: summary", "",
          "Progress: " + ", ".join(f"{rep['counts'][s]} {s}" for s in STATES) + f" of {rep['total']}.", ""]
    md += ["## Runs", "", "| run | state | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for r in runs:
        vals = [finals[r.name].get(k) for k in keys]
        md.append(f"| {r.name} | {r.state} | " + " | ".join("" if v is None else f"{v:.4g}" for v in vals) + " |")
    groups: dict[str, list[RunView]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    md += ["", "## Groups (mean ± std over the completed runs of each group)", "",
           "| group | runs | " + " | ".join(keys) + " |", "|---|---|" + "---|" * len(keys)]
    for g, members in groups.items():
        done = [m for m in members if m.state == "completed"]
        cells = []
        for k in keys:
            vals = [finals[m.name][k] for m in done if isinstance(finals[m.name].get(k), (int, float))]
            cells.append("" if not vals else f"{statistics.mean(vals):.4g} ± {statistics.pstdev(vals):.2g}"
                         if len(vals) > 1 else f"{vals[0]:.4g}")
        md.append(f"| {g} | {len(done)}/{len(members)} | " + " | ".join(cells) + " |")
    figures = _figures(out, runs, groups, plt, atomic_path)
    if figures:
        md += ["", "## Curves", ""] + [f"![{name}]({name})" for name in figures]
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    md += ["", f"Storage: {size / 2**20:.1f} MiB in {out}."]
    failed = diagnose(out, lines=5)
    if failed:
        md += ["", "## Failures", ""] + [f"- **{f['name']}** ({f['kind']}): {f['message'] or ''}; fix: {f['fix']}"
                                         for f in failed]
    text = "\n".join(md) + "\n"
    if write:
        write_atomic(out / "SUMMARY.md", text)
    return text


def _figures(out: Path, runs, groups, plt, atomic_path) -> list[str]:
    """curves.png (every run) and curves_<group>.png; their file names."""
    curves = {r.name: _curve(r) for r in runs}
    curves = {k: v for k, v in curves.items() if v}
    if not curves:
        return []
    names = []

    def draw(file: str, members, title: str):
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for name in members:
            x, y, label = curves[name]
            ax.plot(x, y, marker="." if len(x) < 40 else None, label=name)
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        with atomic_path(out / file) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        names.append(file)

    draw("curves.png", list(curves), "every run")
    for g, members in groups.items():
        have = [m.name for m in members if m.name in curves]
        if len(groups) > 1 and have:
            draw(f"curves_{re.sub(r'[^A-Za-z0-9_.+-]', '_', g)}.png", have, g)
    return names
