"""sllmctl unserve NAME: stop serving a model over HTTP (e.g. one served with --detach)."""

from __future__ import annotations

from typing import Annotated

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.commands._daemon_opts import HostOpt
from sllmctl.output import Out

NAME = "unserve"


def command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    home: HomeOpt = None,
    host: HostOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Stop serving a model over HTTP and unload its serving copy (never starts a daemon)."""
    from sllmctl.wire.client import connect

    result = connect(autostart=False).call("unserve", {"name": name})
    Out(json, quiet).result(result, lambda: print(f"stopped serving {name}"))
