"""One typed message per operation, validated at the edge.

Each operation's arguments are a dataclass whose fields say their type and range; `decode`
turns a request's `args` object into one, or raises BadRequest naming the field (a missing,
mistyped or out-of-range argument is never an `internal` error). Unknown arguments are
ignored. Each message also declares whether the daemon answers it in its socket loop (`fast`)
and which roles may call it (`roles`: admin, peer, read), which the daemon enforces on every
request of a CURVE connection (ipc and loopback without keys: the caller is admin).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from sllmctl.wire.codes import BadRequest
from sllmctl.wire.envelope import show

ADMIN, PEER, READ = "admin", "peer", "read"
PING_MAX_DELAY = 60.0  # seconds; ping exists to test deadlines, not to hold a worker
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # the store's rule for names
HOST_RE = re.compile(r"[A-Za-z0-9.:%_\[\]-]+")  # a name or an IPv4/IPv6 address
KEY_RE = re.compile(r"[!-~]+")  # printable ASCII: it goes in an HTTP header
REDACTED = "***"
_REQUIRED = object()


@dataclass(frozen=True)
class Rule:
    """What one argument may be."""

    kind: type  # str, int, float or bool (an int is taken as a float; a bool is only a bool)
    nullable: bool = False
    lo: float | None = None  # numbers: the range; strings: the length
    hi: float | None = None
    choices: tuple[str, ...] | None = None
    secret: bool = False  # redacted where the daemon shows the request (status' jobs)


def arg(kind: type, default: Any = _REQUIRED, **rule: Any) -> Any:
    meta = {"rule": Rule(kind, **rule)}
    if default is _REQUIRED:
        return dataclasses.field(metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


M = TypeVar("M", bound="Message")


@dataclass
class Message:
    op: ClassVar[str]
    fast: ClassVar[bool] = False
    roles: ClassVar[frozenset[str]] = frozenset({ADMIN})

    @classmethod
    def decode(cls: type[M], args: dict[str, Any]) -> M:
        values = {}
        for f in dataclasses.fields(cls):
            if f.name in args:
                values[f.name] = _check(cls.op, f.name, f.metadata["rule"], args[f.name])
            elif f.default is dataclasses.MISSING:
                raise BadRequest(_missing(cls.op, f.name), field=f.name)
        msg = cls(**values)
        msg.check()
        return msg

    def check(self) -> None:
        """Rules across arguments (none by default)."""

    def to_args(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def public_args(self) -> dict[str, Any]:
        """The arguments with secrets redacted."""
        return {f.name: REDACTED if f.metadata["rule"].secret and getattr(self, f.name)
                is not None else getattr(self, f.name) for f in dataclasses.fields(self)}


def _missing(op: str, name: str) -> str:
    return "the request names no model" if name == "name" else f"{op} needs argument {name}"


def _check(op: str, name: str, rule: Rule, value: Any) -> Any:
    def bad(what: str) -> BadRequest:
        return BadRequest(f"{op}: {name} must be {what}, not {show(value)}", field=name)

    if value is None:
        if rule.nullable:
            return None
        raise bad(_kind(rule))
    if rule.choices is not None:
        if value not in rule.choices:
            raise BadRequest(f"unknown {name} {show(value)}", field=name,
                             hint=f"use {' or '.join(rule.choices)}")
        return value
    if not _of_kind(value, rule.kind):
        raise bad(_kind(rule))
    size: float = len(value) if isinstance(value, str) else value
    if (isinstance(size, float) and not math.isfinite(size)) or (
            rule.lo is not None and size < rule.lo) or (rule.hi is not None and size > rule.hi):
        raise bad(_kind(rule))
    return float(value) if rule.kind is float else value


def _of_kind(value: Any, kind: type) -> bool:
    """An int is a float too; a bool is neither."""
    if kind is bool:
        return isinstance(value, bool)
    return not isinstance(value, bool) and isinstance(value, int | float if kind is float
                                                      else kind)


def _kind(rule: Rule) -> str:
    what = {str: "a string", int: "an integer", float: "a number",
            bool: "true or false"}[rule.kind]
    if rule.kind is str and (rule.lo, rule.hi) != (None, None):
        what += f" of {rule.lo or 0:g} to {rule.hi:g} characters"
    elif (rule.lo, rule.hi) != (None, None):
        what += f" in [{rule.lo:g}, {rule.hi:g}]"
    return what + (" or null" if rule.nullable else "")


def _model_name(op: str, name: str) -> None:
    if not NAME_RE.fullmatch(name):
        raise BadRequest(f"invalid model name {show(name)}", field="name",
                         hint="use letters, digits, '.', '_' and '-' (128 at most), starting "
                         "with a letter or digit")


def loopback(host: str) -> bool:
    """Whether `host` names this machine only (an address, or `localhost`)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class Ping(Message):
    op = "ping"
    roles = frozenset({ADMIN, PEER, READ})
    delay: float = arg(float, 0.0, lo=0, hi=PING_MAX_DELAY)


