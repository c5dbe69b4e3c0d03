"""`pcpc export` and `pcpc generate`: Qwen2-family models through compiled modules.

    pcpc export --model qwen2.5-0.5b [--weights DIR]      # module + flat weights into artifacts/
    pcpc generate --model qwen2.5-0.5b --prompt "Hi" --max-tokens 64 --temperature 0.7 --top-p 0.9 --seed 0

`--model` is a preset name (weights from --weights DIR or the HF cache) or
the path of any local Qwen2-family HF directory. Export builds the
generation module (cached), writes the flat weight file the module's
meta.json describes, and records both in artifacts/<name>.model.json, which
`generate` reads.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import click

from pcpc.mlir.compile import TARGETS as COMPILE_TARGETS
from pcpc.mlir.targets import SHORT_CACHE

DTYPES = ("float32", "bfloat16")
PREFILL_LEN = 128
"""Default tokens per prefill call (capped by the KV-cache capacity)."""


def register(cli: click.Group, data: click.Group) -> None:
    cli.add_command(export)
    cli.add_command(generate)


def artifact_name(model: str, dtype: str, resident: bool = False) -> str:
    """Artifact name of a model's module: qwen-generation[-resident][-bf16] for the 0.5B preset,
    qwen-<dir name>[-resident][-bf16] for a path."""
    from pcpc.errors import UserError
    from pcpc.exporters.hf_weights import HUB_REPOS

    suffix = ("-resident" if resident else "") + ("" if dtype == "float32" else "-bf16")
    if Path(model).is_dir():
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).resolve().name).strip("-.").lower() or "model"
        return f"qwen-{slug}{suffix}"
    if model == "qwen2.5-0.5b":
        return f"qwen-generation{suffix}"
    raise UserError(f"--model {model!r}: not a directory and not a known model; valid names: {', '.join(HUB_REPOS)}")


def weights_name(model: str, dtype: str) -> str:
    """The flat weight file is shared by a model's contract and resident modules of one dtype."""
    return artifact_name(model, dtype) + ".weights.bin"


def model_target(model: str, dtype: str, batch_sizes: list[int], prefill_len: int | None, max_seq: int | None,
                 resident: bool = False, cache_sizes: list[int] | None = None):
    """The build target of `model`'s generation module with these settings.

    cache_sizes: smaller KV-cache capacities to export as well (mlir/qwen_functions.py); None means
    SHORT_CACHE when it lies between prefill_len and max_seq, 0 entries are dropped.
    """
    from pcpc.errors import UserError
    from pcpc.exporters import qwen2
    from pcpc.exporters.hf_weights import read_hf_config
    from pcpc.mlir.targets import QWEN_CPU_FLAGS, qwen_target, resident_cpu_flags

    name = artifact_name(model, dtype, resident)
    if Path(model).is_dir():
        hf_config = read_hf_config(Path(model))
        cfg = qwen2.config_from_hf(hf_config, where=str(Path(model) / "config.json"))
        source = {"hf_config": hf_config}
    else:
        cfg = qwen2.make_config(model)
        source = {"model": model}
    seq = max_seq if max_seq is not None else min(1024, cfg.max_position_embeddings)
    if seq > cfg.max_position_embeddings:
        raise UserError(f"--max-seq {seq} exceeds the model's max_position_embeddings {cfg.max_position_embeddings}")
    prefill_len = min(PREFILL_LEN, seq) if prefill_len is None else prefill_len
    if prefill_len > seq:
        raise UserError(f"--prefill-len {prefill_len} must be <= --max-seq {seq}")
    if cache_sizes is None:
        cache_sizes = [SHORT_CACHE] if prefill_len <= SHORT_CACHE < seq else []
    cache_sizes = sorted(set(c for c in cache_sizes if c))
    bad = [c for c in cache_sizes if not prefill_len <= c < seq]
    if bad:
        raise UserError(f"--cache-size {bad[0]}: must lie in [--prefill-len, --max-seq) = [{prefill_len}, {seq}), "
                        f"or 0 for none")
    opts = dict(batch_sizes=sorted(set(batch_sizes)), prefill_len=prefill_len, max_seq=seq)
    if cache_sizes:
        opts["cache_sizes"] = cache_sizes
    if dtype != "float32":
        opts["dtype"] = dtype
    if resident:
        opts["resident"] = True
    flags = resident_cpu_flags(dtype) if resident else QWEN_CPU_FLAGS
    return qwen_target(name, **source, **opts, llvm_cpu_flags=flags), cfg


def _record_path(out_dir: Path, name: str) -> Path:
    return out_dir / f"{name}.model.json"


