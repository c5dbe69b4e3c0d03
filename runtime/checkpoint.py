"""DiLoCo checkpoints: one file, written atomically, loaded with torch.load(weights_only=True).

A checkpoint taken after round r holds everything the next round reads:
the global parameters and outer momentum, every worker's inner AdamW state
(m, v and its step count), the data position (the next inner step; batches
are a pure function of it, see runtime/data.py), the text-sampling RNG state,
the counters behind the metrics, and the fields of the config that shape the
trajectory, so a resume with a changed config is refused instead of silently
diverging. Arrays are stored as torch tensors so loading never unpickles code.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from pcpc.errors import UserError

VERSION = 1
FILE_NAME = "latest.pt"

# Fields whose change would make a resumed run differ from an uninterrupted one.
TRAJECTORY_FIELDS = (
    "model_path", "data_path", "learning_rate", "tau", "nesterov_momentum", "outer_learning_rate",
    "batch_size", "seed", "tokenizer", "beta1", "beta2", "weight_decay", "grad_clip", "lr_schedule",
    "warmup_steps", "lr_decay_steps", "min_learning_rate", "persist_inner_state",
)


def path_in(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / FILE_NAME


def _tensors(arrays):
    import torch

    return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]


def _arrays(tensors):
    return [t.numpy() for t in tensors]


def save(path: Path, *, round_: int, params, momentum, workers: list[dict], config: dict, rng_state: dict,
         counters: dict) -> None:
    """Write the checkpoint atomically (temp file + fsync + rename).

    workers[r] = {"m": [...], "v": [...], "adam_step": int, "next_step": int}.
    """
    import torch

    from pcpc.mlir.build import write_atomic

    state = {
        "version": VERSION,
        "round": round_,
        "params": _tensors(params),
        "momentum": _tensors(momentum),
        "workers": [
            {"m": _tensors(w["m"]), "v": _tensors(w["v"]), "adam_step": int(w["adam_step"]),
             "next_step": int(w["next_step"])}
            for w in workers
        ],
        "config": {k: config[k] for k in TRAJECTORY_FIELDS},
        "rng_state": rng_state,
        "counters": counters,
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    write_atomic(Path(path), buf.getvalue())


def load(path: Path) -> dict:
    """The checkpoint at `path`, with arrays as numpy."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise UserError(f"--resume: no checkpoint at {path}")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as e:  # a truncated or foreign file: say which and why
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise UserError(f"{path}: not a readable pcpc checkpoint, truncated or foreign ({type(e).__name__}: "
                        f"{first})") from None
    if not isinstance(state, dict) or state.get("version") != VERSION:
        raise UserError(f"{path}: not a pcpc DiLoCo checkpoint of version {VERSION}")
    state["params"] = _arrays(state["params"])
    state["momentum"] = _arrays(state["momentum"])
    for w in state["workers"]:
        w["m"], w["v"] = _arrays(w["m"]), _arrays(w["v"])
    return state


def check_compatible(state: dict, config: dict, world: int, path: Path) -> None:
    """Refuse to resume if a trajectory-shaping field or the worker count changed."""
    for k in TRAJECTORY_FIELDS:
        if state["config"].get(k) != config[k]:
            raise UserError(
                f"--resume: {k} is {config[k]!r} but the checkpoint {path} was written with "
                f"{state['config'].get(k)!r}; restore it or start a new run with --out DIR"
            )
    if len(state["workers"]) != world:
        raise UserError(
            f"--resume: the checkpoint {path} has {len(state['workers'])} workers' state but this run has "
            f"{world} workers (num_workers / WORLD_SIZE)"
        )


def peek_round(run_dir: str | Path) -> int | None:
    """Completed rounds recorded by the run directory's checkpoint, or None without one."""
    path = path_in(run_dir)
    if not path.is_file():
        return None
    return load(path)["round"]
