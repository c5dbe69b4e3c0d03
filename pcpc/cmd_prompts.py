"""`pcpc data prompts`: write and check prompt files (the reference binary format).

    pcpc data prompts encode data/rl_prompts.bin --model qwen2.5-0.5b --prompt "2+2=" --prompt "Is fire hot?"
    pcpc data prompts encode data/rl_prompts.bin --model PATH --from-file prompts.txt     # one prompt per line
    pcpc data prompts show data/rl_prompts.bin [--model PATH]                              # validate, print
"""

from __future__ import annotations

from pathlib import Path

import click


def register(cli: click.Group, data: click.Group) -> None:
    data.add_command(prompts)


def _tokenizer_dir(model: str) -> Path:
    """A directory with tokenizer.json: the model path, or the preset's HF cache snapshot."""
    from pcpc.errors import UserError
    from pcpc.exporters.hf_weights import find_preset, hub_cache_dirs

    path = Path(model)
    if path.is_dir():
        return path
    repo, found = find_preset(model)
    if found is None:
        raise UserError(f"no tokenizer for {model}: download {repo} into the HF cache ({hub_cache_dirs()[-1]}) "
                        f"or pass --model DIR with tokenizer.json")
    return found


@click.group()
def prompts():
    """Prompt files: [num_prompts:u32] then per prompt [len:u32][tokens:u64 x len], little-endian."""


@prompts.command()
@click.argument("out", type=click.Path(dir_okay=False))
@click.option("--model", required=True, help="Whose tokenizer: a model name or a HF directory with tokenizer.json.")
@click.option("--prompt", "texts", multiple=True, help="Prompt text; repeat for several.")
@click.option("--from-file", type=click.Path(dir_okay=False), default=None, help="Text file, one prompt per line.")
@click.option("--raw", is_flag=True, help="Do not apply the tokenizer's chat template.")
def encode(out, model, texts, from_file, raw):
    """Tokenize prompts and write them as a prompt file."""
    from pcpc.errors import UserError
    from pcpc.runtime.prompts import TextCodec, write_prompts

    texts = list(texts)
    if from_file:
        path = Path(from_file)
        if not path.is_file():
            raise UserError(f"--from-file {path}: no such file")
        texts += [line for line in path.read_text().splitlines() if line.strip()]
    if not texts:
        raise UserError("no prompts: give --prompt TEXT or --from-file FILE")
    codec = TextCodec(_tokenizer_dir(model))
    ids = [codec.encode(t, chat=not raw) for t in texts]
    size = write_prompts(out, ids)
    click.echo(f"{out}: {len(ids)} prompts, {sum(map(len, ids))} tokens, {size} bytes")


@prompts.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--model", default=None, help="Decode the tokens with this model's tokenizer.")
def show(path, model):
    """Validate a prompt file and print its prompts (token ids, or text with --model)."""
    from pcpc.runtime.prompts import TextCodec, read_prompts

    ids = read_prompts(path)
    codec = TextCodec(_tokenizer_dir(model)) if model else None
    click.echo(f"{path}: {len(ids)} prompts, valid")
    for i, toks in enumerate(ids):
        body = repr(codec.decode(toks)) if codec else " ".join(map(str, toks))
        click.echo(f"[{i}] {len(toks)} tokens: {body}")
