"""The run directory: one layout for every kind of run, claimed new, resumed or overwritten.

    runs/<config name>/            (or --out DIR)
        config.json                the resolved config, secrets redacted
        status.json                how the run stands (runtime/run/status.py)
        metrics.jsonl, metrics.csv one record per step (runtime/run/metrics.py)
        *.png                      the loop's curves (loss.png, metrics.png)
        checkpoints/latest.pt      the one checkpoint format (runtime/run/checkpoint.py)
        summary.json               written at the end
        ...                        what the loop adds (vocab.json, sample.txt, samples.jsonl, workers.json)

Every file is written atomically (a temp file in the same folder, renamed
into place; weights and checkpoints fsynced first), keeping the user's umask.

`claim` decides what a new `pcpc run` may do with the directory: a resume
needs a checkpoint and refuses, by name, any changed field that would change
the trajectory; a new run refuses a directory that already holds a run
unless --overwrite, which then clears the run's files (and only those).
"""

from __future__ import annotations

import json
from pathlib import Path

from pcpc.errors import UserError
from pcpc.runtime.run import checkpoint
from pcpc.runtime.run.checkpoint import Checkpoint

RUN_FILES = ("config.json", "status.json", "metrics.jsonl", "metrics.csv", "summary.json")
"""Files every run writes (with checkpoints/latest.pt and the loop's own files)."""


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    @property
    def checkpoint(self) -> Path:
        return checkpoint.path_in(self.path)

    def write_text(self, name: str, text: str) -> Path:
        from pcpc.mlir.build import write_atomic

        write_atomic(self.path / name, text)
        return self.path / name

    def write_json(self, name: str, obj) -> Path:
        return self.write_text(name, json.dumps(obj, indent=1) + "\n")

    def claim(self, kind: str, trajectory: dict, *, resume: bool, overwrite: bool, unit: str = "step",
              loop_files=(), explain=None) -> Checkpoint | None:
        """Make the directory ready for this run; on resume, the checkpoint it continues from.

        explain(key, now, then): a sentence on why a changed derived value matters, or None.
        """
        if resume:
            ck = checkpoint.load(self.checkpoint, kind)
            check_trajectory(ck, trajectory, self.checkpoint, explain)
            return ck
        if self.checkpoint.is_file() and not overwrite:
            step = checkpoint.peek_step(self.path, kind)
            raise UserError(f"{self.path} already holds a run (checkpoint after {unit} {step}); pass "
                            f"--resume to continue it, --out DIR to start a new run elsewhere, or --overwrite to "
                            f"start this one over")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            for name in (*RUN_FILES, *loop_files):
                for p in self.path.glob(name):
                    p.unlink()
            self.checkpoint.unlink(missing_ok=True)
        except OSError as e:
            raise UserError(f"run directory {self.path}: {e.strerror} ({e.filename})") from None
        return None


def check_trajectory(ck: Checkpoint, want: dict, path: Path, explain=None) -> None:
    """Refuse a resume whose trajectory fields (or derived values) differ from the checkpoint's."""
    saved = ck.trajectory
    for key in sorted(set(saved) | set(want)):
        a, b = saved.get(key), want.get(key)
        if a != b:
            why = explain(key, b, a) if explain else None
            raise UserError(why or f"--resume: {key} is {b!r} but the checkpoint {path} was written with {a!r}; "
                                   f"restore it or start a new run with --out DIR")
