"""CURVE keys and the allow-list, against real sockets on tcp://127.0.0.1 (random free ports)."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from curve_echo import EchoServer, ask
from zmq.utils import z85

from sllmctl.errors import EXIT_REFUSED, SllmError
from sllmctl.wire import keys

DEADLINE_MS = 1500


@pytest.fixture
def server(tmp_path: Path) -> Iterator[EchoServer]:
    srv = EchoServer(tmp_path / "srv").start()
    yield srv
    srv.stop()


def allow(srv: EchoServer, *lines: str) -> None:
    (srv_dir(srv) / keys.ALLOW_LIST).write_text("\n".join(lines) + "\n")
    assert srv.auth is not None
    srv.auth.reload()


def srv_dir(srv: EchoServer) -> Path:
    assert srv.auth is not None
    return srv.auth.allow_path.parent


def test_pair_made_once_secret_private(tmp_path: Path) -> None:
    pair = keys.create_keys(tmp_path / "k")
    secret = tmp_path / "k" / "host.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert keys.create_keys(tmp_path / "k") == pair  # loaded, not made again
    assert keys.load_keys(tmp_path / "k") == pair
    keys.check_z85_key(pair.public)
    assert pair.fingerprint.startswith("SHA256:") and len(pair.fingerprint) == 23
    assert sorted(p.name for p in (tmp_path / "k").iterdir()) == ["host.key", "host.key_secret"]


def test_secret_readable_by_others_refused(tmp_path: Path) -> None:
    keys.create_keys(tmp_path)
    os.chmod(tmp_path / "host.key_secret", 0o644)
    with pytest.raises(SllmError, match=r"readable by others \(mode 0644\)") as e:
        keys.load_keys(tmp_path)
    assert e.value.hint == f"chmod 600 {tmp_path / 'host.key_secret'}"


def test_tampered_secret_file_refused(tmp_path: Path) -> None:
    pair = keys.create_keys(tmp_path)
    other = keys.create_keys(tmp_path / "o")
    f = tmp_path / "host.key_secret"
    f.write_text(f.read_text().replace(pair.public, other.public))
    with pytest.raises(SllmError, match="is not the secret key's"):
        keys.load_keys(tmp_path)
    with pytest.raises(SllmError, match="no key pair"):
        keys.load_keys(tmp_path / "none")


def test_allow_list_parses_comments_labels() -> None:
    a, b = zmq.curve_keypair()[0].decode(), zmq.curve_keypair()[0].decode()
    text = f"# header\n\n  {a} admin laptop of ann\n{b} read dashboard\n"
    entries = keys.parse_allow_list(text)
    assert entries[a] == keys.AllowedKey(a, "admin", "laptop of ann", 3)
    assert entries[b].role == "read" and entries[b].line == 4


@pytest.mark.parametrize(("line", "error"), [
    ("{k} admin", "line 2: expected `<Z85 public key> <role> <label>`"),
    ("{k} root me", "line 2: unknown role 'root'"),
    ("{k}x admin me", "line 2: a CURVE key is 40 Z85 characters, this one has 41"),
    ("{k}", "line 2: expected"),
    ("\u00e9" * 40 + " admin me", "line 2: not a Z85 key"),
    ("{k} peer me\n{k} read me", "line 3: key already listed on line 2"),
])
def test_malformed_allow_list_line_is_fatal(tmp_path: Path, line: str, error: str) -> None:
    k = zmq.curve_keypair()[0].decode()
    path = tmp_path / keys.ALLOW_LIST
    path.write_text("# who\n" + line.format(k=k) + "\n")
    with pytest.raises(SllmError, match=error.replace("(", r"\(").replace(")", r"\)")):
        keys.load_allow_list(path)
    pair = keys.create_keys(tmp_path)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    try:  # the server does not start on a bad list (pyzmq's folder loader only logs)
        with pytest.raises(SllmError, match="line"):
            keys.secure_server(ctx, sock, pair, path)
    finally:
        sock.close(linger=0)
        ctx.term()


def test_missing_allow_list_is_fatal(tmp_path: Path) -> None:
    with pytest.raises(SllmError, match="no allow-list"):
        keys.load_allow_list(tmp_path / keys.ALLOW_LIST)


def test_admitted_keys_get_replies_with_their_roles(server: EchoServer, tmp_path: Path) -> None:
    ann, bob, pia = (keys.create_keys(tmp_path / n, "client") for n in ("ann", "bob", "pia"))
    allow(server, f"{ann.public} admin ann", f"{bob.public} read bob", f"{pia.public} peer pia")
    for pair, role in ((ann, b"admin"), (bob, b"read"), (pia, b"peer")):
        handshake, reply = ask(server.endpoint, b'{"op": "status"}', pair, server.keys.public,
                               DEADLINE_MS)
        assert (handshake, reply) == ("ok", [role, b'{"op": "status"}'])


def test_client_pair_made_on_first_use(tmp_path: Path) -> None:
    pair = keys.client_keys(tmp_path / "cfg")
    assert (tmp_path / "cfg" / "client.key_secret").exists()
    assert keys.client_keys(tmp_path / "cfg") == pair


def refused(srv: EchoServer, client: keys.KeyPair | None, server_key: str | None) -> None:
    """The request gets no reply within the deadline, and the server keeps serving others."""
    handshake, reply = ask(srv.endpoint, b"hi", client, server_key, DEADLINE_MS)
    assert reply is None
    assert handshake in ("refused", "timeout")


def test_unknown_key_refused_and_logged(server: EchoServer, tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    stranger = keys.create_keys(tmp_path / "s", "client")
    with caplog.at_level(logging.WARNING, logger="sllmctl.keys"):
        handshake, reply = ask(server.endpoint, b"hi", stranger, server.keys.public, DEADLINE_MS)
    assert (handshake, reply) == ("refused", None)
    assert server.auth is not None and server.auth.refusals >= 1
    assert f"refused key {stranger.fingerprint}" in caplog.text


def test_refusal_error_names_host_key_and_fix(tmp_path: Path) -> None:
    ann = keys.create_keys(tmp_path, "client")
    err = keys.refused("gpu1", "tcp://10.0.0.2:7070", ann)
    assert err.exit_code == EXIT_REFUSED == 4
    assert err.message.startswith(f"gpu1 (tcp://10.0.0.2:7070) refused this client's key "
                                  f"{ann.fingerprint}")
    assert err.hint is not None and ann.public in err.hint and "daemon reload" in err.hint


def test_revoked_key_refused_also_on_open_connection(server: EchoServer, tmp_path: Path) -> None:
    ann = keys.create_keys(tmp_path / "ann", "client")
    allow(server, f"{ann.public} admin ann")
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    keys.secure_client(sock, ann, server.keys.public)
    try:
        assert keys.connect_checked(sock, server.endpoint, DEADLINE_MS) == "ok"
        sock.send(b"one")
        assert sock.poll(DEADLINE_MS) and sock.recv_multipart() == [b"admin", b"one"]
        allow(server, "# nobody")
        sock.send(b"two")  # the connection stays up, but its key has no role any more
        assert sock.poll(DEADLINE_MS) and sock.recv_multipart() == [b"none", b"two"]
    finally:
        sock.close(linger=0)
        ctx.term()
    refused(server, ann, server.keys.public)  # and a new connection is refused


def test_wrong_null_and_garbage_keys_refused(server: EchoServer, tmp_path: Path) -> None:
    ann = keys.create_keys(tmp_path / "ann", "client")
    mallory = keys.create_keys(tmp_path / "m", "client")
    allow(server, f"{ann.public} admin ann")
    zero = keys.KeyPair(zmq.curve_public(b"0" * 40).decode(), "0" * 40)
    impostor = keys.KeyPair(ann.public, mallory.secret)  # ann's public key, not her secret
    garbage = keys.KeyPair(*(z85.encode(os.urandom(32)).decode() for _ in range(2)))
    for pair in (zero, impostor, garbage):
        refused(server, pair, server.keys.public)
    refused(server, ann, mallory.public)  # ann with the wrong server key
    refused(server, None, None)  # a plain NULL-mechanism client
    with pytest.raises(SllmError, match="not a Z85 key"):
        ask(server.endpoint, b"hi", ann, "," * 40, DEADLINE_MS)
    _, reply = ask(server.endpoint, b"still", ann, server.keys.public, DEADLINE_MS)
    assert reply == [b"admin", b"still"]


def test_raw_tcp_garbage_does_not_stop_the_server(server: EchoServer, tmp_path: Path) -> None:
    ann = keys.create_keys(tmp_path / "ann", "client")
    allow(server, f"{ann.public} admin ann")
    host, port = server.endpoint.removeprefix("tcp://").rsplit(":", 1)
    for blob in (b"\xff" + b"\x00" * 8 + b"\x7f", os.urandom(4096), b"GET / HTTP/1.0\r\n\r\n"):
        with socket.create_connection((host, int(port)), timeout=2) as s:
            s.settimeout(0.5)
            s.sendall(blob)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                s.recv(4096)
    assert ask(server.endpoint, b"x", ann, server.keys.public, DEADLINE_MS)[1] == [b"admin", b"x"]


class Recorder:
    """A TCP relay in front of `endpoint` that records the bytes its one client sends."""

    def __init__(self, endpoint: str) -> None:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        self.target = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(5)
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = bytearray()
        self.thread = threading.Thread(target=self._relay, daemon=True)
        self.thread.start()

    def _relay(self) -> None:
        with contextlib.suppress(OSError), self.listener, socket.create_connection(
                self.target, timeout=5) as upstream:
            conn, _ = self.listener.accept()
            with conn:
                for s in (conn, upstream):
                    s.settimeout(0.05)
                deadline = time.monotonic() + 5
                while time.monotonic() < deadline:  # bounded: 5 s at most
                    for src, dst in ((conn, upstream), (upstream, conn)):
                        with contextlib.suppress(TimeoutError):
                            data = src.recv(65536)
                            if not data:
                                return
                            if src is conn:
                                self.sent += data
                            dst.sendall(data)


def test_replayed_handshake_and_request_get_nothing(server: EchoServer, tmp_path: Path) -> None:
    """Bytes of an admitted session, sent again verbatim, neither handshake nor reach the app:
    CURVE's per-connection keys and the server's cookie make a recording worthless."""
    ann = keys.create_keys(tmp_path / "ann", "client")
    allow(server, f"{ann.public} admin ann")
    relay = Recorder(server.endpoint)
    assert ask(relay.endpoint, b'{"op": "rm"}', ann, server.keys.public, DEADLINE_MS)[1] == [
        b"admin", b'{"op": "rm"}']
    relay.thread.join(timeout=10)
    served, recording = server.served, bytes(relay.sent)
    assert len(recording) > 200 and b'{"op": "rm"}' not in recording  # sealed on the wire
    for cut in (len(recording), len(recording) // 2, 64):  # whole, truncated, greeting only
        with socket.create_connection(relay.target, timeout=2) as s:
            s.settimeout(0.5)
            with contextlib.suppress(OSError):
                s.sendall(recording[:cut])
                s.recv(65536)
                s.recv(65536)
    assert server.served == served  # no replayed request reached the echo
    assert ask(server.endpoint, b"x", ann, server.keys.public, DEADLINE_MS)[1] == [b"admin", b"x"]


def test_trap_curve_without_authenticator_admits_anyone(tmp_path: Path) -> None:
    """Why secure_server always installs the authenticator: a bare CURVE server admits any key."""
    stranger = keys.create_keys(tmp_path / "s", "client")
    srv = EchoServer(tmp_path / "bare", curve=False)
    pair = srv.keys
    srv.sock.close(linger=0)
    srv.sock = srv.ctx.socket(zmq.ROUTER)
    srv.sock.curve_secretkey, srv.sock.curve_publickey = pair.secret.encode(), pair.public.encode()
    srv.sock.curve_server = True
    srv.endpoint = f"tcp://127.0.0.1:{srv.sock.bind_to_random_port('tcp://127.0.0.1')}"
    srv.start()
    try:
        assert ask(srv.endpoint, b"in", stranger, pair.public, DEADLINE_MS)[1] == [b"none", b"in"]
    finally:
        srv.stop()


def test_role_of_and_sender_role(tmp_path: Path) -> None:
    pair = keys.create_keys(tmp_path)
    ann = zmq.curve_keypair()[0].decode()
    (tmp_path / keys.ALLOW_LIST).write_text(f"{ann} peer ann\n")
    auth = keys.KeyAuthenticator(zmq.Context.instance(), tmp_path / keys.ALLOW_LIST)
    assert auth.role_of(ann) == "peer"
    assert auth.role_of(pair.public) is None and auth.role_of(None) is None
    assert auth.sender_role(zmq.Frame(b"x")) is None  # a frame with no User-Id
    (tmp_path / keys.ALLOW_LIST).write_text("broken line\n")
    with pytest.raises(SllmError, match="line 1"):
        auth.reload()
    assert auth.role_of(ann) == "peer"  # a bad reload leaves the list in force
