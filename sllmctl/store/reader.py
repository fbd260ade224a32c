"""Reading stored models back: `load_state_dict` and `verify`.

One read per chunk into one buffer per data file (many in flight at once, each chunk
checksummed by the thread that read it, while it is still in cache); tensors are views
of those buffers, so a model costs one allocation per data file and no per-tensor opens.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.codec import UNDECODABLE, read_into
from sllmctl.store.format import ALIGNMENT, FILES_DIR, DataFile, torch_dtype
from sllmctl.store.store import Store, StoredModel

if TYPE_CHECKING:
    import torch

VERIFY_WINDOW = 256 << 20  # bytes `verify` reads at a time


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
    data, problem = _read_extra(model, fname)
    if problem is not None:
        raise CorruptCheckpoint(f"model {model.name}: {FILES_DIR}/{fname}: {problem}",
                                hint=reconvert_hint(model))
    return data


def _read_extra(model: StoredModel, fname: str) -> tuple[bytes, str | None]:
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


def read_file(
    model: StoredModel, f: DataFile, *, verify: bool = True, threads: int | None = None,
    direct: bool = False,
) -> torch.Tensor:
    """A data file's bytes in an aligned CPU buffer, every chunk checked when `verify`."""
    from sllmctl import native

    buf = aligned_empty(f.size)
    if f.size == 0:
        return buf
    threads = threads or default_threads()
    fd = open_data(model, f, direct and f.encoding is None)
    try:
        if verify or f.encoding is not None:
            n, sums = read_verify(model, f, fd, buf.data_ptr(), f.size, 0, threads)
        else:
            n = native.pread_into(fd, buf.data_ptr(), f.size, 0, threads)
    finally:
        os.close(fd)
    if n != f.size:
        raise CorruptCheckpoint(
            f"model {model.name}: data file {f.path} ended after {n} of {f.size} bytes",
            hint=reconvert_hint(model),
        )
    if verify:
        check_chunks(model, f, 0, sums)
    return buf


def tensor_views(model: StoredModel, buffers: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict as views of per-file buffers (aliases share their target's view)."""
    out: dict[str, torch.Tensor] = {}
    for name, e in model.manifest.tensors.items():
        raw = buffers[e.file][e.offset:e.offset + e.nbytes]
        out[name] = raw.view(torch_dtype(e.dtype)).view(e.shape)
    for alias, target in model.manifest.aliases.items():
        out[alias] = out[target]
    return out


def load_state_dict(
    name: str,
    device: Any = "cpu",
    *,
    verify: bool = True,
    threads: int | None = None,
    store: Store | None = None,
) -> dict[str, torch.Tensor]:
    """Load model `name` from the store as {tensor name: tensor} on `device`.

    Every chunk is checked against its checksum unless `verify=False`; a mismatch raises
    `CorruptCheckpoint` naming the model, data file and chunk, and nothing is returned.
    Tied tensors come back as the same tensor under each name.
    """
    import torch

    model = (store or Store()).get(name)
    device = torch.device(device)
    if verify:  # small; the engine reads its config and tokenizer from them
        for fname in model.manifest.extra_files:
            read_extra(model, fname)
    if device.type == "cuda":
        from sllmctl.store.gpu_loader import load_to_gpu

        return load_to_gpu(model, device, verify=verify)
    buffers = [read_file(model, f, verify=verify, threads=threads)
               for f in model.manifest.files]
    if device.type != "cpu":
        buffers = [b.to(device) for b in buffers]
    return tensor_views(model, buffers)


@dataclass
class VerifyReport:
    name: str
    chunks: int = 0
    bytes: int = 0
    bad: list[dict[str, Any]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.bad

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "ok": self.ok, "chunks": self.chunks, "bytes": self.bytes,
                "bad": self.bad}


def verify(name: str, *, store: Store | None = None, threads: int | None = None,
           progress: Any = None) -> VerifyReport:
    """Recompute every checksum of model `name`; report every bad chunk and file."""

    model = (store or Store()).get(name)
    report = VerifyReport(name)
    chunk = model.manifest.chunk_size
    window = max(chunk, VERIFY_WINDOW // chunk * chunk)
    buf = aligned_empty(window)
    for f in model.manifest.files:
        try:
            fd = open_data(model, f)
        except CorruptCheckpoint as e:
            report.bad.append({"file": f.path, "chunk": None, "error": e.message})
            continue
        try:
            for start in range(0, f.size, window):
                length = min(window, f.size - start)
                n, sums = read_verify(model, f, fd, buf.data_ptr(), length, start,
                                      threads or default_threads())
                first = start // chunk
                if n != length:
                    report.bad.append({"file": f.path, "chunk": first + len(sums),
                                       "error": f"file ends early, at byte {start + n}"})
                for i, got in enumerate(sums, start=first):
                    if got != f.checksums[i]:
                        fails = ("does not decode" if got == UNDECODABLE
                                 else "fails its checksum")
                        report.bad.append({"file": f.path, "chunk": i,
                                           "error": f"chunk {i} {fails}"})
                report.chunks += len(sums)
                report.bytes += n
                if progress:
                    progress(length)
        finally:
            os.close(fd)
    for fname in model.manifest.extra_files:
        _, problem = _read_extra(model, fname)
        if problem is not None:
            report.bad.append({"file": f"{FILES_DIR}/{fname}", "chunk": None,
                               "error": problem})
    return report
