"""Token shards: the files `pcpc data prepare` writes and the shard format reads, memory-mapped.

The format is llm.c's (dev/data/data_common.py write_datafile), which
build-nanogpt-style training code and FineWeb-Edu shard sets use:

    header   256 little-endian int32: [0] magic, [1] version, [2] number of tokens, the rest 0
    tokens   the ids, uint16 (magic 20240520, version 1: GPT-2-sized vocabularies)
                      or uint32 (magic 20240801, version 7: vocabularies > 65,536)

Also read, as users have them: build-nanogpt's np.save files (.npy of uint16)
and headerless .bin files of raw uint16 ids. A directory holds train_* and
val_* shards (any prefix: edufineweb_train_000001.npy is a train shard),
read in name order. `pcpc data prepare` adds dataset.json, written last: the
tokenizer (as a run's vocab.json holds it) and each shard's token count.

Documents are joined as build-nanogpt does: each starts with the tokenizer's
end-of-text id (GPT-2's 50256), so a window that crosses a document boundary
sees it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from pcpc.errors import UserError

HEADER_INTS = 256
FORMATS = {20240520: (1, np.uint16), 20240801: (7, np.uint32)}
"""magic -> (version, token dtype), llm.c's."""
MANIFEST = "dataset.json"
BATCH_BYTES = 8 << 20
"""prepare tokenizes documents in batches of at most this much input (and batch_docs documents)."""
SHARD_RE = re.compile(r"(?:^|[_\-.])(train|val)[_\-.]?\d*\.(bin|npy)$")


def read_shard(path: Path) -> np.ndarray:
    """The tokens of one shard file, memory-mapped (llm.c .bin, build-nanogpt .npy, or raw uint16 .bin)."""
    path = Path(path)
    if path.suffix == ".npy":
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            raise UserError(f"{path}: not a readable .npy token file ({e})") from None
        if arr.ndim != 1 or arr.dtype not in (np.uint16, np.uint32, np.int32, np.int64):
            raise UserError(f"{path}: expected a 1-D array of token ids, got {arr.dtype} of shape {arr.shape}")
        return arr
    size = path.stat().st_size
    head = np.fromfile(path, np.int32, count=3) if size >= 4 * HEADER_INTS else np.zeros(3, np.int32)
    magic, version, n = (int(v) for v in head)
    if magic in FORMATS:
        want_version, dtype = FORMATS[magic]
        if version != want_version:
            raise UserError(f"{path}: llm.c shard magic {magic} with version {version}; expected {want_version}")
        itemsize = np.dtype(dtype).itemsize
        if size != 4 * HEADER_INTS + n * itemsize:
            raise UserError(f"{path}: its header says {n:,} tokens ({n * itemsize + 4 * HEADER_INTS:,} bytes with "
                            f"the header) but the file has {size:,} bytes: truncated or not a shard")
        return np.memmap(path, dtype, mode="r", offset=4 * HEADER_INTS, shape=(n,))
    if size % 2:
        raise UserError(f"{path}: neither an llm.c shard (no header magic) nor raw uint16 tokens (odd size)")
    return np.memmap(path, np.uint16, mode="r") if size else np.zeros(0, np.uint16)


def write_shard(path: Path, tokens: np.ndarray) -> None:
    """Write one llm.c shard atomically (a temporary file renamed into place)."""
    dtype = np.uint16 if int(tokens.max(initial=0)) < 2 ** 16 else np.uint32
    magic = next(m for m, (_, d) in FORMATS.items() if d is dtype)
    header = np.zeros(HEADER_INTS, np.int32)
    header[:3] = magic, FORMATS[magic][0], len(tokens)
    from pcpc.mlir.build import atomic_file

    with atomic_file(path) as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype).tobytes())


