"""GRPO prompts and DPO preference pairs from a Hugging Face `datasets` dataset: the `dataset` section.

    "dataset": {"name": "open-r1/OpenR1-Math-220k", "split": "train",
                "columns": {"prompt": "problem", "answer": "answer"}, "num_samples": 1000, "seed": 0}

Where the rows come from (`load_rows`):

    name   a Hub dataset, datasets.load_dataset(name, subset, split=split): the network, or the HF datasets
           cache when offline; no network and no cached copy is a UserError saying what to download and
           where to point the config
    path   a save_to_disk directory (load_from_disk), a folder of data files such as the one
           `huggingface-cli download --repo-type dataset NAME --local-dir DIR` writes (load_dataset(DIR)),
           or one .parquet / .jsonl / .json / .csv file (its only split is "train")

Then a seeded permutation of the split, cut to num_samples rows: the same rows, in the same order, for
the same seed on every machine and every datasets version (the permutation is numpy's, not datasets').

What a row becomes:

    GRPO   prompt text (the prompt column, or prompt_template filled from the columns), tokenized as
           the prompt file's text prompts are (setup.py's tokenizers: chat template as a user turn unless
           chat_template is false); the reward functions receive every column of the row under its own
           name, and each `columns` entry under its key (answer=..., the Countdown reward's nums, target)
    DPO    {"prompt", "chosen", "rejected"} texts, tokenized by runtime/rl/dpo.py as its JSONL pairs are

Importing this module does not import `datasets` (it is imported when rows are loaded).
"""

from __future__ import annotations

import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pcpc.errors import UserError
from pcpc.runtime.rl.rewards import LOOP_ARGUMENTS

ROLES = ("prompt", "chosen", "rejected", "answer")
"""Columns with a meaning to the loops: GRPO reads prompt (and hands answer to the rewards), DPO prompt,
chosen and rejected. Any other `columns` key only renames a column for the reward functions."""

RESERVED = LOOP_ARGUMENTS
"""Reward-function arguments the loop fills itself; a column of one of these names is not passed on."""

FILE_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


@dataclass(frozen=True)
class DatasetSection:
    """dataset: GRPO prompts or DPO preference pairs from a Hugging Face `datasets` dataset
    (runtime/rl/datasets.py). Give exactly one of name and path."""

    name: str | None = None
    """Hub dataset name (e.g. open-r1/OpenR1-Math-220k, Jiayi-Pan/Countdown-Tasks-3to4), loaded with
    datasets.load_dataset: from the network, or from the HF datasets cache when offline. Without either, the
    run stops and says how to download it (`huggingface-cli download --repo-type dataset NAME --local-dir DIR`)
    and to set path to DIR."""
    path: str | None = None
    """Local data: a save_to_disk directory, a folder of data files (what huggingface-cli download writes),
    or one .parquet, .jsonl, .json or .csv file (split "train"); relative to the current directory, else to
    the config file's folder."""
    subset: str | None = None
    """The dataset's configuration (the Hub's "subset", load_dataset's second argument), e.g. default."""
    split: str = "train"
    """Which split to read."""
    columns: dict = field(default_factory=dict)
    """Dataset column of each role, {"prompt": "problem", "answer": "solution"}: prompt and answer (GRPO),
    prompt, chosen and rejected (DPO); a role not given reads the column of its own name. Reward functions
    get each key's column under the key (answer=..., or any other key: {"nums": "numbers"}) and every
    column under its own name."""
    prompt_template: str | None = None
    """Makes each prompt from the row's columns, str.format style, for datasets without a prompt column:
    "Using the numbers {nums}, create an equation that equals {target}." (null: the prompt column's text)."""
    num_samples: int | None = None
    """Rows to use: the first num_samples of the seeded shuffle (null: all of the split)."""
    seed: int = 0
    """Seed of the shuffle; the same seed picks the same rows in the same order. Independent of the run's
    seed, so runs that differ only in their seed train on the same data."""
    shuffle: bool = True
    """false: the split's own order (num_samples then takes its first rows)."""
    chat_template: bool = True
    """Wrap each prompt in the tokenizer's chat template as a user turn, as a text prompt is when a prompt
    file is written (false: the raw text; the bytes tokenizer has no template)."""

    def __post_init__(self):
        if (self.name is None) == (self.path is None):
            raise ValueError("give exactly one of name (a Hub dataset) and path (local data); got "
                             + ("both" if self.name is not None else "neither"))
        for key in ("name", "path", "subset", "split"):
            if getattr(self, key) is not None and not getattr(self, key):
                raise ValueError(f"{key} must not be empty")
        for key, col in self.columns.items():
            if not isinstance(col, str) or not col:
                raise ValueError(f"columns.{key} must name a dataset column (a non-empty string), got {col!r}")
            if not key.isidentifier() or key in RESERVED:
                raise ValueError(f"columns: {key!r} cannot be a reward function argument; use a name other than "
                                 f"{', '.join(RESERVED)}")
        if self.num_samples is not None and self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1 or null, got {self.num_samples}")
        if self.prompt_template is not None:
            fields = template_fields(self.prompt_template)
            if not fields:
                raise ValueError(f"prompt_template names no column ({{column}} placeholders): "
                                 f"{self.prompt_template!r}")

    @property
    def source(self) -> str:
        """How messages name the data: the Hub name or the path."""
        return self.name if self.name is not None else self.path

    def column(self, role: str) -> str:
        """The dataset column read for `role`."""
        return self.columns.get(role, role)

    def extra_keys(self) -> list[str]:
        """The `columns` keys that are not roles a loop reads: names for the reward functions only."""
        return [k for k in self.columns if k not in ROLES]


