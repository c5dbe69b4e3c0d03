"""`pcpc build` and `pcpc inspect`."""

from __future__ import annotations

import time
from pathlib import Path

import click

from pcpc.mlir.compile import TARGETS


def register(cli: click.Group, data: click.Group) -> None:
    cli.add_command(build)
    cli.add_command(inspect)


@click.command()
@click.argument("names", nargs=-1)
@click.option("--list", "list_", is_flag=True, help="List the known targets.")
@click.option("--target", default="llvm-cpu", type=click.Choice(TARGETS), show_default=True,
              help="Compile target (llvm-cpu compiles for this host's CPU).")
@click.option("--arch", default=None, help="GPU architecture, e.g. sm_90 or gfx942 (detected for cuda; "
              "past sm_89, cuda gets sm_89 PTX, which the driver JIT-compiles).")
@click.option("--out-dir", default="artifacts", show_default=True, type=click.Path(file_okay=False))
def build(names, list_, target, arch, out_dir):
    """Build targets into artifacts/ (cached: unchanged inputs rebuild nothing)."""
    from pcpc.errors import UserError
    from pcpc.mlir.build import start_build
    from pcpc.mlir.targets import TARGETS as KNOWN, get_target

    if list_ or not names:
        if not list_:
            raise UserError("pcpc build: name a target (see `pcpc build --list`)")
        for t in KNOWN.values():
            click.echo(f"{t.name:24s} {t.description}")
        return
    targets = [get_target(name) for name in names]  # every name checked before anything is built
    started = []  # each export runs beside the compiles started before it (mlir/build.py start_build)
    for t in targets:
        started.append((time.perf_counter(), start_build(t, Path(out_dir), target, arch, log=click.echo)))
    for t0, pending in started:
        result = pending.wait()
        took = time.perf_counter() - t0
        steps = ", ".join(f"{k} {v:.1f}s" for k, v in result.seconds.items()) or "up to date"
        click.echo(f"{result.vmfb} ({steps}; {took:.2f}s)")


@click.command()
@click.argument("vmfb", type=click.Path(dir_okay=False))
def inspect(vmfb):
    """Print a module's signature (from its meta.json, checked against the VMFB)."""
    from pcpc.runtime.module import CompiledModule

    mod = CompiledModule(vmfb)
    meta = mod.meta
    prov = meta.provenance
    click.echo(f"{vmfb}: target {prov.target_name}, compiled for {prov.compile_target}")
    click.echo("  versions: " + ", ".join(f"{k} {v}" for k, v in prov.versions.items()))
    click.echo(f"  flags: {' '.join(prov.compile_flags)}")
    click.echo(f"  parameters: {len(meta.parameters)} tensors, {meta.parameter_bytes:,} bytes")
    for part in prov.parts:
        click.echo(f"  compiled in parts: {part.file} holds {', '.join(part.functions)}")
    for name, sig in meta.functions.items():
        click.echo(f"  {name}:")
        for kind, specs in (("arg", sig.args), ("result", sig.results)):
            for s in _summarise(specs):
                click.echo(f"    {kind:6s} {s}")


def _summarise(specs):
    """Group runs of params/optimizer state so a 290-weight signature stays readable."""
    out, i = [], 0
    while i < len(specs):
        s = specs[i]
        j = i
        while j + 1 < len(specs) and specs[j + 1].role == s.role and s.role in ("param", "optimizer_state", "grad"):
            j += 1
        if j > i:
            out.append(f"{s.role} x{j - i + 1}: {s.name} … {specs[j].name}")
        else:
            out.append(f"{s.name}: {s.role} {s.dtype}{list(s.shape)}")
        i = j + 1
    return out
