"""Request validation (params.py), sampling defaults, and /health while a model loads."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from sllmctl.daemon.http import ModelHost, bind, make_app, serve_in_thread
from sllmctl.daemon.http import params as p
from sllmctl.engine.config import sampling_defaults
from sllmctl.engine.request import SamplingParams


@pytest.mark.parametrize(("value", "seconds"), [
    (None, None), (0, 0.0), (30, 30.0), (2.5, 2.5), (-5, -1.0), ("5m", 300.0), ("1h", 3600.0),
    ("30s", 30.0), ("1h30m", 5400.0), ("1.5h", 5400.0), ("500ms", 0.5), ("-1", -1.0),
    ("-1m", -1.0), ("0", 0.0), ("120", 120.0),
])
def test_keep_alive_takes_ollama_forms(value: Any, seconds: float | None) -> None:
    assert p.keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["5 m", "m", "", "5x", "1h-3m", "nan", "inf", True, [5], {}])
def test_bad_keep_alive_is_a_400(value: Any) -> None:
    with pytest.raises(p.ApiError) as e:
        p.keep_alive(value)
    assert e.value.status == 400 and e.value.param == "keep_alive"


def test_text_parts_become_one_string_and_other_keys_stay() -> None:
    [m] = p.messages([{"role": "user", "name": "ann", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert m == {"role": "user", "name": "ann", "content": "a\nb"}
    [tool] = p.messages([{"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}])
    assert tool["content"] is None


def test_sampling_comes_from_the_request_then_the_model_then_greedy() -> None:
    ask = p.parse({"model": "m", "prompt": "x", "top_p": 0.5, "max_tokens": 7}, "completion")
    assert p.sampling(ask.sampling, {}) == SamplingParams(max_tokens=7, top_p=0.5)
    model = {"temperature": 0.6, "top_p": 0.9, "top_k": 20}
    got = p.sampling(ask.sampling, model)
    assert (got.temperature, got.top_p, got.top_k, got.max_tokens) == (0.6, 0.5, 20, 7)
    none = p.parse({"model": "m", "prompt": "x"}, "completion")
    assert p.sampling(none.sampling, {}) == SamplingParams(max_tokens=p.DEFAULT_MAX_TOKENS)
    assert p.parse({"model": "m", "prompt": "x", "max_completion_tokens": 3, "max_tokens": 9},
                   "completion").sampling["max_tokens"] == 3


def test_sampling_defaults_read_generation_config(tmp_path: Path) -> None:
    assert sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "do_sample": True, "max_length": 9}))
    assert sampling_defaults(tmp_path) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": "hot",
                                                                 "top_p": 3}))
    assert sampling_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text("{oops")
    assert sampling_defaults(tmp_path) == {}


def test_errors_escape_what_cannot_be_encoded() -> None:
    r = p.ApiError(400, "model 'a\ud800' does not exist", param="model").response()
    assert json.loads(bytes(r.body))["error"]["message"] == "model 'a\ud800' does not exist"


def test_health_answers_200_while_a_second_model_loads() -> None:
    gate = threading.Event()

    def loader(name: str) -> tuple[Any, str]:
        if name == "slow":
            gate.wait()
        return SimpleNamespace(loading=None, close=lambda: None), "disk"

    host = ModelHost(loader)
    sock = bind("127.0.0.1", 0)
    server = serve_in_thread(make_app(host, lambda: ["fast", "slow"]), sock)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/health"
    while not server.started:
        threading.Event().wait(0.01)

    def health() -> tuple[int, Any]:
        try:
            r = urllib.request.urlopen(url)
            return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    try:
        slow = threading.Thread(target=host.get, args=("slow",))
        slow.start()
        while "slow" not in host.loading:
            threading.Event().wait(0.01)
        assert health() == (503, {"status": "loading", "ready": [], "loading": ["slow"]})
        host.get("fast")
        assert health() == (200, {"status": "ok", "ready": ["fast"], "loading": ["slow"]})
        gate.set()
        slow.join()
        assert health() == (200, {"status": "ok", "ready": ["fast", "slow"], "loading": []})
    finally:
        gate.set()
        server.should_exit = True


def test_a_model_that_fails_to_load_is_a_500_with_its_message() -> None:
    from sllmctl.errors import CorruptCheckpoint

    def loader(name: str) -> tuple[Any, str]:
        raise CorruptCheckpoint(f"model {name} is corrupt: data.bin fails its checksum")

    sock = bind("127.0.0.1", 0)
    server = serve_in_thread(make_app(ModelHost(loader), lambda: ["bad"]), sock)
    while not server.started:
        threading.Event().wait(0.01)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(
            {"model": "bad", "prompt": "x", "stream": True}).encode())
        with pytest.raises(urllib.error.HTTPError) as e:
            urllib.request.urlopen(req)
        assert e.value.code == 500
        assert json.loads(e.value.read())["error"] == {
            "message": "model bad is corrupt: data.bin fails its checksum",
            "type": "server_error", "param": None, "code": None}
        text = urllib.request.urlopen(url + "/metrics").read().decode()
        assert 'model="bad",endpoint="/v1/completions",status="500"} 1' in text
    finally:
        server.should_exit = True
