"""A tiny CURVE ROUTER echo server and client over sllmctl.wire.keys, for tests (not the daemon).

The server answers every request `[payload]` with `[role, payload]`, role being the sender's
role in the allow-list (`none` when it has none). Run as a script inside a network namespace:

    python tests/curve_echo.py server KEYDIR tcp://0.0.0.0:PORT SECONDS [plain]
    python tests/curve_echo.py client KEYDIR SERVER_KEY tcp://ADDR:PORT PAYLOAD
    (the client prints one JSON line: {"handshake": ..., "reply": [...] or null})
"""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

import zmq

from sllmctl.wire import keys


class EchoServer:
    """A ROUTER echo server in a thread, on a random free port of `host` (default loopback)."""

    def __init__(self, folder: Path, host: str = "127.0.0.1", curve: bool = True,
                 port: int | None = None) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.linger = 0
        self.auth: keys.KeyAuthenticator | None = None
        self.keys = keys.create_keys(folder)
        if curve:
            keys.init_allow_list(folder / keys.ALLOW_LIST)
            self.auth = keys.secure_server(self.ctx, self.sock, self.keys,
                                           folder / keys.ALLOW_LIST)
        if port is None:
            port = self.sock.bind_to_random_port(f"tcp://{host}")
        else:
            self.sock.bind(f"tcp://{host}:{port}")
        self.endpoint = f"tcp://{host}:{port}"
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> EchoServer:
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self.sock.poll(50):
                continue
            frames = self.sock.recv_multipart(copy=False)
            role = self.auth.sender_role(frames[-1]) if self.auth else None
            self.sock.send_multipart([frames[0], (role or "none").encode(), frames[-1].bytes])
            self.served += 1

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.sock.close(linger=0)
        if self.auth:
            self.auth.stop()
        self.ctx.term()


def ask(endpoint: str, payload: bytes, client: keys.KeyPair | None, server_key: str | None,
        timeout_ms: int = 2000) -> tuple[str, list[bytes] | None]:
    """One request from a fresh DEALER: (handshake result, reply frames or None at the deadline).
    `client` None: a plain NULL-mechanism client."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.sndtimeo = timeout_ms  # a DEALER with no peer blocks on send; POLLOUT is not enough
    try:
        if client is not None and server_key is not None:
            keys.secure_client(sock, client, server_key)
        handshake = keys.connect_checked(sock, endpoint, timeout_ms)
        try:
            sock.send(payload)
        except zmq.Again:
            return handshake, None
        reply = sock.recv_multipart() if sock.poll(timeout_ms) else None
        return handshake, reply
    finally:
        sock.close(linger=0)
        ctx.term()


def _main(argv: list[str]) -> int:
    if argv[0] == "server":
        folder, bind, seconds = Path(argv[1]), argv[2], float(argv[3])
        host, port = bind.removeprefix("tcp://").rsplit(":", 1)
        srv = EchoServer(folder, host, curve=argv[4:] != ["plain"], port=int(port)).start()
        print(json.dumps({"ready": bind, "key": srv.keys.public}), flush=True)
        time.sleep(seconds)
        srv.stop()
        return 0
    folder, server_key, endpoint, payload = Path(argv[1]), argv[2], argv[3], argv[4]
    pair = keys.create_keys(folder, "client") if server_key != "-" else None
    handshake, reply = ask(endpoint, payload.encode(), pair, None if pair is None else server_key)
    out = [f.decode("utf-8", "replace") for f in reply] if reply else None
    print(json.dumps({"handshake": handshake, "reply": out}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
