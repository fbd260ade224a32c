"""Answers in OpenAI's shapes: one JSON body, or server-sent events ending in [DONE].

A stream generates in a thread of its own and hands text to the event loop as it comes.
However the response ends (finished, failed, or its client gone), `on_close` runs with how it
ended, and the app cancels the request there, so that a dropped client frees its batch slot at
the engine's next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from sllmctl.daemon.http.metrics import ABORTED
from sllmctl.engine.chat import Completion
from sllmctl.errors import SllmError


def usage(done: Completion) -> dict[str, int]:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


class Answer:
    """What every part of one answer shares: its id, kind, model and creation time."""

    def __init__(self, kind: str, model: str) -> None:
        self.chat = kind == "chat"
        self.model = model
        self.id = ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.object = "chat.completion" if self.chat else "text_completion"

    def body(self, done: Completion) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": done.text}
        else:
            choice["text"], choice["logprobs"] = done.text, None
        return self._head(self.object) | {"choices": [choice], "usage": usage(done)}

    def chunk(self, delta: dict[str, Any], finish: str | None) -> str:
        c: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            c["delta"] = delta
        else:
            c["text"], c["logprobs"] = delta.get("content", ""), None
        return _event(self._head(self.object + ".chunk" if self.chat else self.object)
                      | {"choices": [c]})

    def usage_chunk(self, done: Completion) -> str:
        return _event(self._head(self.object + ".chunk" if self.chat else self.object)
                      | {"choices": [], "usage": usage(done)})

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


def _event(data: Any) -> str:
    return "data: " + json.dumps(data) + "\n\n"


class EventStream(StreamingResponse):
    """Server-sent events with a callback that runs however the response ends."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def event_stream(answer: Answer, run: Callable[[Callable[[str], None]], Completion],
                 include_usage: bool,
                 on_close: Callable[[int | str], None]) -> EventStream:
    """Start `run(on_text)` in a thread now; stream what it produces. `on_close` gets 200,
    500 (the generation failed) or ABORTED (the client left first)."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def put(item: tuple[str, Any]) -> None:
        with contextlib.suppress(RuntimeError):  # the event loop has gone
            loop.call_soon_threadsafe(q.put_nowait, item)

    def work() -> None:
        try:
            put(("done", run(lambda text: put(("text", text)))))
        except BaseException as e:
            put(("error", e))

    threading.Thread(target=work, name="sllmctl-stream", daemon=True).start()
    ended: list[int | str] = [ABORTED]

    async def events() -> AsyncIterator[str]:
        if answer.chat:
            yield answer.chunk({"role": "assistant", "content": ""}, None)
        while True:
            what, value = await q.get()
            if what == "text":
                yield answer.chunk({"content": value}, None)
                continue
            if what == "error":
                ended[0] = 500
                message = value.message if isinstance(value, SllmError) else str(value)
                yield _event({"error": {"message": message, "type": "server_error",
                                        "param": None, "code": None}})
                return
            yield answer.chunk({}, value.finish_reason)
            if include_usage:
                yield answer.usage_chunk(value)
            ended[0] = 200
            yield "data: [DONE]\n\n"
            return

    return EventStream(events(), lambda: on_close(ended[0]))
