"""Talking to the daemon: find it, start it when allowed, and never hang.

Every request has a deadline for the daemon's first answer (FIRST_ANSWER_S) and, for long
jobs, for each later message (the daemon sends a heartbeat every half second). A socket
that timed out is closed with LINGER=0 and the error names the endpoint. Error replies come
back as the SllmError their code stands for (wire.codes).

`--host NAME` (or SLLMCTL_HOST) picks a daemon of the hosts file (wire.hosts) instead of this
host's: the client speaks CURVE with its own key pair (made on first use) and the key the
hosts file holds for that daemon; a handshake the daemon turns down (or a daemon whose key is
not that one) is `keys.Refused` (exit 4) at once, and sends never block (SNDTIMEO).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from sllmctl import paths
from sllmctl.errors import DaemonUnreachable, SllmError
from sllmctl.procs import alive
from sllmctl.wire import hosts, keys
from sllmctl.wire.codes import BadRequest, Forbidden, error_for
from sllmctl.wire.envelope import PROTOCOL_VERSION, Envelope, decode_reply
from sllmctl.wire.messages import Message
from sllmctl.wire.runtime import (
    Connection,
    connection_file,
    ensure_runtime_dir,
    listen_endpoint,
    log_file,
    read_connection,
)

FIRST_ANSWER_S = 1.5
SILENCE_S = 5.0  # a long job that sends nothing for this long is taken as hung
START_S = 20.0
MAX_REPLY = 16 << 20  # bytes: a larger frame from the daemon drops the connection


def autostart_enabled(flag: bool | None = None) -> bool:
    return paths.switch("autostart", "SLLMCTL_AUTOSTART", True, flag)


_selected: list[str] = []  # --host NAME, set by the command line


def select_host(name: str | None) -> None:
    """Make `connect` talk to the hosts file's `name` (the `--host` flag)."""
    _selected.clear()
    if name:
        _selected.append(name)


def selected_host() -> hosts.Host | None:
    """The host `--host` or SLLMCTL_HOST names (None: this host's daemon)."""
    return hosts.resolve(_selected[0] if _selected else None)


@dataclass(frozen=True)
class Remote:
    """A daemon of the hosts file, and this client's own pair."""

    host: hosts.Host
    pair: keys.KeyPair


