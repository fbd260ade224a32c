"""sllmctl verify NAME: recompute every checksum of a stored model."""

from __future__ import annotations

from typing import Annotated

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.errors import CorruptCheckpoint
from sllmctl.output import Out, human_size

NAME = "verify"


def command(
    name: Annotated[str, typer.Argument(help="Model name.")],
    home: HomeOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Check every chunk and file of a model against its checksum (exit 1 if any fails)."""
    from sllmctl.store.reader import verify
    from sllmctl.store.store import Store

    out = Out(json, quiet)
    total = Store().get(name).manifest.total_bytes
    with out.progress(f"verifying {name}", total) as bar:
        report = verify(name, progress=bar.advance)
    if report.ok:
        out.result(report.to_dict(), lambda: print(
            f"{name}: ok ({report.chunks} chunks, {human_size(report.bytes)})"))
        return
    if json:
        out.result(report.to_dict())
    first = report.bad[0]
    more = f" (and {len(report.bad) - 1} more)" if len(report.bad) > 1 else ""
    raise CorruptCheckpoint(
        f"model {name}: {first['file']}: {first['error']}{more}",
        hint=f"convert it again with --force, or remove it: sllmctl rm {name}",
    )
