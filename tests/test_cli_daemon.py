"""The daemon commands through the real command line: ps piped and as JSON, the notice when a
read-only command starts a daemon, daemon logs and daemon restart, unserve's errors."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from cli_run import sllmctl
from safetensors.torch import save_file

from sllmctl.procs import alive

pytestmark = pytest.mark.daemon
LONG_NAME = "a-model-with-a-name-long-enough-to-wrap-an-eighty-column-table-" + "x" * 30



def daemon_pid() -> int | None:
    r = sllmctl("daemon", "status", "--json")
    return int(json.loads(r.stdout)["pid"]) if r.returncode == 0 else None


def stop_daemon() -> None:
    pid = daemon_pid()
    sllmctl("daemon", "stop")
    if pid and alive(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture
def daemon() -> Iterator[int]:
    r = sllmctl("daemon", "start", "--dram-pool", "256MiB", "--measure-bytes", "1048576",
                "--json")
    assert r.returncode == 0, r.stderr
    yield int(json.loads(r.stdout)["pid"])
    stop_daemon()


def test_ps_piped_is_one_row_per_line_with_structured_detail(daemon: int,
                                                            tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    save_file({"w": torch.randn(1024)}, src / "model.safetensors")
    assert sllmctl("convert", str(src), "-n", LONG_NAME, "-q").returncode == 0
    assert sllmctl("warm", LONG_NAME, "-q").returncode == 0
    r = sllmctl("ps")
    assert r.returncode == 0 and r.stderr == ""  # the daemon ran already: no notice
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["NAME", LONG_NAME]  # awk '{print $1}'
    assert lines[0].split()[:6] == ["NAME", "TIER", "SIZE", "IDLE", "EXPIRES", "DETAIL"]
    rows = json.loads(sllmctl("ps", "--json").stdout)["models"]
    assert [(m["name"], m["tier"], m["detail"]) for m in rows] == [
        (LONG_NAME, "dram", {"ready": True})]
    assert rows[0]["expires_at"] is None
    assert sllmctl("ps", "-q").stdout == f"{LONG_NAME}\n"


def test_unserve_errors(daemon: int) -> None:
    r = sllmctl("unserve", "nope")
    assert r.returncode == 1 and "not being served" in r.stderr
    stop_daemon()
    r = sllmctl("unserve", "nope")  # never starts a daemon to stop nothing
    assert r.returncode == 3 and daemon_pid() is None


def test_daemon_logs_and_restart_with_the_same_options(daemon: int) -> None:
    r = sllmctl("daemon", "logs")
    assert r.returncode == 0 and f"(pid {daemon})" in r.stdout
    assert len(sllmctl("daemon", "logs", "-n", "1").stdout.splitlines()) == 1
    lines = sllmctl("daemon", "logs", "-n", "2", "--json").stdout.splitlines()
    assert len(lines) == 2 and all(set(json.loads(x)) == {"file", "line"} for x in lines)
    r = sllmctl("daemon", "restart", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["stopped"] == daemon and info["pid"] != daemon and not alive(daemon)
    argv = Path(f"/proc/{info['pid']}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--dram-pool") + 1] == b"256MiB"  # the options it ran with
    r = sllmctl("daemon", "restart", "--dram-pool", "128MiB", "--json")
    new = json.loads(r.stdout)["pid"]
    argv = Path(f"/proc/{new}/cmdline").read_bytes().split(b"\0")
    assert argv[argv.index(b"--dram-pool") + 1] == b"128MiB"  # or the ones given


def test_no_daemon_log_is_one_line() -> None:
    r = sllmctl("daemon", "logs")
    assert r.returncode == 1 and r.stderr.startswith("error: no daemon log at ")


def test_a_read_only_command_that_starts_a_daemon_says_so() -> None:
    try:
        r = sllmctl("ps", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["models"] == []
        notice = r.stderr.splitlines()
        pid = daemon_pid()
        assert len(notice) == 1 and notice[0].startswith(f"sllmctl: started a daemon (pid {pid}")
        assert "sllmctl daemon stop" in notice[0] and "DRAM pool" in notice[0]
        again = sllmctl("status")
        assert again.returncode == 0 and again.stderr == ""  # it runs now: nothing to say
        assert not any(w in again.stdout for w in ("True", "False", "None", "{", "'"))
    finally:
        deadline = time.monotonic() + 10
        while daemon_pid() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        stop_daemon()
