"""sllmctl migrate NAME --to HOST: move a served model's running requests to another daemon
(token mode), their clients' streams unbroken (docs/migration.md)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.commands._daemon_opts import HOST_HELP, AutostartOpt, _select_host
from sllmctl.output import Out

NAME = "migrate"
FromOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--from", metavar="NAME", help="The source daemon. " + HOST_HELP,
                 callback=_select_host, is_eager=True),
]


def command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    to: Annotated[str, typer.Option("--to", metavar="HOST", help="The destination: a host "
                                    "of the source daemon's hosts file.")],
    request: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--request", metavar="ID", help="Move this request only (default: every one).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List what would move.")] = False,
    source: FromOpt = None,
    autostart: AutostartOpt = None,
    home: HomeOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Move the running requests of a served model to another daemon (token mode)."""
    from sllmctl.wire.client import connect

    result = connect(autostart).call("migrate", {"name": name, "to": to, "request": request,
                                                 "dry_run": int(dry_run)})
    Out(json, quiet).result(result, lambda: print(_human(result)))


def _human(result: dict[str, Any]) -> str:
    reqs = result["requests"]
    if not reqs:
        return f"{result['name']}: no running request to move"
    if result["dry_run"]:
        return "\n".join(f"would move {r['id']} ({r['context']} tokens) to {result['to']}"
                         for r in reqs)
    lines = []
    for r in reqs:
        line = f"{r['id']}: {r['status']}, {r['mode']} mode, {r['rounds']} round(s), " \
               f"{r['tokens_recomputed']} tokens recomputed"
        if r["status"] == "moved":
            line += f", pause {r['pause_s'] * 1000:.0f} ms, total {r['total_s']:.2f} s"
        elif r.get("error"):
            line += f" ({r['error']})"
        lines.append(line)
    return "\n".join(lines)
