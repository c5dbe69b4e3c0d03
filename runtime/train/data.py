"""Datasets for the training loops: text, JSONL documents and token shards; the split; per-worker sampling.

Formats (a config's `data` section, runtime/train/config.py DataConfig):
- text: one file, tokenized whole. The first 1 - test_size of the tokens train,
  the rest validate. Worker r of W trains on the r-th of W equal contiguous
  shards of the training split. A shard is cut into non-overlapping windows of
  block_size + 1 tokens on a grid whose phase is redrawn each epoch; an epoch
  visits every window once in a seeded random order (WorkerSampler).
- jsonl: one document per line, its text in `text_field`. A seeded shuffle of
  the documents puts test_size of them (a fraction, or a count) in validation.
  Worker r trains on documents r, r + W, ... of the rest. Each row of a batch is
  a window of block_size + 1 tokens from a random document long enough for
  one (shorter ones are resampled, as the reference's JSONLDataset), at a
  random offset in it (DocumentSampler).
- shards: a directory of token files (runtime/train/shards.py: llm.c's .bin,
  build-nanogpt's .npy), train_* and val_* by name, memory-mapped. Step s reads
  the s-th stride of W x batch x block tokens through the train shards in order,
  worker r the r-th part of it, as build-nanogpt's loader (ShardSampler).
Validation batches are fixed non-overlapping windows of the validation tokens
(val_batches); JSONL documents are joined with the tokenizer's end-of-text id.

Every batch is a pure function of (seed, rank, step), so the data order is
reproducible and a checkpoint needs only the step for the data position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError
from pcpc.runtime.train.tokenizer import Tokenizer, char_tokenizer

@dataclass(frozen=True)
class Documents:
    """JSONL documents' tokens: document i is tokens[offsets[i]:offsets[i + 1]]."""

    tokens: np.ndarray
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def take(self, index: np.ndarray) -> "Documents":
        lengths = self.lengths()[index]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        parts = [self.tokens[self.offsets[i]:self.offsets[i + 1]] for i in index]
        return Documents(np.concatenate(parts) if parts else self.tokens[:0], offsets)

    def joined(self, eot: int | None) -> np.ndarray:
        """The documents as one stream, each after an end-of-text id when the tokenizer has one."""
        if eot is None:
            return self.tokens
        parts = []
        for i in range(len(self)):
            parts += [np.array([eot], self.tokens.dtype), self.tokens[self.offsets[i]:self.offsets[i + 1]]]
        return np.concatenate(parts) if parts else self.tokens


@dataclass(frozen=True)
class Dataset:
    tokenizer: Tokenizer
    train: "np.ndarray | Documents | list[np.ndarray]"
    """text: (N_train,) token ids; jsonl: the training Documents; shards: the train shards (memory-mapped)."""
    val: np.ndarray
    """(N_val,) validation token ids."""
    where: str = "data_path"
    """The config field the data came from, for errors."""

    def sampler(self, rank: int, world: int, block_size: int, batch_size: int, seed: int):
        """Worker `rank`'s training batches: batch(step) -> (x, y), and steps_per_epoch."""
        if isinstance(self.train, Documents):
            return DocumentSampler(self.train, rank, world, block_size, batch_size, seed, self.where)
        if isinstance(self.train, list):
            return ShardSampler(self.train, rank, world, block_size, batch_size, self.where)
        return WorkerSampler(self.train, rank, world, block_size, batch_size, seed, self.where)


def _ids(tokens: np.ndarray, vocab_size: int) -> np.ndarray:
    return tokens.astype(np.uint16 if vocab_size <= 65536 else np.int64)