def template_fields(template: str) -> list[str]:
    """The column names a prompt_template's {placeholders} read; a malformed template is a ValueError."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"prompt_template: {e}: {template!r}") from None
    return [name.split(".")[0].split("[")[0] for _, name, _, _ in parsed if name]


# ---------------------------------------------------------------------------
# loading


def resolve_path(d: DatasetSection, config_dir: Path | None) -> Path:
    """dataset.path as given, or relative to the config file's folder when it is not there."""
    path = Path(d.path)
    if not path.is_absolute() and not path.exists() and config_dir is not None:
        path = Path(config_dir) / path
    return path


def check_source(d: DatasetSection, config_dir: Path | None) -> None:
    """A missing local path, before anything is built (Hub names are checked when loaded)."""
    if d.path is not None and not resolve_path(d, config_dir).exists():
        where = f"{Path.cwd()}" + (f" or {config_dir}" if config_dir is not None else "")
        raise UserError(f"dataset.path: {d.path} not found (relative to {where}); give a save_to_disk directory, "
                        f"a folder of data files or a .parquet/.jsonl/.json/.csv file")


def load_rows(d: DatasetSection, config_dir: Path | None = None):
    """The split's rows (a datasets.Dataset), shuffled with d.seed and cut to d.num_samples."""
    import datasets

    quiet_before, verbosity = datasets.are_progress_bars_disabled(), datasets.logging.get_verbosity()
    datasets.disable_progress_bars()  # the run's own progress bar and messages say what happens, and
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # a failure is one UserError, not logs first
    try:
        rows = _load_hub(d) if d.name is not None else _load_local(d, resolve_path(d, config_dir))
    finally:
        datasets.logging.set_verbosity(verbosity)
        if not quiet_before:
            datasets.enable_progress_bars()
    if len(rows) == 0:
        raise UserError(f"dataset {d.source}: split {d.split!r} holds no rows")
    return rows.select(subset_indices(len(rows), d.num_samples, d.seed, d.shuffle))


def subset_indices(n: int, num_samples: int | None, seed: int, shuffle: bool = True) -> list[int]:
    """Row indices: a seeded permutation of range(n) (or range(n) itself), cut to num_samples."""
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    return [int(i) for i in order[:num_samples]]


def _download_hint(d: DatasetSection) -> str:
    return (f"download it where there is a network: `huggingface-cli download --repo-type dataset {d.name} "
            f"--local-dir DIR` (then copy DIR here), and set \"dataset\": {{\"path\": \"DIR\", ...}} in place of "
            f"\"name\"; or run once with a network so the HF datasets cache holds it")


