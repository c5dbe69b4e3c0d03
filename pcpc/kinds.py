"""The registry of experiment kinds: which loop an experiment file is for, and how it is loaded.

`pcpc run CONFIG` (and anything else that reads experiment files) goes
through here: a file with a `grpo_config` key is a GRPO run, one with
`dpo_config` a DPO run, one with `"sync": "ddp"` a data-parallel pretraining
run, any other a DiLoCo run. Each kind names its loop
class (a pcpc.runtime.run.skeleton.Loop), whose `Config` the one strict
loader (pcpc/config.py) reads. Loops are imported only when asked for, so
listing kinds stays cheap. A new kind of run is a loop file and one line
here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pcpc.config import from_dict


@dataclass(frozen=True)
class Kind:
    name: str
    marker: str | None
    """The top-level key that marks a file of this kind (None: the default kind)."""
    loop: str
    """module:Class of its Loop."""
    value: object = None
    """The value the marker key must have (None: any)."""

    def marks(self, raw: dict) -> bool:
        return self.marker is not None and self.marker in raw and self.value in (None, raw[self.marker])

    def load_loop(self) -> type:
        module, _, cls = self.loop.partition(":")
        return getattr(importlib.import_module(module), cls)


KINDS = {
    "diloco": Kind("diloco", None, "pcpc.runtime.train.diloco:DiLoCo"),
    "grpo": Kind("grpo", "grpo_config", "pcpc.runtime.rl.grpo:GRPO"),
    "dpo": Kind("dpo", "dpo_config", "pcpc.runtime.rl.dpo:DPO"),
    "ddp": Kind("ddp", "sync", "pcpc.runtime.train.ddp:DataParallel", value="ddp"),
}


SYNCS = ("diloco", *(k.value for k in KINDS.values() if k.marker == "sync"))
"""A pretraining file's `sync`: diloco (the default kind's) or a value that marks another kind (ddp)."""


def kind_of(raw: dict, where: str = "config") -> Kind:
    """The kind of a decoded experiment file."""
    from pcpc.errors import UserError

    if raw.get("sync", "diloco") not in SYNCS:
        raise UserError(f"{where}: sync must be one of {', '.join(SYNCS)}; got {raw['sync']!r}")
    marked = [k for k in KINDS.values() if k.marks(raw)]
    if len(marked) > 1:
        raise UserError(f"the config has both {marked[0].marker!r} and {marked[1].marker!r}: one kind of run per file")
    return marked[0] if marked else next(k for k in KINDS.values() if k.marker is None)


def load_config(raw: dict, where: str = "config"):
    """(loop class, validated config) of a decoded experiment file; errors name `where` and the field."""
    loop = kind_of(raw, where).load_loop()
    return loop, from_dict(loop.Config, raw, where=where)


def run_experiment(config_path, raw: dict | None = None, **options) -> dict | None:
    """Run the experiment file at `config_path` (or the decoded `raw`, as --set left it) through its loop.

    options: out_dir, resume, overwrite, max_restarts, quiet, say (runtime/run/skeleton.py's `start`).
    Returns rank 0's summary.
    """
    from pcpc.config import load_json
    from pcpc.runtime.run.skeleton import start

    loop, cfg = load_config(load_json(config_path) if raw is None else raw, where=str(config_path))
    return start(loop, cfg, str(config_path), **options)
