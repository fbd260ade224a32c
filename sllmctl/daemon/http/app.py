"""The OpenAI-compatible HTTP API, served by the daemon (Starlette on uvicorn, one listener
per host for all its models, routed by the request's `model`).

    GET  /health                 200 when ready, 503 while a model loads
    GET  /v1/models              the stored models
    POST /v1/chat/completions    chat; `stream: true` gives server-sent events ending in [DONE]
    POST /v1/completions         raw prompt completion; streams the same way
    GET  /metrics                Prometheus text: requests, tokens, TTFT, model loads

With an API key, every /v1 route wants `Authorization: Bearer <key>`; /health and /metrics
stay open for probes and scrapers.
"""

from __future__ import annotations

import json
import queue
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from sllmctl.engine.chat import Params
from sllmctl.engine.host import ModelHost
from sllmctl.errors import NotFound, SllmError


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.type,
                                       "param": self.param, "code": self.code}},
                            status_code=self.status)


class Metrics:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = {}
        self.prompt_tokens: dict[str, int] = {}
        self.completion_tokens: dict[str, int] = {}
        self.ttft: dict[str, list[float]] = {}

    def request(self, model: str, endpoint: str, status: int) -> None:
        with self.lock:
            key = (model, endpoint, status)
            self.requests[key] = self.requests.get(key, 0) + 1

    def tokens(self, model: str, prompt: int, completion: int, ttft: float) -> None:
        with self.lock:
            self.prompt_tokens[model] = self.prompt_tokens.get(model, 0) + prompt
            self.completion_tokens[model] = self.completion_tokens.get(model, 0) + completion
            sums = self.ttft.setdefault(model, [0.0, 0.0])
            sums[0] += ttft
            sums[1] += 1

    def render(self, host: ModelHost) -> str:
        lines = ["# TYPE sllmctl_requests_total counter"]
        with self.lock:
            for (m, e, s), n in sorted(self.requests.items()):
                lines.append(f'sllmctl_requests_total{{model="{m}",endpoint="{e}",'
                             f'status="{s}"}} {n}')
            lines.append("# TYPE sllmctl_prompt_tokens_total counter")
            lines += [f'sllmctl_prompt_tokens_total{{model="{m}"}} {n}'
                      for m, n in sorted(self.prompt_tokens.items())]
            lines.append("# TYPE sllmctl_generation_tokens_total counter")
            lines += [f'sllmctl_generation_tokens_total{{model="{m}"}} {n}'
                      for m, n in sorted(self.completion_tokens.items())]
            lines.append("# TYPE sllmctl_time_to_first_token_seconds summary")
            for m, (total, count) in sorted(self.ttft.items()):
                lines.append(f'sllmctl_time_to_first_token_seconds_sum{{model="{m}"}} {total}')
                lines.append(f'sllmctl_time_to_first_token_seconds_count{{model="{m}"}} '
                             f"{int(count)}")
        lines.append("# TYPE sllmctl_model_load_seconds gauge")
        for c in list(host.cold_starts):
            lines.append(f'sllmctl_model_load_seconds{{model="{c["model"]}",tier="{c["tier"]}"}} '
                         f'{c["seconds"]}')
        return "\n".join(lines) + "\n"


def _params(body: dict[str, Any]) -> Params:
    def number(key: str, default: float, lo: float, hi: float) -> float:
        v = body.get(key, default)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise ApiError(400, f"{key} must be a number in [{lo}, {hi}]", param=key)
        return float(v)

    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of up to 4 strings", param="stop")
    max_tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 256
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(400, "max_tokens must be a positive integer", param="max_tokens")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "seed must be an integer", param="seed")
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    return Params(max_tokens=max_tokens, temperature=number("temperature", 1.0, 0, 2),
                  top_p=number("top_p", 1.0, 1e-9, 1), top_k=int(number("top_k", 0, 0, 1e9)),
                  seed=seed, stop=stop)


