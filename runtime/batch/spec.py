"""Batch files: a base experiment config, named experiments and a matrix of overrides.

    name: ablations                  # optional (default: the file's stem)
    description: "..."               # optional
    base: {...}                      # an experiment config of any kind, as `pcpc run` reads it
    experiments:                     # named overrides, deep-merged into base per section
      - name: baseline
      - name: swiglu
        model: {mlp: swiglu}
    matrix:                          # optional: the product of its axes, each experiment named by its labels
      - {lora: {peft: {type: lora}}, dora: {peft: {type: dora}}}    # an axis of named overrides
      - {key: peft.r, values: [4, 16], label: r}                     # a sweep of one (dotted) key: r4, r16
      - {key: seed, values: [42, 123], label: s}                     # -> lora_r4_s42, lora_r4_s123, ...

YAML (PyYAML) or JSON. The matrix's products follow the named experiments;
with both, every named experiment is crossed with the matrix (baseline_s42,
...). Deep merge: objects merge key by key, anything else replaces. A run's
group is its name without its `seed` labels: the runs of a group differ only
by seed (reports give their mean ± std).

`validate` checks every expanded experiment with the strict loader `pcpc
run` uses (pcpc/kinds.py) and the loop's own input checks (data, weights,
prompts and reward files), and that the names are unique; each error names
the experiment and the field.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from pcpc.errors import UserError

TOP_KEYS = ("name", "description", "base", "experiments", "matrix")
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


@dataclass(frozen=True)
class Experiment:
    """One run of a batch: its name, its whole config (base with its overrides), its group."""

    name: str
    raw: dict
    group: str
    overrides: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Batch:
    path: Path
    name: str
    description: str
    experiments: list[Experiment]

    def select(self, only: str | None = None, exclude: str | None = None) -> list[Experiment]:
        """The experiments named in `only` (comma list; all when None), less those in `exclude`."""
        names = {e.name for e in self.experiments}
        picked = self.experiments
        for flag, value in (("--only", only), ("--exclude", exclude)):
            wanted = [n.strip() for n in (value or "").split(",") if n.strip()]
            unknown = [n for n in wanted if n not in names]
            if unknown:
                raise UserError(f"{flag}: no experiment named {', '.join(map(repr, unknown))} in {self.path}; "
                                f"`pcpc batch run {self.path} --list` lists them")
            if wanted:
                picked = [e for e in picked if (e.name in wanted) == (flag == "--only")]
        return picked


def deep_merge(base: dict, override: dict) -> dict:
    """A copy of base with override merged in: objects key by key, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dotted(key: str, value) -> dict:
    """"a.b", 1 -> {"a": {"b": 1}}."""
    out = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def read_file(path: Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    text = path.read_text()
    try:
        if path.suffix == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except Exception as e:  # yaml.YAMLError: its message names the line
        raise UserError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with base and experiments (or matrix), got {type(data).__name__}")
    return data


def _axis(path: Path, i: int, axis) -> list[tuple[str, dict, bool]]:
    """A matrix axis as [(label, overrides, is_seed)]."""
    where = f"{path}: matrix[{i}]"
    if isinstance(axis, dict) and "key" in axis:
        unknown = sorted(set(axis) - {"key", "values", "label"})
        if unknown or not isinstance(axis.get("values"), list) or not axis["values"]:
            raise UserError(f"{where}: a sweep is {{key, values (a non-empty list), label}}"
                            + (f"; unknown {', '.join(unknown)}" if unknown else ""))
        key, label = str(axis["key"]), str(axis.get("label", axis["key"].split(".")[-1]))
        return [(f"{label}{v}", dotted(key, v), key == "seed") for v in axis["values"]]
    if isinstance(axis, dict) and axis and all(isinstance(v, dict) or v is None for v in axis.values()):
        return [(str(label), over or {}, False) for label, over in axis.items()]
    raise UserError(f"{where}: expected {{label: overrides, ...}} or {{key, values, label}}, got {axis!r}")


def load_batch(path: str | Path) -> Batch:
    """Read and expand a batch file (no config validation: see `validate`)."""
    path = Path(path)
    data = read_file(path)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"valid keys: {', '.join(TOP_KEYS)}")
    base = data.get("base")
    if not isinstance(base, dict):
        raise UserError(f"{path}: base: expected an experiment config (a mapping), got {type(base).__name__}")
    named = data.get("experiments") or []
    matrix = data.get("matrix") or []
    if not isinstance(named, list) or not isinstance(matrix, list):
        raise UserError(f"{path}: experiments and matrix must be lists")
    if not named and not matrix:
        raise UserError(f"{path}: no experiments: give an experiments list or a matrix")
    rows = []  # (labels [(label, is_seed)], overrides)
    for i, entry in enumerate(named):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise UserError(f"{path}: experiments[{i}]: expected a mapping with a name")
        rows.append(([(entry["name"], False)], {k: v for k, v in entry.items() if k != "name"}))
    axes = [_axis(path, i, a) for i, a in enumerate(matrix)]
    if axes:
        products = list(itertools.product(*axes))
        rows = [(labels + [(lab, seed) for lab, _, seed in combo], deep_merge_all([over, *[o for _, o, _ in combo]]))
                for labels, over in (rows or [([], {})]) for combo in products]
    experiments = []
    for labels, over in rows:
        name = "_".join(lab for lab, _ in labels)
        group = "_".join(lab for lab, seed in labels if not seed) or name
        experiments.append(Experiment(name, deep_merge(base, over), group, over))
    return Batch(path, str(data.get("name") or path.stem), str(data.get("description") or ""), experiments)


def deep_merge_all(parts: list[dict]) -> dict:
    out: dict = {}
    for part in parts:
        out = deep_merge(out, part)
    return out


def validate(batch: Batch) -> list[str]:
    """Every problem of the batch, each naming the experiment and the field; [] when it is ready to run."""
    from pcpc.kinds import load_config

    errors, seen = [], set()
    for exp in batch.experiments:
        where = f"{batch.path}: {exp.name}"
        if not NAME.match(exp.name):
            errors.append(f"{where}: the name must be letters, digits and _ . + - (it names files)")
        if exp.name in seen:
            errors.append(f"{where}: the name is used twice")
        seen.add(exp.name)
        try:
            loop, cfg = load_config(exp.raw, where=where)
            loop.check_inputs(cfg, batch.path.parent)
        except UserError as e:
            msg = str(e)
            errors.append(msg if msg.startswith(where) else f"{where}: {msg}")
    return errors


def rebase_paths(raw: dict, batch_dir: Path) -> dict:
    """The paths `pcpc run` looks for beside its config file (file.py reward functions, a DPO data file that
    is not where the current directory says) made absolute against the batch file's folder: the runner
    writes each experiment's config into the output tree, away from the batch file."""
    raw = copy.deepcopy(raw)
    g = raw.get("grpo_config")
    if isinstance(g, dict) and isinstance(g.get("reward_funcs"), list):
        funcs = []
        for spec in g["reward_funcs"]:
            module, sep, fn = str(spec).rpartition(":")
            if sep and module.endswith(".py") and not Path(module).is_absolute() and (batch_dir / module).is_file():
                spec = f"{(batch_dir / module).resolve()}:{fn}"
            funcs.append(spec)
        g["reward_funcs"] = funcs
    d = raw.get("dpo_config")
    if isinstance(d, dict) and isinstance(d.get("data_path"), str):
        path = Path(d["data_path"])
        if not path.is_absolute() and not path.exists() and (batch_dir / path).exists():
            d["data_path"] = str((batch_dir / path).resolve())
    return raw
