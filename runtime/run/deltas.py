"""Delta logs: the trained weights at scheduled steps, stored exactly, relative to the weights the run began with.

Any run with a `delta_log` section (GRPO, DPO, DiLoCo; RunConfig) writes <run dir>/deltas/:

    base.safetensors             θ_0, the trained weights at step 0, keyed by parameter name
    step_000010.safetensors      θ_10 where it differs from θ_0: per tensor either
                                   NAME:indices (int32/int64, flat, sorted) + NAME:values (fp32, θ_t there)
                                 or, when more than half of it changed, NAME itself (θ_t, dense)
    index.json                   the names and shapes, and per step its file, bytes and changed count
    fisher.safetensors           with delta_log.fisher_batches B (GRPO, DPO): Σ g² per tensor over the gradients
                                 of the run's first B batches, the diagonal of the empirical Fisher (each
                                 batch's gradient of the training loss, as the compiled module returns it,
                                 squared), which `pcpc masks find --method fisher` ranks weights by

Storing the changed values themselves (not θ_t − θ_0) makes reconstruction exact: θ_0 + fl(θ_t − θ_0) is not
always θ_t in floating point, but θ_0 with θ_t's values written at the changed indices is, bit for bit.
"Changed" compares bits, so a weight that moved and came back is unchanged. The trained weights are the
run's parameters: every weight, or an adapter's tensors.

Each file is written atomically, then index.json; a new run (or --overwrite) starts the directory afresh, a
resumed one appends.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError

REFERENCE_STEPS = (10, 20, 30, 40, 100, 150, 200)
"""The reference design's default checkpoint schedule."""
FORMAT = "pcpc-delta-v1"
DIR = "deltas"


@dataclass(frozen=True)
class DeltaLogConfig:
    """When a run logs its weights: `steps` (a list) or `interval` (every N steps); neither: the reference's
    schedule, steps 10, 20, 30, 40, 100, 150, 200."""

    steps: tuple[int, ...] | None = None
    """Steps (1-based counts of completed steps: rounds, iterations) after which the weights are logged."""
    interval: int | None = None
    """Log after every this many steps."""
    fisher_batches: int | None = None
    """Also sum the squared gradients of the run's first this many batches (each gradient call: a DPO step, a
    GRPO update) into deltas/fisher.safetensors, the empirical Fisher diagonal (GRPO and DPO runs)."""

    def __post_init__(self):
        if self.steps is not None and self.interval is not None:
            raise ValueError("delta_log: give steps or interval, not both")
        if self.interval is not None and self.interval < 1:
            raise ValueError(f"delta_log.interval must be >= 1, got {self.interval}")
        if self.steps is not None:
            steps = tuple(self.steps)
            if not steps or any(not isinstance(s, int) or s < 1 for s in steps):
                raise ValueError(f"delta_log.steps must be positive integers, got {list(steps)}")
            object.__setattr__(self, "steps", tuple(sorted(set(steps))))
        if self.fisher_batches is not None and (not isinstance(self.fisher_batches, int) or self.fisher_batches < 1):
            raise ValueError(f"delta_log.fisher_batches must be an integer >= 1, got {self.fisher_batches}")

    def due(self, done: int) -> bool:
        if self.interval is not None:
            return done % self.interval == 0
        return done in (self.steps if self.steps is not None else REFERENCE_STEPS)


FISHER = "fisher.safetensors"


def step_file(step: int) -> str:
    return f"step_{step:06d}.safetensors"


def _bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint32)


def encode(base: np.ndarray, now: np.ndarray, name: str) -> tuple[dict[str, np.ndarray], int]:
    """The tensors that store `now` against `base` (see the module docstring), and the changed count."""
    b, n = _bits(base), _bits(now)
    changed = np.flatnonzero(b != n)
    if 2 * changed.size > b.size:
        return {name: np.ascontiguousarray(now, np.float32)}, int(changed.size)
    dtype = np.int32 if b.size < 2**31 else np.int64
    return ({f"{name}:indices": changed.astype(dtype), f"{name}:values": n[changed].view(np.float32)},
            int(changed.size))


