"""One checkpoint format for every loop: `checkpoints/latest.pt`, written atomically.

A checkpoint after step s (a DiLoCo round, a GRPO iteration, a DPO step) holds

    kind        the loop that wrote it ("diloco", "grpo", "dpo")
    step        completed steps: the loop resumes at step s
    state       the loop's own state: a nested dict of numbers, strings, lists and arrays
                (numpy arrays or device arrays; every array is stored as a torch tensor)
    trajectory  the config fields (and derived values) that shape the run: a resume that changes
                one of them is refused by name (runtime/run/rundir.py)
    clock       seconds trained so far, so rates and ETAs continue across a resume

The file is torch.save'd straight from views of the arrays (no host copy:
at 0.5B the policy and both moments are 6 GB) into a temp file that is
fsynced and renamed into place, and loaded with torch.load(weights_only=True),
which never unpickles code. A truncated or foreign file is a one-line error.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pcpc.errors import UserError

VERSION = 3
FILE = Path("checkpoints") / "latest.pt"


@dataclass
class Checkpoint:
    kind: str
    step: int
    state: dict
    trajectory: dict = field(default_factory=dict)
    clock: dict = field(default_factory=dict)


def path_in(run_dir: str | Path) -> Path:
    return Path(run_dir) / FILE


def _to_saved(obj):
    """Arrays (numpy or device) -> tensors viewing their memory; containers recursively."""
    import torch

    from pcpc.runtime.module import host_view

    if isinstance(obj, np.ndarray) or hasattr(obj, "to_host"):
        return torch.from_numpy(np.ascontiguousarray(host_view(obj)))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_saved(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_saved(v) for v in obj]
    return obj


def _to_loaded(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.numpy()
    if isinstance(obj, dict):
        return {k: _to_loaded(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_loaded(v) for v in obj]
    return obj


def save(path: str | Path, ckpt: Checkpoint) -> None:
    """Write `ckpt` to `path` atomically (temp file, fsync, rename)."""
    import torch

    from pcpc.mlir.build import atomic_file

    with warnings.catch_warnings():  # torch warns on read-only (mapped) memory; saving only reads it
        warnings.simplefilter("ignore", UserWarning)
        state = _to_saved(ckpt.state)
    blob = {"version": VERSION, "kind": ckpt.kind, "step": int(ckpt.step), "state": state,
            "trajectory": ckpt.trajectory, "clock": ckpt.clock}
    with atomic_file(Path(path)) as f:
        torch.save(blob, f)


def load(path: str | Path, kind: str) -> Checkpoint:
    """The checkpoint at `path` (arrays as numpy); it must have been written by a `kind` run."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}; start the run without --resume")
    try:
        blob = torch.load(path, weights_only=True, mmap=True)  # arrays stay in the page cache until used
    except Exception as e:  # a truncated or foreign file: say which and why
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path}: not a readable pcpc checkpoint, truncated or foreign ({type(e).__name__}: "
                        f"{first})") from None
    if not isinstance(blob, dict) or blob.get("version") != VERSION or not {"kind", "step", "state"} <= set(blob):
        found = blob.get("version") if isinstance(blob, dict) else None
        raise UserError(f"{path}: not a pcpc checkpoint of version {VERSION} (found version {found!r}); "
                        f"start a new run with --out DIR")
    if blob["kind"] != kind:
        raise UserError(f"{path}: a {blob['kind']} checkpoint, but this is a {kind} run; use --out DIR")
    return Checkpoint(blob["kind"], blob["step"], _to_loaded(blob["state"]), blob.get("trajectory", {}),
                      blob.get("clock", {}))


def peek_step(run_dir: str | Path, kind: str) -> int | None:
    """Completed steps recorded by the run directory's checkpoint, or None without one."""
    path = path_in(run_dir)
    return load(path, kind).step if path.is_file() else None