def _load_hub(d: DatasetSection):
    import datasets
    from datasets.exceptions import DatasetNotFoundError

    try:
        return datasets.load_dataset(d.name, d.subset, split=d.split)
    except ConnectionError as e:  # OfflineModeIsEnabled and "Couldn't reach ..." are ConnectionErrors
        raise UserError(f"dataset.name: {d.name} cannot be loaded: no network ({_offline_reason(e)}) and no copy "
                        f"in the HF datasets cache; {_download_hint(d)}") from None
    except DatasetNotFoundError as e:
        raise UserError(f"dataset.name: {d.name}: {e} (a gated dataset needs `huggingface-cli login` first)") from None
    except ValueError as e:
        raise UserError(f"dataset.{_field_of(e)}: {d.name}: {e}") from None
    except Exception as e:  # whatever else the Hub or the dataset's files raise: one line (--debug: the rest)
        raise UserError(f"dataset.name: {d.name} could not be loaded: {type(e).__name__}: {e}") from e


def _offline_reason(e: Exception) -> str:
    set_ = [v for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(v, "").upper() in
            ("1", "ON", "YES", "TRUE")]
    return f"{' / '.join(set_)} set" if set_ else str(e)


def _field_of(e: ValueError) -> str:
    """Which field a load_dataset ValueError is about: an unknown split or configuration, else the source."""
    text = str(e).lower()
    return "split" if "split" in text else "subset" if "config" in text else "name"


def _load_local(d: DatasetSection, path: Path):
    import datasets

    if not path.exists():
        check_source(d, None)
    try:
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            return _pick_split(datasets.load_from_disk(str(path)), d, path)
        if path.is_dir():
            return datasets.load_dataset(str(path), d.subset, split=d.split)
        fmt = FILE_FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise UserError(f"dataset.path: {path}: not a directory nor a {', '.join(FILE_FORMATS)} file")
        if d.split != "train":
            raise UserError(f"dataset.split: {path} is one file, whose only split is \"train\"; got {d.split!r}")
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except UserError:
        raise
    except Exception as e:  # an unknown split or subset, or pyarrow / JSON errors in the user's files
        cause = e.__cause__ or e  # DatasetGenerationError says only that generating failed
        field = _field_of(e) if isinstance(e, ValueError) else "path"
        field = "path" if field == "name" else field
        raise UserError(f"dataset.{field}: {path}: {type(cause).__name__}: {cause}") from e


def _pick_split(loaded, d: DatasetSection, path: Path):
    """A save_to_disk directory holds a Dataset (one split) or a DatasetDict (several)."""
    import datasets

    if isinstance(loaded, datasets.Dataset):
        if d.split != "train":
            raise UserError(f"dataset.split: {path} holds one Dataset (split \"train\"); got {d.split!r}")
        return loaded
    if d.split not in loaded:
        raise UserError(f"dataset.split: {path} has no split {d.split!r}; its splits: {', '.join(loaded)}")
    return loaded[d.split]


# ---------------------------------------------------------------------------
# rows -> prompts and pairs


def check_columns(d: DatasetSection, rows, roles: Sequence[str]) -> None:
    """Every column the loop and the config read exists; the error names the field and lists the columns."""
    have = list(rows.column_names)
    wanted = [(f"columns.{r}", d.column(r), r not in d.columns) for r in roles
              if not (r == "prompt" and d.prompt_template is not None and r not in d.columns)]
    wanted += [(f"columns.{k}", d.columns[k], False) for k in d.columns if k not in roles]
    if d.prompt_template is not None:
        wanted += [("prompt_template", f, False) for f in template_fields(d.prompt_template)]
    for where, col, default in wanted:
        if col not in have:
            hint = f" (the default; set dataset.{where} to the column that holds it)" if default else ""
            raise UserError(f"dataset.{where}: {d.source} (split {d.split}) has no column {col!r}{hint}; its "
                            f"columns: {', '.join(have)}")


