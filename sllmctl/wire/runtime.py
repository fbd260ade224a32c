"""The runtime folder and the daemon's connection file (`<runtime dir>/daemon.json`, 0600),
shared by the daemon that writes it and the clients that read it."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from sllmctl import paths
from sllmctl._version import __version__
from sllmctl.errors import SllmError, UsageError
from sllmctl.wire.envelope import PROTOCOL_VERSION


@dataclass
class Connection:
    endpoint: str
    pid: int | None
    protocol_version: int | None
    server_key: str | None = None  # the daemon's CURVE key when it runs with keys


def connection_file() -> Path:
    return paths.runtime_dir() / "daemon.json"


def log_file() -> Path:
    """Where a detached daemon writes its log."""
    return paths.runtime_dir() / "daemon.log"


def default_endpoint() -> str:
    return f"ipc://{paths.runtime_dir() / 'daemon.sock'}"


def listen_endpoint(listen: str) -> str:
    """`--listen HOST:PORT` as a ZeroMQ endpoint; an empty HOST is 127.0.0.1."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise UsageError(f"--listen wants HOST:PORT, not {listen!r}",
                         hint="e.g. --listen 127.0.0.1:7070")
    return f"tcp://{host or '127.0.0.1'}:{port}"


def ensure_runtime_dir() -> Path:
    d = paths.runtime_dir()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    if d.stat().st_uid != os.getuid():
        raise SllmError(f"runtime folder {d} belongs to another user",
                        hint="set SLLMCTL_RUNTIME_DIR to a folder of your own")
    os.chmod(d, 0o700)
    return d


def read_connection() -> Connection | None:
    try:
        info = json.loads(connection_file().read_text())
        key = info.get("server_key")
        return Connection(str(info["endpoint"]), int(info["pid"]),
                          int(info["protocol_version"]), key if isinstance(key, str) else None)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_connection_file(endpoint: str, server_key: str | None = None) -> Path:
    path = connection_file()
    tmp = path.with_name(f".daemon.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"endpoint": endpoint, "pid": os.getpid(),
                   "protocol_version": PROTOCOL_VERSION, "version": __version__,
                   "started_at": time.time(), "server_key": server_key}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def remove_connection_file() -> None:
    """Remove the connection file if it names this process."""
    try:
        info = json.loads(connection_file().read_text())
        if info.get("pid") == os.getpid():
            connection_file().unlink()
    except (OSError, ValueError, AttributeError):
        pass
