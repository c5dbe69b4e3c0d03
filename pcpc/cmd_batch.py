"""`pcpc batch`: batches of runs (runtime/batch/): run, validate, status, diagnose, summary.

    pcpc batch validate experiments/ablations.yaml
    pcpc batch run experiments/ablations.yaml [--list | --dry-run] [--only a,b] [--exclude a,b]
        [--skip-completed] [--overwrite] [--parallel N] [--gpu-ids 0,1] [--out DIR] [--no-progress]
        [--executor local|slurm|submitit-local [--partition P] [--time-min M] [--gpus-per-run G] [--cpus-per-run C]]
    pcpc batch status runs/ablations [--verbose] [--watch [S]] [--json]
    pcpc batch diagnose runs/ablations [--lines N] [--verbose]
    pcpc batch summary runs/ablations [--stdout]
"""

from __future__ import annotations


import click


def register(cli: click.Group, data: click.Group) -> None:
    cli.add_command(batch)


@click.group()
def batch():
    """Batches of runs: a base config, named experiments and a matrix (YAML or JSON)."""


def _load(file):
    from pcpc.runtime.batch.spec import load_batch

    return load_batch(file)


@batch.command()
@click.argument("file", type=click.Path(dir_okay=False))
def validate(file):
    """Check every experiment of FILE with the loaders `pcpc run` uses; list every error."""
    from pcpc.errors import UserError
    from pcpc.runtime.batch.spec import validate as check

    b = _load(file)
    errors = check(b)
    for e in errors:
        click.echo(f"error: {e}", err=True)
    if errors:
        raise UserError(f"{file}: {len(errors)} error{'s' if len(errors) > 1 else ''} in "
                        f"{len(b.experiments)} experiments")
    click.echo(f"{file}: {len(b.experiments)} experiments, all valid")


@batch.command()
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--list", "list_", is_flag=True, help="List the experiments and stop.")
@click.option("--dry-run", is_flag=True, help="Print each run's command (and estimated duration) and stop.")
@click.option("--only", default=None, metavar="A,B", help="Run only these experiments.")
@click.option("--exclude", default=None, metavar="A,B", help="Leave these experiments out.")
@click.option("--skip-completed", is_flag=True, help="Skip completed runs; resume stopped or failed ones from "
              "their checkpoint.")
@click.option("--overwrite", is_flag=True, help="Start over the runs the output tree already holds.")
@click.option("--parallel", default=1, show_default=True, type=click.IntRange(min=1), help="Runs at once.")
@click.option("--gpu-ids", default="", metavar="0,1", help="GPUs to hand out, one per parallel slot.")
@click.option("--out", "out", default=None, type=click.Path(file_okay=False),
              help="Output tree (default: runs/<batch name>).")
@click.option("--no-progress", is_flag=True, help="No progress output (the end summary only).")
@click.option("--executor", type=click.Choice(["local", "slurm", "submitit-local"]), default="local",
              show_default=True, help="Local processes, Slurm jobs (submitit), or submitit's local executor.")
@click.option("--partition", default=None, help="Slurm partition.")
@click.option("--time-min", default=240, show_default=True, type=click.IntRange(min=1),
              help="Slurm time limit per run, minutes.")
@click.option("--gpus-per-run", default=0, show_default=True, type=click.IntRange(min=0), help="Slurm GPUs per run.")
@click.option("--cpus-per-run", default=None, type=click.IntRange(min=1),
              help="Slurm CPUs per run (and its threads).")
@click.pass_context
def run(ctx, file, list_, dry_run, only, exclude, skip_completed, overwrite, parallel, gpu_ids, out, no_progress,
        executor, partition, time_min, gpus_per_run, cpus_per_run):
    """Run the experiments of FILE as `pcpc run` processes (here, or as Slurm jobs)."""
    from pcpc.errors import UserError
    from pcpc.runtime.batch import runner
    from pcpc.runtime.batch.spec import validate as check

    b = _load(file)
    selected = b.select(only, exclude)
    if list_:
        for e in selected:
            click.echo(f"{e.name:32s} {e.group}")
        click.echo(f"{len(selected)} of {len(b.experiments)} experiments")
        return
    errors = check(b)
    if errors:
        for e in errors:
            click.echo(f"error: {e}", err=True)
        raise UserError(f"{file}: {len(errors)} error(s); nothing was run (`pcpc batch validate {file}`)")
    from pcpc.runtime.batch.executors import SlurmOptions

    if executor == "local" and (partition or gpus_per_run or cpus_per_run):
        raise UserError("--partition, --gpus-per-run and --cpus-per-run are for --executor slurm")
    opts = runner.Options(runner.out_dir(b, out), parallel, tuple(g for g in gpu_ids.split(",") if g),
                          skip_completed, overwrite, not no_progress, click.echo, executor,
                          SlurmOptions(partition, time_min, gpus_per_run, cpus_per_run))
    if dry_run:
        for job in runner.plan(b, selected, opts):
            est = runner.estimate(job, opts.out)
            click.echo(f"{job.exp.name}: {job.action}" + (f", ~{runner.hms(est)} (earlier runs of this shape)"
                                                         if est else ""))
            if job.action != "skip":
                click.echo("  " + " ".join(job.argv()))
        return
    finals = runner.run_batch(b, selected, opts)
    counts = {}
    for state in finals.values():
        counts[state] = counts.get(state, 0) + 1
    click.echo(f"batch {b.name}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) + f"; {opts.out}")
    retry = [n for n, s in finals.items() if s in ("failed", "stopped", "not started")]
    if retry:
        click.echo(f"to run the rest: pcpc batch run {file} --out {opts.out} --skip-completed --only {','.join(retry)}")
    if any(s == "stopped" for s in finals.values()) or "not started" in finals.values():
        ctx.exit(130)
    if any(s == "failed" for s in finals.values()):
        ctx.exit(1)


@batch.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--verbose", is_flag=True, help="A line for every run, not only the running ones.")
@click.option("--watch", default=None, type=float, is_flag=False, flag_value=10.0, metavar="[SECONDS]",
              help="Refresh every SECONDS (default 10) until the runner ends.")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def status(out, verbose, watch, as_json):
    """How the runs of the batch output tree OUT stand, read from the runs themselves."""
    import json
    import time

    from pcpc.runtime.batch.reports import format_status, status_report

    while True:
        rep = status_report(out, verbose)
        text = json.dumps(rep, indent=1) if as_json else format_status(rep, verbose)
        if watch:
            click.clear()
        click.echo(text)
        if not watch or rep["runner"]["state"] != "running":
            return
        time.sleep(watch)


@batch.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--lines", default=20, show_default=True, type=click.IntRange(min=0), help="Log lines shown per run.")
@click.option("--verbose", is_flag=True, help="Every run of each kind, not only the first.")
def diagnose(out, lines, verbose):
    """The failed and stopped runs of OUT grouped by kind, with their log lines and a fix."""
    from pcpc.runtime.batch.reports import diagnose as find, format_diagnosis

    click.echo(format_diagnosis(find(out, lines), verbose))


@batch.command()
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--stdout", "to_stdout", is_flag=True, help="Print SUMMARY.md instead of only writing it.")
def summary(out, to_stdout):
    """Write OUT/SUMMARY.md: progress, final metrics per run and per group, curves, storage, failures."""
    from pathlib import Path

    from pcpc.runtime.batch.reports import summary as write

    text = write(out)
    click.echo(text if to_stdout else f"{Path(out) / 'SUMMARY.md'}")
