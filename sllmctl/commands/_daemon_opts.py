"""Options of the commands that talk to the daemon."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

AutostartOpt = Annotated[
    Optional[bool],  # noqa: UP045 (typer reads the annotation at run time)
    typer.Option("--autostart/--no-autostart",
                 help="Start the daemon if none runs (default: on; SLLMCTL_AUTOSTART=0 "
                 "turns it off)."),
]


# --- issue 15: which daemon (h/remote) -------------------------------------------------------
def _select_host(value: Optional[str]) -> Optional[str]:  # noqa: UP045
    from sllmctl.wire.client import select_host

    select_host(value)  # None too: a flag of an earlier in-process call does not stick
    return value


HOST_HELP = ("Talk to this daemon of the hosts file instead of this host's (see `sllmctl hosts "
             "ls`; default: SLLMCTL_HOST, else this host).")
HostOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--host", metavar="NAME", help=HOST_HELP, callback=_select_host,
                 is_eager=True),
]
# serve's --host is the HTTP address it listens on; there the daemon is --daemon-host
DaemonHostOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--daemon-host", metavar="NAME", help=HOST_HELP, callback=_select_host,
                 is_eager=True),
]