def decode(base: np.ndarray, stored: dict[str, np.ndarray], name: str) -> np.ndarray:
    """θ_t of tensor `name` from θ_0 and its stored entries (exact)."""
    if name in stored:
        return np.array(stored[name], np.float32).reshape(base.shape)
    out = np.array(base, np.float32).reshape(-1)
    out[stored[f"{name}:indices"].astype(np.int64)] = stored[f"{name}:values"]
    return out.reshape(base.shape)


class DeltaLog:
    """A run's delta directory: opened by the skeleton on rank 0 when the config has a delta_log."""

    def __init__(self, run_dir: str | Path, names: list[str], base: list[np.ndarray], start: int,
                 fisher_batches: int | None = None, say=print):
        from pcpc.mlir.build import write_atomic

        self.dir = Path(run_dir) / DIR
        self.names = list(names)
        if start == 0:  # a new run: what an earlier one left here is not this run's
            for f in list(self.dir.glob("step_*.safetensors")) + [self.dir / "index.json", self.dir / FISHER]:
                f.unlink(missing_ok=True)
            self.dir.mkdir(parents=True, exist_ok=True)
            write_atomic(self.dir / "base.safetensors", _save({n: np.asarray(a, np.float32)
                                                               for n, a in zip(names, base)}, step=0))
            self.index = {"format": FORMAT, "names": self.names, "shapes": [list(np.shape(a)) for a in base],
                          "total": int(sum(np.size(a) for a in base)), "steps": {}}
            self._write_index()
        else:
            self.index = read_index(Path(run_dir))
            self.index["steps"] = {k: v for k, v in self.index["steps"].items() if int(k) <= start}
            if self.index.get("fisher", {}).get("steps", [0, 0])[1] > start:  # summed past the checkpoint
                del self.index["fisher"]
                (self.dir / FISHER).unlink(missing_ok=True)
        self.base = read_base(Path(run_dir), self.index)
        # the Fisher sum: wanted until B batches are summed; a resume before then starts the sum afresh
        # (the partial sum is not checkpointed) and the record says which steps it covers
        self.fisher_batches = fisher_batches if fisher_batches and "fisher" not in self.index else None
        self._sums: list[np.ndarray] | None = None
        self._summed, self._first, self._last = 0, None, None
        if self.fisher_batches and start > 0:
            say(f"delta_log.fisher_batches: the squared gradients are summed afresh from step {start + 1} (a "
                f"resume does not keep a partial sum); deltas/{FISHER} records the steps it covers")

    @property
    def wants_gradients(self) -> bool:
        return self.fisher_batches is not None

    def add_gradients(self, step: int, grads: list) -> None:
        """Add one batch's gradients (device or host arrays, in `names` order) to the Fisher sum; the B-th
        writes deltas/fisher.safetensors."""
        from pcpc.runtime.module import host_view

        if self.fisher_batches is None:
            return
        if len(grads) != len(self.names):
            raise ValueError(f"add_gradients: {len(grads)} gradients for {len(self.names)} trained tensors")
        if self._sums is None:
            self._sums = [np.zeros(np.shape(b), np.float32) for b in self.base]
            self._first = step
        for acc, g in zip(self._sums, grads):
            g = host_view(g).reshape(acc.shape)
            acc += np.square(g, dtype=np.float32)
        self._summed += 1
        self._last = step
        if self._summed == self.fisher_batches:
            self._write_fisher()

    def finish(self, say=print) -> None:
        """The run completed: a Fisher sum it began is written with the batches it had (fewer than asked)."""
        if self.fisher_batches is None or self._sums is None:
            return
        say(f"delta_log.fisher_batches {self.fisher_batches}: the run ended after {self._summed} batches; "
            f"deltas/{FISHER} sums those")
        self._write_fisher()

    def _write_fisher(self) -> None:
        from pcpc.mlir.build import write_atomic

        step = self._last
        data = _save(dict(zip(self.names, self._sums)), step=step)
        write_atomic(self.dir / FISHER, data)
        self.index["fisher"] = {"file": FISHER, "batches": self._summed, "steps": [self._first, step],
                                "bytes": len(data)}
        self._write_index()
        self._sums, self.fisher_batches = None, None

    def log(self, step: int, weights: list[np.ndarray]) -> None:
        from pcpc.mlir.build import write_atomic

        tensors, changed = {}, 0
        for name, b, w in zip(self.names, self.base, weights):
            part, c = encode(b, np.asarray(w, np.float32), name)
            tensors.update(part)
            changed += c
        data = _save(tensors, step=step)
        write_atomic(self.dir / step_file(step), data)
        self.index["steps"][str(step)] = {"file": step_file(step), "bytes": len(data), "changed": changed}
        self._write_index()

    def _write_index(self) -> None:
        from pcpc.mlir.build import write_atomic

        write_atomic(self.dir / "index.json", json.dumps(self.index, indent=1) + "\n")


