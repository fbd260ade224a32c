"""Reading stored models back: `load_state_dict` and `verify`.

One read per chunk into one buffer per data file (many in flight at once, each chunk
checksummed by the thread that read it, while it is still in cache); tensors are views
of those buffers, so a model costs one allocation per data file and no per-tensor opens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.codec import UNDECODABLE
from sllmctl.store.datafile import (
    aligned_empty,
    check_chunks,
    default_threads,
    open_data,
    read_extra,
    read_verify,
    reconvert_hint,
    tensor_views,
    try_read_extra,
)
from sllmctl.store.format import FILES_DIR, DataFile
from sllmctl.store.store import Store, StoredModel

if TYPE_CHECKING:
    import torch

VERIFY_WINDOW = 256 << 20  # bytes `verify` reads at a time


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
        from sllmctl.store.gpu.loader import load_to_gpu

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
        _, problem = try_read_extra(model, fname)
        if problem is not None:
            report.bad.append({"file": f"{FILES_DIR}/{fname}", "chunk": None,
                               "error": problem})
    return report
