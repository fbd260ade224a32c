"""The HTTP listener: a socket bound here (so that a port in use is one clear error, not a log
line), served by uvicorn in a thread of the daemon."""

from __future__ import annotations

import socket
import threading
from typing import Any

from starlette.applications import Starlette

from sllmctl.errors import SllmError


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise SllmError(f"cannot serve HTTP on {host}:{port}: {e.strerror}",
                        hint="pick another --port, or stop what uses it") from None
    sock.listen(128)
    return sock


def serve_in_thread(app: Starlette, sock: socket.socket) -> Any:
    """Serve `app` on `sock` until the returned server's `should_exit` is set."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="sllmctl-http", daemon=True)
    thread.start()
    return server
