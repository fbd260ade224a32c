"""sllmctl daemon start|stop|status: the per-host daemon."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from sllmctl.commands._common import HomeOpt, JsonOpt, QuietOpt
from sllmctl.commands._daemon_opts import HostOpt
from sllmctl.output import Out

NAME = "daemon"
app = typer.Typer(help="Start, stop or inspect this host's daemon.", no_args_is_help=True)

ListenOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--listen", help="TCP HOST:PORT instead of the ipc socket (e.g. "
                 "127.0.0.1:7070). Beyond loopback it needs the host's keys (`sllmctl daemon "
                 "keys`) or --insecure."),
]
PoolOpt = Annotated[
    Optional[str],  # noqa: UP045
    typer.Option("--dram-pool", help="Pinned DRAM pool: bytes, 8GiB, 512MB or a share of "
                 "RAM such as 25% (default: 25%)."),
]


@app.command("start")
def start(
    foreground: Annotated[bool, typer.Option("--foreground", help="Run in this process "
                                             "until SIGTERM or Ctrl-C.")] = False,
    listen: ListenOpt = None,
    dram_pool: PoolOpt = None,
    measure_bytes: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--measure-bytes", help="Bytes read to measure the disk at start (default: "
        "268435456).")] = None,
    home: HomeOpt = None,
    use_keys: Annotated[bool, typer.Option("--keys", help="Require CURVE keys and the "
                                           "allow-list on loopback or ipc too.")] = False,
    insecure: Annotated[bool, typer.Option("--insecure", help="Listen beyond loopback "
                                           "without keys (anyone who reaches it may do "
                                           "everything).")] = False,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Start the daemon (detached unless --foreground); a daemon already running with other
    settings is an error."""
    from sllmctl.wire import client, runtime

    endpoint = runtime.listen_endpoint(listen) if listen else None
    if foreground:
        from sllmctl.procs import alive

        conn = runtime.read_connection()
        if conn and alive(conn.pid):
            from sllmctl.errors import SllmError

            raise SllmError(f"a daemon already runs (pid {conn.pid}, {conn.endpoint})",
                            hint="sllmctl daemon stop")
        from sllmctl.daemon.server import run

        run(endpoint, dram_pool or "25%", 256 << 20 if measure_bytes is None else measure_bytes,
            use_keys, insecure)
        return
    from sllmctl.daemon.guard import plan

    mode = plan(endpoint or runtime.default_endpoint(), use_keys, insecure)  # before starting
    if mode == "insecure" and not quiet:
        import sys

        print(f"warning: the daemon listens on {endpoint} without keys (--insecure): anyone "
              "who reaches it may do everything", file=sys.stderr)
    c = client.start_detached(listen=listen, dram_pool=dram_pool, measure_bytes=measure_bytes,
                              security=["--keys"] * use_keys + ["--insecure"] * insecure)
    info = c.call("status")["daemon"]
    Out(json, quiet).result(info, lambda: print(
        f"daemon running: pid {info['pid']}, {info['endpoint']}"))