def make_app(host: ModelHost, models: Any, api_key: str | None = None,
             ready: Any = lambda: True) -> Starlette:
    """`models()` lists stored model names; `ready()` says whether the daemon is up."""
    metrics = Metrics()

    def check_key(request: Request) -> None:
        if api_key and not secrets.compare_digest(
                request.headers.get("authorization", ""), f"Bearer {api_key}"):
            raise ApiError(401, "invalid or missing API key", "authentication_error",
                           code="invalid_api_key")

    async def body_of(request: Request) -> dict[str, Any]:
        check_key(request)
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            raise ApiError(400, "the request needs a model", param="model")
        return body

    def generate(endpoint: str, body: dict[str, Any], kind: str) -> Response:
        params = _params(body)
        name = body["model"]
        messages: list[dict[str, Any]] = body.get("messages") or []
        if kind == "chat":
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
        elif not isinstance(body.get("prompt"), str):
            raise ApiError(400, "prompt must be a string", param="prompt")
        if name not in models():
            raise ApiError(404, f"model {name!r} does not exist", code="model_not_found",
                           param="model")
        keep_alive = body.get("keep_alive")
        rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        obj = "chat.completion" if kind == "chat" else "text_completion"

        def run(on_text: Any) -> Any:
            served = host.get(name, None if keep_alive is None else float(keep_alive))
            try:
                m = served.model
                if kind == "chat":
                    return m.chat(messages, params, on_text)
                return m.complete(body["prompt"], params, on_text)
            finally:
                host.release(served)

        def account(done: Any) -> dict[str, int]:
            metrics.tokens(name, done.prompt_tokens, done.completion_tokens, done.ttft)
            return {"prompt_tokens": done.prompt_tokens,
                    "completion_tokens": done.completion_tokens,
                    "total_tokens": done.prompt_tokens + done.completion_tokens}

        if not body.get("stream"):
            done = run(None)
            metrics.request(name, endpoint, 200)
            choice: dict[str, Any] = {"index": 0, "finish_reason": done.finish_reason}
            if kind == "chat":
                choice["message"] = {"role": "assistant", "content": done.text}
            else:
                choice["text"], choice["logprobs"] = done.text, None
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": name,
                                 "choices": [choice], "usage": account(done)})

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        def chunk(delta: Any, finish: str | None) -> str:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish}
            if kind == "chat":
                c["delta"] = delta
            else:
                c["text"], c["logprobs"] = delta.get("content", ""), None
            return "data: " + json.dumps({"id": rid, "object": obj + ".chunk" if kind == "chat"
                                          else obj, "created": created, "model": name,
                                          "choices": [c]}) + "\n\n"

        def events() -> Iterator[str]:
            q: queue.Queue[Any] = queue.Queue()
            thread = threading.Thread(
                target=lambda: q.put(("done", _safe(run, lambda t: q.put(("text", t))))),
                daemon=True)
            thread.start()
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""}, None)
            while True:
                what, value = q.get()
                if what == "text":
                    yield chunk({"content": value}, None)
                    continue
                if isinstance(value, BaseException):
                    err = value.message if isinstance(value, SllmError) else str(value)
                    yield "data: " + json.dumps({"error": {"message": err,
                                                           "type": "server_error"}}) + "\n\n"
                    break
                usage = account(value)
                yield chunk({}, value.finish_reason)
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": obj + ".chunk",
                                                 "created": created, "model": name,
                                                 "choices": [], "usage": usage}) + "\n\n"
                break
            metrics.request(name, endpoint, 200)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    def endpoint(path: str, kind: str) -> Any:
        async def handle(request: Request) -> Response:
            try:
                body = await body_of(request)
                if body.get("stream"):
                    return generate(path, body, kind)
                return await run_in_threadpool(generate, path, body, kind)
            except ApiError as e:
                return e.response()
            except NotFound as e:
                return ApiError(404, e.message, code="model_not_found").response()
            except SllmError as e:
                return ApiError(500, e.message, "server_error").response()
        return handle

    async def health(request: Request) -> Response:
        if not ready() or host.busy_loading:
            return JSONResponse({"status": "loading"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def list_models(request: Request) -> Response:
        try:
            check_key(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [
            {"id": n, "object": "model", "created": 0, "owned_by": "sllmctl"}
            for n in models()]})

    async def prometheus(request: Request) -> Response:
        return PlainTextResponse(metrics.render(host), media_type="text/plain; version=0.0.4")

    return Starlette(routes=[
        Route("/health", health),
        Route("/v1/models", list_models),
        Route("/v1/chat/completions", endpoint("/v1/chat/completions", "chat"),
              methods=["POST"]),
        Route("/v1/completions", endpoint("/v1/completions", "completion"), methods=["POST"]),
        Route("/metrics", prometheus),
    ])


def _safe(fn: Any, arg: Any) -> Any:
    try:
        return fn(arg)
    except BaseException as e:
        return e


def bind(host: str, port: int) -> socket.socket:
    """Bind the listener here, so that a port in use is one clear error, not a log line."""
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
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]},
                              name="sllmctl-http", daemon=True)
    thread.start()
    return server
