"""sllmctl serve NAME: serve a model over the daemon's OpenAI-compatible HTTP API."""

from __future__ import annotations

import time
from typing import Annotated, Any, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt, seconds
from sllmctl.commands._daemon_opts import AutostartOpt, DaemonHostOpt
from sllmctl.commands.pull import NoPullOpt, ensure_model
from sllmctl.output import Out

NAME = "serve"
DEFAULT_PORT = 8080


def command(
    name: Annotated[str, typer.Argument(help="Model name, catalogue name or Hub repo id.")],
    host: Annotated[str, typer.Option(help="Address to listen on (loopback unless told "
                                      "otherwise).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = DEFAULT_PORT,
    keep_alive: Annotated[str, typer.Option("--keep-alive", help="How long an idle model "
                                            "stays loaded: 300 (seconds), 30s, 5m, 1h; -1 "
                                            "keeps it.")] = "5m",
    api_key: Annotated[Optional[str], typer.Option("--api-key", help="Require this bearer "  # noqa: UP045
                                                   "token.", envvar="SLLMCTL_API_KEY")] = None,
    detach: Annotated[bool, typer.Option("--detach", help="Return once the model is "
                                         "served (stop it with sllmctl unserve NAME).")] = False,
    autostart: AutostartOpt = None,
    home: HomeOpt = None,
    daemon_host: DaemonHostOpt = None,
    no_pull: NoPullOpt = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Load a model and serve it at /v1 (chat and completions, streaming); Ctrl-C unloads."""
    from sllmctl.wire.client import connect

    out = Out(json, quiet)
    name = ensure_model(name, no_pull, out, autostart)  # pulls a catalogue name or repo id
    args: dict[str, Any] = {"name": name, "host": host, "port": port,
                            "keep_alive": seconds(keep_alive, "--keep-alive"),
                            "api_key": api_key}
    client = connect(autostart)
    try:
        with out.progress(f"loading {name}"):
            result = client.call("serve", args)
        out.result(result, lambda: print(
            f"serving {name} at {result['endpoint']} (loaded from {result['tier']} in "
            f"{result['load_seconds']:.2f} s)" + ("" if detach else "; Ctrl-C to stop"),
            flush=True))
        if not detach:
            _follow(out, client, name)
    except KeyboardInterrupt:
        _unserve(out, client, name)


def _follow(out: Out, client: Any, name: str) -> None:
    """Report requests until the model is unloaded elsewhere (Ctrl-C ends it here)."""
    seen = 0
    while True:
        time.sleep(1)
        served = [s for s in client.call("status")["serving"] if s["name"] == name]
        if not served:
            out.info(f"{name} was unloaded (keep-alive or another command)")
            return
        if served[0]["requests"] != seen:
            seen = served[0]["requests"]
            out.info(f"{name}: {seen} request(s) so far")


def _unserve(out: Out, client: Any, name: str) -> None:
    from sllmctl.errors import NotFound

    try:
        client.call("unserve", {"name": name})
    except NotFound:
        out.info(f"{name} was not being served any more")
        return
    out.info(f"stopped serving {name}")
