"""The model store on local disk.

Layout under `<home>/models` (see docs/format.md):

    <name>                 symlink to .data/<name>.<id>; the only thing `ls` sees
    .data/<name>.<id>/     a complete model folder (manifest.json, data-*.bin, files/)
    .tmp/<name>.<id>.<pid> a conversion in progress

A model appears by renaming a finished symlink over `<name>` (atomic), and disappears
by removing the symlink before its folder. Anything under .tmp whose process is gone,
and any .data folder no symlink points to, is garbage that `collect_garbage` removes.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from sllmctl import paths
from sllmctl.errors import NotFound, SllmError
from sllmctl.procs import alive
from sllmctl.store.format import MANIFEST, Manifest

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def check_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise SllmError(
            f"invalid model name {name!r}",
            hint="use letters, digits, '.', '_' and '-' (128 at most), starting with a "
            "letter or digit",
        )
    return name


@dataclass
class StoredModel:
    name: str
    path: Path
    manifest: Manifest


class Store:
    def __init__(self, root: Path | None = None) -> None:
        self.root = root or paths.models_dir()

    @property
    def data_dir(self) -> Path:
        return self.root / ".data"

    @property
    def tmp_dir(self) -> Path:
        return self.root / ".tmp"

    def names(self) -> list[str]:
        try:
            entries = sorted(os.listdir(self.root))
        except FileNotFoundError:
            return []
        return [e for e in entries if not e.startswith(".") and (self.root / e).is_symlink()]

    def exists(self, name: str) -> bool:
        return (self.root / name).is_symlink()

    def path(self, name: str) -> Path:
        check_name(name)
        link = self.root / name
        if not link.is_symlink():
            known = self.names()
            close = [n for n in known if name.lower() in n.lower() or n.lower() in name.lower()]
            hint = f"did you mean {close[0]}?" if close else "run `sllmctl ls` to list models"
            raise NotFound(f"no model named {name!r} in {self.root}", hint=hint)
        return self.root / os.readlink(link)

    def get(self, name: str) -> StoredModel:
        folder = self.path(name)
        where = f"model {name}"
        try:
            raw = (folder / MANIFEST).read_bytes()
        except OSError as e:
            from sllmctl.errors import CorruptCheckpoint

            raise CorruptCheckpoint(
                f"{where}: manifest cannot be read ({e.strerror})",
                hint=f"sllmctl rm {name}, then convert it again",
            ) from None
        return StoredModel(name, folder, Manifest.from_json(raw, where))

    def new_tmp(self, name: str) -> Path:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{name}.{secrets.token_hex(4)}.{os.getpid()}"
        tmp.mkdir()
        return tmp

    def publish(self, name: str, tmp: Path) -> None:
        """Move a finished folder into .data and point `<name>` at it, atomically."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        final = self.data_dir / tmp.name.rsplit(".", 1)[0]
        os.rename(tmp, final)
        link_tmp = self.tmp_dir / f"{final.name}.link"
        os.symlink(os.path.relpath(final, self.root), link_tmp)
        old = self.path(name) if self.exists(name) else None
        os.rename(link_tmp, self.root / name)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def remove(self, name: str) -> None:
        folder = self.path(name)
        os.unlink(self.root / name)
        _fsync_dir(self.root)
        shutil.rmtree(folder, ignore_errors=True)

    def collect_garbage(self) -> list[str]:
        """Remove abandoned conversions and unreferenced model folders."""
        removed = []
        live = {os.path.realpath(self.root / n) for n in self.names()}
        for entry in _listdir(self.tmp_dir):
            path = self.tmp_dir / entry
            pid = entry.rsplit(".", 1)[-1]
            if entry.endswith(".link") or not (pid.isdigit() and alive(int(pid))):
                _remove(path)
                removed.append(str(path))
        for entry in _listdir(self.data_dir):
            path = self.data_dir / entry
            # a folder younger than a minute may belong to a conversion about to publish
            if os.path.realpath(path) not in live and _age(path) > 60:
                _remove(path)
                removed.append(str(path))
        return removed


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.lstat().st_mtime
    except FileNotFoundError:
        return 0.0


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
