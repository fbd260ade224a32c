"""A live daemon against malformed, huge, nested, mistyped and repeated messages: it answers
each with a protocol error (never `internal`), keeps serving, and `status` keeps answering
within its deadline. SLLMCTL_FUZZ_MESSAGES sets the fuzz run's length (default 600); the
figures of a long run are in docs/reliability.md."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
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

from sllmctl.procs import alive
from sllmctl.wire import codes, messages
from sllmctl.wire.client import Client
from sllmctl.wire.envelope import MAX_MESSAGE

pytestmark = pytest.mark.daemon
COUNT = int(os.environ.get("SLLMCTL_FUZZ_MESSAGES", "600"))
ANSWER_S = 2.0  # the first answer to any request (the client's own deadline is 1.5 s)


class Live:
    """A daemon of this module's own (its own home and runtime folder)."""

    def __init__(self, root: Path) -> None:
        run = Path(tempfile.mkdtemp(prefix="fz", dir="/tmp"))  # short: an ipc path
        self.env = {**os.environ, "SLLMCTL_HOME": str(root / "home"),
                    "SLLMCTL_RUNTIME_DIR": str(run)}
        r = subprocess.run([sys.executable, "-m", "sllmctl", "daemon", "start", "--json",
                            "--dram-pool", "64MiB", "--measure-bytes", "1048576"],
                           capture_output=True, text=True, env=self.env, timeout=120)
        assert r.returncode == 0, r.stderr
        info = json.loads(r.stdout)
        self.run = run
        self.pid, self.endpoint = int(info["pid"]), str(info["endpoint"])
        self.ctx = zmq.Context.instance()

    def send(self, frames: list[bytes], wait: float = ANSWER_S) -> dict[str, Any] | None:
        """Send one message on a fresh socket; its first answer, or None."""
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        try:
            sock.connect(self.endpoint)
            sock.send_multipart(frames)
            if not sock.poll(int(wait * 1000)):
                return None
            answer: dict[str, Any] = json.loads(sock.recv_multipart()[0])
            return answer
        finally:
            sock.close(linger=0)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = Client(self.endpoint).call("status")  # 1.5 s deadline
        return result

    def drain(self) -> None:
        """Wait until no long job is in flight."""
        for _ in range(600):
            if not self.status()["jobs"]:
                return
            time.sleep(0.1)
        raise AssertionError("the daemon's jobs did not drain")

    def stop(self) -> None:
        subprocess.run([sys.executable, "-m", "sllmctl", "daemon", "stop"], env=self.env,
                       capture_output=True, timeout=60)
        if alive(self.pid):
            os.kill(self.pid, signal.SIGKILL)
        shutil.rmtree(self.run, ignore_errors=True)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    d = Live(tmp_path_factory.mktemp("fuzz"))
    yield d
    d.stop()


def request(op: Any = "status", args: Any = None, rid: Any = None, v: Any = 1,
            **extra: Any) -> list[bytes]:
    head = {"v": v, "id": rid or secrets.token_hex(8), "op": op, "args": args or {}, **extra}
    return [json.dumps(head).encode()]


def error_of(answer: dict[str, Any] | None) -> dict[str, Any]:
    assert answer is not None and answer["type"] == "reply" and answer["status"] == "error"
    err: dict[str, Any] = answer["error"]
    return err


def test_nested_json_is_a_bad_request(live: Live) -> None:
    for depth in (1000, 990, 5000, 200_000):
        err = error_of(live.send([b"[" * depth + b"]" * depth]))
        assert err["code"] == codes.BAD_REQUEST and "nested too deeply" in err["message"]
    deep = {"v": 1, "id": "deep", "op": "status", "args": {}}
    frame = json.dumps(deep).encode()[:-1] + b',"x":' + b"[" * 900 + b"]" * 900 + b"}"
    answer = live.send([frame])  # deep, but not too deep: an unknown key, ignored
    assert answer is not None and answer["status"] == "ok"
    assert live.status()["daemon"]["pid"] == live.pid


