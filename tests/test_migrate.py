"""Live migration, token mode (issue 17), between real daemons in network namespaces.

Host 0 (the source) serves the demo model over HTTP; the official `openai` client streams
greedy chat completions from it inside host 0. Host 1 (the destination) admits the source's
host key with the `peer` role; the source's hosts file names it h1. A stream migrated mid-way
must give exactly the text of the same stream never migrated; a destination that refuses, or
is killed by a signal after the hand-over, leaves the request going on at the source.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from netbed import Bed, HostDirs, netbed_fixture  # noqa: F401

from sllmctl.wire import keys

TESTS = Path(__file__).resolve().parent
PYTHONPATH = os.pathsep.join(p for p in (str(TESTS.parent), os.environ.get("PYTHONPATH"))
                             if p)
PORT, HTTP = 7070, 8080
MODEL = "smollm2-135m-instruct"
PROMPTS = ["Count from 1 to 100, separated by commas.",
           "List the first 60 even numbers, separated by commas.",
           "Write the alphabet twice, separated by commas."]
MAX_TOKENS = 160
# the openai client, streaming each prompt of argv[1] at once; one JSON line per chunk
CLIENT = """
import json, sys, threading, openai
c = openai.OpenAI(base_url="http://127.0.0.1:PORT/v1", api_key="x", timeout=300)
lock = threading.Lock()
def ask(i, prompt):
    text, n, finish = "", 0, None
    prompt, sampling = prompt if isinstance(prompt, list) else (prompt, {"temperature": 0})
    for ch in c.chat.completions.create(model="MODEL", stream=True, max_tokens=MAX,
            messages=[{"role": "user", "content": prompt}], **sampling):
        if ch.choices and ch.choices[0].delta.content:
            text += ch.choices[0].delta.content
            n += 1
            with lock:
                print(json.dumps({"i": i, "n": n}), flush=True)
        if ch.choices and ch.choices[0].finish_reason:
            finish = ch.choices[0].finish_reason
    with lock:
        print(json.dumps({"i": i, "text": text, "finish": finish}), flush=True)
ts = [threading.Thread(target=ask, args=a) for a in enumerate(json.loads(sys.argv[1]))]
[t.start() for t in ts]
[t.join() for t in ts]
""".replace("PORT", str(HTTP)).replace("MODEL", MODEL).replace("MAX", str(MAX_TOKENS))


class Pair:
    """A source daemon in host 0 and a destination in host 1, with ann's admin key."""

    def __init__(self, bed: Bed, root: Path) -> None:
        self.bed, self.root = bed, root
        self.ann = root / "ann"
        admin = keys.client_keys(self.ann).public
        self.src: HostDirs = bed.provision(0, root, {admin: "admin"})
        self.dst: HostDirs = bed.provision(1, root, {admin: "admin"})
        self.src_cfg = root / "src-cfg"
        bed.write_hosts(self.src_cfg / "hosts.toml", PORT, {1: self.dst})
        self.daemons: dict[int, subprocess.Popen[bytes]] = {}

    def env(self, i: int, config: Path) -> dict[str, str]:
        dirs = self.dst if i else self.src
        return {**dirs.env(), "PYTHONPATH": PYTHONPATH, "SLLMCTL_AUTOSTART": "0",
                "SLLMCTL_CONFIG": str(config / "config.toml")}

    def start(self, i: int) -> None:
        dirs = self.dst if i else self.src
        (dirs.runtime / "daemon.json").unlink(missing_ok=True)  # left by one killed
        argv = [sys.executable, "-m", "sllmctl", "daemon", "start", "--foreground", "--listen",
                f"{self.bed.nodes[i].addr}:{PORT}", "--dram-pool", "1GiB", "--measure-bytes",
                "1048576"]
        with (self.root / f"daemon{i}.log").open("ab") as f:
            self.daemons[i] = self.bed.spawn(i, argv, stdout=f, stderr=f, env=self.env(
                i, self.src_cfg if i == 0 else self.root / "dst-cfg"))
        for _ in range(300):
            if (dirs.runtime / "daemon.json").exists():
                return
            time.sleep(0.1)
        raise AssertionError(self.log(i))

    def log(self, i: int) -> str:
        return (self.root / f"daemon{i}.log").read_text()

    def sllmctl(self, i: int, *args: str) -> Any:
        argv = [sys.executable, "-m", "sllmctl", *args, "--json"]
        r = subprocess.run(self.bed.argv(i, argv), capture_output=True, text=True,
                           timeout=300, env=self.env(i, self.ann))
        assert r.returncode == 0, r.stderr + self.log(0)[-3000:] + self.log(1)[-3000:]
        return json.loads(r.stdout)

    def admit_source(self) -> None:
        """Give the source's host key the peer role on the destination; reload (SIGHUP)."""
        with (self.dst.keys / keys.ALLOW_LIST).open("a") as f:
            f.write(f"{self.src.public} peer source\n")
        self.daemons[1].send_signal(signal.SIGHUP)
        for _ in range(100):
            if "SIGHUP" in self.log(1):
                return
            time.sleep(0.1)

    def migrate(self, then: Callable[[], None] | None = None, during: bool = False) -> Any:
        """`sllmctl migrate MODEL --to h1` on host 0; `then()` after it (`during`: as soon
        as it has started)."""
        argv = [sys.executable, "-m", "sllmctl", "migrate", MODEL, "--to", "h1", "--json"]
        proc = subprocess.Popen(self.bed.argv(0, argv), stdout=subprocess.PIPE, text=True,
                                env=self.env(0, self.ann))
        if then is not None and during:
            then()
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, self.log(0)[-3000:]
        if then is not None and not during:
            then()
        return json.loads(out)

    def streams(self, prompts: list[Any], migrate_after: int | None = None,
                then: Callable[[], None] | None = None, during: bool = False,
                before: Callable[[], None] | None = None) -> tuple[list[Any], Any]:
        """Stream `prompts` at once; once each has `migrate_after` chunks, migrate every
        running request to h1 (then `then()`). The final line of each, and the report."""
        client = self.bed.spawn(0, [sys.executable, "-c", CLIENT, json.dumps(prompts)],
                                stdout=subprocess.PIPE, env=self.env(0, self.ann))
        assert client.stdout is not None
        seen, ends, report = dict.fromkeys(range(len(prompts)), 0), {}, None
        for line in client.stdout:
            doc = json.loads(line)
            if "text" in doc:
                ends[doc["i"]] = doc
                continue
            seen[doc["i"]] = doc["n"]
            if migrate_after and report is None and min(seen.values()) >= migrate_after:
                if before is not None:
                    before()
                report = self.migrate(then, during)
                print(json.dumps(report))  # the figures, under pytest -s
        assert client.wait(timeout=300) == 0 and len(ends) == len(prompts)
        return [ends[i] for i in range(len(prompts))], report