def load_text(path: str | Path, tokenizer: Tokenizer | str, test_size: float = 0.1,
              where: str = "data_path") -> Dataset:
    """Tokenize the text file at `path` (tokenizer: a Tokenizer, or "char"/"byte") and split it: the first
    1 - test_size of the tokens train, the rest validate."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: {path} not found")
    raw = path.read_bytes()
    kind = tokenizer if isinstance(tokenizer, str) else tokenizer.kind
    if kind == "byte":
        tokens, tok = np.frombuffer(raw, dtype=np.uint8), Tokenizer("byte")
    else:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: {path} is not UTF-8 text ({e}); use the byte tokenizer") from None
        if kind == "char":
            codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)  # one code point per character
            uniq, tokens = np.unique(codes, return_inverse=True)
            tok = Tokenizer("char", "".join(map(chr, uniq)))
            if not isinstance(tokenizer, str) and tokenizer != tok:
                tokens, tok = tokenizer.encode(text), tokenizer  # the run's vocabulary (a resumed or base run's)
        elif isinstance(tokenizer, str):
            raise ValueError(f"tokenizer must be char, byte or a Tokenizer, got {tokenizer!r}")
        else:
            tok, tokens = tokenizer, tokenizer.encode(text)
    tokens = _ids(tokens, tok.vocab_size)
    n = int(len(tokens) * (1 - test_size))
    return Dataset(tok, tokens[:n], tokens[n:], where)


def read_jsonl(path: Path, text_field: str, where: str) -> list[str]:
    """The documents' texts of a JSONL file, one object per line with a string `text_field`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{where}: {path} not found")
    from pcpc.runtime.train.shards import documents

    texts = [text for text, _, _ in documents(path, "jsonl", text_field, names="data.text_field")]
    if not texts:
        raise UserError(f"{where}: {path} holds no documents")
    return texts


def load_jsonl(path: str | Path, tokenizer: Tokenizer | None, test_size: int | float | None, seed: int,
               text_field: str = "text", where: str = "data.path") -> Dataset:
    """Tokenize a JSONL file's documents and split them: a seeded shuffle puts test_size of them (a fraction,
    or a count) in validation. tokenizer None: char, from the documents."""
    texts = read_jsonl(Path(path), text_field, where)
    tok = tokenizer or char_tokenizer(texts)
    encoded = tok.encode_batch(texts)
    lengths = np.array([len(e) for e in encoded], np.int64)
    tokens = _ids(np.concatenate(encoded) if encoded else np.zeros(0, np.int64), tok.vocab_size)
    docs = Documents(tokens, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    test_size = 0.1 if test_size is None else test_size
    n_val = test_size if isinstance(test_size, int) else int(round(len(docs) * test_size))
    if not 1 <= n_val < len(docs):
        raise UserError(f"data.test_size: {test_size} of {len(docs)} documents gives {n_val} for validation; "
                        f"both splits need at least one document")
    order = np.random.default_rng([seed, 0x5E1]).permutation(len(docs))
    val = docs.take(order[:n_val]).joined(tok.eot)
    return Dataset(tok, docs.take(np.sort(order[n_val:])), val, where)


def load_shards(path: str | Path, tokenizer: Tokenizer, where: str = "data.path") -> Dataset:
    """A directory of token shards: the train shards memory-mapped, the val shards joined."""
    from pcpc.runtime.train.shards import read_shard, shard_paths

    train_paths, val_paths = shard_paths(Path(path), where)
    train = [read_shard(p) for p in train_paths]
    vals = [read_shard(p) for p in val_paths]
    val = vals[0] if len(vals) == 1 else np.concatenate(vals)
    top = max(int(a[:1 << 20].max(initial=0)) for a in train[:1] + vals[:1])  # a sample: shards are GBs
    if top >= tokenizer.vocab_size:
        raise UserError(f"{where}: {path} holds token id {top}, outside the {tokenizer.vocab_size:,} ids of "
                        f"tokenizer {tokenizer.kind} (data.tokenizer names the shards' tokenizer)")
    return Dataset(tokenizer, train, val, where)


def load_dataset(data, tokenizer: Tokenizer | None, seed: int = 0, where: str = "data.path") -> Dataset:
    """The Dataset a DataConfig describes, tokenized with `tokenizer` (None: char, from the data); errors name
    `where`, the config field it came from."""
    kind = data.kind
    if kind == "shards":
        return load_shards(data.path, tokenizer, where)
    if kind == "jsonl":
        return load_jsonl(data.path, tokenizer, data.test_size, seed, data.text_field, where)
    return load_text(data.path, tokenizer or "char", 0.1 if data.test_size is None else data.test_size, where)


class DocumentSampler:
    """JSONL training batches of one worker: row i of batch(step) is a block_size + 1 window at a random
    offset of a random document of the worker's (documents rank, rank + world, ...) that is long enough;
    each draw is a function of (seed, rank, step)."""

    def __init__(self, docs: Documents, rank: int, world: int, block_size: int, batch_size: int, seed: int,
                 where: str = "data.path"):
        mine = docs.take(np.arange(rank, len(docs), world))
        lengths = mine.lengths()
        self.eligible = np.flatnonzero(lengths >= block_size + 1)
        if not len(self.eligible):
            raise UserError(f"{where}: worker {rank} of {world} has no document of at least {block_size + 1} "
                            f"tokens (block_size + 1; its longest has {int(lengths.max(initial=0))}); use longer "
                            f"documents, fewer workers or a smaller data.block_size")
        self.docs, self.rank, self.block, self.batch_size, self.seed = mine, rank, block_size, batch_size, seed
        self.steps_per_epoch = max(1, int(lengths[self.eligible].sum()) // (batch_size * block_size))
        """Steps of about one pass over the worker's tokens (the windows are drawn, not enumerated)."""

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.rank, step])
        doc = self.eligible[rng.integers(len(self.eligible), size=self.batch_size)]  # (B,)
        length = self.docs.offsets[doc + 1] - self.docs.offsets[doc]
        start = self.docs.offsets[doc] + (rng.random(self.batch_size) * (length - self.block)).astype(np.int64)
        windows = self.docs.tokens[start[:, None] + np.arange(self.block + 1)].astype(np.int64)  # (B, T+1)
        return np.ascontiguousarray(windows[:, :-1]), np.ascontiguousarray(windows[:, 1:])