@app.command("stop")
def stop(host: HostOpt = None, json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Stop the daemon (models in its tiers are unloaded; the store is untouched)."""
    from sllmctl.wire import client

    pid = client.stop()
    Out(json, quiet).result({"stopped": pid}, lambda: print(
        f"daemon stopped (pid {pid})" if pid else "no daemon was running"))


@app.command("status")
def status(host: HostOpt = None, json: JsonOpt = False, quiet: QuietOpt = False) -> None:
    """Say whether the daemon runs and answers (never starts one; exit 3 if it is down)."""
    from sllmctl.wire import client

    info = client.connect(autostart=False).call("status")["daemon"]
    log = f", log {info['log_file']}" if info.get("log_file") else ""
    Out(json, quiet).result(info, lambda: print(
        f"daemon {info['state']}: pid {info['pid']}, {info['endpoint']}, "
        f"up {info['uptime_s']:.0f} s{log}"))


@app.command("restart")
def restart(
    listen: ListenOpt = None,
    dram_pool: Annotated[Optional[str], typer.Option(  # noqa: UP045
        "--dram-pool", help="Pinned DRAM pool (default: the running daemon's).")] = None,
    measure_bytes: Annotated[Optional[int], typer.Option(  # noqa: UP045
        "--measure-bytes", help="Bytes read to measure the disk at start (default: the "
        "running daemon's).")] = None,
    home: HomeOpt = None,
    json: JsonOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Stop the daemon and start it again, with the options it ran with unless given."""
    from sllmctl.wire import client, runtime

    if listen:  # a bad --listen fails before the running daemon stops
        runtime.listen_endpoint(listen)
    before = running_options()
    pid = client.stop()
    c = client.start_detached(listen=listen or before.get("listen"),
                              dram_pool=dram_pool or before.get("dram_pool"),
                              measure_bytes=measure_bytes if measure_bytes is not None else
                              before.get("measure_bytes"), security=before.get("security"))
    info = {**c.call("status")["daemon"], "stopped": pid}
    Out(json, quiet).result(info, lambda: print(
        (f"daemon stopped (pid {pid}); " if pid else "no daemon was running; ")
        + f"running: pid {info['pid']}, {info['endpoint']}"))


def running_options() -> dict[str, Any]:
    """The options the running daemon was started with, as its status reports them (its
    settings and its security mode); nothing when none answers."""
    from sllmctl.errors import DaemonUnreachable
    from sllmctl.wire import client, runtime

    try:
        info = client.connect(autostart=False).call("status")["daemon"]
    except DaemonUnreachable:
        return {}
    settings, mode = info.get("settings", {}), info.get("security", {}).get("mode")
    endpoint = settings.get("endpoint")
    listen = (endpoint.removeprefix("tcp://") if endpoint and
              endpoint != runtime.default_endpoint() else None)
    return {"listen": listen, "dram_pool": settings.get("dram_pool"),
            "measure_bytes": settings.get("measure_bytes"),
            "security": {"curve": ["--keys"], "insecure": ["--insecure"]}.get(mode or "", [])}


@app.command("logs")
def logs(
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing what the "
                                         "daemon writes, until Ctrl-C.")] = False,
    lines: Annotated[int, typer.Option("--lines", "-n", help="Print the last N lines "
                                       "(0: the whole log).")] = 50,
    home: HomeOpt = None,
    json: JsonOpt = False,
) -> None:
    """Print the daemon's log (the one a detached daemon writes in the runtime folder);
    `--json`: one JSON object a line, {"file", "line"}."""
    import sys
    import time

    path = log_path()
    if not path.is_file():
        from sllmctl.errors import SllmError

        raise SllmError(f"no daemon log at {path}",
                        hint="a detached daemon writes it: sllmctl daemon start")
    def emit(line: str) -> None:
        if json:
            import json as json_

            line = json_.dumps({"file": str(path), "line": line.rstrip("\n")}) + "\n"
        sys.stdout.write(line)

    with path.open("r", errors="replace") as f:
        text = f.readlines()
        for line in text[-lines:] if lines > 0 else text:
            emit(line)
        sys.stdout.flush()
        while follow:
            line = f.readline()
            if line:
                emit(line)
                sys.stdout.flush()
            else:
                time.sleep(0.25)


def log_path() -> Path:
    """The running daemon's log file as its status names it, else where a detached daemon
    writes it (`daemon.log` in the runtime folder)."""
    from sllmctl import paths
    from sllmctl.errors import SllmError
    from sllmctl.wire import client

    conn = client.read_connection()
    if conn and client.alive(conn.pid):
        try:
            s = client.connect(autostart=False).call("status")
            found = s["daemon"].get("log_file") or s.get("log_file")
            if found:
                return Path(found)
        except SllmError:
            pass
    return paths.runtime_dir() / "daemon.log"
