"""The training loops' tokenizers: char, byte, gpt2 (tiktoken's BPE), or a local HF tokenizer directory.

- `char` builds its vocabulary from the dataset (the sorted set of characters,
  as nanoGPT's shakespeare_char); `byte` maps bytes to ids 0..255.
- `gpt2` is tiktoken's GPT-2 BPE (50,257 ids, <|endoftext|> = 50256). tiktoken
  ships no BPE files: it downloads vocab.bpe and encoder.json on first use into
  its cache. Offline, the error names both files, their sha256 and where to put
  them (`gpt2_files`).
- A directory is a local HF tokenizer: tokenizer.json, or a GPT-2-style
  vocab.json + merges.txt (byte-level BPE). It is loaded with the `tokenizers`
  library and kept, whole, in the run's vocab.json, so a run decodes its samples
  without the directory.

A Tokenizer is a small frozen value: `to_json` / `from_json` round-trip it
through the run directory's vocab.json, and two runs share a tokenizer exactly
when their vocab.json texts are equal.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pcpc.errors import UserError

GPT2_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/"
GPT2_FILES = {  # tiktoken_ext.openai_public.gpt2: each file's sha256
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
}
GPT2_EOT = 50256


def tiktoken_cache_dir() -> Path:
    """Where tiktoken looks for its files: TIKTOKEN_CACHE_DIR, else DATA_GYM_CACHE_DIR, else <tmp>/data-gym-cache."""
    for var in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if os.environ.get(var):
            return Path(os.environ[var])
    return Path(tempfile.gettempdir()) / "data-gym-cache"


def gpt2_files() -> list[tuple[str, str, Path]]:
    """(file, sha256, the path tiktoken reads it from) of the GPT-2 BPE files: the cache names each by the
    sha1 of its URL."""
    cache = tiktoken_cache_dir()
    return [(name, digest, cache / hashlib.sha1((GPT2_URL + name).encode()).hexdigest())
            for name, digest in GPT2_FILES.items()]


@functools.cache
def _gpt2():
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # no network: requests / urllib errors, or a blocked download
        files = "; ".join(f"{name} (sha256 {digest}) from {GPT2_URL}{name} as {path}"
                          for name, digest, path in gpt2_files())
        raise UserError(f"tokenizer gpt2: tiktoken could not load its BPE files ({type(e).__name__}). "
                        f"Without a network, place them in its cache ({tiktoken_cache_dir()}; set "
                        f"TIKTOKEN_CACHE_DIR to choose another): {files}") from None


@functools.cache
def _hf(spec: str):
    from tokenizers import Tokenizer as HFTokenizer

    return HFTokenizer.from_str(spec)


def _hf_from_dir(path: Path) -> tuple[str, int | None]:
    """(tokenizer.json text, end-of-text id or None) of a local HF tokenizer directory."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    if (path / "tokenizer.json").is_file():
        try:
            tok = HFTokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise UserError(f"tokenizer: {path / 'tokenizer.json'} is not a tokenizers file ({e})") from None
    elif (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        try:
            tok = HFTokenizer(models.BPE.from_file(str(path / "vocab.json"), str(path / "merges.txt")))
        except Exception as e:
            raise UserError(f"tokenizer: {path}: vocab.json + merges.txt do not load as a BPE ({e})") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
    else:
        raise UserError(f"tokenizer: {path} holds neither tokenizer.json nor vocab.json + merges.txt (a local HF "
                        f"tokenizer directory)")
    eot = None
    config = path / "tokenizer_config.json"
    names = ["<|endoftext|>", "</s>", "<eos>"]
    if config.is_file():
        eos = json.loads(config.read_text()).get("eos_token")
        eos = eos.get("content") if isinstance(eos, dict) else eos
        names = [eos] + names if isinstance(eos, str) else names
    for name in names:
        if tok.token_to_id(name) is not None:
            eot = tok.token_to_id(name)
            break
    return json.dumps(json.loads(tok.to_str()), ensure_ascii=False), eot  # the form from_json reads back


@dataclass(frozen=True)
class Tokenizer:
    """char: ids index `chars`; byte: ids are byte values; gpt2: tiktoken; hf: `spec` is its tokenizer.json."""

    kind: str
    chars: str = ""
    spec: str = ""
    eot: int | None = None
    """The end-of-text id that separates documents (gpt2 and HF tokenizers that have one), else None."""

    @property
    def vocab_size(self) -> int:
        if self.kind == "char":
            return len(self.chars)
        if self.kind == "byte":
            return 256
        if self.kind == "gpt2":
            return _gpt2().n_vocab
        return _hf(self.spec).get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """(N,) int64 ids of `text` (special tokens are text, never control ids)."""
        if self.kind == "byte":
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        if self.kind == "char":
            lookup = {c: i for i, c in enumerate(self.chars)}
            missing = sorted(set(text) - set(lookup))
            if missing:
                raise UserError(f"characters {missing[:5]} are not in the run's vocabulary")
            return np.array([lookup[c] for c in text], dtype=np.int64)
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """encode over many texts, in parallel where the backend can."""
        if self.kind == "gpt2":
            return [np.asarray(ids, np.int64) for ids in _gpt2().encode_ordinary_batch(texts)]
        if self.kind == "hf":
            return [np.asarray(e.ids, np.int64) for e in _hf(self.spec).encode_batch(texts, add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        if self.kind == "byte":
            return bytes(ids).decode("utf-8", errors="replace")
        if self.kind == "char":
            return "".join(self.chars[i] for i in ids)
        if self.kind == "gpt2":
            return _gpt2().decode(ids)
        return _hf(self.spec).decode(ids, skip_special_tokens=False)

    def to_json(self) -> str:
        d = {"kind": self.kind}
        if self.kind == "char":
            d["chars"] = self.chars
        if self.kind == "hf":
            d["tokenizer"] = json.loads(self.spec)
        if self.eot is not None:
            d["eot"] = self.eot
        return json.dumps(d, ensure_ascii=False) + "\n"

    @staticmethod
    def from_json(text: str) -> "Tokenizer":
        d = json.loads(text)
        spec = json.dumps(d["tokenizer"], ensure_ascii=False) if "tokenizer" in d else ""
        return Tokenizer(d["kind"], d.get("chars", ""), spec, d.get("eot"))


def named_tokenizer(name: str) -> Tokenizer:
    """The tokenizer a config's `tokenizer` names, for the kinds that do not depend on the data: byte, gpt2 or
    a local HF tokenizer directory (char needs the data: `char_tokenizer`)."""
    if name == "byte":
        return Tokenizer("byte")
    if name == "gpt2":
        _gpt2()  # the offline error here, before anything starts
        return Tokenizer("gpt2", eot=GPT2_EOT)
    path = Path(name)
    if path.is_dir():
        spec, eot = _hf_from_dir(path)
        return Tokenizer("hf", spec=spec, eot=eot)
    raise UserError(f"tokenizer: {name!r} is neither char, byte, gpt2 nor a local HF tokenizer directory "
                    f"(relative to {Path.cwd()})")


def char_tokenizer(texts) -> Tokenizer:
    """The char tokenizer of the characters in `texts` (an iterable of strings)."""
    chars: set[str] = set()
    for t in texts:
        chars.update(t)
    return Tokenizer("char", "".join(sorted(chars)))