@dataclass
class Status(Message):
    op = "status"
    fast = True
    roles = frozenset({ADMIN, PEER, READ})


@dataclass
class Warm(Message):
    op = "warm"
    name: str = arg(str)
    tier: str = arg(str, "dram", choices=("dram", "gpu"))
    gpu: int | None = arg(int, None, nullable=True, lo=0, hi=1023)

    def check(self) -> None:
        _model_name(self.op, self.name)


@dataclass
class Unload(Message):
    op = "unload"
    name: str = arg(str)
    tier: str | None = arg(str, None, nullable=True, choices=("dram", "gpu"))

    def check(self) -> None:
        _model_name(self.op, self.name)


@dataclass
class Measure(Message):
    op = "measure"


@dataclass
class Serve(Message):
    op = "serve"
    name: str = arg(str)
    host: str = arg(str, "127.0.0.1", lo=1, hi=255)
    port: int = arg(int, 8080, lo=1, hi=65535)
    keep_alive: float = arg(float, 300.0, lo=-1, hi=1e9)  # seconds; -1: for ever
    api_key: str | None = arg(str, None, nullable=True, lo=1, hi=1024, secret=True)

    def check(self) -> None:
        _model_name(self.op, self.name)
        if not HOST_RE.fullmatch(self.host):
            raise BadRequest(f"serve: host must be a host name or address, not "
                             f"{show(self.host)}", field="host")
        if self.api_key is not None and not KEY_RE.fullmatch(self.api_key):
            raise BadRequest("serve: api_key must be printable ASCII without spaces",
                             field="api_key")
        if self.api_key is None and not loopback(self.host):
            raise BadRequest(
                f"serving HTTP on {self.host} without an API key is refused: anyone who "
                "reaches it could use every stored model", field="host",
                hint="add --api-key KEY (or SLLMCTL_API_KEY), or serve on 127.0.0.1")


@dataclass
class Unserve(Message):
    op = "unserve"
    name: str = arg(str)

    def check(self) -> None:
        _model_name(self.op, self.name)


REPO_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
REVISION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,255}")


