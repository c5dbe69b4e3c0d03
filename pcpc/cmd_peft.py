"""`pcpc peft`: adapters in HF peft's format (exporters/peft.py).

    pcpc peft merge runs/grpo/adapter --base ~/models/Qwen2.5-0.5B-Instruct --out merged/
    pcpc generate --model qwen2.5-0.5b --adapter runs/grpo/adapter --prompt "Hi"     (cmd_qwen.py)

An adapter is pcpc's (a run's <run dir>/adapter) or one peft saved; LoRA, DoRA, VeRA and MiSS adapters
(PiSSA / MiLoRA are saved as the LoRA they convert to).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import click

COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
          "merges.txt", "special_tokens_map.json", "added_tokens.json")


def register(cli: click.Group, data: click.Group) -> None:
    cli.add_command(peft)


@click.group()
def peft():
    """Adapters in HF peft's format: merge them into a model."""


@peft.command()
@click.argument("adapter", type=click.Path(file_okay=False))
@click.option("--base", required=True, help="The base model: a local HF directory or a preset in the HF cache.")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="The merged HF directory.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def merge(adapter, base, out, overwrite):
    """Write ADAPTER merged into --base as a HF directory (config, model.safetensors, tokenizer files)."""
    from pcpc.errors import UserError

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite or choose another directory")
    files = merge_dir(adapter, base, out)
    click.echo(f"{out}: {', '.join(files)}")


def merge_dir(adapter: str | Path, base: str, out: Path) -> list[str]:
    """The merged HF directory; returns the files written. Written into a temporary sibling and renamed,
    so a failure leaves nothing half-written."""
    import numpy as np
    from safetensors.numpy import save_file

    from pcpc.exporters import hf_weights, peft as pcpc_peft, qwen2

    model_dir = hf_weights.find_model_dir(base, option="--base")
    qcfg = qwen2.config_from_hf(hf_weights.read_hf_config(model_dir), where=str(model_dir / "config.json"))
    raw = hf_weights.read_safetensors(model_dir)
    weights = {k: hf_weights.to_f32(v) for k, v in raw.items()}
    merged, cfg = pcpc_peft.merge_into(weights, qcfg, adapter)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in merged.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    written = ["model.safetensors"]
    for name in COPIED:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, tmp / name)
            written.append(name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return written
