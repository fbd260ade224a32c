"""Options shared by every command."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Optional

import typer


def _set_home(value: Optional[Path]) -> Optional[Path]:  # noqa: UP045
    """--home, before or after the subcommand: a flag beats SLLMCTL_HOME and the config file.
    It goes into the environment too, so that a daemon this command starts uses it."""
    if value is not None:
        from sllmctl import paths

        paths.set_override("home", str(value))
        os.environ["SLLMCTL_HOME"] = str(value)
    return value


HOME_HELP = "Store root (overrides SLLMCTL_HOME and the config file)."
HomeOpt = Annotated[
    Optional[Path],  # noqa: UP045 (typer reads the annotation at run time)
    typer.Option("--home", help=HOME_HELP, callback=_set_home, is_eager=True),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


def quiet_opt(help: str) -> Any:
    """A -q/--quiet option whose help says what -q means for this command."""
    return typer.Option("--quiet", "-q", help=help)


QuietOpt = Annotated[bool, quiet_opt("Print nothing but errors (the exit code tells the "
                                     "outcome).")]


def seconds(value: str, flag: str) -> float:
    """A duration flag (`5m`, `1h`, `30s`, `300`, `-1`) in seconds; a usage error if not."""
    from sllmctl.durations import EXAMPLES, parse_duration
    from sllmctl.errors import UsageError

    try:
        return parse_duration(value)
    except ValueError:
        raise UsageError(f"{flag} wants a duration, not {value!r}", hint=EXAMPLES) from None
