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