class Client:
    def __init__(self, endpoint: str, remote: Remote | None = None) -> None:
        self.endpoint = endpoint
        self.remote = remote
        self.ctx: Any = zmq.Context.instance()

    @property
    def where(self) -> str:
        return (f"{self.remote.host.name} ({self.endpoint})" if self.remote
                else f"the daemon at {self.endpoint}")

    def _open(self, timeout: float) -> Any:
        """A DEALER connected to the daemon; for a remote one, the CURVE handshake done."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, int(timeout * 1000))  # a failed handshake: no peer
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_REPLY)  # a remote daemon is a trust boundary too
        if self.remote is None:
            sock.connect(self.endpoint)
            return sock
        try:
            keys.secure_client(sock, self.remote.pair, self.remote.host.key)
            seen = keys.connect_checked(sock, self.endpoint, int(timeout * 1000))
        except BaseException:
            sock.close(linger=0)
            raise
        if seen != "ok":
            sock.close(linger=0)
            if seen == "refused":
                raise keys.refused(self.remote.host.name, self.endpoint, self.remote.pair)
            raise self._silent(timeout)
        return sock

    def _silent(self, deadline: float) -> DaemonUnreachable:
        if self.remote:
            return DaemonUnreachable(
                f"{self.where} did not answer within {deadline:.1f} s",
                hint=f"check that its daemon runs (`sllmctl daemon start --listen ...` on "
                f"{self.remote.host.name}) and that this machine reaches it")
        return DaemonUnreachable(
            f"the daemon at {self.endpoint} did not answer within {deadline:.1f} s",
            hint="sllmctl daemon status; restart it: sllmctl daemon stop; sllmctl daemon start")

    def request(self, msg: Message, **kwargs: Any) -> Any:
        """Send one typed message; see `call`."""
        return self.call(msg.op, msg.to_args(), **kwargs)

    def call(self, op: str, args: dict[str, Any] | None = None, *,
             on_event: Callable[[dict[str, Any]], None] | None = None,
             first_answer: float = FIRST_ANSWER_S, wait: bool = True,
             version: int = PROTOCOL_VERSION) -> Any:
        """Send one request; return its result (None if not `wait`, once it is accepted)."""
        req = Envelope(op, args or {}, v=version)
        sock = self._open(first_answer)
        try:
            try:
                sock.send_multipart(req.encode())
            except zmq.Again:
                raise self._silent(first_answer) from None
            deadline = first_answer
            while True:
                if not sock.poll(int(deadline * 1000)):
                    raise self._silent(deadline)
                msg = decode_reply(sock.recv_multipart())
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
                raise self._named(_error(msg.get("error")))
        except BadRequest as e:
            raise SllmError(f"malformed answer from {self.where}: {e.message}") from None
        finally:
            sock.close(linger=0)


    def _named(self, e: SllmError) -> SllmError:
        """A refusal from a remote daemon names the host."""
        if self.remote and isinstance(e, Forbidden):
            return Forbidden(f"{self.remote.host.name}: {e.message}",
                             e.hint and e.hint.replace("the daemon's host",
                                                       self.remote.host.name))
        return e


def local(conn: Connection) -> Client:
    """A client for this host's daemon; CURVE when it runs with keys (`--keys`)."""
    if conn.server_key is None:
        return Client(conn.endpoint)
    return remote(hosts.Host("this host", conn.endpoint, conn.server_key))


def remote(host: hosts.Host) -> Client:
    """A client for a daemon of the hosts file, with this client's pair (made on first use)."""
    pair = keys.client_keys(paths.config_path().parent)
    return Client(host.endpoint, Remote(host, pair))


def _error(err: Any) -> SllmError:
    if not isinstance(err, dict):
        err = {}
    hint, field = err.get("hint"), err.get("field")
    return error_for(str(err.get("code", "")),
                     str(err.get("message", "the daemon refused the request")),
                     hint if isinstance(hint, str) else None,
                     field if isinstance(field, str) else None)


def connect(autostart: bool | None = None) -> Client:
    """A client for the daemon `--host`/SLLMCTL_HOST names, else this host's; starts this
    host's if none runs and autostart is on (a remote daemon is never started)."""
    host = selected_host()
    if host is not None:
        return remote(host)
    env = os.environ.get("SLLMCTL_DAEMON")
    if env:  # an explicit endpoint: never start anything
        return Client(env)
    conn = read_connection()
    if conn is not None and alive(conn.pid):
        if conn.protocol_version != PROTOCOL_VERSION:
            raise SllmError(
                f"the running daemon (pid {conn.pid}) speaks protocol version "
                f"{conn.protocol_version}; this sllmctl speaks {PROTOCOL_VERSION}",
                hint="restart it: sllmctl daemon stop; sllmctl daemon start")
        return local(conn)
    if not autostart_enabled(autostart):
        why = (f"stale connection file from pid {conn.pid}" if conn else
               f"no connection file in {paths.runtime_dir()}")
        raise DaemonUnreachable(f"the daemon is not running ({why})",
                                hint="sllmctl daemon start, or allow autostart")
    return start_detached()