@pytest.fixture
def pair(netbed: Callable[..., Bed], tmp_path: Path) -> Pair:
    from sllmctl.demo import demo_gguf

    try:
        gguf = demo_gguf()
    except Exception:  # the demo model's package is missing
        pytest.skip("the demo model's package is not installed")
    p = Pair(netbed(2), tmp_path)
    for i in (0, 1):
        r = subprocess.run([sys.executable, "-m", "sllmctl", "convert", str(gguf), "--name",
                            MODEL, "-q"], capture_output=True, text=True, timeout=600,
                           env=p.env(i, p.ann))
        assert r.returncode == 0, r.stderr
    for i in (0, 1):
        p.start(i)
    for i in (0, 1):  # each loads the model now: the migration finds it loaded
        p.sllmctl(i, "serve", MODEL, "--port", str(HTTP), "--detach")
    return p


@pytest.mark.daemon
@pytest.mark.slow
def test_a_migrated_stream_is_the_unmigrated_text(pair: Pair) -> None:
    alone, _ = pair.streams(PROMPTS[:1])
    assert alone[0]["finish"] == "length"  # long enough to be moved mid-way
    listed = []
    # the destination does not admit the source yet: refused, the request goes on here
    again, report = pair.streams(PROMPTS[:1], migrate_after=4, before=lambda: listed.append(
        pair.sllmctl(0, "migrate", MODEL, "--to", "h1", "--dry-run")))
    (dry,) = listed
    assert dry["dry_run"] and [r["id"] for r in dry["requests"]] == [
        r["id"] for r in report["requests"]]
    assert dry["requests"][0]["context"] > dry["requests"][0]["tokens"] >= 4
    assert again == alone
    assert [r["status"] for r in report["requests"]] == ["stayed"]
    assert "refused" in report["requests"][0]["error"]
    pair.admit_source()
    moved, report = pair.streams(PROMPTS[:1], migrate_after=4)
    assert moved == alone
    (r,) = report["requests"]
    assert r["status"] == "moved" and r["mode"] == "tokens", report
    assert r["rounds"] >= 1 and r["tokens_recomputed"] > 0 and r["pause_s"] >= 0
    assert r["total_s"] >= r["pause_s"]
    # sampled with a fixed seed: the random generator's state moves with the request
    seeded = [[PROMPTS[0], {"temperature": 0.8, "seed": 7}]]
    alone, _ = pair.streams(seeded)
    moved, report = pair.streams(seeded, migrate_after=4)
    assert report["requests"][0]["status"] == "moved" and moved == alone
    # several streams migrated at once each end as they would have
    together, _ = pair.streams(PROMPTS)
    moved, report = pair.streams(PROMPTS, migrate_after=4)
    assert moved == together
    statuses = [r["status"] for r in report["requests"]]  # a short answer may end first
    assert "moved" in statuses and set(statuses) <= {"moved", "completed"}