class ShardSampler:
    """Shard training batches of one worker: step s takes the s-th stride of world x batch_size x block_size
    tokens (+ 1 for the targets) through the train shards in order, a shard's tail shorter than a stride
    skipped; worker r reads the r-th batch_size x block_size part of it. An epoch is one pass."""

    def __init__(self, shards: list[np.ndarray], rank: int, world: int, block_size: int, batch_size: int,
                 where: str = "data.path"):
        self.shards, self.rank, self.block, self.batch_size = shards, rank, block_size, batch_size
        self.part = block_size * batch_size
        self.stride = self.part * world
        per_shard = np.array([max(0, (len(s) - 1) // self.stride) for s in shards], np.int64)
        self.ends = np.cumsum(per_shard)  # step s of an epoch is in the first shard with ends > s
        self.steps_per_epoch = int(self.ends[-1]) if len(shards) else 0
        if self.steps_per_epoch < 1:
            raise UserError(f"{where}: no train shard holds one step of {world} workers x {batch_size} x "
                            f"{block_size + 1} tokens ({self.stride + 1:,}); the largest has "
                            f"{max(len(s) for s in shards):,}")

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def position(self, step: int) -> tuple[int, int]:
        """(shard index, token offset) where this worker's batch of `step` starts."""
        i = step % self.steps_per_epoch
        k = int(np.searchsorted(self.ends, i, side="right"))
        local = i - (int(self.ends[k - 1]) if k else 0)
        return k, local * self.stride + self.rank * self.part

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        k, offset = self.position(step)
        buf = np.asarray(self.shards[k][offset:offset + self.part + 1], np.int64)
        return (np.ascontiguousarray(buf[:-1].reshape(self.batch_size, self.block)),
                np.ascontiguousarray(buf[1:].reshape(self.batch_size, self.block)))


class WorkerSampler:
    """The training batches of one worker: `batch(step)` -> (x, y), each (batch_size, block_size) int64."""

    def __init__(self, train: np.ndarray, rank: int, world: int, block_size: int, batch_size: int, seed: int,
                 where: str = "data_path"):
        shard_len = len(train) // world
        self.shard = train[rank * shard_len:(rank + 1) * shard_len]
        self.rank, self.block, self.batch_size, self.seed = rank, block_size, batch_size, seed
        # Windows start at phase + i * block for i < n_windows; phase < block, so the last
        # one ends at most at (n_windows + 1) * block <= shard_len - 1.
        self.n_windows = max(0, (shard_len - 1 - block_size) // block_size)
        self.steps_per_epoch = self.n_windows // batch_size
        if self.steps_per_epoch < 1:
            raise UserError(
                f"{where}: each of the {world} workers' shards has {shard_len} tokens, too few for one batch "
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


def val_batches(val: np.ndarray, block_size: int, batch_size: int, max_batches: int = 0, where: str = "data_path"):
    """Fixed validation batches [(x, y)], each (batch_size, block_size) int64.

    Non-overlapping windows from the start of the split, grouped in order;
    with max_batches > 0, that many batches evenly spaced over the split.
    """
    n_windows = (len(val) - 1) // block_size
    n_batches = n_windows // batch_size
    if n_batches < 1:
        raise UserError(
            f"{where}: the validation split has {len(val)} tokens, too few for one batch of "
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
