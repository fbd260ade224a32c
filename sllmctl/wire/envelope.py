"""The envelope every message travels in, protocol version 1 (spec: docs/protocol.md).

ZeroMQ, client DEALER to daemon ROUTER. Every message is one JSON frame (UTF-8), then zero or
more binary frames that the JSON names (none in version 1). Never pickle.

    request  {"v": 1, "id": "<hex>", "op": "<op>", "args": {...}}
    event    {"v": 1, "id": "<request id>", "type": "progress", "stage": s, "done": n, "total": m}
    reply    {"v": 1, "id": "<request id>", "type": "reply", "status": "ok", "result": {...}}
             {"v": 1, "id": ..., "type": "reply", "status": "error",
              "error": {"code": c, "message": m, "hint": h, "field": f}}

The arguments of each operation are typed in messages.py; this module checks only the
envelope, in the order size -> JSON object -> id -> v -> op -> args is an object.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from sllmctl.errors import SllmError
from sllmctl.wire.codes import BadRequest, UnknownOp, VersionMismatch

PROTOCOL_VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes, all frames of one request together; ZMQ_MAXMSGSIZE too
MAX_FRAMES = 16
MAX_ID = 128  # characters of a request id


class Refused(Exception):
    """A request that cannot be taken: the error to answer with, and the request's id where
    one could be read (None: the reply goes out with `"id": null`)."""

    def __init__(self, rid: str | None, error: SllmError) -> None:
        super().__init__(error.message)
        self.rid, self.error = rid, error


@dataclass
class Envelope:
    op: str
    args: dict[str, Any] = field(default_factory=dict)
    id: str = field(default_factory=lambda: secrets.token_hex(8))
    v: int = PROTOCOL_VERSION

    def encode(self) -> list[bytes]:
        return [dump({"v": self.v, "id": self.id, "op": self.op, "args": self.args})]

    @classmethod
    def decode(cls, frames: list[bytes], ops: tuple[str, ...]) -> Envelope:
        """Parse a request whose op must be one of `ops`; Refused says what is wrong."""
        size = sum(len(f) for f in frames)
        if not frames or len(frames) > MAX_FRAMES or size > MAX_MESSAGE:
            raise Refused(None, BadRequest(
                f"a request is 1 to {MAX_FRAMES} frames of {MAX_MESSAGE} bytes in all, not "
                f"{len(frames)} of {size}"))
        try:
            head = load(frames[0])
        except BadRequest as e:
            raise Refused(None, e) from None
        rid = head.get("id")
        if not isinstance(rid, str) or not 0 < len(rid) <= MAX_ID:
            raise Refused(None, BadRequest(
                f"request has no id (a string of 1 to {MAX_ID} characters)", field="id"))
        v = head.get("v")
        if type(v) is not int:  # bool and float are not versions
            raise Refused(rid, BadRequest(f"v must be an integer, not {show(v)}", field="v"))
        if v != PROTOCOL_VERSION:
            raise Refused(rid, VersionMismatch(
                f"protocol version {v} refused: this daemon speaks version {PROTOCOL_VERSION}",
                hint="use the sllmctl that matches the daemon, or restart the daemon: "
                "sllmctl daemon stop && sllmctl daemon start"))
        op, args = head.get("op"), head.get("args", {})
        if not isinstance(op, str) or op not in ops:
            raise Refused(rid, UnknownOp(f"unknown operation {show(op)}",
                                         hint=f"known: {', '.join(ops)}"))
        if not isinstance(args, dict):
            raise Refused(rid, BadRequest("args must be an object", field="args"))
        return cls(op=op, args=args, id=rid, v=v)


def reply_ok(rid: str, result: Any) -> list[bytes]:
    return [dump({"v": PROTOCOL_VERSION, "id": rid, "type": "reply", "status": "ok",
                  "result": result})]


def reply_error(rid: str | None, code: str, e: SllmError) -> list[bytes]:
    error = {"code": code, "message": e.message, "hint": e.hint,
             "field": e.field if isinstance(e, BadRequest) else None}
    return [dump({"v": PROTOCOL_VERSION, "id": rid, "type": "reply", "status": "error",
                  "error": error})]


def progress(rid: str, stage: str, done: int, total: int,
             data: dict[str, Any] | None = None) -> list[bytes]:
    """A progress event; `data` (an object) rides along where an operation streams results
    (migrate_in's tokens)."""
    event = {"v": PROTOCOL_VERSION, "id": rid, "type": "progress", "stage": stage,
             "done": done, "total": total}
    if data is not None:
        event["data"] = data
    return [dump(event)]


def decode_reply(frames: list[bytes]) -> dict[str, Any]:
    """An event or reply from the daemon; BadRequest if it is neither."""
    if not frames:
        raise BadRequest("empty message")
    head = load(frames[0])
    if head.get("type") not in ("reply", "progress"):
        raise BadRequest(f"unexpected message type {show(head.get('type'))}")
    return head


def dump(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def load(frame: bytes) -> dict[str, Any]:
    """One JSON object; BadRequest for anything else (bad UTF-8, too deep, not an object)."""
    try:
        obj = json.loads(frame)
    except RecursionError:
        raise BadRequest("message is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise BadRequest(f"message is not JSON ({str(e)[:80]})") from None
    if not isinstance(obj, dict):
        raise BadRequest("message is not a JSON object")
    return obj


def show(value: Any) -> str:
    """A value for an error message: short, and never a deep repr (which could recurse)."""
    if value is None or isinstance(value, bool | int | float):
        text = repr(value)
    elif isinstance(value, str):
        text = repr(value[:40] + ("..." if len(value) > 40 else ""))
    else:
        return f"a {type(value).__name__}"
    return text if len(text) <= 60 else text[:57] + "..."
