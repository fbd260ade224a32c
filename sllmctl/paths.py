"""Paths and settings, resolved in one place: flag > environment > config file > default.

| setting     | environment         | config key  | default                                    |
|-------------|---------------------|-------------|--------------------------------------------|
| home        | SLLMCTL_HOME        | home        | ~/.sllmctl                                 |
| runtime dir | SLLMCTL_RUNTIME_DIR | runtime_dir | $XDG_RUNTIME_DIR/sllmctl, /tmp/sllmctl-UID |
| config file | SLLMCTL_CONFIG      |             | ~/.config/sllmctl/config.toml              |
| autostart   | SLLMCTL_AUTOSTART   | autostart   | on (the daemon starts on first use)        |
| compress    | SLLMCTL_COMPRESS    | compress    | off (`convert` writes plain data files)    |
| pull        | SLLMCTL_PULL        | pull        | missing (`never`: serve/run/warm never pull) |

The store lives under `<home>/models`. Nothing is read until a command needs it.
"""

from __future__ import annotations

import os
import tomllib
from functools import cache
from pathlib import Path
from typing import Any

from sllmctl.errors import SllmError

_overrides: dict[str, str] = {}  # set from command-line flags


def set_override(key: str, value: str | None) -> None:
    if value is not None:
        _overrides[key] = value
        config.cache_clear()


def config_path() -> Path:
    env = os.environ.get("SLLMCTL_CONFIG")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "sllmctl" / "config.toml"


@cache
def config() -> dict[str, Any]:
    path = config_path()
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise SllmError(f"config file {path} cannot be read: {e}",
                        hint="fix or remove it") from None


def setting(key: str, env: str, default: str) -> str:
    if key in _overrides:
        return _overrides[key]
    if os.environ.get(env):
        return os.environ[env]
    value = config().get(key)
    return str(value) if value is not None else default


def switch(key: str, env: str, default: bool, flag: bool | None = None) -> bool:
    """An on/off setting: the flag when given, else the environment or config file, where
    0, false, no and off (any case) mean off and anything else on."""
    if flag is not None:
        return flag
    value = setting(key, env, "1" if default else "0").strip().lower()
    return value not in ("0", "false", "no", "off")


def home() -> Path:
    return Path(setting("home", "SLLMCTL_HOME", str(Path.home() / ".sllmctl"))).expanduser()


def models_dir() -> Path:
    return home() / "models"


def runtime_dir() -> Path:
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    default = str(Path(xdg) / "sllmctl") if xdg else f"/tmp/sllmctl-{os.getuid()}"
    return Path(setting("runtime_dir", "SLLMCTL_RUNTIME_DIR", default)).expanduser()
