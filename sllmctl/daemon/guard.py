"""Who may reach the daemon, and what each caller may ask for.

Three modes, decided once at start (`plan`):

| mode       | when                                                | callers                  |
|------------|-----------------------------------------------------|--------------------------|
| `local`    | ipc, or TCP on a loopback address, without `--keys` | whoever reaches it: admin|
| `curve`    | `--keys`, or TCP beyond loopback (keys made)        | the allow-list's keys,   |
|            |                                                     | each with its role       |
| `insecure` | TCP beyond loopback with `--insecure`               | anyone: admin (warned)   |

Beyond loopback without keys the daemon does not start; a security option asked for and not
in force is an error, never silent. With keys, the ROUTER is a CURVE server (wire.keys) and
every request's sender role, read from its frame's User-Id as the allow-list stands now, is
checked against the roles its operation declares (wire.messages).
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import zmq

from sllmctl import paths
from sllmctl.errors import SllmError, UsageError
from sllmctl.wire import keys
from sllmctl.wire.codes import Forbidden
from sllmctl.wire.messages import ADMIN

log = logging.getLogger("sllmctl.daemon")
Mode = Literal["local", "curve", "insecure"]


def keys_dir() -> Path:
    """The daemon's key pair and allow-list: `<home>/keys`."""
    return paths.home() / "keys"


def make_keys() -> tuple[keys.KeyPair, bool]:
    """The host's key pair, made once; whether it was made now. A new allow-list admits this
    user's own client key as admin (the same user owns the home, and `sllmctl` on this host
    must keep working with `--keys`); nobody else."""
    folder = keys_dir()
    made = not (folder / "host.key_secret").exists()
    pair = keys.create_keys(folder)
    allow = folder / keys.ALLOW_LIST
    if not allow.exists():
        keys.init_allow_list(allow)
        mine = keys.client_keys(paths.config_path().parent)
        with allow.open("a", encoding="utf-8") as f:
            f.write(f"{mine.public} admin this host's own client\n")
    return pair, made


def is_local(endpoint: str) -> bool:
    """ipc, inproc, or TCP on a loopback address (`tcp://127.0.0.1:7070`, `tcp://[::1]:7070`)."""
    if not endpoint.startswith("tcp://"):
        return True
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # `*`, an interface or a host name: reachable from elsewhere


def plan(endpoint: str, want_keys: bool = False, insecure: bool = False) -> Mode:
    """The mode for `endpoint` and the flags given; an error for a combination that would
    leave a security option asked for and not in force."""
    if want_keys and insecure:
        raise UsageError("--keys and --insecure contradict each other", hint="pick one")
    if want_keys:
        return "curve"
    if is_local(endpoint):
        if insecure:
            raise UsageError(f"--insecure is for TCP beyond loopback; {endpoint} is local "
                             "and needs no keys", hint="leave --insecure out")
        return "local"
    if insecure:
        return "insecure"
    if (keys_dir() / "host.key_secret").exists():
        return "curve"
    raise SllmError(f"listening on {endpoint} beyond loopback needs keys, and this host has "
                    "none", hint="run `sllmctl daemon keys` (then add clients to "
                    f"{keys_dir() / keys.ALLOW_LIST}), or pass --insecure on a trusted network")


