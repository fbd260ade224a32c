"""Talking to the daemon: find it, start it when allowed, and never hang.

Every request has a deadline for the daemon's first answer (FIRST_ANSWER_S) and, for long
jobs, for each later message (the daemon sends a heartbeat every half second). A socket
that timed out is closed with LINGER=0 and the error names the endpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq

from sllmctl import paths
from sllmctl.daemon import protocol as proto
from sllmctl.errors import CorruptCheckpoint, DaemonUnreachable, NotFound, SllmError
from sllmctl.procs import alive

FIRST_ANSWER_S = 1.5
SILENCE_S = 5.0  # a long job that sends nothing for this long is taken as hung
START_S = 20.0

_ERRORS: dict[str, type[SllmError]] = {proto.NOT_FOUND: NotFound,
                                       proto.CORRUPT: CorruptCheckpoint}


@dataclass
class Connection:
    endpoint: str
    pid: int | None
    protocol_version: int | None


def connection_file() -> Path:
    return paths.runtime_dir() / "daemon.json"


def read_connection() -> Connection | None:
    try:
        info = json.loads(connection_file().read_text())
        return Connection(str(info["endpoint"]), int(info["pid"]),
                          int(info["protocol_version"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def autostart_enabled(flag: bool | None = None) -> bool:
    return paths.switch("autostart", "SLLMCTL_AUTOSTART", True, flag)


class Client:
    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.ctx: Any = zmq.Context.instance()

    def call(self, op: str, args: dict[str, Any] | None = None, *,
             on_event: Callable[[dict[str, Any]], None] | None = None,
             first_answer: float = FIRST_ANSWER_S, wait: bool = True,
             version: int = proto.PROTOCOL_VERSION) -> Any:
        """Send one request; return its result (None if not `wait`, once it is accepted)."""
        req = proto.Request(op, args or {}, v=version)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint)
            sock.send_multipart(req.encode())
            deadline = first_answer
            while True:
                if not sock.poll(int(deadline * 1000)):
                    raise DaemonUnreachable(
                        f"the daemon at {self.endpoint} did not answer within {deadline:.1f} s",
                        hint="sllmctl daemon status; restart it: sllmctl daemon stop; "
                        "sllmctl daemon start")
                msg = proto.decode_reply(sock.recv_multipart())
                # a reply without an id answers a request the daemon could not parse
                if msg.get("id") != req.id and not (msg.get("id") is None
                                                    and msg.get("status") == "error"):
                    continue
                if msg["type"] == "progress":
                    if not wait:
                        return None
                    if on_event:
                        on_event(msg)
                    deadline = SILENCE_S
                    continue
                if msg.get("status") == "ok":
                    return msg.get("result")
                err = msg.get("error") or {}
                cls = _ERRORS.get(err.get("code", ""), SllmError)
                raise cls(str(err.get("message", "the daemon refused the request")),
                          hint=err.get("hint"))
        except proto.ProtocolError as e:
            raise SllmError(f"malformed answer from the daemon at {self.endpoint}: "
                            f"{e.message}") from None
        finally:
            sock.close(linger=0)


def connect(autostart: bool | None = None) -> Client:
    """A client for this host's daemon; starts one if none runs and autostart is on."""
    env = os.environ.get("SLLMCTL_DAEMON")
    if env:  # an explicit endpoint: never start anything
        return Client(env)
    conn = read_connection()
    if conn is not None and alive(conn.pid):
        if conn.protocol_version != proto.PROTOCOL_VERSION:
            raise SllmError(
                f"the running daemon (pid {conn.pid}) speaks protocol version "
                f"{conn.protocol_version}; this sllmctl speaks {proto.PROTOCOL_VERSION}",
                hint="restart it: sllmctl daemon stop; sllmctl daemon start")
        return Client(conn.endpoint)
    if not autostart_enabled(autostart):
        why = (f"stale connection file from pid {conn.pid}" if conn else
               f"no connection file in {paths.runtime_dir()}")
        raise DaemonUnreachable(f"the daemon is not running ({why})",
                                hint="sllmctl daemon start, or allow autostart")
    return start_detached()


def start_detached(listen: str | None = None, dram_pool: str | None = None,
                   measure_bytes: int | None = None) -> Client:
    """Start a daemon in its own session, logging to the runtime folder; wait until it
    answers."""
    from sllmctl.daemon.server import ensure_runtime_dir

    run = ensure_runtime_dir()
    conn = read_connection()
    if conn and alive(conn.pid):
        return Client(conn.endpoint)
    connection_file().unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "sllmctl", "daemon", "start", "--foreground"]
    if listen:
        cmd += ["--listen", listen]
    if dram_pool:
        cmd += ["--dram-pool", dram_pool]
    if measure_bytes is not None:
        cmd += ["--measure-bytes", str(measure_bytes)]
    logfile = run / "daemon.log"
    with open(logfile, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        conn = read_connection()
        if conn and conn.pid == proc.pid:
            client = Client(conn.endpoint)
            try:
                client.call("status", first_answer=1.0)
                return client
            except DaemonUnreachable:
                pass
        if proc.poll() is not None:
            tail = logfile.read_text(errors="replace").strip().splitlines()[-1:]
            raise SllmError(f"the daemon exited at start ({tail[0] if tail else 'no log'})",
                            hint=f"see {logfile}")
        time.sleep(0.05)
    raise DaemonUnreachable(f"the daemon did not start within {START_S:.0f} s",
                            hint=f"see {logfile}")


def stop(timeout: float = 10.0) -> int | None:
    """Stop this host's daemon; returns its pid, or None if none was running."""
    import signal

    conn = read_connection()
    if conn is None or not alive(conn.pid):
        connection_file().unlink(missing_ok=True)
        return None
    try:
        Client(conn.endpoint).call("shutdown", first_answer=2.0)
    except SllmError:  # hung, or another protocol version: the signal works for all
        os.kill(conn.pid or 0, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(conn.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(conn.pid):
        raise SllmError(f"the daemon (pid {conn.pid}) did not stop within {timeout:.0f} s",
                        hint=f"kill -9 {conn.pid}")
    return conn.pid
