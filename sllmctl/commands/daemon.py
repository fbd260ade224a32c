"""sllmctl daemon start|stop|status: the per-host daemon."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.output import Out

NAME = "daemon"
app = typer.Typer(help="Start, stop or inspect this host's daemon.", no_args_is_help=True)

ListenOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--listen", help="TCP HOST:PORT instead of the ipc socket (e.g. "
                 "127.0.0.1:7070). The protocol has no authentication: keep it on loopback "
                 "or a trusted network."),
]
PoolOpt = Annotated[
    str, typer.Option("--dram-pool", help="Pinned DRAM pool: bytes, 8GiB, 512MB or a share of "
                      "RAM such as 25%."),
]


@app.command("start")
def start(
    foreground: Annotated[bool, typer.Option("--foreground", help="Run in this process "
                                             "until SIGTERM or Ctrl-C.")] = False,
    listen: ListenOpt = None,
    dram_pool: PoolOpt = "25%",
    measure_bytes: Annotated[int, typer.Option(
        "--measure-bytes", help="Bytes read to measure the disk at start.")] = 256 << 20,
    home: HomeOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Start the daemon (detached unless --foreground)."""
    from sllmctl.daemon import client

    endpoint = _endpoint(listen)
    if foreground:
        conn = client.read_connection()
        if conn and client.alive(conn.pid):
            from sllmctl.errors import SllmError

            raise SllmError(f"a daemon already runs (pid {conn.pid}, {conn.endpoint})",
                            hint="sllmctl daemon stop")
        from sllmctl.daemon.server import run

        run(endpoint, dram_pool, measure_bytes)
        return
    c = client.start_detached(listen=listen, dram_pool=dram_pool, measure_bytes=measure_bytes)
    info = c.call("status")["daemon"]
    Out(json, quiet).result(info, lambda: print(
        f"daemon running: pid {info['pid']}, {info['endpoint']}"))


def _endpoint(listen: str | None) -> str | None:
    if not listen:
        return None
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        from sllmctl.errors import UsageError

        raise UsageError(f"--listen wants HOST:PORT, not {listen!r}",
                         hint="e.g. --listen 127.0.0.1:7070")
    return f"tcp://{host or '127.0.0.1'}:{port}"


@app.command("stop")
def stop(json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Stop the daemon (models in its tiers are unloaded; the store is untouched)."""
    from sllmctl.daemon import client

    pid = client.stop()
    Out(json, quiet).result({"stopped": pid}, lambda: print(
        f"daemon stopped (pid {pid})" if pid else "no daemon was running"))


@app.command("status")
def status(json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Say whether the daemon runs and answers (never starts one; exit 3 if it is down)."""
    from sllmctl.daemon import client

    info = client.connect(autostart=False).call("status")["daemon"]
    Out(json, quiet).result(info, lambda: print(
        f"daemon {info['state']}: pid {info['pid']}, {info['endpoint']}, "
        f"up {info['uptime_s']:.0f} s"))
