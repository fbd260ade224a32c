"""CurveZMQ keys, the allow-list and the authenticator that enforces it (pyzmq's `zmq.auth`).

Files, in one folder (the daemon's: `<home>/keys`; the client's: the config folder):

| file              | what                                                       | mode |
|-------------------|------------------------------------------------------------|------|
| `<name>.key`      | the public key (pyzmq certificate format)                  | 0644 |
| `<name>.key_secret` | the public and the secret key                            | 0600 |
| `authorized_keys` | daemon only: who may connect (`<Z85 key> <role> <label>`)  | 0600 |

A secret key file that others can read is refused, as ssh refuses one. pyzmq writes its files
with the process's umask, so the pair is made in a private temporary folder, its modes set,
and only then renamed into place: no reader ever sees a secret file with a wider mode.

The authenticator admits only the keys in the allow-list; the NULL and PLAIN mechanisms and
every other key are refused, each refusal logged with the key's fingerprint. The User-Id of
an admitted connection is its Z85 public key; `role_of` maps it to the key's role in the
allow-list as it stands now, so a key removed and reloaded loses its rights at once, also on
a connection that is already open.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85
from zmq.utils.monitor import recv_monitor_message

from sllmctl.errors import EXIT_REFUSED, SllmError

Role = Literal["admin", "peer", "read"]
ROLES: tuple[Role, ...] = ("admin", "peer", "read")
ALLOW_LIST = "authorized_keys"
ZAP_DOMAIN = "sllmctl"

log = logging.getLogger("sllmctl.keys")

_ALLOW_HEADER = """\
# Who may connect to this daemon: one key a line, `<Z85 public key> <role> <label>`.
# Roles: admin (every operation), peer (daemon-to-daemon: copies, migration, locality),
# read (status, ps, locality). Reload with `sllmctl daemon reload` or SIGHUP.
"""


class Refused(SllmError):
    """A daemon refused this client's key (or the client does not know the daemon's key)."""

    exit_code = EXIT_REFUSED
    code = "refused"


def refused(host: str, endpoint: str, client: KeyPair) -> Refused:
    """The one-line error for a handshake a daemon turned down, naming the host and the fix."""
    return Refused(
        f"{host} ({endpoint}) refused this client's key {client.fingerprint}, or its key is "
        "not the one in hosts.toml",
        hint=f"on {host}: add `{client.public} admin <label>` (or peer, read) to its "
             f"{ALLOW_LIST}, then `sllmctl daemon reload`; check the key with `sllmctl hosts ls`")


@dataclass(frozen=True)
class KeyPair:
    public: str  # Z85, 40 characters
    secret: str

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


@dataclass(frozen=True)
class AllowedKey:
    key: str  # Z85
    role: Role
    label: str
    line: int


def check_z85_key(text: str) -> bytes:
    """The 32 raw bytes of a Z85 CURVE key, or ValueError with a one-line reason."""
    if len(text) != 40:
        raise ValueError(f"a CURVE key is 40 Z85 characters, this one has {len(text)}")
    try:
        raw = z85.decode(text.encode("ascii"))
    except (ValueError, KeyError, UnicodeEncodeError, IndexError):
        raise ValueError("not a Z85 key (characters outside the Z85 alphabet)") from None
    if len(raw) != 32 or z85.encode(raw).decode("ascii") != text:
        raise ValueError("not a Z85 key")
    return raw


def fingerprint(public: str | bytes) -> str:
    """A short name for a key in logs and messages: `SHA256:` and 16 hex digits of its raw bytes."""
    text = public.decode("ascii", "replace") if isinstance(public, bytes) else public
    try:
        raw = check_z85_key(text)
    except ValueError:
        raw = text.encode("utf-8", "replace")
    return "SHA256:" + hashlib.sha256(raw).hexdigest()[:16]


def _files(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.key", folder / f"{name}.key_secret"


def create_keys(folder: Path, name: str = "host") -> KeyPair:
    """Make the key pair `<name>.key`/`<name>.key_secret` in `folder` once; a pair already
    there is loaded instead (and checked)."""
    public_file, secret_file = _files(folder, name)
    if secret_file.exists():
        return load_keys(folder, name)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = Path(tempfile.mkdtemp(prefix=".keys-", dir=folder))  # mode 0700
    try:
        made_public, made_secret = (Path(p) for p in zmq.auth.create_certificates(tmp, name))
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        os.replace(made_public, public_file)
        os.replace(made_secret, secret_file)  # last: its presence means "the pair is made"
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    finally:
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return load_keys(folder, name)


def load_keys(folder: Path, name: str = "host") -> KeyPair:
    """Load and check the key pair: the secret file private to its owner, both keys well
    formed, and the public key the one the secret key makes."""
    _, secret_file = _files(folder, name)
    try:
        st = secret_file.stat()
    except FileNotFoundError:
        raise SllmError(f"no key pair at {secret_file}",
                        hint="make one with `sllmctl daemon keys`") from None
    if st.st_mode & 0o077:
        mode = stat.S_IMODE(st.st_mode)
        raise SllmError(f"secret key file {secret_file} is readable by others (mode {mode:04o})",
                        hint=f"chmod 600 {secret_file}")
    try:
        public, secret = zmq.auth.load_certificate(secret_file)
    except (OSError, ValueError) as e:
        raise SllmError(f"key file {secret_file} cannot be read: {e}") from None
    if secret is None:
        raise SllmError(f"key file {secret_file} holds no secret key")
    pair = KeyPair(public.decode("ascii", "replace"), secret.decode("ascii", "replace"))
    try:
        check_z85_key(pair.public)
        check_z85_key(pair.secret)
    except ValueError as e:
        raise SllmError(f"key file {secret_file}: {e}") from None
    if zmq.curve_public(pair.secret.encode()).decode() != pair.public:
        raise SllmError(f"key file {secret_file}: the public key is not the secret key's")
    return pair


def client_keys(config_dir: Path) -> KeyPair:
    """The client's own pair, `client.key(_secret)` in the config folder, made on first use."""
    return create_keys(config_dir, "client")


