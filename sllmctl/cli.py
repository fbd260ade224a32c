"""The `sllmctl` command line: registers one module per command, nothing else.

Every command module keeps torch out of its top level, so `--help` and completion stay fast.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from sllmctl import __version__, paths
from sllmctl.commands import (
    convert,
    daemon,
    demo,
    ls,
    pull,
    rm,
    run,
    serve,
    show,
    status,
    unload,
    verify,
    warm,
)
from sllmctl.output import fail

app = typer.Typer(
    name="sllmctl",
    help="Start large language models fast: convert, store, warm and serve checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,  # static scripts ship in completions/
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for module in (convert, pull, ls, show, rm, verify, warm, unload, status, serve, run, demo):
    app.command(name=module.NAME)(module.command)
app.command(name="ps")(status.ps)
app.add_typer(daemon.app, name=daemon.NAME)


def _version(value: bool) -> None:
    if value:
        print(f"sllmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    home: Annotated[
        Optional[Path],  # noqa: UP045 (typer reads the annotation at run time)
        typer.Option("--home", help="Store root (overrides SLLMCTL_HOME and the config file)."),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    if home is not None:
        paths.set_override("home", str(home))


# typer >= 0.20 ships its own copy of click; older versions use click itself
_click = getattr(typer, "_click", None) or importlib.import_module("click")


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="sllmctl", standalone_mode=False)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        fail(KeyboardInterrupt())
    except _click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except BaseException as e:  # one error path for everything else
        fail(e)
