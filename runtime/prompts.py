"""Prompt files: token ids of several prompts in the reference binary format.

    [num_prompts: u32] then per prompt [len: u32][tokens: u64 x len]

all little-endian, nothing else in the file. Reading validates the whole
file: a truncated file, a prompt running past the end, or bytes left over
after the last prompt are errors naming the file and the offending prompt,
never silently wrong prompts.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Sequence

import numpy as np

from pcpc.errors import UserError

_U32 = struct.Struct("<I")
MAX_U32 = 2**32 - 1


def encode_prompts(prompts: Sequence[Sequence[int]]) -> bytes:
    """The bytes of a prompt file holding `prompts` (each a sequence of non-negative token ids)."""
    if len(prompts) > MAX_U32:
        raise UserError(f"too many prompts for a u32 count: {len(prompts)}")
    parts = [_U32.pack(len(prompts))]
    for i, tokens in enumerate(prompts):
        arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if arr.size and arr.min() < 0:
            raise UserError(f"prompt {i}: token ids must be >= 0, got {int(arr.min())}")
        parts.append(_U32.pack(arr.size))
        parts.append(arr.astype("<u8").tobytes())
    return b"".join(parts)


def decode_prompts(data: bytes, where: str = "prompt file") -> list[list[int]]:
    """Prompts from prompt-file bytes; any inconsistency is a UserError naming `where`."""
    if len(data) < 4:
        raise UserError(f"{where}: truncated: {len(data)} bytes, too short for the 4-byte prompt count")
    (count,) = _U32.unpack_from(data, 0)
    off, prompts = 4, []
    for i in range(count):
        if off + 4 > len(data):
            raise UserError(
                f"{where}: truncated: header says {count} prompts but the file ends before prompt {i}'s length "
                f"(offset {off}, file {len(data)} bytes)"
            )
        (n,) = _U32.unpack_from(data, off)
        off += 4
        end = off + 8 * n
        if end > len(data):
            raise UserError(
                f"{where}: truncated: prompt {i} declares {n} tokens ({8 * n} bytes) but only "
                f"{len(data) - off} bytes remain"
            )
        prompts.append(np.frombuffer(data, dtype="<u8", count=n, offset=off).astype(np.int64).tolist())
        off = end
    if off != len(data):
        raise UserError(f"{where}: {len(data) - off} unexpected bytes after the last of {count} prompts")
    return prompts


def write_prompts(path: str | Path, prompts: Sequence[Sequence[int]]) -> int:
    """Write a prompt file atomically; returns its size in bytes."""
    from pcpc.mlir.build import write_atomic

    data = encode_prompts(prompts)
    write_atomic(Path(path), data)
    return len(data)


def read_prompts(path: str | Path) -> list[list[int]]:
    """Read and validate a prompt file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such prompt file")
    return decode_prompts(path.read_bytes(), str(path))


# ---------------------------------------------------------------------------
# text <-> tokens (HF tokenizer.json through the `tokenizers` library; no torch)


class TextCodec:
    """A HF model directory's tokenizer and chat template.

    The chat template (tokenizer_config.json "chat_template" or
    chat_template.jinja) is rendered with jinja2 the way transformers'
    apply_chat_template does: sandboxed, trim_blocks and lstrip_blocks, a
    `tojson` filter and `raise_exception`, the special tokens as variables.
    """

    def __init__(self, model_dir: str | Path):
        from tokenizers import Tokenizer

        self.dir = Path(model_dir)
        path = self.dir / "tokenizer.json"
        if not path.is_file():
            raise UserError(f"{self.dir}: no tokenizer.json (needed to turn text into tokens)")
        self.tokenizer = Tokenizer.from_file(str(path))
        self.config = _read_json(self.dir / "tokenizer_config.json")
        template = self.config.get("chat_template")
        jinja_file = self.dir / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text()
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template: str | None = template

    def special(self, name: str) -> str | None:
        value = self.config.get(name)
        return value.get("content") if isinstance(value, dict) else value

    def render_chat(self, text: str) -> str:
        """The chat-formatted prompt for one user message, ready for the assistant's reply."""
        import json

        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
        env.globals["raise_exception"] = raise_exception
        specials = {k: self.special(k) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        try:
            return env.from_string(self.chat_template).render(
                messages=[{"role": "user", "content": text}], add_generation_prompt=True, tools=None,
                documents=None, **{k: v for k, v in specials.items() if v is not None},
            )
        except jinja2.exceptions.TemplateError as e:
            raise UserError(f"{self.dir}: chat template failed: {e}") from None

    def encode(self, text: str, chat: bool = True) -> list[int]:
        """Token ids of `text`, chat-formatted when `chat` and the tokenizer has a template."""
        if chat and self.chat_template:
            text = self.render_chat(text)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)


class TextStream:
    """Incremental detokenizer: push tokens, get the newly completed text.

    Decodes the whole row each time and returns the new suffix, holding back
    a trailing replacement character (an incomplete UTF-8 sequence).
    """

    def __init__(self, codec: TextCodec):
        self.codec, self.tokens, self.shown = codec, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.codec.decode(self.tokens)
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new

    def finish(self) -> str:
        """The text held back at the end (an incomplete UTF-8 sequence decodes as replacement characters)."""
        text = self.codec.decode(self.tokens)
        new, self.shown = (text[len(self.shown):] if text.startswith(self.shown) else ""), text
        return new


def _read_json(path: Path) -> dict:
    import json

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return data if isinstance(data, dict) else {}