def parse_allow_list(text: str, source: str = ALLOW_LIST) -> dict[str, AllowedKey]:
    """Parse an allow-list; any malformed line is an error naming the line number."""
    entries: dict[str, AllowedKey] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split(None, 2)
        where = f"{source} line {number}"
        if len(parts) < 3:
            raise SllmError(f"{where}: expected `<Z85 public key> <role> <label>`, got {line!r}",
                            hint="fix the line or put # before it")
        key, role, label = parts
        try:
            check_z85_key(key)
        except ValueError as e:
            raise SllmError(f"{where}: {e}", hint="paste the key `sllmctl daemon keys` printed"
                            ) from None
        if role not in ROLES:
            raise SllmError(f"{where}: unknown role {role!r}", hint="roles: " + ", ".join(ROLES))
        if key in entries:
            raise SllmError(f"{where}: key already listed on line {entries[key].line}",
                            hint="keep one line per key")
        entries[key] = AllowedKey(key, cast(Role, role), label.strip(), number)
    return entries


def load_allow_list(path: Path) -> dict[str, AllowedKey]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SllmError(f"no allow-list at {path}",
                        hint="add a line `<client key> admin <label>` to it") from None
    except (OSError, UnicodeDecodeError) as e:
        raise SllmError(f"allow-list {path} cannot be read: {e}") from None
    return parse_allow_list(text, str(path))


def init_allow_list(path: Path) -> None:
    """Write an allow-list with only its header comment, when there is none yet."""
    if path.exists():
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(_ALLOW_HEADER)


