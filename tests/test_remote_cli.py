"""The commands of issue 15 without a daemon: daemon keys, hosts add|ls|rm|key, --host on
an unknown name, and the daemon's start-up decision (guard.plan)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import zmq

from sllmctl.daemon import guard
from sllmctl.errors import SllmError, UsageError
from sllmctl.wire import keys


def sllmctl(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sllmctl", *args], capture_output=True,
                          text=True, env={**os.environ, **env}, timeout=120)


def test_daemon_keys_made_once_and_shown(home: Path, tmp_path: Path) -> None:
    r = sllmctl("daemon", "keys", "--show")
    assert r.returncode == 1 and "sllmctl daemon keys" in r.stderr
    r = sllmctl("daemon", "keys")
    assert r.returncode == 0 and "made this host's key pair" in r.stderr
    public = r.stdout.strip()
    keys.check_z85_key(public)
    secret = home / "keys" / "host.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    again = sllmctl("daemon", "keys", "--json")
    info = json.loads(again.stdout)
    assert (info["public"], info["made"], again.stderr) == (public, False, "")
    assert sllmctl("daemon", "keys", "--show").stdout.strip() == public
    allowed = keys.load_allow_list(home / "keys" / keys.ALLOW_LIST)
    mine = keys.client_keys(tmp_path)  # the config folder: this user's own client
    assert [(e.key, e.role) for e in allowed.values()] == [(mine.public, "admin")]


def test_hosts_add_ls_rm_key(tmp_path: Path) -> None:
    key = zmq.curve_keypair()[0].decode()
    r = sllmctl("hosts", "add", "gpu1", "tcp://10.0.0.2:7070", "--key", key, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["fingerprint"] == keys.fingerprint(key)
    r = sllmctl("hosts", "add", "gpu1", "tcp://10.0.0.2:7070", "--key",
                zmq.curve_keypair()[0].decode())
    assert r.returncode == 1 and "another key" in r.stderr and "hosts rm gpu1" in r.stderr
    r = sllmctl("hosts", "ls")
    assert r.stdout.split("\t")[:2] == ["gpu1", "tcp://10.0.0.2:7070"]
    assert json.loads(sllmctl("hosts", "ls", "--json").stdout)["hosts"][0]["key"] == key
    mine = sllmctl("hosts", "key").stdout.strip()
    assert mine == keys.client_keys(tmp_path).public  # made on first use, then the same
    assert sllmctl("hosts", "rm", "gpu1").returncode == 0
    assert json.loads(sllmctl("hosts", "ls", "--json").stdout)["hosts"] == []
    r = sllmctl("hosts", "rm", "gpu1")
    assert r.returncode == 1 and "no host named 'gpu1'" in r.stderr


@pytest.mark.parametrize("args", [("status",), ("ps",), ("warm", "m"), ("unload", "m"),
                                  ("daemon", "status"), ("daemon", "stop"),
                                  ("daemon", "reload"), ("serve", "m", "--daemon-host")])
def test_unknown_host_is_one_line_with_the_add_to_run(args: tuple[str, ...]) -> None:
    flag = () if args[-1] == "--daemon-host" else ("--host",)
    r = sllmctl(*args, *flag, "nowhere")
    assert r.returncode == 1, r.stderr
    assert r.stderr.splitlines() == [
        "error: no host named 'nowhere' in " + str(Path(os.environ["SLLMCTL_CONFIG"]).parent
                                                  / "hosts.toml"),
        "hint: sllmctl hosts add nowhere tcp://ADDR:PORT --key KEY"]
    r = sllmctl(*args[:-1] if not flag else args, SLLMCTL_HOST="nowhere")
    assert r.returncode == 1 and "no host named 'nowhere'" in r.stderr


def test_plan_modes(home: Path) -> None:
    assert guard.plan("ipc:///tmp/x/daemon.sock") == "local"
    for local in ("tcp://127.0.0.1:7070", "tcp://[::1]:7070", "tcp://localhost:7070"):
        assert guard.plan(local) == "local" and guard.is_local(local)
    assert guard.plan("tcp://127.0.0.1:7070", want_keys=True) == "curve"
    for wide in ("tcp://0.0.0.0:7070", "tcp://*:7070", "tcp://10.0.0.2:7070", "tcp://eth0:1"):
        assert not guard.is_local(wide)
        assert guard.plan(wide, insecure=True) == "insecure"
        with pytest.raises(SllmError, match="needs keys") as e:
            guard.plan(wide)
        assert e.value.hint is not None and "sllmctl daemon keys" in e.value.hint
    with pytest.raises(UsageError, match="contradict"):
        guard.plan("tcp://10.0.0.2:7070", want_keys=True, insecure=True)
    with pytest.raises(UsageError, match="beyond loopback"):
        guard.plan("tcp://127.0.0.1:7070", insecure=True)
    guard.make_keys()
    assert guard.plan("tcp://10.0.0.2:7070") == "curve"  # keys made: they are used


def test_keys_on_loopback_without_a_pair_is_an_error(home: Path) -> None:
    r = sllmctl("daemon", "start", "--foreground", "--keys", "--listen", "127.0.0.1:7399")
    assert r.returncode == 1 and "no key pair" in r.stderr and "sllmctl daemon keys" in r.stderr


def test_reload_names_a_host_key_that_changed_on_disk(home: Path, tmp_path: Path) -> None:
    """The allow-list reloads in place; a new host key pair cannot (the socket keeps the key
    it started with), so reload says so instead of passing in silence."""
    guard.make_keys()
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    g = guard.secure(ctx, sock, "curve", "tcp://10.0.0.2:7070")
    try:
        before = g.pair
        assert before is not None and g.reload()["keys"] == 1  # unchanged: a plain reload
        other = keys.create_keys(tmp_path / "other")
        for name in ("host.key", "host.key_secret"):
            (guard.keys_dir() / name).write_bytes((tmp_path / "other" / name).read_bytes())
        with pytest.raises(SllmError, match="takes a restart") as e:
            g.reload()
        assert before.fingerprint in e.value.message and other.fingerprint in e.value.message
        assert g.pair == before  # still the key in force
    finally:
        g.stop()
        sock.close(linger=0)
        ctx.term()
