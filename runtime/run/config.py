"""The fields every run has: one base dataclass that each loop's config extends.

Each loop's config lives next to its loop (runtime/train/config.py,
runtime/rl/grpo_config.py, runtime/rl/dpo_config.py) and inherits
`RunConfig`; a loop may redeclare a base field to change its default (DiLoCo
seeds with 1337, GRPO waits 1800 s for a collective). All of them are loaded
by the one strict loader, pcpc.config.from_dict, which names the file and
the field of every mistake. Which loop a file is for is decided by the
registry of experiment kinds, pcpc/kinds.py.

A config also says what a resume may change: `resume_may_change` lists the
dotted fields that do not shape the trajectory (how often to checkpoint, the
W&B run, the thread count, how long to run). Every other field, plus the
values a loop derives from them (the cosine schedule's real decay length),
is stored in the checkpoint and compared on `--resume`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import ClassVar

from pcpc.config import check_at_least, check_choice, redacted_dict
from pcpc.mlir.compile import TARGETS
from pcpc.runtime.run.deltas import DeltaLogConfig

SECRET_FIELDS = ("wandb_api_key",)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """What every kind of run takes, whatever its loop."""

    seed: int = 0
    """Seeds initialisation, data order and sampling."""
    target: str = "llvm-cpu"
    """Compile target and device of the modules: llvm-cpu (this host's CPU), cuda, rocm, vulkan."""
    threads: int | None = None
    """IREE CPU threads per process (null: the loop divides the cores between its processes)."""
    checkpoint_interval: int = 10
    """Checkpoint every this many steps (rounds, iterations), always after the last and on Ctrl+C (0: only then)."""
    timeout_s: float = 300.0
    """Collective timeout: a process that stops answering fails the run after this many seconds."""
    wandb_project: str | None = None
    """Weights & Biases project; null logs locally only."""
    wandb_entity: str | None = None
    """W&B team or user (null: your default entity)."""
    wandb_run_name: str | None = None
    """W&B run name (null: W&B picks one)."""
    wandb_api_key: str | None = field(default=None, repr=False)
    """W&B API key (or WANDB_API_KEY / `wandb login`); never printed or written to the run directory."""
    wandb_tags: tuple[str, ...] = ()
    """W&B tags of the run (pcpc batch sets them from the experiment's name: method, seed, size, ...)."""
    wandb_group: str | None = None
    """W&B group of the run (pcpc batch: {size}_{group})."""
    delta_log: DeltaLogConfig | None = None
    """Log the trained weights at scheduled steps, exactly, against the first ones, in <run dir>/deltas
    (runtime/run/deltas.py): {"steps": [10, 20]}, {"interval": N}, or {} for steps 10, 20, 30, 40, 100, 150,
    200; read back by `pcpc deltas` and `pcpc masks find`."""

    RESUME_MAY_CHANGE: ClassVar[tuple[str, ...]] = (
        "threads", "checkpoint_interval", "timeout_s", "wandb_project", "wandb_entity", "wandb_run_name",
        "wandb_api_key", "wandb_tags", "wandb_group",
    )
    """Fields a resumed run may change: they do not alter its trajectory. A loop's config adds its own."""

    def __post_init__(self):
        check_choice(self, "target", TARGETS)
        check_at_least(self, 0, "seed", "checkpoint_interval")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be >= 1 or null, got {self.threads}")

    def public_dict(self) -> dict:
        """All fields, secrets redacted: what is printed, saved in the run directory and sent to W&B."""
        return redacted_dict(self, SECRET_FIELDS)

    def resume_may_change(self) -> tuple[str, ...]:
        """Dotted fields a resume may change (the class's list; a config may refine it per value)."""
        return self.RESUME_MAY_CHANGE

    def trajectory(self, derived: dict | None = None) -> dict:
        """{dotted field: value} of everything that shapes the run, plus `derived` values (JSON-able)."""
        keep = set(self.resume_may_change())
        flat = {k: v for k, v in flatten(json.loads(json.dumps(dataclasses.asdict(self)))).items() if k not in keep}
        return {**flat, **json.loads(json.dumps(derived or {}))}


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}; empty objects stay values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