def test_size_limits(live: Live) -> None:
    # one frame over MAXMSGSIZE: ZeroMQ drops that peer; the daemon serves the others
    assert live.send([b" " * (2 * MAX_MESSAGE)], wait=1.0) is None
    assert live.status()["daemon"]["pid"] == live.pid
    # frames under the limit each, over it together: refused by the daemon's own check
    err = error_of(live.send([b"{}"] + [b" " * (MAX_MESSAGE // 4)] * 5))
    assert err["code"] == codes.BAD_REQUEST and "frames" in err["message"]


def test_versions_must_be_the_integer_1(live: Live) -> None:
    for v, code in ((True, codes.BAD_REQUEST), (1.0, codes.BAD_REQUEST),
                    ("1", codes.BAD_REQUEST), (None, codes.BAD_REQUEST),
                    (2, codes.VERSION_MISMATCH)):
        err = error_of(live.send(request(v=v)))
        assert err["code"] == code, v
        assert err["field"] == ("v" if code == codes.BAD_REQUEST else None)


def test_mistyped_arguments_are_bad_requests_naming_them(live: Live) -> None:
    cases = [("warm", {"name": "m", "gpu": "0"}, "gpu"), ("warm", {"name": 5}, "name"),
             ("ping", {"delay": "1"}, "delay"), ("ping", {"delay": 3600}, "delay"),
             ("serve", {"name": "m", "port": "80"}, "port"),
             ("serve", {"name": "m", "keep_alive": "5m"}, "keep_alive"),
             ("unload", {"name": "m", "tier": 3}, "tier"), ("unserve", {}, "name")]
    for op, args, field in cases:
        err = error_of(live.send(request(op, args)))
        assert (err["code"], err["field"]) == (codes.BAD_REQUEST, field), (op, args)


def test_a_repeated_request_id_is_refused(live: Live) -> None:
    first = live.send(request("ping", {"delay": 2}, rid="same-id"))
    assert first is not None and first["type"] == "progress"
    for op in ("ping", "status"):
        err = error_of(live.send(request(op, rid="same-id")))
        assert (err["code"], err["field"]) == (codes.BAD_REQUEST, "id")


def test_a_full_queue_is_busy_and_status_still_answers(live: Live) -> None:
    sock = live.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(live.endpoint)
    ids = [f"q{i}" for i in range(60)]
    for rid in ids:
        sock.send_multipart(request("ping", {"delay": 1}, rid=rid))
    first: dict[str, dict[str, Any]] = {}
    while len(first) < len(ids) and sock.poll(int(ANSWER_S * 1000)):
        m = json.loads(sock.recv_multipart()[0])
        first.setdefault(m["id"], m)
    assert live.status()["jobs"]  # answered while every worker and queue place is taken
    sock.close(linger=0)
    busy = [m for m in first.values() if m.get("status") == "error"]
    assert len(first) == len(ids) and busy
    assert all(m["error"]["code"] == codes.BUSY for m in busy)
    live.drain()


def test_an_api_key_is_never_shown(live: Live) -> None:
    live.drain()
    sock = live.ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(live.endpoint)
    for i in range(8):  # every worker busy, so that the serve job waits in the queue
        sock.send_multipart(request("ping", {"delay": 1.5}, rid=f"hold{i}"))
    sock.send_multipart(request("serve", {"name": "m", "api_key": "sekret-key"}, rid="key"))
    while json.loads(sock.recv_multipart()[0])["id"] != "key":
        pass
    s = live.status()
    sock.close(linger=0)
    assert [j["args"]["api_key"] for j in s["jobs"] if j["op"] == "serve"] == ["***"]
    assert "sekret-key" not in json.dumps(s)


def test_http_beyond_loopback_needs_a_key(live: Live) -> None:
    err = error_of(live.send(request("serve", {"name": "m", "host": "0.0.0.0"})))
    assert (err["code"], err["field"]) == (codes.BAD_REQUEST, "host")
    assert "without an API key is refused" in err["message"]


# ---------------------------------------------------------------- the fuzz run
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.integers(-(10**30), 10**30)
    | st.floats() | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
fields = st.sampled_from(sorted({f for m in messages.MESSAGES.values()
                                 for f in m.__dataclass_fields__} | {"x"}))
ops = st.sampled_from([op for op in messages.OPS if op != "shutdown"]) | st.text(max_size=10)
ids = st.sampled_from(["dup", "dup", ""]) | st.text(min_size=1, max_size=12) | json_values


@st.composite
def shaped(draw: st.DrawFn) -> list[bytes]:
    """A request with the envelope's keys, each maybe wrong, and arguments of any type."""
    args = draw(st.dictionaries(fields, json_values, max_size=5) | json_values)
    head = {"v": draw(st.sampled_from([1, 1, 1, True, 1.0, "1", 0, 2, None])),
            "id": draw(ids), "op": draw(ops), "args": args}
    for key in draw(st.sets(st.sampled_from(sorted(head)), max_size=1)):
        del head[key]
    return [json.dumps(head).encode()]


nested = st.integers(1, 60_000).map(lambda n: [b"[" * n + b"]" * n])
huge = st.integers(MAX_MESSAGE - 64, MAX_MESSAGE + 4096).map(
    lambda n: request("warm", {"name": "a" * n}))
raw_bytes = st.lists(st.binary(max_size=64), min_size=1, max_size=3)
fuzz_messages = shaped() | shaped() | shaped() | nested | huge | raw_bytes

stats: dict[str, Any] = {"messages": 0, "answers": 0, "internal": 0, "unanswered_oversized": 0,
                         "codes": {}}


@settings(max_examples=COUNT, deadline=None, database=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(frames=fuzz_messages)
def fuzz_one(live: Live, frames: list[bytes]) -> None:
    stats["messages"] += 1
    oversized = sum(map(len, frames)) > MAX_MESSAGE
    answer = live.send(frames, wait=0.3 if oversized else ANSWER_S)  # oversized: dropped
    if answer is None:
        assert oversized, frames[0][:200]
        stats["unanswered_oversized"] += 1
    else:
        stats["answers"] += 1
        code = answer["error"]["code"] if answer.get("status") == "error" else answer["type"]
        stats["codes"][code] = stats["codes"].get(code, 0) + 1
        if code == codes.INTERNAL:
            stats["internal"] += 1
            raise AssertionError(f"internal reply to {frames[0][:200]!r}: {answer}")
    if stats["messages"] % 25 == 0:
        assert alive(live.pid)
        live.status()


# `status` from another process (so that the fuzzer's own work cannot delay it) every 50 ms
# while the fuzz runs, each call within the client's 1.5 s deadline; figures on stdout at the end
POLLER = """
import json, select, sys, time
from sllmctl.errors import SllmError
from sllmctl.wire.client import Client
client, took, misses = Client(sys.argv[1]), [], 0
while not select.select([sys.stdin], [], [], 0.05)[0]:
    start = time.perf_counter()
    try:
        client.call("status")
    except SllmError:
        misses += 1
    took.append(time.perf_counter() - start)
took.sort()
print(json.dumps({"status_calls": len(took), "status_misses": misses,
                  "status_p50_s": round(took[len(took) // 2], 4),
                  "status_p99_s": round(took[int(len(took) * 0.99)], 4),
                  "status_max_s": round(took[-1], 4)}))
"""


def test_fuzz(live: Live) -> None:
    live.drain()
    poller = subprocess.Popen([sys.executable, "-c", POLLER, live.endpoint], env=live.env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        fuzz_one(live)
    finally:
        out, _ = poller.communicate("stop\n", timeout=60)
    polled = json.loads(out)
    assert alive(live.pid) and live.status()["daemon"]["pid"] == live.pid
    print(json.dumps({**stats, "deaths": 0, **polled}))
    assert polled["status_misses"] == 0 and polled["status_calls"] > 0
    assert stats["internal"] == 0 and stats["messages"] >= COUNT * 0.9
