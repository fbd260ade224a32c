"""A live daemon with keys (CURVE on loopback TCP, `--keys`) against the authentication
surface: raw garbage and truncated handshakes on its TCP port, replays of a recorded admitted
session (whole, cut, with a byte flipped), strangers' keys, a wrong server key, and typed
requests from `read` and `peer` keys for every op (refused as `forbidden` unless the op
allows the role) and from the admin key for the new `reload` op. The daemon keeps answering
`status`, never answers `internal`, and its memory stays flat.

SLLMCTL_FUZZ_AUTH sets the number of cases (default 2,000, about 20 s here); the figures of
a long run are in docs/reliability.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz_daemon import Live as PlainLive
from zmq.utils import z85

from sllmctl.procs import alive
from sllmctl.wire import codes, keys, messages

pytestmark = pytest.mark.daemon
COUNT = int(os.environ.get("SLLMCTL_FUZZ_AUTH", "2000"))
ANSWER_MS = 2000
GREETING = b"\xff" + b"\x00" * 8 + b"\x7f\x03\x00" + b"CURVE".ljust(20, b"\x00")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss(pid: int) -> int:
    """The daemon's resident memory, bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


class Live:
    """A daemon with keys: ann (admin), rita (read), pete (peer) allowed."""

    def __init__(self, root: Path) -> None:
        run = Path(tempfile.mkdtemp(prefix="fa", dir="/tmp"))
        home, cfg = root / "home", root / "cfg"
        self.pairs = {n: keys.create_keys(root / n, "client") for n in ("rita", "pete")}
        self.pairs["ann"] = keys.client_keys(cfg)
        server = keys.create_keys(home / "keys")
        roles = {"ann": "admin", "rita": "read", "pete": "peer"}
        (home / "keys" / keys.ALLOW_LIST).write_text("".join(
            f"{self.pairs[n].public} {r} {n}\n" for n, r in roles.items()))
        self.env = {**os.environ, "SLLMCTL_HOME": str(home), "SLLMCTL_RUNTIME_DIR": str(run),
                    "SLLMCTL_CONFIG": str(cfg / "config.toml")}
        self.port = free_port()
        self.endpoint = f"tcp://127.0.0.1:{self.port}"
        r = subprocess.run([sys.executable, "-m", "sllmctl", "daemon", "start", "--json",
                            "--keys", "--listen", f"127.0.0.1:{self.port}", "--dram-pool",
                            "64MiB", "--measure-bytes", "1048576"],
                           capture_output=True, text=True, env=self.env, timeout=120)
        assert r.returncode == 0, r.stderr
        self.pid, self.run, self.server_key = int(json.loads(r.stdout)["pid"]), run, server.public
        self.ctx = zmq.Context()
        self.socks = {n: self.dealer(p) for n, p in self.pairs.items()}

    def dealer(self, pair: keys.KeyPair, server_key: str | None = None,
               timeout_ms: int = ANSWER_MS) -> tuple[str, zmq.Socket]:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.SNDTIMEO, ANSWER_MS)
        keys.secure_client(sock, pair, server_key or self.server_key)
        return keys.connect_checked(sock, self.endpoint, timeout_ms), sock

    def ask(self, who: str, frames: list[bytes]) -> dict[str, Any]:
        """Send on `who`'s open connection; the reply (the first answer) to this request."""
        handshake, sock = self.socks[who]
        assert handshake == "ok"
        rid = json.loads(frames[0]).get("id")
        sock.send_multipart(frames)
        while sock.poll(ANSWER_MS):  # skip what earlier long jobs still send
            answer: dict[str, Any] = json.loads(sock.recv_multipart()[0])
            if answer.get("id") in (rid, None):
                return answer
        raise AssertionError(f"no answer to {frames[0][:200]!r}")

    def status(self) -> dict[str, Any]:
        answer = self.ask("ann", [json.dumps({"v": 1, "id": secrets.token_hex(8),
                                              "op": "status", "args": {}}).encode()])
        assert answer["status"] == "ok", answer
        result: dict[str, Any] = answer["result"]
        return result

    def raw(self, blob: bytes) -> None:
        """Bytes on a fresh TCP connection, as they are; read what comes back briefly."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.settimeout(0.02)
            with contextlib.suppress(OSError):
                s.sendall(blob)
                s.recv(4096)

    def stop(self) -> None:
        for _, sock in self.socks.values():
            sock.close(linger=0)
        self.ctx.term()
        PlainLive.stop(self)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    d = Live(tmp_path_factory.mktemp("fuzzauth"))
    yield d
    d.stop()


def record(live: Live) -> bytes:
    """The bytes an admitted client sends for one `status`, through a recording relay."""
    from test_keys import Recorder

    relay = Recorder(live.endpoint)
    sock = live.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.SNDTIMEO, ANSWER_MS)
    sock.linger = 0
    keys.secure_client(sock, live.pairs["ann"], live.server_key)
    assert keys.connect_checked(sock, relay.endpoint, ANSWER_MS) == "ok"
    sock.send(json.dumps({"v": 1, "id": "rec", "op": "status", "args": {}}).encode())
    assert sock.poll(ANSWER_MS)
    sock.close(linger=0)
    relay.thread.join(timeout=10)
    return bytes(relay.sent)


json_values = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
ops = st.sampled_from(messages.OPS)
garbage = st.binary(max_size=512) | st.binary(max_size=256).map(lambda b: GREETING + b) | \
    st.integers(1, len(GREETING)).map(lambda n: GREETING[:n])
cases = st.one_of(
    st.tuples(st.just("raw"), garbage),
    st.tuples(st.just("replay"), st.floats(0, 1), st.integers(0, 10_000) | st.none()),
    st.tuples(st.just("stranger"), st.binary(min_size=32, max_size=32)),
    st.tuples(st.just("role"), st.sampled_from(["rita", "pete"]), ops,
              st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
    st.tuples(st.just("role"), st.just("ann"), st.sampled_from(["reload", "status"]),
              st.dictionaries(st.text(max_size=6), json_values, max_size=3)),
)
stats: dict[str, Any] = {"cases": 0, "kinds": {}, "codes": {}, "internal": 0}
ZERO = keys.KeyPair(zmq.curve_public(b"0" * 40).decode(), "0" * 40)


def role_case(live: Live, who: str, op: str, args: dict[str, Any]) -> None:
    answer = live.ask(who, [json.dumps({"v": 1, "id": secrets.token_hex(8), "op": op,
                                        "args": args}).encode()])
    code = answer["error"]["code"] if answer.get("status") == "error" else answer["type"]
    stats["codes"][code] = stats["codes"].get(code, 0) + 1
    assert code != codes.INTERNAL, answer
    role = {"ann": "admin", "rita": "read", "pete": "peer"}[who]
    if role not in messages.MESSAGES[op].roles:  # refused before its arguments are read
        assert code == codes.FORBIDDEN and f"has role {role}" in answer["error"]["message"]


@settings(max_examples=COUNT, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(case=cases)
def fuzz_one(live: Live, recording: bytes, case: tuple[Any, ...]) -> None:
    kind = case[0]
    stats["cases"] += 1
    stats["kinds"][kind] = stats["kinds"].get(kind, 0) + 1
    if kind == "raw":
        live.raw(case[1])
    elif kind == "replay":
        blob = bytearray(recording[:max(1, int(len(recording) * case[1]))])
        if case[2] is not None:
            blob[case[2] % len(blob)] ^= 0x5A
        live.raw(bytes(blob))
    elif kind == "stranger":
        secret = z85.encode(case[1])  # any 32 bytes are a secret key (all zero too)
        pair = keys.KeyPair(zmq.curve_public(secret).decode(), secret.decode())
        handshake, sock = live.dealer(pair)
        sock.close(linger=0)
        assert handshake == "refused"
    else:
        role_case(live, case[1], case[2], case[3])
    if stats["cases"] % 50 == 0:
        assert alive(live.pid)
        live.status()


def test_fuzz_authentication(live: Live) -> None:
    recording = record(live)
    assert len(recording) > 200 and b'"status"' not in recording
    for _ in range(600):  # the tiers (torch, the pool) and the disk measurement done first
        s = live.status()
        if s["daemon"]["state"] == "ready" and s["bandwidth"] and not s["jobs"]:
            break
        time.sleep(0.1)
    before = rss(live.pid)
    fuzz_one(live, recording)
    live.status()
    after = rss(live.pid)
    # a wrong server key fails the handshake too (never admitted)
    handshake, sock = live.dealer(live.pairs["ann"], ZERO.public, timeout_ms=1000)
    sock.close(linger=0)
    assert handshake != "ok"
    s = live.status()
    print(json.dumps({**stats, "rss_before": before, "rss_after": after,
                      "refused_keys": s["daemon"]["security"]["refused_keys"],
                      "forbidden": s["daemon"]["security"]["forbidden"]}))
    assert alive(live.pid) and s["daemon"]["pid"] == live.pid
    assert stats["cases"] >= COUNT * 0.9 and stats["internal"] == 0
    assert after - before < 32 << 20, (before, after)  # flat: no per-connection leak


def test_sighup_and_reload_take_rights_at_once(live: Live) -> None:
    """On connections that stay open: a key removed and reloaded (SIGHUP) is refused at its
    next request; a malformed list on reload is an error and the list in force stays."""
    allow = Path(live.env["SLLMCTL_HOME"]) / "keys" / keys.ALLOW_LIST
    kept = allow.read_text()

    def status_as(who: str) -> dict[str, Any]:
        return live.ask(who, [json.dumps({"v": 1, "id": secrets.token_hex(8), "op": "status",
                                          "args": {}}).encode()])

    assert status_as("rita")["status"] == "ok"
    allow.write_text("".join(ln + "\n" for ln in kept.splitlines() if not ln.endswith("rita")))
    os.kill(live.pid, signal.SIGHUP)
    for _ in range(50):  # the loop reloads within its 0.2 s poll
        answer = status_as("rita")
        if answer["status"] == "error":
            break
        time.sleep(0.1)
    assert answer["error"]["code"] == codes.FORBIDDEN
    assert "no longer in the allow-list" in answer["error"]["message"]
    allow.write_text(kept + "garbage\n")
    answer = live.ask("ann", [json.dumps({"v": 1, "id": "rl", "op": "reload", "args": {}})
                              .encode()])
    assert answer["status"] == "error" and "line 4" in answer["error"]["message"]
    assert status_as("rita")["status"] == "error"  # the list in force stayed
    allow.write_text(kept)
    answer = live.ask("ann", [json.dumps({"v": 1, "id": "rl2", "op": "reload", "args": {}})
                              .encode()])
    assert answer["result"]["keys"] == 3 and status_as("rita")["status"] == "ok"