def text_of(value, where: str) -> str:
    """A text cell, or the content of the last message of a chat-format cell ([{"role", "content"}, ...], or
    ShareGPT's {"from", "value"})."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        for key in ("content", "value"):
            if isinstance(value.get(key), str):
                return value[key]
    if isinstance(value, list) and value:
        return text_of(value[-1], where)
    raise UserError(f"{where}: expected text (or chat messages), got {type(value).__name__} {str(value)[:80]!r}")


def prompt_texts(d: DatasetSection, rows) -> list[str]:
    """Each row's prompt: the prompt column's text, or prompt_template filled from the row."""
    if d.prompt_template is None:
        col = d.column("prompt")
        return [text_of(v, f"dataset {d.source} row {i}, column {col!r}") for i, v in enumerate(rows[col])]
    out = []
    for i, row in enumerate(rows.select_columns(sorted(set(template_fields(d.prompt_template))))):
        try:
            out.append(d.prompt_template.format(**row))
        except (KeyError, IndexError, ValueError, AttributeError) as e:
            raise UserError(f"dataset.prompt_template on row {i}: {type(e).__name__}: {e}") from None
    return out


def reward_arguments(d: DatasetSection, rows) -> dict[str, str]:
    """Reward-function argument -> dataset column: every column under its own name, then each `columns` entry
    but prompt / chosen / rejected under its key (so answer= is the mapped column even where one is called
    answer)."""
    out = {c: c for c in rows.column_names if c not in RESERVED}
    out.update({k: col for k, col in d.columns.items() if k not in ("prompt", "chosen", "rejected")})
    return out


@dataclass
class PromptSet:
    """GRPO prompts: token ids, and (from a dataset) the rows whose columns the reward functions receive.

    The rows stay a datasets.Dataset (memory-mapped Arrow): an iteration reads the cells of its own
    prompts only, so long columns (OpenR1's generations) are never all in memory."""

    ids: list[list[int]]
    rows: object = None
    """The datasets.Dataset behind ids (row i made prompt i), or None (a prompt file)."""
    arguments: dict[str, str] = field(default_factory=dict)
    """Reward-function argument name -> the column it reads (reward_arguments)."""

    def columns_for(self, order: Sequence[int]) -> dict[str, list]:
        """{argument: one cell per entry of order}: the columns of the prompts `order` names."""
        if self.rows is None or not self.arguments:
            return {}
        unique = sorted(set(order))
        picked = self.rows.select(unique).select_columns(sorted(set(self.arguments.values())))
        at = {i: k for k, i in enumerate(unique)}
        cells = {col: list(picked[col]) for col in picked.column_names}
        return {arg: [cells[col][at[i]] for i in order] for arg, col in self.arguments.items()}


def load_prompts(d: DatasetSection, tokenizer, config_dir: Path | None = None) -> PromptSet:
    """The prompts of a GRPO run, tokenized, with their rows for the rewards."""
    rows = load_rows(d, config_dir)
    check_columns(d, rows, ["prompt"] + (["answer"] if "answer" in d.columns else []))
    ids = [tokenizer.encode(t, chat=d.chat_template) for t in prompt_texts(d, rows)]
    return PromptSet(ids, rows, reward_arguments(d, rows))


def load_pair_records(d: DatasetSection, config_dir: Path | None = None) -> list[tuple[str, dict]]:
    """(where, {"prompt", "chosen", "rejected"} texts) per row, for runtime/rl/dpo.py to tokenize."""
    rows = load_rows(d, config_dir)
    check_columns(d, rows, ["prompt", "chosen", "rejected"])
    prompts = prompt_texts(d, rows)
    out = []
    for i, (p, c, r) in enumerate(zip(prompts, rows[d.column("chosen")], rows[d.column("rejected")])):
        where = f"dataset {d.source} row {i}"
        out.append((where, {"prompt": p, "chosen": text_of(c, f"{where}, column {d.column('chosen')!r}"),
                            "rejected": text_of(r, f"{where}, column {d.column('rejected')!r}")}))
    return out
