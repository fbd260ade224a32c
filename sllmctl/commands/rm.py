"""sllmctl rm NAME: remove a model from the store."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt, YesOpt
from sllmctl.errors import SllmError
from sllmctl.output import Out

NAME = "rm"


def command(
    names: Annotated[list[str], typer.Argument(help="Model name(s).")],
    yes: YesOpt = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Say what would go.")] = False,
    home: HomeOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Remove models from the store."""
    from sllmctl.catalogue import stored_name
    from sllmctl.store.store import Store

    out = Out(json, quiet)
    store = Store()
    names = [stored_name(n) for n in names]  # a repo id names the model pulled as org--model
    for name in names:
        store.path(name)  # fail before removing anything if one name is wrong
    if not (yes or dry_run):
        if not sys.stdin.isatty():
            raise SllmError("rm needs --yes when not run from a terminal",
                            hint=f"sllmctl rm {' '.join(names)} --yes")
        if not typer.confirm(f"remove {', '.join(names)}?", err=True):
            raise SllmError("nothing removed")
    if not dry_run:
        for name in names:
            store.remove(name)
    data = {"removed": [] if dry_run else names, "would_remove": names if dry_run else []}
    out.result(data, lambda: print(
        "\n".join(f"{'would remove' if dry_run else 'removed'} {n}" for n in names)))
