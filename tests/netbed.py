"""A multi-host test bed: N network namespaces on a bridge, with links shaped by `tc`.

Layout, for a bed with prefix P (`nb<pid hex>x<4 hex>` for tests, `nbh<4 hex>` by hand):

    P-br   the bridge's own namespace: br0 and one veth end p<i> per host
    P-<i>  host i: lo and eth0 (10.77.0.<i+1>/24), the other end of p<i>

Nothing is created in the root namespace, so the machine's own interfaces are never touched,
and traffic stays on loopback and between these namespaces. Everything is removed by
`Bed.down()` (the fixture calls it in a finally, atexit calls it for a bed left up); a bed
whose test process died is removed by the next `sweep()`, which only touches names with the
test prefix whose pid no longer runs. Every loop is bounded in count and in time.

Tests use the `netbed` fixture: `from netbed import netbed_fixture  # noqa: F401` (tests/
is on sys.path under pytest's default import mode) and a parameter `netbed`, a factory:
`bed = netbed(2)`. Without root or `ip netns` it skips with one line.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

SUBNET = "10.77.0"
MAX_HOSTS = 200
_TEST_NAME = re.compile(r"(nb([0-9a-f]+)x[0-9a-f]{4})-(br|\d+)$")
_HAND_NAME = re.compile(r"(nbh[0-9a-f]{4})-(br|\d+)$")
_RATE = re.compile(r"(\d+(?:\.\d+)?)([kmg]?)bit", re.IGNORECASE)


class NetbedError(RuntimeError):
    pass


def ip(*args: str, timeout: float = 20, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise NetbedError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def namespaces() -> list[str]:
    out = ip("netns", "list").stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


_reason: list[str | None] = []


def unavailable() -> str | None:
    """Why a bed cannot be made here (one line), or None."""
    if _reason:
        return _reason[0]
    reason = None
    if os.geteuid() != 0:
        reason = "netbed needs root (network namespaces)"
    elif shutil.which("ip") is None or shutil.which("tc") is None:
        reason = "netbed needs `ip` and `tc` (iproute2)"
    else:
        probe = f"nb{os.getpid():x}x{secrets.token_hex(2)}-0"
        made = ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            reason = f"cannot create network namespaces: {made.stderr.strip()}"
        else:
            ip("netns", "del", probe, check=False)
    _reason.append(reason)
    return reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_namespace(name: str) -> None:
    """Kill what still runs inside one of our namespaces (by pid), then delete it."""
    pids = ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    ip("netns", "del", name, check=False)


def sweep(hand: bool = False) -> list[str]:
    """Remove the namespaces of test beds whose process is gone (`hand`: the by-hand beds)."""
    gone = []
    for name in namespaces():
        test = _TEST_NAME.match(name)
        dead = test is not None and not _alive(int(test.group(2), 16))
        if dead or (hand and _HAND_NAME.match(name)):
            _remove_namespace(name)
            gone.append(name)
    return gone


def tc_rate_args(rate: str) -> list[str]:
    """tbf arguments for a rate such as `10gbit`: a burst of 1 ms at that rate (at least 64 KiB)."""
    m = _RATE.fullmatch(rate)
    if not m:
        raise NetbedError(f"bad rate {rate!r}: expected e.g. 100mbit, 10gbit")
    bits = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[m.group(2).lower()]
    burst = max(64 * 1024, int(bits / 8 / 1000))
    return ["rate", rate, "burst", str(burst), "latency", "50ms"]


@dataclass
class Node:
    index: int
    ns: str
    addr: str

    @property
    def name(self) -> str:  # its name in the client's hosts file
        return f"h{self.index}"


@dataclass(frozen=True)
class HostDirs:
    """One host's own folders and keys, for a daemon started inside its namespace."""

    home: Path
    runtime: Path
    keys: Path  # the daemon's key pair and authorized_keys
    public: str  # the daemon's public key (Z85)

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLLMCTL_HOME": str(self.home),
                "SLLMCTL_RUNTIME_DIR": str(self.runtime)}