@dataclass
class Guard:
    """The mode in force, the host's pair and the authenticator (curve mode only)."""

    mode: Mode
    pair: keys.KeyPair | None = None
    auth: keys.KeyAuthenticator | None = None
    forbidden: int = 0  # requests refused for their role

    def role(self, frame: zmq.Frame) -> str | None:
        if self.auth is None:
            return ADMIN
        return self.auth.sender_role(frame)

    def check(self, op: str, roles: frozenset[str], frame: zmq.Frame) -> None:
        """Raise Forbidden unless the sender of `frame` may call `op`."""
        role = self.role(frame)
        if role in roles:
            return
        self.forbidden += 1
        user = _user_id(frame)
        who = keys.fingerprint(user) if user else "an unknown key"
        need = " or ".join(sorted(roles))
        log.warning("refused %s from key %s (role %s): it needs %s", op, who, role, need)
        if role is None:
            raise Forbidden(f"{op} refused: key {who} is no longer in the allow-list",
                            hint=f"add it again to {self._allow_path()}, then "
                            "`sllmctl daemon reload` there")
        raise Forbidden(f"{op} needs role {need}; this client's key {who} has role {role}",
                        hint=f"on the daemon's host, give the key role {need} in "
                        f"{self._allow_path()}, then `sllmctl daemon reload`")

    def reload(self) -> dict[str, Any]:
        if self.auth is None:
            raise SllmError(f"this daemon runs without keys ({self.mode}): there is no "
                            "allow-list to reload", hint="start it with --keys to use one")
        count = self.auth.reload()
        self._check_host_key(count)
        return {"allow_list": str(self.auth.allow_path), "keys": count}

    def _check_host_key(self, count: int) -> None:
        """A host key pair changed on disk is not in force until a restart (the bound socket
        keeps the key it started with): say so rather than pretend it was reloaded."""
        if self.pair is None:
            return
        try:
            on_disk: keys.KeyPair | None = keys.load_keys(keys_dir())
        except SllmError as e:
            on_disk, why = None, e.message
        if on_disk is not None and on_disk.public == self.pair.public:
            return
        found = (f"host key {on_disk.fingerprint} on disk" if on_disk is not None
                 else f"no usable host key on disk ({why})")
        raise SllmError(f"the allow-list was reloaded ({count} keys), but the daemon still uses "
                        f"host key {self.pair.fingerprint}: {found}; a new host key takes a "
                        "restart", hint="sllmctl daemon restart, then give clients the new "
                        "key (sllmctl daemon keys --show; sllmctl hosts add NAME ... --key KEY)")

    def describe(self) -> dict[str, Any]:
        """For status: the mode, the host key's fingerprint, the allow-list's size."""
        out: dict[str, Any] = {"mode": self.mode, "fingerprint": None, "allow_list": None,
                               "refused_keys": 0, "forbidden": self.forbidden}
        if self.pair is not None and self.auth is not None:
            out.update(fingerprint=self.pair.fingerprint, allow_list=str(self.auth.allow_path),
                       refused_keys=self.auth.refusals)
        return out

    def stop(self) -> None:
        if self.auth is not None:
            self.auth.stop()

    def _allow_path(self) -> str:
        return str(self.auth.allow_path) if self.auth else keys.ALLOW_LIST


def _user_id(frame: zmq.Frame) -> str | None:
    try:
        value = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return value if isinstance(value, str) else None


def secure(ctx: zmq.Context, sock: zmq.Socket, mode: Mode, endpoint: str) -> Guard:
    """Make `sock` (not yet bound) what `mode` asks: a CURVE server admitting only the
    allow-list in curve mode (a missing pair or a bad allow-list is fatal)."""
    if mode == "insecure":
        log.warning("listening on %s WITHOUT keys (--insecure): anyone who reaches it may do "
                    "everything; run `sllmctl daemon keys` and drop --insecure", endpoint)
    if mode != "curve":
        return Guard(mode)
    pair = keys.load_keys(keys_dir())  # an error naming `sllmctl daemon keys` when missing
    allow = keys_dir() / keys.ALLOW_LIST
    auth = keys.secure_server(ctx, sock, pair, allow)  # raises on a malformed allow-list
    size = auth.reload()
    log.info("keys: host key %s, %d key(s) allowed (%s)", pair.fingerprint, size, allow)
    if size == 0:
        log.warning("the allow-list %s is empty: no client can connect; add "
                    "`<key> admin <label>` lines, then `sllmctl daemon reload`", allow)
    return Guard(mode, pair, auth)
