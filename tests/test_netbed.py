"""The multi-host test bed itself, and CURVE across it: real namespaces, veths, a bridge, tc."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import zmq
from netbed import Bed, NetbedError, leftovers, netbed_fixture, sweep, unavailable, wait_line  # noqa: F401
from netbed_probe import tcp_payloads

from sllmctl.wire import hosts, keys

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(
    p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH")) if p)}
PROBE = [sys.executable, str(TESTS / "netbed_probe.py")]
ECHO = [sys.executable, str(TESTS / "curve_echo.py")]
MakeBed = Callable[..., Bed]


def probe(bed: Bed, i: int, *args: str, timeout: float = 60) -> dict[str, object]:
    done = bed.run(i, [*PROBE, *args], timeout=timeout)
    return json.loads(done.stdout.splitlines()[-1])


def start(bed: Bed, i: int, argv: list[str]) -> subprocess.Popen[bytes]:
    proc = bed.spawn(i, argv, stdout=subprocess.PIPE, env=ENV)
    wait_line(proc)  # its "ready" line
    return proc


def test_hosts_ping_and_tcp_echo_across_the_bridge(netbed: MakeBed) -> None:
    bed = netbed(3)
    assert [n.addr for n in bed.nodes] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
    server = start(bed, 0, [*PROBE, "echo", "10.77.0.1", "9000", "30"])
    for i in (1, 2):
        assert probe(bed, i, "talk", "10.77.0.1", "9000", f"hello from {i}") == {
            "reply": f"hello from {i}"}
    bed.stop(server)
    if subprocess.run(["which", "ping"], capture_output=True).returncode == 0:
        assert bed.run(1, ["ping", "-c", "1", "-W", "2", "10.77.0.3"], check=False).returncode == 0


def test_hosts_do_not_reach_the_machine(netbed: MakeBed) -> None:
    bed = netbed(1)
    routes = bed.run(0, ["ip", "route"]).stdout
    assert "default" not in routes and "10.77.0.0/24" in routes


def throughput(bed: Bed, nbytes: int) -> float:
    sink = start(bed, 0, [*PROBE, "sink", "10.77.0.1", "9001", "60"])
    sent = probe(bed, 1, "send", "10.77.0.1", "9001", str(nbytes), timeout=90)
    sink.wait(timeout=30)
    return nbytes / float(sent["seconds"])  # type: ignore[arg-type]


def test_tc_shaped_link_is_measurably_slower(netbed: MakeBed) -> None:
    bed = netbed(2)
    nbytes = 4 << 20
    free = throughput(bed, nbytes)
    bed.shape(1, "40mbit")
    shaped = throughput(bed, nbytes)
    print(f"unshaped {free * 8 / 1e6:.0f} Mbit/s, shaped (40mbit) {shaped * 8 / 1e6:.0f} Mbit/s")
    assert shaped < 0.5 * free
    assert shaped < 2 * 40e6 / 8  # within a factor 2 of the configured rate
    for rate in ("10gbit", "25gbit", "100gbit"):  # the rates the benchmarks emulate
        bed.shape(1, rate)
    qdisc = bed.run(1, ["tc", "qdisc", "show", "dev", "eth0"]).stdout
    assert "tbf" in qdisc and "100Gbit" in qdisc


def connect_seconds(bed: Bed, i: int, addr: str, port: int) -> float:
    code = ("import socket, time; t = time.perf_counter();"
            f" socket.create_connection(({addr!r}, {port}), timeout=10).close();"
            " print(time.perf_counter() - t)")
    return float(bed.run(i, [sys.executable, "-c", code]).stdout)


def test_tc_delay_adds_latency(netbed: MakeBed) -> None:
    bed = netbed(2)
    server = start(bed, 0, [*PROBE, "echo", "10.77.0.1", "9002", "30"])
    try:
        bed.shape(1, "1gbit", "25ms")
    except NetbedError as e:
        pytest.skip(str(e).splitlines()[0])
    # a TCP connect is one round trip: at least 2 x 25 ms with the delay on both directions
    assert connect_seconds(bed, 1, "10.77.0.1", 9002) >= 0.045
    bed.stop(server)


def test_nothing_left_after_down(netbed: MakeBed) -> None:
    bed = netbed(2)
    proc = bed.spawn(0, ["sleep", "60"])
    assert leftovers(bed.prefix)
    bed.down()
    assert proc.returncode is not None
    assert leftovers(bed.prefix) == []
    bed.down()  # idempotent


def test_interrupted_run_cleans_up_and_sweep_removes_dead_beds(tmp_path: Path) -> None:
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    code = (f"import sys, time; sys.path.insert(0, {str(TESTS)!r}); from netbed import Bed;"
            " b = Bed(2).up(); print(b.prefix, flush=True); time.sleep(60)")
    for sig in (signal.SIGINT, signal.SIGKILL):
        child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                                 stderr=subprocess.DEVNULL, env=ENV)
        try:
            prefix = wait_line(child).decode()
            assert leftovers(prefix)
            child.send_signal(sig)
            child.wait(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            assert child.stdout is not None
            child.stdout.close()
        if sig == signal.SIGKILL:  # no atexit ran: the next sweep finds the dead pid's bed
            assert leftovers(prefix) and prefix + "-br" in sweep()
        assert leftovers(prefix) == []


def test_curve_across_namespaces(netbed: MakeBed, tmp_path: Path) -> None:
    """A CURVE echo server in host 0, clients in host 1: the admitted key is answered, an
    unknown one refused, and the wire between them shows no JSON in clear (a plain ZeroMQ
    control exchange in the same capture does, so the capture sees payload)."""
    bed = netbed(3)
    ann_dir, eve_dir, rita_dir = tmp_path / "ann", tmp_path / "eve", tmp_path / "rita"
    ann = keys.create_keys(ann_dir, "client")
    rita = keys.create_keys(rita_dir, "client")
    srv = bed.provision(0, tmp_path, {ann.public: "admin", rita.public: "read"})
    bed.write_hosts(tmp_path / "hosts.toml", 7000, {0: srv})
    found = hosts.load(tmp_path / "hosts.toml")["h0"]
    assert (found.endpoint, found.key) == ("tcp://10.77.0.1:7000", srv.public)
    server_key = found.key
    curve = start(bed, 0, [*ECHO, "server", str(srv.keys), "tcp://10.77.0.1:7000", "60"])
    plain = start(bed, 0, [*ECHO, "server", str(tmp_path / "p"), "tcp://10.77.0.1:7001", "60",
                           "plain"])
    stop = tmp_path / "stop"
    cap = start(bed, 0, [*PROBE, "capture", "eth0", "60", str(tmp_path / "cap"), str(stop)])

    def client(folder: Path, port: int, text: str, key: str = server_key,
               host: int = 1) -> dict[str, object]:
        done = bed.run(host, [*ECHO, "client", str(folder), key, f"tcp://10.77.0.1:{port}", text])
        return json.loads(done.stdout.splitlines()[-1])

    secret = json.dumps({"op": "status", "marker": "curve-" + os.urandom(6).hex()})
    control = json.dumps({"op": "status", "marker": "plain-" + os.urandom(6).hex()})
    assert client(ann_dir, 7000, secret) == {"handshake": "ok", "reply": ["admin", secret]}
    assert client(eve_dir, 7000, secret) == {"handshake": "refused", "reply": None}
    assert client(rita_dir, 7000, secret, host=2) == {"handshake": "ok", "reply": ["read", secret]}
    assert client(tmp_path / "x", 7001, control, "-") == {"handshake": "ok",
                                                          "reply": ["none", control]}
    time.sleep(0.3)  # let the last frames reach the capture
    stop.touch()
    cap.wait(timeout=10)
    payload = tcp_payloads((tmp_path / "cap").read_bytes())
    assert control.encode() in payload[7001]  # the capture sees ZeroMQ payload in clear ...
    assert len(payload[7000]) > 2 * len(secret)  # ... and the CURVE port's traffic,
    assert secret.encode() not in payload[7000] and b'{"' not in payload[7000]  # sealed
    assert b"CURVE" in payload[7000]  # the ZMTP greeting names the mechanism
    for proc in (curve, plain):
        bed.stop(proc)


def test_skips_with_one_line_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    import netbed as nb

    monkeypatch.setattr(nb, "_reason", [])
    monkeypatch.setattr(nb.os, "geteuid", lambda: 1000)
    assert nb.unavailable() == "netbed needs root (network namespaces)"
    monkeypatch.setattr(nb, "_reason", [])
    monkeypatch.setattr(nb.os, "geteuid", lambda: 0)
    monkeypatch.setattr(nb.shutil, "which", lambda name: None)
    assert nb.unavailable() == "netbed needs `ip` and `tc` (iproute2)"


def test_plain_client_gets_nothing_across_namespaces(netbed: MakeBed, tmp_path: Path) -> None:
    bed = netbed(2)
    srv_dir = tmp_path / "srv"
    keys.create_keys(srv_dir)
    (srv_dir / keys.ALLOW_LIST).write_text(f"{zmq.curve_keypair()[0].decode()} admin x\n")
    start(bed, 0, [*ECHO, "server", str(srv_dir), "tcp://10.77.0.1:7000", "60"])
    done = bed.run(1, [*ECHO, "client", str(tmp_path / "c"), "-", "tcp://10.77.0.1:7000", "hi"])
    assert json.loads(done.stdout.splitlines()[-1])["reply"] is None
