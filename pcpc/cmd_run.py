"""`pcpc run CONFIG`: run an experiment file through its loop (pcpc/kinds.py).

A DiLoCo file (experiments/nanogpt_small.json) trains with runtime/train/diloco.py;
a file with a "grpo_config" or "dpo_config" key goes to the GRPO or DPO loop.
Exit status: 0 done, 2 a mistake in the input (one line), 1 a worker that
failed or died, 130 stopped by Ctrl+C (checkpoint saved).
"""

from __future__ import annotations

import json

import click


def register(cli: click.Group, data: click.Group) -> None:
    cli.add_command(run)


def apply_overrides(raw: dict, overrides: tuple[str, ...]) -> dict:
    """--set KEY=VALUE (VALUE as JSON, else a string; KEY may be dotted for nested objects)."""
    from pcpc.errors import UserError

    raw = json.loads(json.dumps(raw))
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        *parents, leaf = key.split(".")
        node = raw
        for p in parents:
            if not isinstance(node.get(p), dict):
                raise UserError(f"--set {key}: {p!r} is not an object in the config")
            node = node[p]
        node[leaf] = value
    return raw


@click.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--resume", is_flag=True, help="Continue from the last checkpoint in the run directory.")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False),
              help="Run directory (default: runs/<config file name>).")
@click.option("--overwrite", is_flag=True, help="Start over in a run directory that already holds a run.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config field, VALUE in JSON (repeatable), e.g. --set outer_loop_steps=5.")
@click.option("--max-restarts", default=0, show_default=True, type=click.IntRange(min=0),
              help="If a worker dies, relaunch from the last checkpoint up to this many times.")
@click.option("--quiet", is_flag=True, help="No progress bar or per-round messages.")
@click.pass_context
def run(ctx, config, resume, out_dir, overwrite, overrides, max_restarts, quiet):
    """Run an experiment: DiLoCo training, GRPO or DPO, as the CONFIG file describes.

    \b
    pcpc run experiments/nanogpt_small.json
    pcpc run experiments/nanogpt_small.json --resume
    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d --rdzv-endpoint HOST:29500 --no-python \\
        pcpc run experiments/nanogpt_small.json
    """
    from pcpc.config import load_json
    from pcpc.kinds import run_experiment
    from pcpc.runtime.run.launch import WorkerFailure

    raw = apply_overrides(load_json(config), overrides)
    try:
        summary = run_experiment(config, raw, out_dir=out_dir, resume=resume, overwrite=overwrite,
                                 max_restarts=max_restarts, quiet=quiet, say=click.echo)
    except WorkerFailure as e:
        click.echo(f"error: {e}", err=True)
        if ctx.obj and ctx.obj.get("debug") and e.details:
            click.echo(e.details, err=True)
        ctx.exit(1)
    if summary and summary.get("stopped"):
        ctx.exit(130)
