"""sllmctl warm NAME: make a model resident in the DRAM or GPU tier."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.commands._daemon_opts import AutostartOpt, HostOpt
from sllmctl.commands.pull import NoPullOpt, ensure_model
from sllmctl.output import Out, human_size

NAME = "warm"


def command(
    name: Annotated[str, typer.Argument(help="Model name, catalogue name or Hub repo id.")],
    tier: Annotated[str, typer.Option("--tier", help="dram or gpu.")] = "dram",
    gpu: Annotated[Optional[int], typer.Option("--gpu", help="GPU index (default: the one "  # noqa: UP045
                                                "with the most free memory).")] = None,
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="Return once resident, or as "
                                       "soon as the daemon accepts the job.")] = True,
    autostart: AutostartOpt = None,
    home: HomeOpt = None,
    host: HostOpt = None,
    no_pull: NoPullOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Load a model into a faster tier; exit 0 once it is resident there."""
    from sllmctl.errors import UsageError
    from sllmctl.wire.client import connect

    if tier not in ("dram", "gpu"):
        raise UsageError(f"unknown tier {tier!r}", hint="use --tier dram or --tier gpu")
    out = Out(json, quiet)
    name = ensure_model(name, no_pull, out, autostart)  # pulls a catalogue name or repo id
    args: dict[str, Any] = {"name": name, "tier": tier, "gpu": gpu}
    client = connect(autostart)
    if not wait:
        client.call("warm", args, wait=False)
        out.result({"name": name, "tier": tier, "accepted": True},
                   lambda: print(f"warming {name} into {tier} (not waiting)"))
        return
    with out.progress(f"warming {name} ({tier})") as bar:
        shown = [0]

        def on_event(ev: dict[str, Any]) -> None:
            if ev.get("total"):
                bar.set_total(ev["total"])
                bar.advance(ev["done"] - shown[0])
                shown[0] = ev["done"]

        result = client.call("warm", args, on_event=on_event)
    out.result(result, lambda: print(
        f"{name}: resident in {tier}"
        + (f" (GPU {result['gpu']}, from {result['loaded_from']})" if tier == "gpu" else "")
        + f", {human_size(result['bytes'])} in {result['seconds']:.2f} s"))
