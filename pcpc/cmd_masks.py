"""`pcpc masks`: find sparse masks from a run's delta log, compare them, summarise them (runtime/masks.py).

    pcpc masks find --deltas runs/grpo --method magnitude --sparsity-percent 90 --target-step 100
    pcpc masks compare masks/a.safetensors masks/b.safetensors
    pcpc masks stats masks/sparsity_90pct_magnitude_step100.safetensors
"""

from __future__ import annotations

import json
from pathlib import Path

import click


def register(cli: click.Group, data: click.Group) -> None:
    cli.add_command(masks)


@click.group()
def masks():
    """Sparse masks: which weights a sparse run trains."""


@masks.command()
@click.option("--deltas", "run", required=True, type=click.Path(file_okay=False), help="A run with a delta log.")
@click.option("--method", required=True,
              type=click.Choice(["magnitude", "momentum", "delta-variance", "fisher", "random"]),
              help="How weights are scored (runtime/masks.py); fisher: the squared gradients the run summed "
                   "(delta_log.fisher_batches).")
@click.option("--sparsity-percent", type=float, required=True, help="Percent of the weights left frozen.")
@click.option("--target-step", type=int, default=None,
              help="The logged step the scores are taken at (required; fisher: the last step its sum covers).")
@click.option("--momentum-window", type=int, default=25, show_default=True, help="momentum: logged steps used.")
@click.option("--mlp-only", is_flag=True, help="Train MLP weights only (every other tensor frozen).")
@click.option("--min-keep-percent", type=float, default=0.25, show_default=True,
              help="Every eligible tensor keeps at least this percent of its entries.")
@click.option("--invert", is_flag=True, help="Keep the lowest-scoring weights instead (a baseline).")
@click.option("--seed", type=int, default=0, show_default=True, help="random: the seed.")
@click.option("--out", default=None, type=click.Path(dir_okay=False),
              help="Mask file (default: masks/<model>/sparsity_<P>pct_<method>_step<N>.safetensors, the model "
                   "name of the run sanitised: google/gemma-3-270m-it -> google_gemma_3_270m_it).")
def find(run, method, sparsity_percent, target_step, momentum_window, mlp_only, min_keep_percent, invert, seed,
         out):
    """Score the weights from RUN's delta log and keep the top ones."""
    from pcpc.runtime import masks as m

    found, record = m.find(run, method, sparsity_percent, target_step, momentum_window, mlp_only,
                           min_keep_percent, invert, seed)
    target_step = record["target_step"]
    model = m.model_of(Path(run))
    folder = Path("masks") / m.sanitize(model) if model else Path("masks")
    path = Path(out) if out else folder / (m.mask_name(method, sparsity_percent, target_step, momentum_window,
                                                        invert) + ".safetensors")
    path = m.save(path, found, record)
    click.echo(f"{path}: {record['kept']:,} of {record['weights']:,} weights trained "
               f"({100 * record['density']:.3f}%); record {m.record_path(path)}")


@masks.command()
@click.argument("a", type=click.Path(dir_okay=False))
@click.argument("b", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def compare(a, b, as_json):
    """The overlap of masks A and B: Jaccard index (aggregate and per layer) against chance."""
    from pcpc.runtime import masks as m

    report = m.compare(m.load(a), m.load(b), (a, b))
    if as_json:
        click.echo(json.dumps(report, indent=1))
        return
    click.echo(f"Jaccard {report['jaccard']:.4f} (chance {report['chance_jaccard']:.4f}); "
               f"{100 * report['a_in_b']:.2f}% of A in B, {100 * report['b_in_a']:.2f}% of B in A; "
               f"densities {100 * report['density_a']:.3f}% / {100 * report['density_b']:.3f}%")
    for layer, r in report["layers"].items():
        click.echo(f"  {layer:<40} Jaccard {r['jaccard']:.4f}  chance {r['chance_jaccard']:.4f}")


@masks.command()
@click.argument("mask", type=click.Path(dir_okay=False))
def stats(mask):
    """Per layer: the share of weights MASK trains."""
    from pcpc.runtime import masks as m
    from pcpc.runtime.run.deltas import layer_of

    loaded = m.load(mask)
    layers: dict[str, list[int]] = {}
    for name, v in loaded.items():
        acc = layers.setdefault(layer_of(name), [0, 0])
        acc[0] += int(v.sum())
        acc[1] += v.size
    kept, total = sum(x[0] for x in layers.values()), sum(x[1] for x in layers.values())
    click.echo(f"{mask}: {kept:,} of {total:,} weights trained ({100 * kept / total:.3f}%)")
    for layer, (k, n) in layers.items():
        click.echo(f"  {layer:<40} {n:>12,}  {100 * k / n:7.3f}%")