@dataclass
class Pull(Message):
    """A model from the Hugging Face Hub into the store (ops_pull.py). The hub fields carry
    the client's HF_ENDPOINT, HF_TOKEN, HF_HUB_CACHE and HF_HUB_OFFLINE (null: the daemon's
    own). `cancel` cancels the pull of `name` in flight instead."""

    op = "pull"
    repo: str = arg(str)
    name: str = arg(str)
    revision: str = arg(str, "main", lo=1, hi=256)
    dtype: str | None = arg(str, None, nullable=True, choices=("bf16", "f16", "f32", "f64"))
    compress: bool = arg(bool, False)
    file: str | None = arg(str, None, nullable=True, lo=1, hi=255)
    quant: str | None = arg(str, None, nullable=True, lo=1, hi=32)
    force: bool = arg(bool, False)
    endpoint: str | None = arg(str, None, nullable=True, lo=1, hi=1024)
    token: str | None = arg(str, None, nullable=True, lo=1, hi=1024, secret=True)
    cache_dir: str | None = arg(str, None, nullable=True, lo=1, hi=4096)
    offline: bool | None = arg(bool, None, nullable=True)
    cancel: bool = arg(bool, False)

    def check(self) -> None:
        _model_name(self.op, self.name)
        if not REPO_RE.fullmatch(self.repo) or ".." in self.repo:
            raise BadRequest(f"pull: repo must be a Hub repo id (org/name), not "
                             f"{show(self.repo)}", field="repo")
        if not REVISION_RE.fullmatch(self.revision) or ".." in self.revision:
            raise BadRequest(f"pull: invalid revision {show(self.revision)}", field="revision")
        if self.file is not None and ("/" in self.file or not self.file.endswith(".gguf")):
            raise BadRequest("pull: file must name a .gguf file at the repo's top level",
                             field="file")
        if self.endpoint is not None and not self.endpoint.startswith(("http://", "https://")):
            raise BadRequest("pull: endpoint must be an http(s) URL", field="endpoint")


@dataclass
class Shutdown(Message):
    op = "shutdown"
    fast = True


@dataclass
class Reload(Message):
    """Read the allow-list again (as SIGHUP does)."""

    op = "reload"
    fast = True


# ------------------------------------------------------------ live migration (token mode)
MIGRATION_ID_RE = re.compile(r"[0-9a-f]{8,64}")
MAX_STATE = 900_000  # characters of a request's state (Request.to_dict as JSON)


@dataclass
class Migrate(Message):
    """Move the running requests of a served model (or one, `request`) to the daemon the
    hosts file names `to`, in token mode; `dry_run` (0/1) lists them only."""

    op = "migrate"
    name: str = arg(str)
    to: str = arg(str, lo=1, hi=64)
    request: str | None = arg(str, None, nullable=True, lo=1, hi=128)
    dry_run: int = arg(int, 0, lo=0, hi=1)

    def check(self) -> None:
        _model_name(self.op, self.name)


@dataclass
class MigrateIn(Message):
    """Daemon to daemon: rebuild a request from its state (prefill) and continue it,
    streaming each token back as an event; a later round of the same migration replaces
    the earlier one."""

    op = "migrate_in"
    roles = frozenset({ADMIN, PEER})
    migration: str = arg(str, lo=8, hi=64)
    name: str = arg(str)
    state: str = arg(str, lo=2, hi=MAX_STATE, secret=True)  # JSON: the prompt is user data
    round: int = arg(int, 1, lo=1, hi=1000)

    def check(self) -> None:
        _model_name(self.op, self.name)
        _migration_id(self.op, self.migration)


@dataclass
class MigrateEnd(Message):
    """Daemon to daemon: let the migrated request go (its client left, or the source
    takes it back)."""

    op = "migrate_end"
    fast = True
    roles = frozenset({ADMIN, PEER})
    migration: str = arg(str, lo=8, hi=64)

    def check(self) -> None:
        _migration_id(self.op, self.migration)


def _migration_id(op: str, value: str) -> None:
    if not MIGRATION_ID_RE.fullmatch(value):
        raise BadRequest(f"{op}: migration must be 8 to 64 hex digits", field="migration")


MESSAGES: dict[str, type[Message]] = {
    m.op: m for m in (Ping, Status, Warm, Unload, Measure, Serve, Unserve, Pull, Shutdown,
                      Reload, Migrate, MigrateIn, MigrateEnd)}
OPS = tuple(MESSAGES)
FAST_OPS = frozenset(op for op, m in MESSAGES.items() if m.fast)


def decode(op: str, args: dict[str, Any]) -> Message:
    """The typed message of a request whose op is one of OPS."""
    return MESSAGES[op].decode(args)
