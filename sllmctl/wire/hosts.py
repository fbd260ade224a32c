"""The client's hosts file: daemon names -> endpoint and public key, like ssh's known_hosts.

`hosts.toml` lives in the config folder (beside config.toml), mode 0600:

    [hosts.gpu1]
    endpoint = "tcp://10.0.0.2:7070"
    key = "rq:rM>}U?@Lns47E1%kR.o@n%FcmmsL/@{H8]yf7"

`--host NAME` (or `SLLMCTL_HOST`) picks one; neither means the local daemon. Every write is
atomic (temporary file in the same folder, fsync, rename), so a crash leaves the old file or
the new one. A name already known with another key is refused: remove it first, on purpose.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from sllmctl import paths
from sllmctl.errors import SllmError
from sllmctl.wire.keys import check_z85_key

HOSTS_FILE = "hosts.toml"
ENV_HOST = "SLLMCTL_HOST"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")


@dataclass(frozen=True)
class Host:
    name: str
    endpoint: str
    key: str  # the daemon's Z85 public key


def hosts_path() -> Path:
    return paths.config_path().parent / HOSTS_FILE


def check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise SllmError(f"bad host name {name!r}: letters, digits, - and _, at most 63, "
                        "starting with a letter or digit")
    return name


def check_endpoint(endpoint: str) -> str:
    """`tcp://ADDR:PORT`: ADDR an IPv4 address, a [bracketed] IPv6 address or a host name."""
    m = re.fullmatch(r"tcp://(\[[^\]]+\]|[^:\[\]/]+):(\d{1,5})", endpoint)
    if not m:
        raise SllmError(f"bad endpoint {endpoint!r}: expected tcp://ADDR:PORT")
    addr, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise SllmError(f"bad endpoint {endpoint!r}: port {port} is not 1 to 65535")
    try:
        if addr.startswith("["):
            ipaddress.IPv6Address(addr[1:-1])
        elif re.fullmatch(r"[\d.]+", addr) or not _HOSTNAME.fullmatch(addr):
            ipaddress.IPv4Address(addr)
    except ValueError:
        raise SllmError(f"bad endpoint {endpoint!r}: {addr} is not an address") from None
    return endpoint


def check_key(key: str) -> str:
    try:
        check_z85_key(key)
    except ValueError as e:
        raise SllmError(f"bad key {key!r}: {e}",
                        hint="paste the key `sllmctl daemon keys --show` prints on that host"
                        ) from None
    return key


def load(path: Path | None = None) -> dict[str, Host]:
    """The known hosts, by name; a missing file is an empty one, a malformed one an error."""
    path = path or hosts_path()
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SllmError(f"hosts file {path} cannot be read: {e}", hint="fix or remove it"
                        ) from None
    table = data.get("hosts", {})
    if not isinstance(table, dict):
        raise SllmError(f"hosts file {path}: `hosts` is not a table")
    found: dict[str, Host] = {}
    for name, entry in table.items():
        if not isinstance(entry, dict) or not {"endpoint", "key"} <= entry.keys():
            raise SllmError(f"hosts file {path}: host {name!r} needs an endpoint and a key")
        try:
            found[name] = Host(check_name(name), check_endpoint(str(entry["endpoint"])),
                               check_key(str(entry["key"])))
        except SllmError as e:
            raise SllmError(f"hosts file {path}: {e.message}", hint=e.hint) from None
    return found


def _render(hosts: dict[str, Host]) -> str:
    # Names, endpoints and Z85 keys are validated and hold no quote or backslash, so they
    # stand in TOML basic strings as they are.
    out = ["# Daemons this client knows: `sllmctl hosts add NAME tcp://ADDR:PORT --key KEY`\n"]
    for h in sorted(hosts.values(), key=lambda h: h.name):
        out.append(f'\n[hosts.{h.name}]\nendpoint = "{h.endpoint}"\nkey = "{h.key}"\n')
    return "".join(out)


def _write(path: Path, hosts: dict[str, Host]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{HOSTS_FILE}.", dir=path.parent)  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(_render(hosts))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def add(name: str, endpoint: str, key: str, path: Path | None = None) -> Host:
    """Add a host. Adding it again with the same endpoint and key changes nothing; another
    endpoint updates it; another key is refused (remove the name first, on purpose)."""
    path = path or hosts_path()
    host = Host(check_name(name), check_endpoint(endpoint), check_key(key))
    hosts = load(path)
    old = hosts.get(name)
    if old is not None and old.key != key:
        raise SllmError(f"host {name} is already known with another key",
                        hint=f"if its key really changed: sllmctl hosts rm {name}, then add it")
    if old != host:
        hosts[name] = host
        _write(path, hosts)
    return host


def remove(name: str, path: Path | None = None) -> Host:
    path = path or hosts_path()
    hosts = load(path)
    if name not in hosts:
        raise SllmError(f"no host named {name!r} in {path}", hint="sllmctl hosts ls")
    gone = hosts.pop(name)
    _write(path, hosts)
    return gone


def resolve(flag: str | None, path: Path | None = None) -> Host | None:
    """The host `--host NAME` or `SLLMCTL_HOST` names, or None for the local daemon."""
    name = flag or os.environ.get(ENV_HOST) or None
    if name is None:
        return None
    path = path or hosts_path()
    host = load(path).get(check_name(name))
    if host is None:
        raise SllmError(f"no host named {name!r} in {path}",
                        hint=f"sllmctl hosts add {name} tcp://ADDR:PORT --key KEY")
    return host
