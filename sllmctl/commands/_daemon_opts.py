"""Options and helpers of the commands that talk to the daemon."""

from __future__ import annotations

import sys
from typing import Annotated, Any, Optional

import typer

AutostartOpt = Annotated[
    Optional[bool],  # noqa: UP045 (typer reads the annotation at run time)
    typer.Option("--autostart/--no-autostart",
                 help="Start the daemon if none runs (default: on; SLLMCTL_AUTOSTART=0 "
                 "turns it off)."),
]


def connect_telling(autostart: bool | None, quiet: bool = False) -> Any:
    """A client for the daemon, as `client.connect`; when this call had to start one, say so
    in one line on stderr (a read-only command should not start a daemon silently)."""
    import os

    from sllmctl.wire import client

    before = client.read_connection()
    running = (os.environ.get("SLLMCTL_DAEMON") or client.selected_host() is not None
               or (before and client.alive(before.pid)))  # a remote daemon is never started
    c = client.connect(autostart)
    if not running and not quiet:
        after = client.read_connection()
        pid = after.pid if after else "?"
        pool = _pool(c)
        print(f"sllmctl: started a daemon (pid {pid}, DRAM pool {pool}); stop it with: "
              "sllmctl daemon stop", file=sys.stderr)
    return c


def _pool(c: Any) -> str:
    from sllmctl.errors import SllmError
    from sllmctl.output import human_size

    try:
        dram = c.call("status").get("dram")
    except SllmError:  # the notice must never turn a working command into a failing one
        dram = None
    if dram and dram.get("capacity"):
        return human_size(dram["capacity"])
    return "25 % of RAM, being set up"
# --- which daemon: this host's, or one of the hosts file ------------------------------------
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
