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

import contextlib
import os
import re
import secrets
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

from sllmctl import paths
from sllmctl.errors import CorruptCheckpoint, NotFound, SllmError
from sllmctl.procs import alive
from sllmctl.store.format import FILES_DIR, MANIFEST, Manifest

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # whole names only: fullmatch


def check_name(name: str) -> str:
    if not NAME_RE.fullmatch(name):
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

    def check_files(self) -> None:
        """What a listing can check without reading data: every file the manifest names is
        a regular file (not a link) of its size. CorruptCheckpoint names the first that is
        not."""
        expect = [(f.path, f.on_disk) for f in self.manifest.files]
        expect += [(f"{FILES_DIR}/{n}", meta["size"])
                   for n, meta in self.manifest.extra_files.items()]
        for rel, size in expect:
            try:
                st = os.lstat(self.path / rel)
            except OSError as e:
                why = "is missing" if isinstance(e, FileNotFoundError) else e.strerror
                raise CorruptCheckpoint(f"model {self.name}: {rel} {why}",
                                        hint=remove_hint(self.name)) from None
            if not stat.S_ISREG(st.st_mode) or st.st_size != size:
                what = "is not a regular file" if not stat.S_ISREG(st.st_mode) else (
                    f"is {st.st_size} bytes, expected {size} (truncated or damaged)")
                raise CorruptCheckpoint(f"model {self.name}: {rel} {what}",
                                        hint=remove_hint(self.name))


@dataclass
class StoreEntry:
    """One entry of `Store.entries`: a readable model, or the error that makes it corrupt."""

    name: str
    model: StoredModel | None
    error: str | None = None

    @property
    def corrupt(self) -> bool:
        return self.error is not None


def remove_hint(name: str) -> str:
    return f"sllmctl rm {name}, then convert it again"


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

    def entries(self) -> list[StoreEntry]:
        """Every model, each either readable (its manifest sound and its files of the right
        sizes) or marked corrupt with the one-line reason; one damaged model never hides the
        others. Data bytes are not read: `verify` does that."""
        out = []
        for name in self.names():
            try:
                model = self.get(name)
                model.check_files()
            except NotFound:  # removed while listing
                continue
            except CorruptCheckpoint as e:
                out.append(StoreEntry(name, None, e.message))
                continue
            out.append(StoreEntry(name, model))
        return out

    def exists(self, name: str) -> bool:
        return (self.root / name).is_symlink()

    def path(self, name: str) -> Path:
        """The model folder `name` links to. A link that leads anywhere but to a folder
        directly under .data (absolute, `..`, or through another link) is refused."""
        check_name(name)
        link = self.root / name
        if not link.is_symlink():
            known = self.names()
            close = [n for n in known if name.lower() in n.lower() or n.lower() in name.lower()]
            hint = f"did you mean {close[0]}?" if close else "run `sllmctl ls` to list models"
            raise NotFound(f"no model named {name!r} in {self.root}", hint=hint)
        target = os.readlink(link)
        parts = Path(target).parts
        folder = self.root / target
        if (len(parts) != 2 or parts[0] != self.data_dir.name or parts[1] in (".", "..")
                or folder.is_symlink() or self.data_dir.is_symlink()):
            raise CorruptCheckpoint(
                f"model {name}: its link points outside the store's model folders ({target})",
                hint=f"remove the link itself (not what it points to): rm {link}")
        return folder

    def get(self, name: str) -> StoredModel:
        folder = self.path(name)
        where = f"model {name}"
        try:
            fd = os.open(folder / MANIFEST, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            with os.fdopen(fd, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise CorruptCheckpoint(f"{where}: manifest cannot be read ({e.strerror})",
                                    hint=remove_hint(name)) from None
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
        old = None
        if self.exists(name):
            with contextlib.suppress(CorruptCheckpoint):  # a bad link is replaced, not followed
                old = self.path(name)
        os.rename(link_tmp, self.root / name)
        _fsync_dir(self.root)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Remove the link, then its folder; only ever a folder directly under .data (`path`
        refuses any other), and links inside it are removed, never followed."""
        folder = self.path(name)
        os.unlink(self.root / name)
        _fsync_dir(self.root)
        shutil.rmtree(folder, ignore_errors=True)

    def collect_garbage(self) -> list[str]:
        """Remove abandoned conversions and unreferenced model folders."""
        removed: list[str] = []
        if self.data_dir.is_symlink() or self.tmp_dir.is_symlink():
            return removed  # not made by sllmctl: nothing under them is ours to delete
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