@pytest.mark.daemon
@pytest.mark.slow
def test_a_destination_killed_after_the_hand_over(pair: Pair) -> None:
    pair.admit_source()
    alone, _ = pair.streams(PROMPTS[:1])
    moved, report = pair.streams(PROMPTS[:1], migrate_after=4,
                                 then=lambda: pair.daemons[1].send_signal(signal.SIGKILL))
    assert report["requests"][0]["status"] == "moved"
    assert pair.daemons[1].wait(timeout=30) == -signal.SIGKILL
    assert moved == alone  # taken back by the source, nothing lost
    assert "the request goes on here" in pair.log(0)
    # killed while the migration starts: whether before or after the hand-over, the request
    # goes on at the source
    pair.start(1)
    pair.sllmctl(1, "serve", MODEL, "--port", str(HTTP), "--detach")
    moved, report = pair.streams(PROMPTS[:1], migrate_after=4, during=True,
                                 then=lambda: pair.daemons[1].send_signal(signal.SIGKILL))
    assert moved == alone
    assert report["requests"][0]["status"] in ("stayed", "moved")


# ------------------------------------------------------------ the mechanism, in one process
def test_a_detached_request_keeps_its_stream_and_goes_on_elsewhere() -> None:
    """Snapshot between two steps, detach, continue on a second engine and relay its tokens
    into the first request's stream: the stream is the unmigrated one."""
    from test_batch import prompts, tiny_model

    from sllmctl.engine.batch import BatchEngine
    from sllmctl.engine.request import Request, SamplingParams
    from sllmctl.engine.sampling import generate

    model, p = tiny_model(), prompts()[4]
    want = generate(model, p, 20, eos_ids=[])
    first, second = (BatchEngine(tiny_model(), slots=2, max_len=64) for _ in range(2))
    try:
        req = Request(p, SamplingParams(max_tokens=20))
        stream = first.add(req)
        got = [next(stream) for _ in range(3)]
        snap = first.at_step(req.to_dict).result(10)
        assert first.at_step(lambda: first.scheduler.detach(req)).result(10)
        assert first.scheduler.running() == [] and req.finish is None
        copy = Request.from_dict(json.loads(json.dumps(snap)))
        for at, token in enumerate(second.add(copy), len(snap["tokens"])):
            if at >= len(req.tokens):  # the relay: past the source's last token
                req.tokens.append(token)
                req.out.put(token)
        req.end(copy.finish or "length")
        got += list(stream)
        assert got == want and req.tokens == want and req.finish == "length"
        done = Request(p, SamplingParams(max_tokens=1))
        list(first.add(done))
        assert not first.at_step(lambda: first.scheduler.detach(done)).result(10)
    finally:
        first.close()
        second.close()


@pytest.mark.parametrize("state", [
    "not json", "[]", "{}", json.dumps({"prompt": [1], "params": {"max_tokens": "9"}}),
])
def test_a_malformed_state_is_a_bad_request(state: str) -> None:
    from sllmctl.daemon.ops_migrate import _rebuild
    from sllmctl.wire.codes import BadRequest

    with pytest.raises(BadRequest) as e:
        _rebuild(state)
    assert e.value.field == "state"


def test_a_state_is_checked_against_the_model() -> None:
    from sllmctl.daemon.ops_migrate import _fits, _rebuild
    from sllmctl.engine.request import Request, SamplingParams
    from sllmctl.wire.codes import BadRequest

    good = Request([1, 2, 3], SamplingParams(max_tokens=5, seed=3))
    req = _rebuild(json.dumps(good.to_dict()))
    _fits(req, 10, torch_device("cpu"))
    with pytest.raises(BadRequest, match="ids below 3"):
        _fits(req, 3, torch_device("cpu"))
    good.finish = "stop"
    with pytest.raises(BadRequest, match="already ended"):
        _rebuild(json.dumps(good.to_dict()))


def torch_device(name: str) -> Any:
    import torch

    return torch.device(name)


def test_the_report_for_people() -> None:
    from sllmctl.commands.migrate import _human

    head = {"name": "m", "to": "h1", "mode": "tokens", "dry_run": False}
    moved = {"id": "req-1", "mode": "tokens", "status": "moved", "rounds": 2,
             "tokens_recomputed": 90, "pause_s": 0.0123, "total_s": 1.5}
    stayed = {"id": "req-2", "mode": "tokens", "status": "stayed", "rounds": 1,
              "tokens_recomputed": 0, "error": "h1 did not answer"}
    assert _human(head | {"requests": [moved, stayed]}).splitlines() == [
        "req-1: moved, tokens mode, 2 round(s), 90 tokens recomputed, pause 12 ms, "
        "total 1.50 s",
        "req-2: stayed, tokens mode, 1 round(s), 0 tokens recomputed (h1 did not answer)"]
    assert _human(head | {"requests": []}) == "m: no running request to move"
    assert _human(head | {"dry_run": True, "requests": [
        {"id": "req-1", "context": 50, "tokens": 9}]}) == "would move req-1 (50 tokens) to h1"