class Bed:
    def __init__(self, n: int, prefix: str | None = None) -> None:
        if not 1 <= n <= MAX_HOSTS:
            raise NetbedError(f"a bed has 1 to {MAX_HOSTS} hosts, not {n}")
        self.prefix = prefix or f"nb{os.getpid():x}x{secrets.token_hex(2)}"
        self.bridge = f"{self.prefix}-br"
        self.nodes = [Node(i, f"{self.prefix}-{i}", f"{SUBNET}.{i + 1}") for i in range(n)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self._made: list[str] = []

    def up(self) -> Bed:
        atexit.register(self.down)
        try:
            self._make_namespace(self.bridge)
            ip("-n", self.bridge, "link", "add", "br0", "type", "bridge")
            ip("-n", self.bridge, "link", "set", "br0", "up")
            for node in self.nodes:
                self._add_node(node)
        except BaseException:
            self.down()
            raise
        return self

    def _make_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self._made.append(name)
        ip("-n", name, "link", "set", "lo", "up")

    def _add_node(self, node: Node) -> None:
        self._make_namespace(node.ns)
        port = f"p{node.index}"
        ip("-n", node.ns, "link", "add", "eth0", "type", "veth", "peer", "name", port,
           "netns", self.bridge)
        ip("-n", self.bridge, "link", "set", port, "master", "br0")
        ip("-n", self.bridge, "link", "set", port, "up")
        ip("-n", node.ns, "addr", "add", f"{node.addr}/24", "dev", "eth0")
        ip("-n", node.ns, "link", "set", "eth0", "up")

    def provision(self, i: int, root: Path, admit: dict[str, str]) -> HostDirs:
        """Make host i's home, runtime folder and key pair under `root`, and its allow-list
        with `admit` (Z85 public key -> role, labelled by role)."""
        from sllmctl.wire import keys

        base = root / self.nodes[i].name
        dirs = HostDirs(base / "home", base / "run", base / "home" / "keys", "")
        dirs.runtime.mkdir(parents=True, mode=0o700)
        pair = keys.create_keys(dirs.keys)
        lines = [f"{key} {role} {role}-{n}" for n, (key, role) in enumerate(admit.items())]
        (dirs.keys / keys.ALLOW_LIST).write_text("\n".join(lines) + "\n")
        return HostDirs(dirs.home, dirs.runtime, dirs.keys, pair.public)

    def write_hosts(self, path: Path, port: int, dirs: dict[int, HostDirs]) -> None:
        """Add hosts h<i> (tcp://10.77.0.<i+1>:port, their daemon's key) to a hosts file."""
        from sllmctl.wire import hosts

        for i, d in dirs.items():
            hosts.add(self.nodes[i].name, f"tcp://{self.nodes[i].addr}:{port}", d.public, path)

    def shape(self, i: int, rate: str, delay: str | None = None) -> None:
        """Shape host i's link both ways: `rate` (tbf; e.g. 10gbit, 25gbit, 100gbit) and an
        optional one-way `delay` (netem, e.g. 1ms; needs the kernel's sch_netem)."""
        if delay is None:
            qdisc = ["tbf", *tc_rate_args(rate)]
        else:
            qdisc = ["netem", "delay", delay, "rate", rate]
        for ns, dev in ((self.nodes[i].ns, "eth0"), (self.bridge, f"p{i}")):
            done = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev",
                                   dev, "root", *qdisc], capture_output=True, text=True,
                                  timeout=20)
            if done.returncode != 0:
                raise NetbedError(f"tc on {ns}/{dev}: {done.stderr.strip()}"
                                  + (" (no sch_netem: delay unavailable)"
                                     if "netem" in qdisc and "unknown" in done.stderr else ""))

    def unshape(self, i: int) -> None:
        for ns, dev in ((self.nodes[i].ns, "eth0"), (self.bridge, f"p{i}")):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", dev, "root"],
                           capture_output=True, timeout=20)

    def argv(self, i: int, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.nodes[i].ns, *cmd]

    def run(self, i: int, cmd: Sequence[str], timeout: float = 30,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside host i, bounded by `timeout` seconds."""
        done = subprocess.run(self.argv(i, cmd), capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise NetbedError(f"on host {i}: {' '.join(cmd)}: rc {done.returncode}: "
                              f"{done.stderr.strip()[-2000:]}")
        return done

    def spawn(self, i: int, cmd: Sequence[str], **popen: object) -> subprocess.Popen[bytes]:
        """Start a process inside host i (`ip netns exec` execs it: the pid is the process's);
        `down()` stops it by that pid."""
        proc: subprocess.Popen[bytes] = subprocess.Popen(  # type: ignore[call-overload]
            self.argv(i, cmd), start_new_session=True, **popen)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3) -> int:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        return proc.returncode

    def down(self) -> None:
        """Stop this bed's processes and delete its namespaces (idempotent)."""
        for proc in self.procs:
            self.stop(proc)
        self.procs.clear()
        for name in reversed(self._made):
            _remove_namespace(name)
        self._made.clear()
        atexit.unregister(self.down)


def leftovers(prefix: str) -> list[str]:
    """Namespaces and root-namespace links that carry `prefix` (none, after down())."""
    links = ip("-o", "link", "show").stdout
    return [n for n in namespaces() if n.startswith(prefix)] + [
        line for line in links.splitlines() if prefix in line]


@pytest.fixture(name="netbed")
def netbed_fixture() -> Iterator[Callable[..., Bed]]:
    """A factory of beds: `netbed(n)` -> a Bed that is up; all are removed after the test."""
    reason = unavailable()
    if reason:
        pytest.skip(reason)
    sweep()
    beds: list[Bed] = []

    def make(n: int = 2) -> Bed:
        bed = Bed(n)
        beds.append(bed)
        return bed.up()

    try:
        yield make
    finally:
        for bed in beds:
            bed.down()


def wait_line(proc: subprocess.Popen[bytes], timeout: float = 20) -> bytes:
    """The first line a spawned process writes on stdout (a pipe), within `timeout` seconds."""
    import selectors

    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    buf = b""
    try:
        while b"\n" not in buf and time.monotonic() < deadline and len(buf) < 65536:
            if sel.select(max(0.0, deadline - time.monotonic())):
                chunk = os.read(proc.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
    finally:
        sel.close()
    if b"\n" not in buf:
        raise NetbedError(f"no line from {proc.args} within {timeout}s (got {buf[:200]!r})")
    return buf.split(b"\n", 1)[0]
