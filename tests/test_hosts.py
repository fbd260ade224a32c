"""The client's hosts file (hosts.toml): add, list, remove, validation, resolving --host."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq

from sllmctl.errors import SllmError
from sllmctl.wire import hosts


def key() -> str:
    return zmq.curve_keypair()[0].decode()


def test_add_list_remove_roundtrip(tmp_path: Path) -> None:
    a, b = key(), key()
    hosts.add("gpu1", "tcp://10.0.0.2:7070", a)
    hosts.add("gpu-2", "tcp://[fd00::2]:7071", b)
    path = tmp_path / "hosts.toml"  # beside SLLMCTL_CONFIG, which the home fixture sets
    assert hosts.hosts_path() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert hosts.load() == {"gpu1": hosts.Host("gpu1", "tcp://10.0.0.2:7070", a),
                            "gpu-2": hosts.Host("gpu-2", "tcp://[fd00::2]:7071", b)}
    assert hosts.remove("gpu1").key == a
    assert list(hosts.load()) == ["gpu-2"]
    assert [p.name for p in tmp_path.iterdir()] == ["hosts.toml"]  # no temporary file left


def test_missing_file_is_empty() -> None:
    assert hosts.load() == {}


def test_same_key_again_is_a_no_op_new_endpoint_updates(tmp_path: Path) -> None:
    a = key()
    hosts.add("n1", "tcp://10.0.0.2:7070", a)
    before = (tmp_path / "hosts.toml").stat().st_mtime_ns
    hosts.add("n1", "tcp://10.0.0.2:7070", a)
    assert (tmp_path / "hosts.toml").stat().st_mtime_ns == before
    hosts.add("n1", "tcp://node1.lan:7070", a)
    assert hosts.load()["n1"].endpoint == "tcp://node1.lan:7070"


def test_other_key_for_a_known_name_refused() -> None:
    hosts.add("n1", "tcp://10.0.0.2:7070", key())
    with pytest.raises(SllmError, match="already known with another key") as e:
        hosts.add("n1", "tcp://10.0.0.2:7070", key())
    assert e.value.hint is not None and "hosts rm n1" in e.value.hint


@pytest.mark.parametrize(("name", "endpoint", "k", "error"), [
    ("bad name", "tcp://10.0.0.2:1", None, "bad host name 'bad name'"),
    ("a.b", "tcp://10.0.0.2:1", None, "bad host name"),
    ("-x", "tcp://10.0.0.2:1", None, "bad host name"),
    ("n", "10.0.0.2:1", None, "expected tcp://ADDR:PORT"),
    ("n", "ipc:///tmp/x", None, "expected tcp://ADDR:PORT"),
    ("n", "tcp://10.0.0.2", None, "expected tcp://ADDR:PORT"),
    ("n", "tcp://10.0.0.2:0", None, "port 0 is not 1 to 65535"),
    ("n", "tcp://10.0.0.2:70000", None, "port 70000"),
    ("n", "tcp://10.0.0.999:1", None, "10.0.0.999 is not an address"),
    ("n", "tcp://[zz::1]:1", None, "is not an address"),
    ("n", 'tcp://a"b:1', None, "is not an address"),
    ("n", "tcp://10.0.0.2:1", "short", "40 Z85 characters, this one has 5"),
    ("n", "tcp://10.0.0.2:1", '"' * 40, "not a Z85 key"),
])
def test_validation_one_line_errors(name: str, endpoint: str, k: str | None,
                                    error: str) -> None:
    with pytest.raises(SllmError, match=error.replace("(", r"\(")) as e:
        hosts.add(name, endpoint, k or key())
    assert "\n" not in e.value.message
    assert hosts.load() == {}


def test_remove_unknown_name(tmp_path: Path) -> None:
    with pytest.raises(SllmError, match="no host named 'ghost'"):
        hosts.remove("ghost")


def test_resolve_flag_env_and_local(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = key(), key()
    hosts.add("one", "tcp://10.0.0.1:7070", a)
    hosts.add("two", "tcp://10.0.0.2:7070", b)
    monkeypatch.delenv(hosts.ENV_HOST, raising=False)
    assert hosts.resolve(None) is None
    assert hosts.resolve("one") == hosts.Host("one", "tcp://10.0.0.1:7070", a)
    monkeypatch.setenv(hosts.ENV_HOST, "two")
    assert hosts.resolve(None) is not None and hosts.resolve(None).key == b  # type: ignore[union-attr]
    assert hosts.resolve("one").key == a  # type: ignore[union-attr]  # the flag wins
    with pytest.raises(SllmError, match="no host named 'three'") as e:
        hosts.resolve("three")
    assert e.value.hint == "sllmctl hosts add three tcp://ADDR:PORT --key KEY"


def test_malformed_file_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text("[hosts.x]\nendpoint = 3\n")
    with pytest.raises(SllmError, match="host 'x' needs an endpoint and a key"):
        hosts.load()
    path.write_text('[hosts.x]\nendpoint = "tcp://1.2.3.4:5"\nkey = "nope"\n')
    with pytest.raises(SllmError, match=r"hosts file .*: bad key 'nope'"):
        hosts.resolve("x")
    path.write_text("[hosts\n")
    with pytest.raises(SllmError, match="cannot be read"):
        hosts.load()
