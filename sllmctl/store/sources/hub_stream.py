"""Conversion that overlaps the download, for safetensors repos.

The writer plans every data file from every tensor's name, dtype and shape before it writes a
byte (load order across shards), so each shard's header is read ahead first: the first bytes
of each shard go into its partial file in the HF cache (hub_blob.fetch_blob with `stop_at`),
and the full download later resumes from there, so those bytes still arrive once. Then the
files download in order on a thread while the writer converts: each tensor's load waits until
its bytes are in the partial file and reads them from there. Nothing is published before every
file has passed its sha256 (the writer's `ready` hook waits for the download thread).
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllmctl.errors import SllmError
from sllmctl.store.sources.base import KEPT_FILES, Source, SourceError, SourceTensor
from sllmctl.store.sources.hub import (
    Downloaded,
    HubOptions,
    Resolved,
    download,
    fetch_lfs,
    lfs_location,
)
from sllmctl.store.sources.hub_blob import blob_path

if TYPE_CHECKING:
    import torch

HEAD_BYTES = 16 << 10  # read ahead of each shard first; a larger header gets a second request


@dataclass
class _File:
    """How much of one shard is on disk, and where (the partial file, then the blob)."""

    path: Path
    blob: Path  # where the partial file is renamed to once verified
    have: int = 0
    done: bool = False
    cond: threading.Condition = field(default_factory=threading.Condition)

    def watch(self, have: int) -> None:
        with self.cond:
            self.have = have
            self.cond.notify_all()


class Stream:
    """The download thread and what the writer's tensor loads wait on."""

    def __init__(self, res: Resolved, opts: HubOptions, progress: Callable[[int], None],
                 cancel: threading.Event | None) -> None:
        self.res, self.opts, self.progress, self.cancel = res, opts, progress, cancel
        self.storage = opts.cache / res.storage
        self.files: dict[str, _File] = {}
        self.error: BaseException | None = None
        self.result: Downloaded | None = None
        self.finished = threading.Event()
        self.header_bytes = 0  # read ahead (they count as downloaded, once)
        self.thread = threading.Thread(target=self._run, name="sllmctl-pull", daemon=True)

    def headers(self) -> dict[str, dict[str, Any]]:
        """Each shard's safetensors header, read into its partial file first."""
        out = {}
        for f in self.res.weights:
            if not f.name.endswith(".safetensors"):
                continue
            self.files[f.name] = _File(Path(), blob_path(self.storage, f.sha256 or ""))
            try:
                out[f.name] = self._header(f)
            except (ValueError, struct.error, UnicodeDecodeError):
                partial = self.files[f.name].path
                if not partial.name.endswith(".incomplete"):
                    raise SourceError(f"{f.name}: not a safetensors file") from None
                partial.unlink()  # kept from an earlier pull, but not this file's start
                self.files[f.name] = _File(Path(), blob_path(self.storage, f.sha256 or ""))
                out[f.name] = self._header(f)
        return out

    def _header(self, f: Any) -> dict[str, Any]:
        got = self._prefix(f, 8)
        (n,) = struct.unpack("<Q", _pread(got, 0, 8))
        if 8 + n > f.size:
            raise ValueError("header past the end")
        got = self._prefix(f, 8 + n)
        header = json.loads(_pread(got, 8, n))
        header.pop("__metadata__", None)
        return {"header": header, "start": 8 + n}

    def _prefix(self, f: Any, n: int) -> Path:
        """A path holding at least the file's first `n` bytes (its partial file or blob)."""
        entry = self.files[f.name]
        if entry.have >= n and entry.path != Path():
            return entry.path
        url, headers = lfs_location(self.res, f, self.opts)
        got = fetch_lfs(self.storage, url, f, headers, lambda _: None, self.cancel,
                        stop_at=max(n, min(f.size, HEAD_BYTES)), watch=entry.watch)
        entry.path = got.path
        self.header_bytes += got.downloaded
        return got.path

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        try:
            def on_file(name: str, path: Path) -> None:
                entry = self.files.get(name)
                if entry is not None:
                    with entry.cond:
                        entry.path, entry.done = path, True
                        entry.cond.notify_all()

            self.result = download(self.res, self.opts, self.progress, self.cancel, on_file,
                                   watch=lambda name: self.files[name].watch
                                   if name in self.files else None)
        except BaseException as e:
            self.error = e
        finally:
            self.finished.set()
            for entry in self.files.values():
                with entry.cond:
                    entry.cond.notify_all()

    def wait(self) -> Downloaded:
        """Every file downloaded and verified (or the download's error)."""
        self.finished.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result

    def read(self, name: str, start: int, end: int) -> bytearray:
        entry = self.files[name]
        with entry.cond:
            while not entry.done and entry.have < end and self.error is None:
                entry.cond.wait(1.0)
            if self.error is not None:
                raise self.error
            path = entry.path
        for _ in range(2):
            try:
                return _pread(path, start, end - start)
            except FileNotFoundError:  # renamed from partial to blob meanwhile
                path = entry.blob
        return _pread(path, start, end - start)


def stream_source(stream: Stream, kept: dict[str, Path]) -> Source:
    """A Source whose tensors load from the files as they arrive."""
    from sllmctl.store.format import DTYPES

    tensors: list[SourceTensor] = []
    for name, info in stream.headers().items():
        for tname, meta in info["header"].items():
            begin, end = meta["data_offsets"]
            if meta["dtype"] not in DTYPES:
                raise SourceError(f"{name}: tensor {tname!r} has dtype {meta['dtype']}")
            tensors.append(SourceTensor(
                tname, meta["dtype"], tuple(meta["shape"]),
                _loader(stream, name, info["start"] + begin, info["start"] + end, meta)))
    extra = {n: p.read_bytes() for n, p in kept.items() if n in KEPT_FILES}
    return Source("safetensors", f"hf://{stream.res.repo_id}@{stream.res.commit}", tensors,
                  extra_files=extra, provenance={"format": "safetensors"})


def _loader(stream: Stream, name: str, start: int, end: int,
            meta: dict[str, Any]) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        import torch

        from sllmctl.store.format import torch_dtype

        data = stream.read(name, start, end)
        dtype = torch_dtype(meta["dtype"])
        if not data:
            return torch.empty(meta["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(meta["shape"])

    return load


def _pread(path: Path, offset: int, n: int) -> bytearray:
    data = bytearray(n)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = os.preadv(fd, [data], offset) if n else 0
    finally:
        os.close(fd)
    if got != n:
        raise SllmError(f"{path}: {got} of {n} bytes at {offset}")
    return data
