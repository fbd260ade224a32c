"""The Starlette app: routes, the API key, and the one place errors become responses.

Every error is JSON in OpenAI's shape, unknown routes included (404). A completion request is
validated (params.py), its model loaded and its prompt checked against the engine's length
before anything is answered; then it is answered whole, or streamed (stream.py).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Iterable
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from sllmctl.daemon.http import params
from sllmctl.daemon.http.host import ModelHost, Served
from sllmctl.daemon.http.metrics import ABORTED, Metrics
from sllmctl.daemon.http.params import ApiError, Ask, json_response
from sllmctl.daemon.http.stream import Answer, event_stream
from sllmctl.engine.chat import Completion
from sllmctl.engine.request import ContextTooLong
from sllmctl.engine.request import Request as EngineRequest
from sllmctl.errors import NotFound, SllmError

log = logging.getLogger("sllmctl.daemon")
POLL = 0.25  # seconds between looks for a client gone while its whole answer is made


def make_app(host: ModelHost, models: Callable[[], Iterable[str]], api_key: str | None = None,
             ready: Callable[[], bool] = lambda: True,
             max_body: int = params.MAX_BODY) -> Starlette:
    """`models()` lists stored model names; `ready()` says whether the daemon is up; bodies
    over `max_body` bytes are refused (413)."""
    api = Api(host, models, api_key, ready, max_body)
    return Starlette(routes=[
        Route("/health", api.health),
        Route("/v1/models", api.list_models),
        Route("/v1/chat/completions", api.completion("/v1/chat/completions", "chat"),
              methods=["POST"]),
        Route("/v1/completions", api.completion("/v1/completions", "completion"),
              methods=["POST"]),
        Route("/metrics", api.prometheus),
    ], exception_handlers={HTTPException: api.no_route, Exception: api.server_error})


class Api:
    def __init__(self, host: ModelHost, models: Callable[[], Iterable[str]],
                 api_key: str | None, ready: Callable[[], bool], max_body: int) -> None:
        self.host, self.models, self.api_key, self.ready = host, models, api_key, ready
        self.max_body = max_body
        self.metrics = Metrics()

    def check_key(self, request: Request) -> None:
        if self.api_key and not secrets.compare_digest(
                request.headers.get("authorization", ""), f"Bearer {self.api_key}"):
            raise ApiError(401, "invalid or missing API key", "authentication_error",
                           code="invalid_api_key")

    # ------------------------------------------------------------ completions
    def completion(self, endpoint: str, kind: str) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                return await self.answer(request, endpoint, kind)
            except ClientDisconnect:
                self.metrics.request(getattr(request.state, "model", ""), endpoint, ABORTED)
                return Response(status_code=400)
            except (ApiError, SllmError) as e:
                error = e if isinstance(e, ApiError) else _api_error(e)
                self.metrics.request(getattr(request.state, "model", ""), endpoint,
                                     error.status)
                return error.response()
        return handle

    async def answer(self, request: Request, endpoint: str, kind: str) -> Response:
        """The response; a whole answer is counted here, a stream when it ends."""
        self.check_key(request)
        ask = params.parse(params.parse_json(await _body(request, self.max_body)), kind)
        names = self.models()
        if ask.model not in names and ask.model.replace("/", "--") in names:
            ask.model = ask.model.replace("/", "--")  # a repo id: pulled as org--model
        if ask.model not in names:
            raise ApiError(404, f"model {ask.model!r} does not exist", param="model",
                           code="model_not_found")
        request.state.model = ask.model  # a stored name: safe as a metrics label
        served, req = await run_in_threadpool(self.prepare, ask)
        reply = Answer(kind, ask.model)
        if ask.stream:
            def closed(status: int | str) -> None:
                req.cancel()
                self.metrics.request(ask.model, endpoint, status)

            return event_stream(reply, lambda on_text: self.generate(served, req, on_text),
                                ask.include_usage, closed)
        work = asyncio.ensure_future(run_in_threadpool(self.generate, served, req))
        gone = False
        while not (await asyncio.wait({work}, timeout=POLL))[0]:
            if not gone and await request.is_disconnected():
                gone = True
                req.cancel()  # nobody will read the answer: let its slot go
        done = work.result()
        self.metrics.request(ask.model, endpoint, ABORTED if gone else 200)
        return json_response(reply.body(done))

    def prepare(self, ask: Ask) -> tuple[Served, EngineRequest]:
        """Load the model and build the request; a prompt the engine cannot hold is a 400."""
        served = self.host.get(ask.model, ask.keep_alive)
        try:
            model = served.model
            sampling = params.sampling(ask.sampling, model.defaults)
            if ask.kind == "chat":
                return served, model.chat_request(ask.messages, sampling)
            return served, model.completion_request(ask.prompt, sampling)
        except ContextTooLong as e:
            self.host.release(served)
            raise ApiError(400, e.message, param="messages" if ask.kind == "chat" else "prompt",
                           code="context_length_exceeded") from None
        except SllmError as e:  # the chat template refused the conversation
            self.host.release(served)
            raise ApiError(400, e.message, param="messages") from None
        except BaseException:
            self.host.release(served)
            raise

    def generate(self, served: Served, req: EngineRequest, on_text: Any = None) -> Completion:
        try:
            done = served.model.generate(req, on_text)
        finally:
            self.host.release(served)
        self.metrics.tokens(served.name, done.prompt_tokens, done.completion_tokens,
                            done.ttft if done.completion_tokens else None)
        return done

    # ------------------------------------------------------------ the rest
    async def health(self, request: Request) -> Response:
        ok, loading = self.host.readiness()
        if not self.ready():
            return json_response({"status": "starting", "ready": ok, "loading": loading}, 503)
        if loading and not ok:
            return json_response({"status": "loading", "ready": ok, "loading": loading}, 503)
        return json_response({"status": "ok", "ready": ok, "loading": loading})

    async def list_models(self, request: Request) -> Response:
        try:
            self.check_key(request)
        except ApiError as e:
            return e.response()
        return json_response({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "sllmctl"}
            for n in self.models()]})

    async def prometheus(self, request: Request) -> Response:
        return PlainTextResponse(self.metrics.render(list(self.host.cold_starts)),
                                 media_type="text/plain; version=0.0.4")

    async def no_route(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        try:
            if request.url.path.startswith("/v1"):
                self.check_key(request)
        except ApiError as e:
            return e.response()
        message = f"Invalid URL ({request.method} {request.url.path})"
        if status == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return ApiError(status, message, code="not_found" if status == 404 else None).response()

    async def server_error(self, request: Request, exc: Exception) -> Response:
        log.exception("HTTP %s %s failed", request.method, request.url.path, exc_info=exc)
        return ApiError(500, "internal server error", "server_error").response()


def _api_error(e: SllmError) -> ApiError:
    """A model that is gone is a 404; a load that failed (a corrupt model, say) is the
    server's error, with its message."""
    if isinstance(e, NotFound):
        return ApiError(404, e.message, param="model", code="model_not_found")
    return ApiError(500, e.message, "server_error")


async def _body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes `limit` bytes."""
    too_big = ApiError(413, f"the request body is larger than {limit} bytes",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)
