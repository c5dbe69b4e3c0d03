"""`pcpc data fetch NAME`: download a training text from its canonical source, checksummed.
`pcpc data prepare INPUT --tokenizer T --out DIR`: tokenize a text or JSONL file into token shards.

tiny_shakespeare: karpathy/char-rnn's input.txt -> data/tiny_shakespeare.txt
enwik8: mattmahoney.net/dc/enwik8.zip, unzipped -> data/enwik8.txt
The download goes to a temporary file, is checked against the published
checksum and only then renamed into place. Without a network the error says
which file to place where.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import click

from pcpc.errors import UserError


@dataclass(frozen=True)
class Source:
    url: str
    file_name: str
    algorithm: str
    digest: str
    """Checksum of the final (unzipped) file."""
    size: int
    member: str | None = None
    """For a zip download: the member to extract."""


SOURCES = {
    "tiny_shakespeare": Source(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        "tiny_shakespeare.txt", "sha256", "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        1_115_394,
    ),
    # The Hutter Prize's published checksums of the 100,000,000-byte file.
    "enwik8": Source(
        "http://mattmahoney.net/dc/enwik8.zip", "enwik8.txt", "sha1", "57b8363b814821dc9d47aa4d41f58733519076b2",
        100_000_000, member="enwik8",
    ),
}


def register(cli: click.Group, data: click.Group) -> None:
    data.add_command(fetch)
    data.add_command(prepare)


def file_digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, timeout: float) -> None:
    import urllib.request

    from tqdm import tqdm

    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        total = int(resp.headers.get("Content-Length") or 0) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=Path(url).name, leave=False) as bar:
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                bar.update(len(chunk))


def _unzip_member(path: Path, src: Source) -> None:
    """Replace the downloaded zip at `path` by its member src.member."""
    unzipped = path.with_name(path.name + ".unzipped")
    try:
        with zipfile.ZipFile(path) as zf, zf.open(src.member) as member, open(unzipped, "wb") as out:
            for chunk in iter(lambda: member.read(1 << 20), b""):
                out.write(chunk)
        os.replace(unzipped, path)
    except (zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{src.url}: not the expected zip archive ({e})") from None
    finally:
        unzipped.unlink(missing_ok=True)


def fetch_dataset(name: str, out_dir: Path, timeout: float = 60.0, say=click.echo) -> Path:
    """Download, verify and place dataset `name` in out_dir; returns its path."""
    if name not in SOURCES:
        raise UserError(f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}")
    src = SOURCES[name]
    dest = out_dir / src.file_name
    if dest.is_file():
        if file_digest(dest, src.algorithm) == src.digest:
            say(f"{dest} is already there (checksum ok)")
            return dest
        raise UserError(f"{dest} exists but its {src.algorithm} is not the published {src.digest[:12]}…; "
                        f"remove it and fetch again")
    from pcpc.mlir.build import atomic_path

    with atomic_path(dest) as tmp:  # renamed into place only once the checksum matches; removed otherwise
        say(f"downloading {src.url}")
        try:
            _download(src.url, tmp, timeout)
        except OSError as e:  # URLError, HTTP errors, timeouts, DNS failures
            why = f"HTTP {e.code} {e.reason}" if hasattr(e, "code") else getattr(e, "reason", e)
            raise UserError(
                f"could not download {name} from {src.url} ({why}). Without a network, "
                f"place the file at {dest} yourself ({src.size:,} bytes, {src.algorithm} {src.digest})"
                + (f": unzip {Path(src.url).name} and rename {src.member} to {src.file_name}" if src.member else "")
            ) from None
        if src.member:
            _unzip_member(tmp, src)
        got = file_digest(tmp, src.algorithm)
        if got != src.digest:
            raise UserError(f"{src.url}: {src.algorithm} {got} does not match the published {src.digest}; "
                            f"nothing was written to {dest}")
    say(f"{dest}: {src.size:,} bytes, {src.algorithm} ok")
    return dest


@click.command()
@click.argument("name", type=click.Choice(sorted(SOURCES)))
@click.option("--dir", "out_dir", default="data", show_default=True, type=click.Path(file_okay=False),
              help="Where to put the file.")
@click.option("--timeout", default=60.0, show_default=True, help="Network timeout in seconds.")
def fetch(name, out_dir, timeout):
    """Download a dataset (tiny_shakespeare, enwik8) and verify its checksum."""
    fetch_dataset(name, Path(out_dir), timeout)


@click.command()
@click.argument("input_path", metavar="INPUT", type=click.Path(dir_okay=False))
@click.option("--tokenizer", required=True,
              help="byte, gpt2 (tiktoken's GPT-2 BPE) or a local HF tokenizer directory.")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="The shard directory to write (train_*.bin, val_*.bin, dataset.json).")
@click.option("--shard-size", default=100_000_000, show_default=True, help="Tokens per shard.")
@click.option("--val-tokens", default=None, type=int,
              help="Tokens (from the start) for validation [default: one shard's worth].")
@click.option("--format", "fmt", default="auto", show_default=True, type=click.Choice(["auto", "text", "jsonl"]),
              help="auto: jsonl for a .jsonl file, else text.")
@click.option("--text-field", default="text", show_default=True, help="jsonl: the field holding the text.")
@click.option("--overwrite", is_flag=True, help="Replace the shards of a non-empty --out.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def prepare(input_path, tokenizer, out_dir, shard_size, val_tokens, fmt, text_field, overwrite, quiet):
    """Tokenize a text or JSONL file into llm.c-format token shards (streamed, on every core)."""
    from pcpc.runtime.train.shards import prepare as run_prepare
    from pcpc.runtime.train.tokenizer import Tokenizer, named_tokenizer

    tok = Tokenizer("char") if tokenizer == "char" else named_tokenizer(tokenizer)  # char: prepare says why not
    info = run_prepare(Path(input_path), Path(out_dir), tok, fmt, shard_size, val_tokens, text_field, overwrite,
                       progress=not quiet)
    n = info["tokens"]
    click.echo(f"{out_dir}: {n['train']:,} train + {n['val']:,} val tokens ({info['dtype']}) from "
               f"{info['documents']:,} document(s) in {len(info['shards'])} shard(s)")
