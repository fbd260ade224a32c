"""sllmctl unload NAME: drop a model from the daemon's tiers (the store keeps it)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.commands._daemon_opts import AutostartOpt, HostOpt
from sllmctl.output import Out

NAME = "unload"


def command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    tier: Annotated[Optional[str], typer.Option("--tier", help="dram or gpu (default: "  # noqa: UP045
                                                 "both).")] = None,
    autostart: AutostartOpt = None,
    home: HomeOpt = None,
    host: HostOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Unload a model from the GPU and/or DRAM tier."""
    from sllmctl.wire.client import connect

    result = connect(autostart).call("unload", {"name": name, "tier": tier})
    Out(json, quiet).result(result, lambda: print(
        f"{name}: unloaded from {', '.join(result['unloaded'])}"))
