"""A data file at the lowest level: open it checked, read chunks into memory (decoded where
it is encoded) with their checksums, compare those with the manifest, view tensors in the
buffers. The CPU reader, `verify`, the GPU loader and the daemon's DRAM tier build on these.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.codec import UNDECODABLE, read_into
from sllmctl.store.format import ALIGNMENT, FILES_DIR, DataFile, torch_dtype
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch


@dataclass
class Piece:
    """A range of a data file's (decoded) bytes, starting at a chunk boundary."""

    file: int
    offset: int
    length: int


def default_threads() -> int:
    return max(4, min(32, 2 * (os.cpu_count() or 1)))


def aligned_empty(nbytes: int) -> torch.Tensor:
    """An uninitialised uint8 CPU tensor whose data starts at an ALIGNMENT boundary."""
    import torch

    raw = torch.empty(nbytes + ALIGNMENT, dtype=torch.uint8)
    skip = -raw.data_ptr() % ALIGNMENT
    return raw[skip:skip + nbytes]


def open_data(model: StoredModel, f: DataFile, direct: bool = False) -> int:
    """Open a data file, checking its size; O_DIRECT when asked and possible."""
    path = model.path / f.path
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW  # a data file is never a link
    fd = -1
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, flags | os.O_DIRECT)
        except OSError:
            fd = -1  # file system without O_DIRECT (tmpfs): read through the page cache
    if fd < 0:
        try:
            fd = os.open(path, flags)
        except OSError as e:
            why = "is missing" if isinstance(e, FileNotFoundError) else (
                f"cannot be opened ({e.strerror})")
            raise CorruptCheckpoint(
                f"model {model.name}: data file {f.path} {why}", hint=reconvert_hint(model)
            ) from None
    size = os.fstat(fd).st_size
    if size != f.on_disk:
        os.close(fd)
        raise CorruptCheckpoint(
            f"model {model.name}: data file {f.path} is {size} bytes, expected {f.on_disk} "
            "(truncated or damaged)",
            hint=reconvert_hint(model),
        )
    return fd


def reconvert_hint(model: StoredModel) -> str:
    source = model.manifest.provenance.get("source", "SRC")
    return f"convert it again: sllmctl convert {source} --name {model.name} --force"


def read_extra(model: StoredModel, fname: str) -> bytes:
    """A non-weight file's bytes, checked against its SHA-256 in the manifest."""
    data, problem = try_read_extra(model, fname)
    if problem is not None:
        raise CorruptCheckpoint(f"model {model.name}: {FILES_DIR}/{fname}: {problem}",
                                hint=reconvert_hint(model))
    return data


def try_read_extra(model: StoredModel, fname: str) -> tuple[bytes, str | None]:
    """(bytes, None), or (b"", what is wrong: missing, unreadable, sha256 mismatch)."""
    try:
        fd = os.open(model.path / FILES_DIR / fname, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as fh:
            data = fh.read()
    except OSError as e:
        return b"", e.strerror or type(e).__name__
    if hashlib.sha256(data).hexdigest() != model.manifest.extra_files[fname]["sha256"]:
        return b"", "sha256 mismatch"
    return data, None


def check_chunks(model: StoredModel, f: DataFile, first: int, sums: list[str]) -> None:
    chunk = model.manifest.chunk_size
    for i, got in enumerate(sums, start=first):
        if got != f.checksums[i]:
            end = min((i + 1) * chunk, f.size)
            fails = "does not decode" if got == UNDECODABLE else "fails its checksum"
            raise CorruptCheckpoint(
                f"model {model.name}: data file {f.path} chunk {i} (bytes {i * chunk}-{end}) "
                f"{fails}",
                hint=reconvert_hint(model),
            )


def read_verify(model: StoredModel, f: DataFile, fd: int, addr: int, length: int,
                offset: int, threads: int) -> tuple[int, list[str]]:
    """native.read_verify for any data file: chunks [offset, offset + length) into memory at
    `addr`, decoded where the file is encoded; (bytes read, each chunk's checksum)."""
    from sllmctl import native

    chunk = model.manifest.chunk_size
    if f.encoding is None:
        return native.read_verify(fd, addr, length, offset, chunk, threads)
    out = np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(addr))
    return read_into(fd, f, chunk, offset, length, out, threads)


def tensor_views(model: StoredModel, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as views of per-file buffers (aliases share their target's view)."""
    out: dict[str, torch.Tensor] = {}
    for name, e in model.manifest.tensors.items():
        raw = buffers[e.file][e.offset:e.offset + e.nbytes]
        out[name] = raw.view(torch_dtype(e.dtype)).view(e.shape)
    for alias, target in model.manifest.aliases.items():
        out[alias] = out[target]
    return out
