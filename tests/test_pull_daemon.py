"""`sllmctl pull` through a real daemon against the fake Hub: JSON Lines progress, `show`,
errors in one line, a shared download, Ctrl-C, and `serve smollm2-135m` on an empty store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fakehub import FakeHub, Repo
from test_pull import REPO, SHARD, tiny_model

from sllmctl.procs import alive

pytestmark = pytest.mark.daemon
MiB = 1 << 20


def sllmctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sllmctl", *args], capture_output=True,
                          text=True, env=os.environ.copy(), timeout=timeout)


def popen(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "sllmctl", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=os.environ.copy())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "src")


@pytest.fixture
def hub(tiny: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    h = FakeHub()
    h.repos[REPO] = Repo.from_folder(tiny)
    monkeypatch.setenv("HF_ENDPOINT", h.endpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    yield h
    h.close()


@pytest.fixture
def daemon(hub: FakeHub) -> Iterator[int]:
    r = sllmctl("daemon", "start", "--dram-pool", "256MiB", "--measure-bytes", str(MiB),
                "--json")
    assert r.returncode == 0, r.stderr
    pid = int(json.loads(r.stdout)["pid"])
    yield pid
    hub.release.set()
    sllmctl("daemon", "stop")
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def pull_jobs() -> list[dict[str, Any]]:
    r = sllmctl("ps", "--json", "--no-autostart")
    assert r.returncode == 0, r.stderr
    return [j for j in json.loads(r.stdout)["jobs"] if j["op"] == "pull"]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ask(endpoint: str, model: str, key: str) -> str:
    import urllib.request

    body = json.dumps({"model": model, "temperature": 0, "max_tokens": 16, "messages": [
        {"role": "user", "content": "What is the capital of France?"}]}).encode()
    req = urllib.request.Request(f"{endpoint}/chat/completions", body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return str(json.loads(r.read())["choices"][0]["message"]["content"])


def wait_for(what: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while not (found := what()):
        assert time.monotonic() < deadline, "waited too long"
        time.sleep(0.1)
    return found


def test_pull_streams_json_lines_and_show_names_the_commit(hub: FakeHub, daemon: int) -> None:
    r = sllmctl("pull", REPO, "--json")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    events, result = lines[:-1], lines[-1]
    assert events and all(e["event"] == "progress" for e in events)
    assert "downloading" in {e["stage"] for e in events}  # converting overlaps it
    commit = hub.repos[REPO].commit
    assert (result["name"], result["commit"], result["shared"]) == ("org--tiny", commit, False)
    shown = sllmctl("show", "org--tiny")
    assert f"repo:        {REPO}" in shown.stdout and f"commit:      {commit}" in shown.stdout
    again = sllmctl("pull", REPO)
    assert again.returncode == 0 and "up to date" in again.stdout


@pytest.mark.parametrize(("repo", "kind", "line"), [
    ("org/missing", None, "error: org/missing: no such repo on the Hub"),
    (REPO, "private", "error: org/tiny: access refused (401): set HF_TOKEN or accept the licence"),
    (REPO, "gated", "error: org/tiny: access refused (403): set HF_TOKEN or accept the licence"),
])
def test_refusals_are_one_line(hub: FakeHub, daemon: int, repo: str, kind: str | None,
                               line: str) -> None:
    if kind:
        setattr(hub.repos[REPO], kind, True)
    r = sllmctl("pull", repo)
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == line and len(r.stderr.splitlines()) == 2  # and a hint
    if kind:
        os.environ["HF_TOKEN"] = hub.repos[REPO].token
        try:
            assert sllmctl("pull", repo).returncode == 0
        finally:
            del os.environ["HF_TOKEN"]


def test_two_pulls_of_one_model_share_one_download(hub: FakeHub, daemon: int,
                                                   tiny: Path) -> None:
    hub.stall_after = 20_000
    first = popen("pull", REPO, "--json")
    wait_for(lambda: hub.gets(SHARD))
    second = popen("pull", REPO, "--json")
    jobs = wait_for(lambda: len(pull_jobs()) == 2 and pull_jobs())
    assert {j["args"]["repo"] for j in jobs} == {REPO}
    assert {j["args"]["token"] for j in jobs} == {None}
    hub.stall_after = None
    hub.release.set()
    results = [json.loads(p.communicate(timeout=120)[0].splitlines()[-1]) for p in
               (first, second)]
    assert sorted(r["shared"] for r in results) == [False, True]
    assert hub.sent[SHARD] == (tiny / SHARD).stat().st_size  # downloaded once


def test_ctrl_c_cancels_and_a_rerun_resumes(hub: FakeHub, daemon: int, tiny: Path) -> None:
    hub.stall_after = 20_000
    proc = popen("pull", REPO)
    wait_for(lambda: pull_jobs() and hub.gets(SHARD))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (out, err)
    assert "cancelled the pull of org--tiny" in err
    hub.stall_after = None
    hub.release.set()
    wait_for(lambda: not pull_jobs())
    r = sllmctl("pull", REPO, "--json")
    assert r.returncode == 0, r.stderr
    assert hub.sent[SHARD] == (tiny / SHARD).stat().st_size  # resumed: no byte twice


def test_detach_leaves_it_running_and_no_pull_refuses(hub: FakeHub, daemon: int) -> None:
    r = sllmctl("pull", REPO, "--detach", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["accepted"]
    wait_for(lambda: not pull_jobs() and sllmctl("show", "org--tiny").returncode == 0)
    r = sllmctl("warm", "org/other", "--no-pull")
    assert r.returncode == 1 and "model org--other is not in the store" in r.stderr
    assert "hint: sllmctl pull org/other" in r.stderr


def test_repo_ids_name_the_stored_model_and_the_config_overrides_the_catalogue(
        hub: FakeHub, daemon: int, tmp_path: Path) -> None:
    assert sllmctl("pull", REPO).returncode == 0
    assert sllmctl("show", REPO).returncode == 0  # org/tiny is org--tiny
    assert sllmctl("rm", REPO, "--yes").returncode == 0
    assert sllmctl("ls", "--json").stdout.count("org--tiny") == 0
    Path(os.environ["SLLMCTL_CONFIG"]).write_text(
        '[catalogue.tiny]\nrepo = "org/tiny"\n\n[catalogue."smollm2-135m"]\nrevision = "v2"\n')
    rows = {r["name"]: r for r in json.loads(sllmctl("pull", "--list", "--json").stdout)}
    assert rows["tiny"]["repo"] == REPO and rows["tiny"]["source"] == "config"
    assert rows["smollm2-135m"]["revision"] == "v2"
    assert rows["smollm2-135m"]["repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    os.environ["SLLMCTL_PULL"] = "never"
    try:
        r = sllmctl("warm", "tiny")
        assert r.returncode == 1 and "model tiny is not in the store (pulls are off)" in r.stderr
    finally:
        del os.environ["SLLMCTL_PULL"]
    r = sllmctl("warm", "tiny", "--json")  # pulled first, as `tiny`
    assert r.returncode == 0, r.stderr
    assert json.loads(sllmctl("show", "tiny", "--json").stdout)["provenance"]["repo"] == REPO


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model's files as the Hub has SmolLM2-135M-Instruct: bf16 safetensors, config,
    tokenizer (made from the demo GGUF by the existing GGUF reader)."""
    from safetensors.torch import save_file

    from sllmctl.demo import demo_gguf
    from sllmctl.errors import SllmError
    from sllmctl.store.sources.gguf import open_gguf

    try:
        source = open_gguf(demo_gguf(), "BF16")
    except SllmError as e:
        pytest.skip(str(e))
    out = tmp_path_factory.mktemp("smol")
    save_file({t.name: t.load() for t in source.tensors}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    for name, data in source.extra_files.items():
        (out / name).write_bytes(data)
    return out


@pytest.mark.slow
def test_serve_a_catalogue_name_on_an_empty_store_pulls_it(hub: FakeHub, daemon: int,
                                                           smol: Path) -> None:
    hub.repos["HuggingFaceTB/SmolLM2-135M-Instruct"] = Repo.from_folder(smol)
    port = free_port()
    r = sllmctl("serve", "smollm2-135m", "--port", str(port), "--detach", "--json",
                "--api-key", "k", timeout=600)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["name"] == "smollm2-135m" and info["tier"] == "disk"
    assert "Paris" in ask(info["endpoint"], "smollm2-135m", "k")
    shown = sllmctl("show", "smollm2-135m", "--json")
    assert json.loads(shown.stdout)["provenance"]["repo"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    # by repo id: from the HF cache (nothing downloaded), stored as org--model, and the HTTP
    # API's model field takes the repo id too
    repo = "HuggingFaceTB/SmolLM2-135M-Instruct"
    sent = dict(hub.sent)
    r = sllmctl("pull", repo, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.splitlines()[-1])
    assert result["name"] == "HuggingFaceTB--SmolLM2-135M-Instruct" and result["downloaded"] == 0
    assert hub.sent == sent
    assert "Paris" in ask(info["endpoint"], repo, "k")
