"""Text datasets for the training loops: tokenizers, the 90/10 split, per-worker sampling.

Tokenizers: `char` builds its vocabulary from the dataset (the sorted set of
characters, as nanoGPT's shakespeare_char) and is saved with the run so
samples decode; `byte` maps bytes to ids 0..255 (dataset-independent).

The first 90% of the tokens train, the last 10% validate. Worker r of W
trains on the r-th of W equal contiguous shards of the training split. A
shard is cut into non-overlapping windows of block_size + 1 tokens on a grid
whose phase is redrawn each epoch; an epoch visits every window once in a
seeded random order. The batch of inner step s is a pure function of
(seed, rank, s), so the data order is reproducible and a checkpoint only
needs the step (the data position).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError

TRAIN_FRACTION = 0.9


@dataclass(frozen=True)
class Tokenizer:
    """char: ids index `chars`; byte: ids are byte values."""

    kind: str
    chars: str = ""

    @property
    def vocab_size(self) -> int:
        return len(self.chars) if self.kind == "char" else 256

    def encode(self, text: str) -> np.ndarray:
        if self.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        lookup = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(text) - set(lookup))
        if missing:
            raise UserError(f"characters {missing[:5]} are not in the run's vocabulary")
        return np.array([lookup[c] for c in text], dtype=np.int64)

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        return "".join(self.chars[i] for i in ids)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": self.chars} if self.kind == "char" else {"kind": "byte"},
                          ensure_ascii=False) + "\n"

    @staticmethod
    def from_json(text: str) -> "Tokenizer":
        d = json.loads(text)
        return Tokenizer(d["kind"], d.get("chars", ""))


@dataclass(frozen=True)
class Dataset:
    tokenizer: Tokenizer
    train: np.ndarray
    """(N_train,) token ids: the first 90%."""
    val: np.ndarray
    """(N_val,) token ids: the last 10%."""


def load_dataset(path: str | Path, kind: str) -> Dataset:
    """Tokenize the file at `path` with a `char` or `byte` tokenizer and split it 90/10."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data_path: {path} not found")
    raw = path.read_bytes()
    if kind == "byte":
        tokens = np.frombuffer(raw, dtype=np.uint8)
        tok = Tokenizer("byte")
    elif kind == "char":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"data_path: {path} is not UTF-8 text ({e}); use \"tokenizer\": \"byte\"") from None
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
        uniq, tokens = np.unique(codes, return_inverse=True)
        tok = Tokenizer("char", "".join(map(chr, uniq)))
    else:
        raise ValueError(f"tokenizer must be char or byte, got {kind!r}")
    tokens = tokens.astype(np.uint16 if tok.vocab_size <= 65536 else np.int64)
    n = int(len(tokens) * TRAIN_FRACTION)
    return Dataset(tok, tokens[:n], tokens[n:])


class WorkerSampler:
    """The training batches of one worker: `batch(step)` -> (x, y), each (batch_size, block_size) int64."""

    def __init__(self, train: np.ndarray, rank: int, world: int, block_size: int, batch_size: int, seed: int):
        shard_len = len(train) // world
        self.shard = train[rank * shard_len:(rank + 1) * shard_len]
        self.rank, self.block, self.batch_size, self.seed = rank, block_size, batch_size, seed
        # Windows start at phase + i * block for i < n_windows; phase < block, so the last
        # one ends at most at (n_windows + 1) * block <= shard_len - 1.
        self.n_windows = max(0, (shard_len - 1 - block_size) // block_size)
        self.steps_per_epoch = self.n_windows // batch_size
        if self.steps_per_epoch < 1:
            raise UserError(
                f"data_path: each of the {world} workers' shards has {shard_len} tokens, too few for one batch "
                f"of {batch_size} x {block_size + 1}; use more data or a smaller batch_size"
            )
        self._epoch = (-1, 0, None)

    def _order(self, epoch: int):
        if self._epoch[0] != epoch:
            rng = np.random.default_rng([self.seed, self.rank, epoch])
            phase = int(rng.integers(self.block))
            self._epoch = (epoch, phase, rng.permutation(self.n_windows))
        return self._epoch[1], self._epoch[2]

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def starts(self, step: int) -> np.ndarray:
        """(B,) offsets into the shard of the windows of inner step `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        phase, perm = self._order(epoch)
        return phase + perm[i * self.batch_size:(i + 1) * self.batch_size] * self.block

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        starts = self.starts(step)  # (B,)
        windows = self.shard[starts[:, None] + np.arange(self.block + 1)].astype(np.int64)  # (B, T+1)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


def val_batches(val: np.ndarray, block_size: int, batch_size: int, max_batches: int = 0):
    """Fixed validation batches [(x, y)], each (batch_size, block_size) int64.

    Non-overlapping windows from the start of the split, grouped in order;
    with max_batches > 0, that many batches evenly spaced over the split.
    """
    n_windows = (len(val) - 1) // block_size
    n_batches = n_windows // batch_size
    if n_batches < 1:
        raise UserError(
            f"data_path: the validation split has {len(val)} tokens, too few for one batch of "
            f"{batch_size} x {block_size + 1}; use more data or a smaller eval_batch_size"
        )
    chosen = range(n_batches)
    if 0 < max_batches < n_batches:
        chosen = sorted({int(round(i)) for i in np.linspace(0, n_batches - 1, max_batches)})
    out = []
    for b in chosen:
        starts = (b * batch_size + np.arange(batch_size)) * block_size  # (B,)
        windows = val[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)  # (B, T+1)
        out.append((np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])))
    return out
