"""The `sllmctl` command line: registers one module per command, nothing else.

Every command module keeps torch out of its top level, so `--help` and completion stay fast.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from sllmctl._version import __version__
from sllmctl.commands import (
    completion,
    convert,
    daemon,
    daemon_keys,
    demo,
    hosts,
    ls,
    migrate,
    pull,
    rm,
    run,
    serve,
    show,
    status,
    unload,
    unserve,
    verify,
    warm,
)
from sllmctl.commands._common import HomeOpt
from sllmctl.errors import EXIT_INTERRUPTED
from sllmctl.output import fail, print_json_error

app = typer.Typer(
    name="sllmctl",
    help="Start large language models fast: convert, store, warm and serve checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,  # `sllmctl completion SHELL` prints static scripts instead
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)

for module in (convert, pull, ls, show, rm, verify, warm, unload, status, serve, unserve, run,
               demo, completion):
    app.command(name=module.NAME)(module.command)
app.command(name="ps")(status.ps)
app.add_typer(daemon.app, name=daemon.NAME)
# keys, reload and the hosts file
daemon.app.command("keys")(daemon_keys.keys)
daemon.app.command("reload")(daemon_keys.reload)
app.add_typer(hosts.app, name=hosts.NAME)
app.command(name=migrate.NAME)(migrate.command)


def _version(value: bool) -> None:
    if value:
        print(f"sllmctl {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    home: HomeOpt = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
) -> None:
    return None  # both options act through their callbacks


def _wants_json(argv: list[str]) -> bool:
    args = argv[: argv.index("--")] if "--" in argv else argv
    return "--json" in args


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    json_mode = _wants_json(args)
    try:
        # without standalone mode typer turns Ctrl-C into a returned 130 (and click's
        # Ctrl-D at a prompt into Abort)
        rc = app(args=args, prog_name="sllmctl", standalone_mode=False)
        if rc == EXIT_INTERRUPTED:
            raise KeyboardInterrupt
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        fail(KeyboardInterrupt(), json_mode)
    except typer.TyperException as e:  # click's usage errors (typer >= 0.28 vendors click)
        if json_mode:
            ctx = getattr(e, "ctx", None)
            where = getattr(ctx, "command_path", None) or "sllmctl"
            print_json_error("usage", e.format_message(), f"{where} --help")
        show = getattr(e, "show", None)
        if show is not None:
            show()
        else:
            print(f"error: {e.format_message()}", file=sys.stderr)
        sys.exit(e.exit_code)
    except SystemExit:
        raise
    except BaseException as e:  # one error path for everything else
        fail(e, json_mode)