class KeyAuthenticator(ThreadAuthenticator):
    """A ZAP handler that admits CURVE clients whose key is in the allow-list, and nobody else.

    pyzmq's own handler admits every NULL-mechanism peer when no address policy is set, and
    only logs a certificate folder it cannot load; this one decides every request itself.
    """

    def __init__(self, context: zmq.Context, allow_path: Path) -> None:
        super().__init__(context=context, log=logging.getLogger("sllmctl.keys.zap"))
        self.allow_path = allow_path
        self._lock = threading.Lock()
        self._entries: dict[str, AllowedKey] = load_allow_list(allow_path)  # fatal if bad
        self.refusals = 0

    def reload(self) -> int:
        """Read the allow-list again (SIGHUP, `daemon reload`); returns how many keys it holds.
        A malformed file raises and leaves the list in force unchanged."""
        entries = load_allow_list(self.allow_path)
        with self._lock:
            self._entries = entries
        log.info("allow-list %s reloaded: %d keys", self.allow_path, len(entries))
        return len(entries)

    def entry(self, key: str) -> AllowedKey | None:
        with self._lock:
            return self._entries.get(key)

    def role_of(self, user_id: str | None) -> Role | None:
        """The role of an admitted connection's User-Id (its Z85 key), as the list stands now."""
        found = self.entry(user_id) if user_id else None
        return found.role if found else None

    def sender_role(self, frame: zmq.Frame) -> Role | None:
        """The role of the peer that sent `frame` (received with `copy=False`)."""
        try:
            user_id = frame.get("User-Id")
        except zmq.ZMQError:
            return None
        return self.role_of(user_id if isinstance(user_id, str) else None)

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) < 6:
            if len(msg) >= 2:
                self._send_zap_reply(msg[1], b"400", b"Not enough frames")
            return
        version, request_id, _domain, address, _identity, mechanism = msg[:6]
        credentials = msg[6:]
        peer = address.decode("utf-8", "replace")
        if version != b"1.0":
            self._send_zap_reply(request_id, b"400", b"Invalid version")
        elif mechanism != b"CURVE" or len(credentials) != 1 or len(credentials[0]) != 32:
            self._refuse(request_id, peer, mechanism.decode("ascii", "replace"), None)
        else:
            key = z85.encode(credentials[0]).decode("ascii")
            found = self.entry(key)
            if found is None:
                self._refuse(request_id, peer, "CURVE", key)
            else:
                log.debug("admitted %s (%s, %s) from %s", fingerprint(key), found.role,
                          found.label, peer)
                self._send_zap_reply(request_id, b"200", b"OK", key)

    def _refuse(self, request_id: bytes, peer: str, mechanism: str, key: str | None) -> None:
        self.refusals += 1
        who = f"key {fingerprint(key)}" if key else f"mechanism {mechanism} (no CURVE key)"
        log.warning("refused %s from %s: not in %s", who, peer, self.allow_path)
        self._send_zap_reply(request_id, b"400", b"key not allowed")


def secure_server(context: zmq.Context, sock: zmq.Socket, keys: KeyPair,
                  allow_path: Path) -> KeyAuthenticator:
    """Make `sock` a CURVE server that admits only the allow-list's keys. Call before bind;
    stop the returned authenticator after closing the socket."""
    auth = KeyAuthenticator(context, allow_path)
    auth.start()
    try:
        sock.zap_domain = ZAP_DOMAIN.encode()
        sock.zap_enforce_domain = 1  # no ZAP handler answering means refusal, not admission
        sock.curve_secretkey = keys.secret.encode()
        sock.curve_publickey = keys.public.encode()
        sock.curve_server = True
    except BaseException:
        auth.stop()
        raise
    return auth


def secure_client(sock: zmq.Socket, keys: KeyPair, server_key: str) -> None:
    """Configure a DEALER (or REQ) for CURVE with this client's pair and the server's key.
    Call before connect. LINGER=0: a refused or dead peer never holds the process at exit."""
    try:
        check_z85_key(server_key)
    except ValueError as e:
        raise SllmError(f"the daemon's key {server_key!r}: {e}",
                        hint="check the key in hosts.toml (`sllmctl hosts ls`)") from None
    sock.linger = 0
    sock.curve_serverkey = server_key.encode()
    sock.curve_publickey = keys.public.encode()
    sock.curve_secretkey = keys.secret.encode()


HANDSHAKE_FAILED = (zmq.Event.HANDSHAKE_FAILED_AUTH | zmq.Event.HANDSHAKE_FAILED_PROTOCOL
                    | zmq.Event.HANDSHAKE_FAILED_NO_DETAIL)


def connect_checked(sock: zmq.Socket, endpoint: str,
                    timeout_ms: int) -> Literal["ok", "refused", "timeout"]:
    """Connect and watch the handshake for at most `timeout_ms`: `ok`, `refused` (the server
    turned the key down, or the two sides' keys do not match) or `timeout` (nobody answered).
    Lets a client say "refused" at once instead of waiting out its deadline."""
    monitor = sock.get_monitor_socket(zmq.Event.HANDSHAKE_SUCCEEDED | HANDSHAKE_FAILED)
    try:
        sock.connect(endpoint)
        if not monitor.poll(timeout_ms):
            return "timeout"
        event = recv_monitor_message(monitor)["event"]
        return "ok" if event == zmq.Event.HANDSHAKE_SUCCEEDED else "refused"
    finally:
        sock.disable_monitor()
        monitor.close(linger=0)