def shard_paths(directory: Path, where: str = "data.path") -> tuple[list[Path], list[Path]]:
    """(train shards, val shards) of a directory, each in name order."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UserError(f"{where}: {directory} is not a directory of token shards (relative to {Path.cwd()})")
    split: dict[str, list[Path]] = {"train": [], "val": []}
    for p in sorted(directory.iterdir()):
        m = SHARD_RE.search(p.name)
        if m and p.is_file():
            split[m[1]].append(p)
    for name, paths in split.items():
        if not paths:
            raise UserError(f"{where}: {directory} has no {name}_* shard (.bin or .npy); it needs train_* and val_* "
                            f"files, as `pcpc data prepare` writes")
    return split["train"], split["val"]


def manifest(directory: Path) -> dict | None:
    """dataset.json of a prepared directory, or None (shards from elsewhere)."""
    path = Path(directory) / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def documents(path: Path, fmt: str, text_field: str, chunk_bytes: int = 1 << 20, names: str = "--text-field"):
    """(text, starts a document, bytes read so far) of the input, streamed: a JSONL line is a document; a text
    file is one document, read in chunks of about chunk_bytes that end at line ends. `names`: the option or
    field that names text_field, for errors."""
    with open(path, "rb") as f:
        if fmt == "jsonl":
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    doc = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
                text = doc.get(text_field) if isinstance(doc, dict) else None
                if not isinstance(text, str):
                    raise UserError(f"{path}:{lineno}: expected an object with a string {text_field!r} field "
                                    f"({names} names it)")
                yield text, True, f.tell()
            return
        first = True
        while True:
            chunk = f.read(chunk_bytes)
            if not chunk:
                return
            chunk += f.readline()  # to the line's end: a BPE never merges across a newline
            try:
                text = chunk.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{path}: not UTF-8 text ({e})") from None
            yield text, first, f.tell()
            first = False


def prepare(src: Path, out: Path, tokenizer, fmt: str = "auto", shard_size: int = 100_000_000,
            val_tokens: int | None = None, text_field: str = "text", overwrite: bool = False,
            progress: bool = True, batch_docs: int = 2048) -> dict:
    """Tokenize a text or JSONL file into llm.c shards in `out`: the first val_tokens tokens (default: one
    shard's worth) into val_*, the rest into train_*, each shard_size tokens (the last ones shorter).

    It streams (a shard's buffer and a batch of documents, at most 8 MB of input, are all it holds),
    tokenizes a batch of documents on every core the tokenizer's backend uses, and writes each shard atomically; dataset.json comes last, so
    a directory that has it is complete. Returns the manifest."""
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if not src.is_file():
        raise UserError(f"INPUT: {src} not found")
    fmt = fmt if fmt != "auto" else ("jsonl" if src.suffix == ".jsonl" else "text")
    if tokenizer.kind == "char":
        raise UserError("--tokenizer char builds its vocabulary from the whole corpus; shards use byte, gpt2 or a "
                        "local HF tokenizer directory")
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1, got {shard_size}")
    val_tokens = shard_size if val_tokens is None else val_tokens
    if val_tokens < 1:
        raise UserError(f"--val-tokens must be >= 1, got {val_tokens}")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out: {out} is not empty; give another directory, or --overwrite to replace it")
        for p in out.iterdir():
            if p.is_file() and (SHARD_RE.search(p.name) or p.name == MANIFEST):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tokenizer.vocab_size <= 2 ** 16 else np.uint32
    buf = np.empty(min(shard_size, val_tokens), dtype)
    filled, written = 0, {}
    counts = {"train": 0, "val": 0}

    def split_now() -> str:
        return "val" if counts["val"] < val_tokens else "train"

    def flush() -> None:
        nonlocal filled, buf
        split = split_now()
        name = f"{split}_{sum(1 for k in written if k.startswith(split)):06d}.bin"
        write_shard(out / name, buf[:filled])
        written[name] = filled
        counts[split] += filled
        filled = 0
        want = shard_size if split_now() == "train" else min(shard_size, val_tokens - counts["val"])
        if len(buf) != want:
            buf = np.empty(want, dtype)

    def add(ids: np.ndarray) -> None:
        nonlocal filled
        while len(ids):
            take = min(len(ids), len(buf) - filled)
            buf[filled:filled + take] = ids[:take]
            filled, ids = filled + take, ids[take:]
            if filled == len(buf):
                flush()

    total = src.stat().st_size
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"tokenizing {src.name}", disable=not progress)
    docs, done_bytes, n_docs = [], 0, 0

    eot = np.array([] if tokenizer.eot is None else [tokenizer.eot], np.int64)

    def write(batch, encoded) -> None:
        """Append a tokenized batch (each document after the end-of-text id) to the shards."""
        nonlocal done_bytes, n_docs
        parts = []
        for (_, starts, _), ids in zip(batch, encoded):
            parts += [eot, ids] if starts else [ids]
            n_docs += starts
        add(np.concatenate(parts).astype(dtype))
        bar.update(batch[-1][2] - done_bytes)
        done_bytes = batch[-1][2]
        bar.set_postfix(tokens=f"{counts['train'] + counts['val'] + filled:,}")

    # Double-buffered: batch k is tokenized (the backend's threads, without the GIL) while this thread reads
    # and parses batch k + 1, then writes batch k.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pending, start = None, 0

        def submit(batch):
            nonlocal pending
            future = pool.submit(tokenizer.encode_batch, [t for t, _, _ in batch])
            if pending is not None:
                write(pending[0], pending[1].result())
            pending = (batch, future)

        for doc in documents(src, fmt, text_field):
            docs.append(doc)
            if len(docs) == batch_docs or doc[2] - start >= BATCH_BYTES:  # a batch: enough documents, or 8 MB
                submit(docs)
                docs, start = [], doc[2]
        if docs:
            submit(docs)
        if pending is not None:
            write(pending[0], pending[1].result())
    bar.close()
    if filled:
        flush()
    if counts["train"] == 0:
        for name in written:
            (out / name).unlink()
        raise UserError(f"INPUT: {src} has {counts['val']:,} tokens, all of them within --val-tokens "
                        f"{val_tokens:,}: nothing would train; give a smaller --val-tokens")
    info = {"tokenizer": json.loads(tokenizer.to_json()), "source": str(src), "format": fmt, "documents": n_docs,
            "dtype": np.dtype(dtype).name, "tokens": counts, "shards": written}
    from pcpc.mlir.build import write_atomic

    write_atomic(out / MANIFEST, json.dumps(info, indent=2) + "\n")
    return info
