"""The `pcpc` command line.

Commands live in small modules (pcpc/cmd_*.py) that import heavy libraries
inside the command body, so `pcpc --help` and no-op builds stay fast. A
UserError prints one line and exits with status 2; so does an OSError (a
folder that cannot be written, a disk that is full), naming the path.
`--debug` shows the traceback, and the details an error carries (a
compiler's output, a failed worker's traceback).
"""

from __future__ import annotations

import sys

import click

from pcpc.errors import UserError


class _Group(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except (UserError, OSError) as e:
            if ctx.obj and ctx.obj.get("debug"):
                if getattr(e, "details", ""):
                    click.echo(e.details, err=True)
                raise
            click.echo(f"error: {_one_line(e)}", err=True)
            ctx.exit(2)


def _one_line(e: Exception) -> str:
    if isinstance(e, UserError):
        return str(e)
    where = f": {e.filename}" if e.filename else ""
    return f"{e.strerror or type(e).__name__}{where}" if e.strerror else f"{type(e).__name__}: {e}"


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
@click.version_option(package_name="pcpc")
@click.pass_context
def cli(ctx, debug):
    """pcpc: functional models -> MLIR -> IREE VMFB, and the loops that drive them."""
    ctx.ensure_object(dict)["debug"] = debug


@cli.group()
def data():
    """Datasets and prompt files."""


def _register():
    from pcpc import cmd_build

    cmd_build.register(cli, data)
    __import__("pcpc.cmd_qwen", fromlist=["register"]).register(cli, data)
    __import__("pcpc.cmd_prompts", fromlist=["register"]).register(cli, data)
    __import__("pcpc.cmd_run", fromlist=["register"]).register(cli, data)
    __import__("pcpc.cmd_data", fromlist=["register"]).register(cli, data)
    __import__("pcpc.cmd_batch", fromlist=["register"]).register(cli, data)
    __import__("pcpc.cmd_peft", fromlist=["register"]).register(cli, data)
    __import__("pcpc.cmd_deltas", fromlist=["register"]).register(cli, data)
    __import__("pcpc.cmd_masks", fromlist=["register"]).register(cli, data)


_register()


def main(argv=None):
    from pcpc.runtime.host_memory import use_in_this_process

    use_in_this_process()  # pcpc's own process: CPU modules keep their freed pages (runtime/host_memory.py)
    try:
        cli.main(args=argv, prog_name="pcpc", standalone_mode=True)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
