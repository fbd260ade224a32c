"""Request validation for the HTTP API: every client error is an `ApiError`, answered as a
4xx in OpenAI's error shape, before any answer has started (so a stream that would fail
never answers 200 first).

Checked here: the body (size, JSON, an object naming a model), messages (a role, and content
that is a string or a list of text parts, which the official client sends), the prompt,
sampling fields (types and ranges as OpenAI has them: `max_tokens` at least 1, `stream` a
bool), `stream_options`, ollama's `keep_alive` (seconds, or a duration such as 5m, 1h, 30s),
and strings that cannot be UTF-8 (a lone surrogate such as \\ud800).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import Response

from sllmctl.durations import parse_duration
from sllmctl.engine.request import SamplingParams

MAX_BODY = 4 << 20  # bytes in one request body (413 beyond)
ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_MAX_TOKENS = 256


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type_,
                                                                       param, code)

    def response(self) -> Response:
        return json_response({"error": {"message": self.message, "type": self.type,
                                         "param": self.param, "code": self.code}}, self.status)


def json_response(body: Any, status: int = 200) -> Response:
    """JSON with non-ASCII escaped, so that any string (even one a client sent) encodes."""
    return Response(json.dumps(body), status_code=status, media_type="application/json")


@dataclass
class Ask:
    """One validated completion request."""

    kind: str  # chat or completion
    model: str
    messages: list[dict[str, Any]] = field(default_factory=list)
    prompt: str = ""
    sampling: dict[str, Any] = field(default_factory=dict)  # only the fields given
    stream: bool = False
    include_usage: bool = False
    keep_alive: float | None = None


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return body


def parse(body: dict[str, Any], kind: str) -> Ask:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "the request needs a model", param="model")
    _utf8(model, "model")
    ask = Ask(kind, model, sampling=_sampling(body), keep_alive=keep_alive(body.get("keep_alive")))
    if kind == "chat":
        ask.messages = messages(body.get("messages"))
    else:
        ask.prompt = _prompt(body.get("prompt"))
    ask.stream = _bool(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options must be an object", param="stream_options")
        if not ask.stream:
            raise ApiError(400, "stream_options is only allowed when stream is true",
                           param="stream_options")
        ask.include_usage = _bool(options, "include_usage", "stream_options.include_usage")
    return ask


def sampling(given: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
    """A request's sampling: its own fields, else the model's defaults, else greedy."""
    merged = {"max_tokens": DEFAULT_MAX_TOKENS, **defaults, **given}
    return SamplingParams(**merged)


def keep_alive(value: Any) -> float | None:
    """Seconds to keep the model loaded after this request (ollama's forms: a number of
    seconds or a duration string; negative keeps it loaded for good)."""
    if value is None:
        return None
    if isinstance(value, str | int | float):
        with contextlib.suppress(ValueError):
            return parse_duration(value)
    raise ApiError(400, "keep_alive must be seconds or a duration such as 5m, 1h or 30s "
                   "(negative keeps the model loaded)", param="keep_alive")


def messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise ApiError(400, "messages must be a non-empty list", param="messages")
    return [_message(m, f"messages[{i}]") for i, m in enumerate(value)]


def _message(m: Any, where: str) -> dict[str, Any]:
    if not isinstance(m, dict):
        raise ApiError(400, f"{where} must be an object", param=where)
    role = m.get("role")
    if role not in ROLES:
        raise ApiError(400, f"{where}.role must be one of {', '.join(ROLES)}",
                       param=f"{where}.role")
    out = dict(m)
    content = m.get("content")
    if content is None and not (role == "assistant" and m.get("tool_calls")):
        raise ApiError(400, f"{where}.content is missing", param=f"{where}.content")
    if isinstance(content, list):
        content = "\n".join(_text_part(p, f"{where}.content[{j}]") for j, p in enumerate(content))
    elif content is not None and not isinstance(content, str):
        raise ApiError(400, f"{where}.content must be a string or a list of text parts",
                       param=f"{where}.content")
    out["content"] = content
    _utf8(out, where)
    return out


def _text_part(part: Any, where: str) -> str:
    if not isinstance(part, dict) or part.get("type") != "text":
        kind = part.get("type") if isinstance(part, dict) else type(part).__name__
        raise ApiError(400, f"{where}: only text content parts are supported (got {kind!r})",
                       param=where)
    if not isinstance(part.get("text"), str):
        raise ApiError(400, f"{where}.text must be a string", param=f"{where}.text")
    return str(part["text"])


def _prompt(value: Any) -> str:
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not isinstance(value, str):
        raise ApiError(400, "prompt must be a string", param="prompt")
    _utf8(value, "prompt")
    return value


def _sampling(body: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, lo, hi in (("temperature", 0, 2), ("top_p", 1e-9, 1)):
        if body.get(key) is not None:
            out[key] = float(_number(body, key, lo, hi))
    if body.get("top_k") is not None:  # vLLM's extension; -1 is off, as 0
        out["top_k"] = max(0, int(_number(body, "top_k", -1, 1 << 30, integer=True)))
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    if body.get(key) is not None:
        out["max_tokens"] = int(_number(body, key, 1, 1 << 30, integer=True))
    if body.get("seed") is not None:
        out["seed"] = int(_number(body, "seed", -(1 << 63), (1 << 64) - 1, integer=True))
    if body.get("n") not in (None, 1):
        raise ApiError(400, "only n=1 is supported", param="n")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) \
                or len(stop) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 strings",
                           param="stop")
        _utf8(stop, "stop")
        out["stop"] = stop
    return out


def _number(body: dict[str, Any], key: str, lo: float, hi: float,
            integer: bool = False) -> float:
    v = body[key]
    kinds = int if integer else int | float
    if isinstance(v, bool) or not isinstance(v, kinds) or not lo <= v <= hi:
        what = "an integer" if integer else "a number"
        raise ApiError(400, f"{key} must be {what} in [{lo:g}, {hi:g}]", param=key)
    return v


def _bool(body: dict[str, Any], key: str, param: str | None = None) -> bool:
    v = body.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ApiError(400, f"{param or key} must be true or false", param=param or key)
    return v


def _utf8(value: Any, where: str) -> None:
    """Refuse strings that have no UTF-8 form (lone surrogates), anywhere in `value`."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ApiError(400, f"{where} holds a lone surrogate (not valid Unicode text)",
                           param=where) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _utf8(k, where)
            _utf8(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _utf8(v, f"{where}[{i}]")