def start_detached(listen: str | None = None, dram_pool: str | None = None,
                   measure_bytes: int | None = None, security: list[str] | None = None
                   ) -> Client:
    """Start a daemon in its own session, logging to the runtime folder; wait until it
    answers. A daemon already running is used if it has the settings asked for (None: any),
    else this is an error naming both."""
    ensure_runtime_dir()
    conn = read_connection()
    if conn and alive(conn.pid):
        client = local(conn)
        _check_settings(client, conn.pid, listen, dram_pool, measure_bytes)
        return client
    connection_file().unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "sllmctl", "daemon", "start", "--foreground"]
    if listen:
        cmd += ["--listen", listen]
    if dram_pool:
        cmd += ["--dram-pool", dram_pool]
    if measure_bytes is not None:
        cmd += ["--measure-bytes", str(measure_bytes)]
    cmd += security or []  # --keys, --insecure
    log = log_file()
    with open(log, "ab") as f:
        start_at = f.tell()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=f, stderr=f,
                                start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_S
    while time.monotonic() < deadline:
        conn = read_connection()
        if conn and conn.pid == proc.pid:
            client = local(conn)
            try:
                client.call("status", first_answer=1.0)
                return client
            except DaemonUnreachable:
                pass
        if proc.poll() is not None:
            raise _start_failure(log, start_at)
        time.sleep(0.05)
    raise DaemonUnreachable(f"the daemon did not start within {START_S:.0f} s",
                            hint=f"see {log}")


def _start_failure(log: Any, start_at: int) -> SllmError:
    """The daemon's own `error:`/`hint:` lines when it refused to start, else its last line."""
    with open(log, "rb") as f:
        f.seek(start_at)
        lines = f.read().decode(errors="replace").strip().splitlines()
    error = next((ln[len("error: "):] for ln in lines if ln.startswith("error: ")), None)
    hint = next((ln[len("hint: "):] for ln in lines if ln.startswith("hint: ")), None)
    if error is not None:
        return SllmError(error, hint=hint or f"see {log}")
    return SllmError(f"the daemon exited at start ({lines[-1] if lines else 'no log'})",
                     hint=f"see {log}")


def _check_settings(client: Client, pid: int | None, listen: str | None,
                    dram_pool: str | None, measure_bytes: int | None) -> None:
    settings = (client.call("status").get("daemon") or {}).get("settings") or {}
    asked = {"endpoint": listen and listen_endpoint(listen), "dram_pool": dram_pool,
             "measure_bytes": measure_bytes}
    flag = {"endpoint": "--listen", "dram_pool": "--dram-pool",
            "measure_bytes": "--measure-bytes"}
    differ = [f"{flag[k]} {v} (it runs with {settings.get(k)})"
              for k, v in asked.items() if v is not None and _norm(v) != _norm(settings.get(k))]
    if differ:
        raise SllmError(f"a daemon already runs (pid {pid}) with other settings: asked for "
                        + ", ".join(differ),
                        hint="sllmctl daemon stop, then start it with the new settings")


def _norm(value: Any) -> str:
    return str(value).strip().lower().replace(" ", "")


def stop(timeout: float = 10.0) -> int | None:
    """Stop this host's daemon (or the one `--host` names); returns its pid, or None if
    none was running."""
    import signal

    host = selected_host()
    if host is not None:
        return _stop_remote(remote(host), timeout)
    conn = read_connection()
    if conn is None or not alive(conn.pid):
        connection_file().unlink(missing_ok=True)
        return None
    try:
        local(conn).call("shutdown", first_answer=2.0)
    except SllmError:  # hung, or another protocol version: the signal works for all
        os.kill(conn.pid or 0, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive(conn.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if alive(conn.pid):
        raise SllmError(f"the daemon (pid {conn.pid}) did not stop within {timeout:.0f} s",
                        hint=f"kill -9 {conn.pid}")
    return conn.pid


def _stop_remote(client: Client, timeout: float) -> int | None:
    """Ask a remote daemon to stop, and wait until it no longer answers."""
    pid: int | None = client.call("shutdown", first_answer=2.0).get("pid")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            client.call("status", first_answer=0.5)
        except (DaemonUnreachable, keys.Refused):  # a closing socket fails the handshake
            return pid
        time.sleep(0.1)
    raise SllmError(f"{client.where} still answers {timeout:.0f} s after shutdown",
                    hint="see its log there")
