"""`pcpc deltas`: read a run's delta log (runtime/run/deltas.py).

    pcpc deltas list runs/grpo                           the logged steps, their sizes and update density
    pcpc deltas reconstruct runs/grpo --step 20 --out ckpt/step_20     the weights at step 20, bit for bit
    pcpc deltas stats runs/grpo [--step 20] [--tol 1e-5]  per layer: the fraction of weights not updated
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import click

from pcpc.cmd_peft import COPIED


def register(cli: click.Group, data: click.Group) -> None:
    cli.add_command(deltas)


@click.group()
def deltas():
    """A run's delta log: list the steps, reconstruct the weights at one, measure the updated subnetwork."""


def _run_dir(run: str) -> Path:
    from pcpc.errors import UserError

    path = Path(run)
    if not path.is_dir():
        raise UserError(f"RUN {run}: no such run directory")
    return path


@deltas.command("list")
@click.argument("run")
def list_steps(run):
    """The logged steps of RUN: file size and the share of weights changed since step 0."""
    from pcpc.runtime.run import deltas as d

    index = d.read_index(_run_dir(run))
    total = index["total"]
    click.echo(f"{run}: {len(index['names'])} tensors, {total:,} weights; base {run}/{d.DIR}/base.safetensors")
    click.echo(f"{'step':>8} {'bytes':>14} {'changed':>14} {'density':>9}")
    for step in d.logged_steps(index):
        e = index["steps"][str(step)]
        click.echo(f"{step:>8} {e['bytes']:>14,} {e['changed']:>14,} {100 * e['changed'] / total:>8.3f}%")
    f = index.get("fisher")
    if f:
        click.echo(f"Fisher: squared gradients of {f['batches']} batches (steps {f['steps'][0]}..{f['steps'][1]}), "
                   f"{f['bytes']:,} bytes in {run}/{d.DIR}/{f['file']} (pcpc masks find --method fisher)")


@deltas.command()
@click.argument("run")
@click.option("--step", type=int, required=True, help="A logged step (0: the weights the run began with).")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Directory for model.safetensors (and, for a run from a HF model, its config and tokenizer).")
@click.option("--flat", "flat", type=click.Path(dir_okay=False), default=None,
              help="Also write the weights as a flat file (the training module's layout).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def reconstruct(run, step, out, flat, overwrite):
    """Write RUN's weights at --step, exactly as the run held them."""
    from safetensors.numpy import save_file

    from pcpc.errors import UserError
    from pcpc.runtime.run import deltas as d

    run_dir, out = _run_dir(run), Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; pass --overwrite or choose another directory")
    index = d.read_index(run_dir)
    weights = d.weights_at(run_dir, step, index)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: w for n, w in zip(index["names"], weights)}, str(tmp / "model.safetensors"),
              metadata={"format": "pt", "pcpc_run": str(run_dir), "pcpc_step": str(step)})
    written = ["model.safetensors", *_copy_model_files(run_dir, tmp)]
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if flat:
        from pcpc.exporters.hf_weights import write_flat

        write_flat(Path(flat), list(zip(index["names"], weights)), "float32", 4 * index["total"])
        written.append(str(flat))
    click.echo(f"{out}: step {step} of {run}: {', '.join(written)}")


def _copy_model_files(run_dir: Path, out: Path) -> list[str]:
    """A GRPO / DPO run's HF model files (config, tokenizer), when the run trained every weight of one."""
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return []
    exp = cfg.get("experiment", {})
    if cfg.get("kind") not in ("grpo", "dpo") or exp.get("peft") or not exp.get("model"):
        return []
    from pcpc.errors import UserError
    from pcpc.exporters.hf_weights import find_model_dir

    try:
        model_dir = find_model_dir(exp["model"])
    except UserError:
        return []
    copied = []
    for name in COPIED:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, out / name)
            copied.append(name)
    return copied


@deltas.command()
@click.argument("run")
@click.option("--step", type=int, default=None, help="A logged step (default: the last).")
@click.option("--tol", type=float, default=1e-5, show_default=True,
              help="An update counts as zero when |θ_step - θ_0| <= tol (Mukherjee et al. 2025).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(run, step, tol, as_json):
    """Per layer and in all: the fraction of weights whose update since step 0 is zero at --tol."""
    import numpy as np

    from pcpc.errors import UserError
    from pcpc.runtime.run import deltas as d

    run_dir = _run_dir(run)
    index = d.read_index(run_dir)
    steps = d.logged_steps(index)
    if not steps:
        raise UserError(f"{run}: the delta log has no steps yet")
    step = steps[-1] if step is None else step
    base = d.read_base(run_dir, index)
    now = d.weights_at(run_dir, step, index, base)
    layers: dict[str, list[int]] = {}
    for name, b, w in zip(index["names"], base, now):
        same = int(np.count_nonzero(np.abs(w.astype(np.float64) - b) <= tol))
        acc = layers.setdefault(d.layer_of(name), [0, 0])
        acc[0] += same
        acc[1] += b.size
    total_same, total = sum(v[0] for v in layers.values()), sum(v[1] for v in layers.values())
    report = {"run": str(run_dir), "step": step, "tol": tol, "weights": total,
              "unchanged_fraction": total_same / total,
              "layers": {k: {"weights": n, "unchanged_fraction": s / n} for k, (s, n) in layers.items()}}
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(f"{run} step {step}: {100 * (1 - report['unchanged_fraction']):.2f}% of {total:,} weights updated "
               f"(|Δ| > {tol:g}); {100 * report['unchanged_fraction']:.2f}% unchanged")
    for k, v in report["layers"].items():
        click.echo(f"  {k:<40} {v['weights']:>12,}  {100 * (1 - v['unchanged_fraction']):7.2f}% updated")