@click.command()
@click.option("--model", required=True, help="qwen2.5-0.5b, or the path of a Qwen2-family HF directory.")
@click.option("--weights", type=click.Path(file_okay=False), default=None,
              help="HF directory with config.json, *.safetensors and tokenizer files (default: the model path or the HF cache).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True, help="Weight dtype of the module.")
@click.option("--batch-size", "batch_sizes", type=click.IntRange(min=1), multiple=True, default=(1,), show_default=True,
              help="Batch sizes to export (prefill_bs{B} / decode_bs{B}); repeat for several.")
@click.option("--prefill-len", type=click.IntRange(min=1), default=None,
              help=f"Tokens per prefill call [default: {PREFILL_LEN}, or --max-seq if smaller].")
@click.option("--max-seq", type=click.IntRange(min=1), default=None, help="KV-cache capacity [default: min(1024, max positions)].")
@click.option("--cache-size", "cache_sizes", type=click.IntRange(min=0), multiple=True, default=None,
              help=f"A smaller KV-cache capacity to export as well; generation runs on the smallest cache that "
                   f"holds prompt + new tokens (decode reads the whole cache each step). Repeat for several; "
                   f"0 for none [default: {SHORT_CACHE}].")
@click.option("--resident", is_flag=True,
              help="Build the variant whose weights are module parameters, packed once into the layout "
                   "its matmuls read (faster; also writes WEIGHTS.<hash>.packed).")
@click.option("--target", default="llvm-cpu", type=click.Choice(COMPILE_TARGETS), show_default=True)
@click.option("--out-dir", default="artifacts", show_default=True, type=click.Path(file_okay=False))
def export(model, weights, dtype, batch_sizes, prefill_len, max_seq, cache_sizes, resident, target, out_dir):
    """Build a Qwen2 generation module and write its flat weight file into artifacts/."""
    export_model(model, weights, dtype, list(batch_sizes), prefill_len, max_seq,
                 list(cache_sizes) if cache_sizes else None, resident, target, Path(out_dir), say=click.echo)


def export_model(model: str, weights, dtype: str, batch_sizes: list[int], prefill_len: int | None, max_seq: int | None,
                 cache_sizes: list[int] | None, resident: bool, target: str, out_dir: Path, say) -> dict:
    """`pcpc export`: the module (cached build), the flat weights, the packed weights of a resident module,
    and last the record `pcpc generate` reads; returns the record."""
    from pcpc.errors import UserError
    from pcpc.exporters import hf_weights, qwen2
    from pcpc.mlir.build import build, write_atomic
    from pcpc.mlir.signature import load_meta

    tgt, cfg = model_target(model, dtype, batch_sizes, prefill_len, max_seq, resident, cache_sizes)
    model_dir = hf_weights.find_model_dir(model, weights)  # fails fast, before the slow build
    found = qwen2.config_from_hf(hf_weights.read_hf_config(model_dir), where=str(model_dir / "config.json"))
    if found != cfg:
        raise UserError(f"{model_dir}: config.json describes a different model than {model!r}: {found} != {cfg}")
    t0 = time.perf_counter()
    result = build(tgt, out_dir, target, log=say)
    say(f"{result.vmfb} ({', '.join(f'{k} {v:.1f}s' for k, v in result.seconds.items()) or 'up to date'})")
    meta = load_meta(result.meta)
    tensors = hf_weights.read_safetensors(model_dir)
    ordered = hf_weights.ordered_tensors(tensors, qwen2.param_shapes(cfg), cfg.tie_word_embeddings, str(model_dir))
    weights_path = out_dir / weights_name(model, dtype)
    size = hf_weights.write_flat(weights_path, list(ordered), dtype, meta.parameter_bytes)
    record = {
        "model": model,
        "model_dir": str(model_dir.resolve()),
        "target": {"name": tgt.name, "recipe": tgt.recipe, "config": tgt.config, "sources": list(tgt.sources),
                   "description": tgt.description, "llvm_cpu_flags": list(tgt.llvm_cpu_flags)},
        "compile_target": target,
        "weights": weights_path.name,
        "parameter_bytes": meta.parameter_bytes,
        "eos_token_ids": hf_weights.eos_token_ids(model_dir),
    }
    say(f"{weights_path} ({size:,} bytes, {len(meta.parameters)} tensors, {dtype}; {time.perf_counter() - t0:.1f}s)")
    if meta.provenance.encoder_sha256:  # the module reads its matrices packed: pack them now, not at first use
        from pcpc.runtime.pack import ensure_packed

        t1 = time.perf_counter()
        packed, _ = ensure_packed(result.vmfb, meta, weights_path)
        say(f"{packed} ({packed.stat().st_size:,} bytes, packed for {result.vmfb.name}; "
            f"{time.perf_counter() - t1:.1f}s)")
    write_atomic(_record_path(out_dir, tgt.name), json.dumps(record, indent=1) + "\n")
    return record


def adapted_weights(result, weights: Path, model_dir: str, adapter: str, say) -> Path:
    """The module's flat weight file with the adapter merged in, written once next to the base's (named by
    a hash of the adapter's files and the base file) and reused."""
    import hashlib

    import numpy as np

    from pcpc.exporters import hf_weights, peft, qwen2
    from pcpc.mlir.signature import load_meta

    meta = load_meta(result.meta)
    h = hashlib.sha256()
    for f in ("adapter_config.json", "adapter_model.safetensors"):
        p = Path(adapter) / f
        h.update(p.read_bytes() if p.is_file() else b"")
    st = weights.stat()
    h.update(f"{weights.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = weights.with_name(f"{weights.name.removesuffix('.bin')}.adapter-{h.hexdigest()[:12]}.bin")
    if out.is_file():
        return out
    qcfg = qwen2.config_from_hf(hf_weights.read_hf_config(Path(model_dir)), where=str(Path(model_dir) / "config.json"))
    arrays = hf_weights.read_flat(weights, meta.parameters, meta.parameter_bytes)
    f32 = {s.name: ((a.astype(np.uint32) << 16).view(np.float32) if s.dtype == "bfloat16" else a)
           for s, a in zip(meta.parameters, arrays)}
    merged, cfg = peft.merge_into(f32, qcfg, adapter)
    dtype = meta.parameters[0].dtype
    hf_weights.write_flat(out, [(s.name, merged[s.name]) for s in meta.parameters], dtype, meta.parameter_bytes)
    say(f"{adapter}: {cfg.type} r {cfg.r} merged into {out.name}")
    return out


@click.command()
@click.option("--model", required=True, help="A model exported with `pcpc export` (name or path).")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeat for a batch.")
@click.option("--prompt-file", type=click.Path(dir_okay=False), default=None,
              help="Binary prompt file of token ids (see `pcpc data prompts`); no chat template applied.")
@click.option("--max-tokens", type=int, default=128, show_default=True)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-p", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--raw", is_flag=True, help="Do not apply the tokenizer's chat template.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--resident", is_flag=True, help="Use the module exported with --resident.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Runtime worker threads.")
@click.option("--adapter", default=None, type=click.Path(file_okay=False),
              help="A peft adapter directory (pcpc's <run dir>/adapter, or one peft saved) to generate with.")
@click.option("--out-dir", default="artifacts", show_default=True, type=click.Path(file_okay=False))
def generate(model, prompts, prompt_file, max_tokens, temperature, top_p, seed, raw, dtype, resident, threads, adapter,
             out_dir):
    """Generate text from prompts; streams one prompt's reply as it is produced."""
    from pcpc.config import load_json
    from pcpc.errors import UserError
    from pcpc.mlir.build import Target, build
    from pcpc.runtime import generate as gen
    from pcpc.runtime.prompts import TextCodec, TextStream, read_prompts

    sampling = gen.SamplingConfig(temperature, top_p, seed)
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be >= 1, got {max_tokens}")
    if bool(prompts) == bool(prompt_file):
        raise UserError("give --prompt TEXT (one or more) or --prompt-file FILE, not both or neither")
    out_dir = Path(out_dir)
    name = artifact_name(model, dtype, resident)
    rec_path = _record_path(out_dir, name)
    if not rec_path.is_file():  # build what is missing, as `pcpc run` does, and say so once
        click.echo(f"{model}: not exported yet ({rec_path} missing); exporting it now with `pcpc export`'s "
                   f"defaults (once)", err=True)
        export_model(model, None, dtype, [1], None, None, None, resident, "llvm-cpu", out_dir,
                     say=lambda m: click.echo("  " + m, err=True))
    record = load_json(rec_path)
    codec = TextCodec(record["model_dir"])
    ids = read_prompts(prompt_file) if prompt_file else [codec.encode(p, chat=not raw) for p in prompts]
    spec = record["target"]
    target = Target(**{**spec, "sources": tuple(spec["sources"]), "llvm_cpu_flags": tuple(spec.get("llvm_cpu_flags", ()))})
    result = build(target, out_dir, record.get("compile_target", "llvm-cpu"))
    weights = out_dir / record["weights"]
    if adapter:
        weights = adapted_weights(result, weights, record["model_dir"], adapter,
                                  say=lambda m: click.echo(m, err=True))
    model_ = gen.QwenModel.load(result.vmfb, weights, threads=threads)

    streams = [TextStream(codec) for _ in ids]
    live = len(ids) == 1

    def on_token(row, token):
        piece = streams[row].push(token)
        if live and piece:
            click.echo(piece, nl=False)
            sys.stdout.flush()

    res = gen.generate(model_, ids, max_tokens, sampling, record.get("eos_token_ids", []), on_token)
    if live:
        click.echo(streams[0].finish())
    else:
        for i, toks in enumerate(res.tokens):
            click.echo(f"--- [{i}] {prompts[i] if prompts else f'prompt {i}'}")
            click.echo(codec.decode(toks))
    n_new = sum(len(t) for t in res.tokens)
    click.echo(
        f"[{len(ids)} prompt(s), {res.prompt_tokens} prompt tokens: prefill {res.prefill_seconds:.2f}s; "
        f"{n_new} new tokens in {res.decode_seconds:.2f}s"
        f" ({res.decode_steps / max(res.decode_seconds, 1e-9):.1f} decode steps/s)]", err=True,
    )