def _save(tensors: dict[str, np.ndarray], step: int) -> bytes:
    from safetensors.numpy import save

    return save(tensors, metadata={"format": FORMAT, "step": str(step)})


# ---------------------------------------------------------------------------
# reading (pcpc deltas, pcpc masks)


def read_index(run_dir: Path) -> dict:
    path = Path(run_dir) / DIR / "index.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no delta log ({path} is missing; give the run a \"delta_log\" section)")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise UserError(f"{path}: not a readable delta index ({e})") from None
    if index.get("format") != FORMAT:
        raise UserError(f"{path}: not a pcpc delta log (format {index.get('format')!r}, expected {FORMAT})")
    return index


def read_base(run_dir: Path, index: dict) -> list[np.ndarray]:
    from safetensors.numpy import load_file

    tensors = load_file(str(Path(run_dir) / DIR / "base.safetensors"))
    missing = [n for n in index["names"] if n not in tensors]
    if missing:
        raise UserError(f"{run_dir}/{DIR}/base.safetensors: lacks {missing[:3]} (a foreign or damaged delta log)")
    return [tensors[n] for n in index["names"]]


def logged_steps(index: dict) -> list[int]:
    return sorted(int(k) for k in index["steps"])


def weights_at(run_dir: Path, step: int, index: dict | None = None, base: list[np.ndarray] | None = None
               ) -> list[np.ndarray]:
    """θ_step of every trained tensor (step 0: the base), exactly as the run held them."""
    from safetensors.numpy import load_file

    index = index or read_index(run_dir)
    base = base if base is not None else read_base(run_dir, index)
    if step == 0:
        return [np.array(b) for b in base]
    entry = index["steps"].get(str(step))
    if entry is None:
        raise UserError(f"--step {step}: not logged in {run_dir}; logged steps: "
                        f"{', '.join(map(str, logged_steps(index))) or 'none'}")
    stored = load_file(str(Path(run_dir) / DIR / entry["file"]))
    return [decode(b, stored, n) for n, b in zip(index["names"], base)]


def read_fisher(run_dir: Path, index: dict) -> tuple[dict, "object"]:
    """(the index's fisher record, an open safetensors handle of deltas/fisher.safetensors)."""
    from safetensors import safe_open

    rec = index.get("fisher")
    if rec is None:
        raise UserError(f"{run_dir}: its delta log has no Fisher sum (give the run's delta_log a "
                        f"\"fisher_batches\": N, e.g. {{\"steps\": [10, 20], \"fisher_batches\": 16}})")
    path = Path(run_dir) / DIR / rec["file"]
    if not path.is_file():
        raise UserError(f"{path}: missing (index.json records a Fisher sum of {rec['batches']} batches)")
    return rec, safe_open(str(path), "np")


def layer_of(name: str) -> str:
    """`model.layers.3.mlp.up_proj.weight` -> `model.layers.3`; names outside a numbered block stay whole."""
    m = re.match(r"(.*?\.\d+)\.", name)
    return m.group(1) if m else name
