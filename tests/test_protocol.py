"""The protocol on its own (no daemon): the envelope, every typed message, the error table."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from sllmctl.errors import CorruptCheckpoint, NotFound, SllmError
from sllmctl.wire import codes, messages
from sllmctl.wire.codes import BadRequest
from sllmctl.wire.envelope import (
    MAX_MESSAGE,
    PROTOCOL_VERSION,
    Envelope,
    Refused,
    decode_reply,
    reply_error,
)

# one valid example of every message, with each argument set away from its default
EXAMPLES: dict[str, dict[str, Any]] = {
    "ping": {"delay": 2.5},
    "status": {},
    "warm": {"name": "m-1.q4", "tier": "gpu", "gpu": 1},
    "unload": {"name": "m", "tier": "dram"},
    "measure": {},
    "serve": {"name": "m", "host": "0.0.0.0", "port": 9000, "keep_alive": -1,
              "api_key": "k"},
    "unserve": {"name": "m"},
    "pull": {"repo": "org/m-1", "name": "org--m-1", "revision": "v1.0", "dtype": "f16",
             "compress": True, "file": "m.Q4_K_M.gguf", "quant": "Q4_K_M", "force": True,
             "endpoint": "http://127.0.0.1:9", "token": "hf_x", "cache_dir": "/tmp/hf",
             "offline": True, "cancel": True},
    "shutdown": {},
    "reload": {},
    # issue 17 (h/migrate)
    "migrate": {"name": "m", "to": "h1", "request": "req-1", "dry_run": 1},
    "migrate_in": {"migration": "ab12cd34", "name": "m", "state": "{}", "round": 2},
    "migrate_end": {"migration": "ab12cd34ef"},
}

# per op: (field, bad value) pairs, each of which must be refused naming the field
MALFORMED: list[tuple[str, str, Any]] = [
    ("ping", "delay", "1"), ("ping", "delay", True), ("ping", "delay", -1),
    ("ping", "delay", messages.PING_MAX_DELAY + 1), ("ping", "delay", None),
    ("ping", "delay", [1]),
    ("warm", "name", 3), ("warm", "name", ""), ("warm", "name", "../etc"),
    ("warm", "name", "a\n"), ("warm", "name", None), ("warm", "name", {"a": 1}),
    ("warm", "tier", "ssd"), ("warm", "tier", 1), ("warm", "tier", None),
    ("warm", "gpu", "0"), ("warm", "gpu", 1.0), ("warm", "gpu", False), ("warm", "gpu", -1),
    ("unload", "name", []), ("unload", "tier", "both"),
    ("serve", "port", "8080"), ("serve", "port", 0), ("serve", "port", 70000),
    ("serve", "port", 80.5), ("serve", "host", ""), ("serve", "host", 7),
    ("serve", "keep_alive", "5m"), ("serve", "keep_alive", -2), ("serve", "keep_alive", 1e300),
    ("serve", "api_key", ""), ("serve", "api_key", 5), ("serve", "api_key", "k\u00e9y"),
    ("serve", "api_key", "a key"), ("serve", "host", "\ud800"), ("serve", "host", "a b"),
    ("unserve", "name", 1.5),
    ("pull", "repo", "noslash"), ("pull", "repo", "a/b/c"), ("pull", "repo", "../x"),
    ("pull", "repo", "org/.."), ("pull", "name", "org/m"), ("pull", "revision", "../main"),
    ("pull", "revision", ""), ("pull", "dtype", "int4"), ("pull", "compress", 1),
    ("pull", "offline", "yes"), ("pull", "file", "../x.gguf"), ("pull", "file", "x.bin"),
    ("pull", "endpoint", "file:///etc"), ("pull", "token", ""), ("pull", "cancel", None),
    ("migrate", "to", ""), ("migrate", "dry_run", 2), ("migrate", "dry_run", True),
    ("migrate_in", "migration", "XYZ12345"), ("migrate_in", "state", 7),
    ("migrate_in", "round", 0), ("migrate_end", "migration", "ab"),
]


def test_ops_are_one_table() -> None:
    assert set(messages.OPS) == set(EXAMPLES)
    assert {"status", "shutdown", "reload", "migrate_end"} == messages.FAST_OPS
    for m in messages.MESSAGES.values():
        assert m.roles and m.roles <= {messages.ADMIN, messages.PEER, messages.READ}


@pytest.mark.parametrize("op", sorted(EXAMPLES))
def test_every_message_round_trips(op: str) -> None:
    msg = messages.decode(op, EXAMPLES[op])
    assert msg.op == op and type(msg) is messages.MESSAGES[op]
    frames = Envelope(op, msg.to_args()).encode()
    env = Envelope.decode(frames, messages.OPS)
    again = messages.decode(env.op, json.loads(frames[0])["args"])
    assert again == msg
    assert {k: v for k, v in again.to_args().items() if k in EXAMPLES[op]} == EXAMPLES[op]
    assert messages.decode(op, {**EXAMPLES[op], "unknown": 1}) == msg  # unknown args ignored


def test_defaults() -> None:
    assert messages.decode("warm", {"name": "m"}) == messages.Warm("m", "dram", None)
    s = messages.decode("serve", {"name": "m"})
    assert (s.host, s.port, s.keep_alive, s.api_key) == ("127.0.0.1", 8080, 300.0, None)
    assert messages.decode("ping", {"delay": 1}).delay == 1.0  # an int is a number


@pytest.mark.parametrize(("op", "field", "value"), MALFORMED)
def test_every_malformed_field_is_bad_request_naming_it(op: str, field: str, value: Any) -> None:
    with pytest.raises(BadRequest) as e:
        messages.decode(op, {**EXAMPLES[op], field: value})
    assert e.value.field == field
    assert codes.code_of(e.value) == codes.BAD_REQUEST


@pytest.mark.parametrize("op", [op for op in EXAMPLES if op in ("warm", "unload", "serve",
                                                                 "unserve")])
def test_a_missing_name_is_bad_request(op: str) -> None:
    with pytest.raises(BadRequest, match="the request names no model") as e:
        messages.decode(op, {k: v for k, v in EXAMPLES[op].items() if k != "name"})
    assert e.value.field == "name"


def test_serving_beyond_loopback_wants_a_key() -> None:
    for host in ("127.0.0.1", "127.8.0.1", "::1", "localhost"):
        assert messages.decode("serve", {"name": "m", "host": host}).host == host
    for host in ("0.0.0.0", "10.1.2.3", "::", "127.evil.example"):
        with pytest.raises(BadRequest, match="without an API key is refused") as e:
            messages.decode("serve", {"name": "m", "host": host})
        assert e.value.field == "host"


def test_secrets_are_redacted() -> None:
    assert messages.decode("pull", EXAMPLES["pull"]).public_args()["token"] == messages.REDACTED
    msg = messages.decode("serve", EXAMPLES["serve"])
    assert msg.api_key == "k" and msg.public_args()["api_key"] == messages.REDACTED
    assert messages.decode("serve", {"name": "m"}).public_args()["api_key"] is None


def refused(frames: list[bytes]) -> Refused:
    with pytest.raises(Refused) as e:
        Envelope.decode(frames, messages.OPS)
    return e.value


def head(**fields: Any) -> list[bytes]:
    return [json.dumps({"v": 1, "id": "r1", "op": "status", "args": {}, **fields}).encode()]


@pytest.mark.parametrize(("frames", "code", "field", "rid"), [
    ([b"not json"], codes.BAD_REQUEST, None, None),
    ([b"\xff\xfe"], codes.BAD_REQUEST, None, None),
    ([b"[1, 2]"], codes.BAD_REQUEST, None, None),
    ([b"[" * 100_000 + b"]" * 100_000], codes.BAD_REQUEST, None, None),
    ([b"{}"] * 17, codes.BAD_REQUEST, None, None),
    ([b" " * (MAX_MESSAGE + 1)], codes.BAD_REQUEST, None, None),
    (head(id=None), codes.BAD_REQUEST, "id", None),
    (head(id=7), codes.BAD_REQUEST, "id", None),
    (head(id="x" * 129), codes.BAD_REQUEST, "id", None),
    (head(v=True), codes.BAD_REQUEST, "v", "r1"),
    (head(v=1.0), codes.BAD_REQUEST, "v", "r1"),
    (head(v="1"), codes.BAD_REQUEST, "v", "r1"),
    (head(v=None), codes.BAD_REQUEST, "v", "r1"),
    (head(v=2), codes.VERSION_MISMATCH, None, "r1"),
    (head(op="reboot"), codes.UNKNOWN_OP, None, "r1"),
    (head(op=["status"]), codes.UNKNOWN_OP, None, "r1"),
    (head(args=[1]), codes.BAD_REQUEST, "args", "r1"),
])
def test_malformed_envelopes(frames: list[bytes], code: str, field: str | None,
                             rid: str | None) -> None:
    e = refused(frames)
    assert codes.code_of(e.error) == code and e.rid == rid
    assert getattr(e.error, "field", None) == field


def test_version_mismatch_names_both() -> None:
    e = refused(head(v=99))
    assert e.error.message == (f"protocol version 99 refused: this daemon speaks version "
                               f"{PROTOCOL_VERSION}")


def test_error_replies_come_back_as_their_exceptions() -> None:
    cases: list[SllmError] = [
        BadRequest("b", "h", field="gpu"), codes.VersionMismatch("v"), codes.UnknownOp("u"),
        NotFound("n"), codes.DoesNotFit("d"), codes.NoGpu("g"), CorruptCheckpoint("c"),
        codes.Busy("busy"), codes.Internal("i")]
    for e in cases:
        reply = decode_reply(reply_error("r", codes.code_of(e), e))
        err = reply["error"]
        back = codes.error_for(err["code"], err["message"], err["hint"], err["field"])
        assert type(back) is type(e) and back.message == e.message and back.hint == e.hint
        assert getattr(back, "field", None) == getattr(e, "field", None)
    plain = SllmError("other")
    assert codes.code_of(plain) == codes.FAILED
    assert type(codes.error_for(codes.FAILED, "x")) is SllmError
    assert all(codes.code_of(codes.error_for(c, "x")) == c for c in codes.CODES)


def test_messages_are_dataclasses_with_rules() -> None:
    for m in messages.MESSAGES.values():
        for f in dataclasses.fields(m):
            assert isinstance(f.metadata["rule"], messages.Rule), (m.op, f.name)


def test_the_wire_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, sllmctl.wire.client, sllmctl.wire.messages, sllmctl.wire.runtime; "
            "print(sorted(m for m in sys.modules if m.startswith(('torch', 'sllmctl.daemon', "
            "'sllmctl.store', 'sllmctl.engine'))))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
