"""The CLI <-> daemon protocol, version 1 (the specification is docs/protocol.md).

ZeroMQ, client DEALER to daemon ROUTER. Every message is one JSON frame (UTF-8), followed
by zero or more binary frames for tensors and blobs that the JSON names. Never pickle.

    request  {"v": 1, "id": "<hex>", "op": "<op>", "args": {...}}
    event    {"v": 1, "id": "<request id>", "type": "progress", "stage": s, "done": n, "total": m}
    reply    {"v": 1, "id": "<request id>", "type": "reply", "status": "ok", "result": {...}}
             {"v": 1, "id": ..., "type": "reply", "status": "error",
              "error": {"code": c, "message": m, "hint": h}}

A long job sends progress events (at least one a second while it runs), then exactly one
reply; a heartbeat may still arrive after the reply, and clients ignore messages for a
request they are no longer waiting on. The daemon refuses a request whose "v" differs from
its own with the error code `version_mismatch`, naming both versions.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

PROTOCOL_VERSION = 1

# operations; the daemon answers FAST_OPS in its socket loop, the rest on worker threads
OPS = ("ping", "status", "warm", "unload", "measure", "serve", "unserve", "shutdown")
FAST_OPS = frozenset({"status", "shutdown"})

# error codes
BAD_REQUEST = "bad_request"
VERSION_MISMATCH = "version_mismatch"
UNKNOWN_OP = "unknown_op"
NOT_FOUND = "not_found"
DOES_NOT_FIT = "does_not_fit"
NO_GPU = "no_gpu"
CORRUPT = "corrupt_checkpoint"
FAILED = "failed"
INTERNAL = "internal"


class ProtocolError(Exception):
    """A message that breaks the protocol; `code` is one of the error codes."""

    def __init__(self, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.hint = code, message, hint


@dataclass
class Request:
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    v: int = PROTOCOL_VERSION

    def encode(self) -> list[bytes]:
        return [_dump({"v": self.v, "id": self.id, "op": self.op, "args": self.args})]

    @classmethod
    def decode(cls, frames: list[bytes]) -> Request:
        """Parse a request; ProtocolError says what is wrong (with the id where known)."""
        if not frames:
            raise ProtocolError(BAD_REQUEST, "empty message")
        head = _load(frames[0])
        rid = head.get("id")
        if not isinstance(rid, str) or not rid:
            raise ProtocolError(BAD_REQUEST, "request has no id")
        if head.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(
                VERSION_MISMATCH,
                f"protocol version {head.get('v')!r} refused: this daemon speaks version "
                f"{PROTOCOL_VERSION}",
                hint="use the sllmctl that matches the daemon, or restart the daemon: "
                "sllmctl daemon stop && sllmctl daemon start",
            )
        op, args = head.get("op"), head.get("args", {})
        if op not in OPS:
            raise ProtocolError(UNKNOWN_OP, f"unknown operation {op!r}",
                                hint=f"known: {', '.join(OPS)}")
        if not isinstance(args, dict):
            raise ProtocolError(BAD_REQUEST, "args must be an object")
        return cls(op=op, args=args, id=rid)


def request_id(frames: list[bytes]) -> str | None:
    """The id of a message, if it has a readable one (to address an error reply)."""
    try:
        rid = json.loads(frames[0]).get("id") if frames else None
    except (ValueError, AttributeError):
        return None
    return rid if isinstance(rid, str) else None


def reply_ok(rid: str, result: Any) -> list[bytes]:
    return [_dump({"v": PROTOCOL_VERSION, "id": rid, "type": "reply", "status": "ok",
                   "result": result})]


def reply_error(rid: str | None, code: str, message: str, hint: str | None = None) -> list[bytes]:
    return [_dump({"v": PROTOCOL_VERSION, "id": rid, "type": "reply", "status": "error",
                   "error": {"code": code, "message": message, "hint": hint}})]


def progress(rid: str, stage: str, done: int, total: int) -> list[bytes]:
    return [_dump({"v": PROTOCOL_VERSION, "id": rid, "type": "progress", "stage": stage,
                   "done": done, "total": total})]


def decode_reply(frames: list[bytes]) -> dict[str, Any]:
    if not frames:
        raise ProtocolError(BAD_REQUEST, "empty message")
    head = _load(frames[0])
    if head.get("type") not in ("reply", "progress"):
        raise ProtocolError(BAD_REQUEST, f"unexpected message type {head.get('type')!r}")
    return head


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _load(frame: bytes) -> dict[str, Any]:
    try:
        obj = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(BAD_REQUEST, f"message is not JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ProtocolError(BAD_REQUEST, "message is not a JSON object")
    return obj
