"""The GPU loader: disk or pinned DRAM to GPU at the speed of the slower of the two.

Pieces of each data file (64 MiB, chunk-aligned) are read by a pool of threads into pinned
host buffers from a reusable pool. Per piece, the main thread queues an asynchronous
host-to-GPU copy into the file's single GPU allocation on a copy stream, and the checksums
of the piece's chunks on a second stream once the copy is done; a recycler thread hands a
pinned buffer back to the readers as soon as its copy has finished. Checksums are reduced
on the GPU (sum64x2 is two integer reductions) while later copies are still running, and
compared against the manifest with one transfer at the end.

Each piece is read through the page cache when all of it is resident there (mincore), and
with O_DIRECT otherwise, so a hot page cache is read at memory speed and a cold disk at
disk speed without polluting the cache.

`load_pinned` + `pinned_to_gpu` are the in-memory path: a model whose chunks already sit in
pinned host memory (the daemon's DRAM tier) goes to the GPU with copies and checksums only.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.format import ALIGNMENT, PAGE_WORDS
from sllmctl.store.reader import open_data, reconvert_hint, tensor_views
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch

PIECE = 64 << 20  # bytes per read and per copy; a multiple of the checksum chunk
POOL_BUFFERS = 16
READERS = 8  # pieces read at once
READ_THREADS = 8  # threads (outstanding preads) per piece read from disk
CACHED_READ_THREADS = 2  # per piece read from the page cache (a memory copy; more contend)
READ_PIECE = 4 << 20  # bytes per pread


class PinnedPool:
    """Reusable page-aligned pinned host buffers. Allocating and pinning is slow (the
    first touch of new memory), so a pool is made once per process and kept."""

    def __init__(self, buffers: int = POOL_BUFFERS, size: int = PIECE) -> None:
        import torch

        self.size = size
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=True)
                        for _ in range(buffers)]
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        for b in self.buffers:
            self.free.put(b)


_pools: dict[int, PinnedPool] = {}
_pool_lock = threading.Lock()


def default_pool() -> PinnedPool:
    with _pool_lock:
        if 0 not in _pools:
            _pools[0] = PinnedPool()
        return _pools[0]


@dataclass
class Piece:
    file: int
    offset: int
    length: int


def pieces(model: StoredModel, size: int = PIECE) -> list[Piece]:
    return [Piece(i, off, min(size, f.size - off))
            for i, f in enumerate(model.manifest.files) for off in range(0, f.size, size)]


# ---------------------------------------------------------------- checksums on the GPU

def _signed(hex16: str) -> int:
    v = int(hex16, 16)
    return v - (1 << 64) if v >= 1 << 63 else v


def expected_sums(model: StoredModel, device: Any) -> list[torch.Tensor]:
    """Each file's manifest checksums as an int64 tensor [chunks, 2] on `device`."""
    import torch

    out = []
    for f in model.manifest.files:
        rows = [(_signed(c[:16]), _signed(c[16:])) for c in f.checksums]
        out.append(torch.tensor(rows, dtype=torch.int64).reshape(-1, 2).to(device))
    return out


class GpuChecker:
    """sum64x2 of chunks already on the GPU, written into per-file result tensors."""

    def __init__(self, model: StoredModel, device: Any) -> None:
        import torch

        self.model = model
        self.chunk = model.manifest.chunk_size
        self.pages_per_chunk = self.chunk // ALIGNMENT
        self.weights = torch.arange(1, self.pages_per_chunk + 1, dtype=torch.int64,
                                    device=device)
        self.results = [torch.zeros(len(f.checksums), 2, dtype=torch.int64, device=device)
                        for f in model.manifest.files]

    def add(self, file: int, offset: int, data: torch.Tensor) -> None:
        """Checksum `data`: bytes of `file` from `offset`, whole chunks (the file's last
        chunk may be short)."""
        import torch

        end = offset + data.numel()
        ragged = end % self.chunk and end != self.model.manifest.files[file].size
        if offset % self.chunk or ragged:
            raise ValueError("GPU checksums need whole chunks")

        pages = data.view(torch.int64).view(-1, PAGE_WORDS).sum(dim=1)
        first = offset // self.chunk
        full = pages.numel() // self.pages_per_chunk
        out = self.results[file]
        if full:
            p = pages[: full * self.pages_per_chunk].view(full, self.pages_per_chunk)
            out[first:first + full, 0] = p.sum(dim=1)
            out[first:first + full, 1] = (p * self.weights).sum(dim=1)
        rest = pages[full * self.pages_per_chunk:]
        if rest.numel():
            out[first + full, 0] = rest.sum()
            out[first + full, 1] = (rest * self.weights[: rest.numel()]).sum()

    def check(self, expected: list[torch.Tensor]) -> None:
        """Raise CorruptCheckpoint naming the first chunk whose checksum differs."""
        import torch

        bad = [torch.ne(r, e).any(dim=1) for r, e in zip(self.results, expected, strict=True)]
        flags = torch.stack([b.any() for b in bad]).cpu() if bad else None
        if flags is None or not bool(flags.any()):
            return
        file = int(flags.nonzero()[0])
        chunk = int(bad[file].nonzero()[0])
        f = self.model.manifest.files[file]
        end = min((chunk + 1) * self.chunk, f.size)
        raise CorruptCheckpoint(
            f"model {self.model.name}: data file {f.path} chunk {chunk} "
            f"(bytes {chunk * self.chunk}-{end}) fails its checksum",
            hint=reconvert_hint(self.model),
        )


# ---------------------------------------------------------------- page-cache residency

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(fd: int, size: int) -> np.ndarray | None:
    """Per 4 KiB page of the file, whether the page cache holds it (None: unknown)."""
    if size == 0:
        return np.zeros(0, dtype=bool)
    if mmap.PAGESIZE != ALIGNMENT:
        return None
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = (ctypes.c_ubyte * (size // ALIGNMENT))()
        if _libc.mincore(addr, size, vec) != 0:
            return None
        return (np.frombuffer(memoryview(vec).cast('B'), dtype=np.uint8) & 1).astype(bool)
    finally:
        _libc.munmap(addr, size)


# ---------------------------------------------------------------- the pipeline

class _Files:
    """Two descriptors per data file: buffered, and O_DIRECT where the file system allows."""

    def __init__(self, model: StoredModel, direct: bool | None) -> None:
        self.buffered = [open_data(model, f) for f in model.manifest.files]
        self.direct: list[int | None] = []
        self.cached: list[np.ndarray | None] = []
        for i, f in enumerate(model.manifest.files):
            fd = open_data(model, f, direct=True) if direct is not False else -1
            is_direct = fd >= 0 and _is_direct(fd)
            if fd >= 0 and not is_direct:
                os.close(fd)
            self.direct.append(fd if is_direct else None)
            if direct is None and is_direct:
                self.cached.append(resident_pages(self.buffered[i], f.size))
            else:
                self.cached.append(None)
        self.force_direct = direct is True

    def fd_for(self, p: Piece) -> int:
        d = self.direct[p.file]
        if d is None:
            return self.buffered[p.file]
        if self.force_direct:
            return d
        cached = self.cached[p.file]
        if cached is None:
            return d
        lo, hi = p.offset // ALIGNMENT, -(-(p.offset + p.length) // ALIGNMENT)
        return self.buffered[p.file] if cached[lo:hi].all() else d

    def close(self) -> None:
        for fd in self.buffered + [d for d in self.direct if d is not None]:
            os.close(fd)


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def _read_pieces(model: StoredModel, todo: list[Piece], pool: PinnedPool, direct: bool | None,
                 readers: int, read_threads: int
                 ) -> Iterator[tuple[Piece, torch.Tensor, Callable[[], None]]]:
    """Yield (piece, pinned buffer holding it, release) as reads complete, in any order."""
    from sllmctl import native

    files = _Files(model, direct)
    done: queue.Queue[Any] = queue.Queue()
    stop = threading.Event()

    def read(p: Piece) -> None:
        buf = None
        try:
            while buf is None:
                if stop.is_set():
                    return
                try:
                    buf = pool.free.get(timeout=0.1)
                except queue.Empty:
                    continue
            fd = files.fd_for(p)
            threads = read_threads if fd in files.direct else CACHED_READ_THREADS
            n = native.pread_into(fd, buf.data_ptr(), p.length, p.offset, threads, READ_PIECE)
            if n != p.length:
                raise CorruptCheckpoint(
                    f"model {model.name}: data file {model.manifest.files[p.file].path} "
                    f"ended early (read {n} of {p.length} bytes at {p.offset})",
                    hint=reconvert_hint(model))
            done.put((p, buf))
        except BaseException as e:
            if buf is not None:
                pool.free.put(buf)
            done.put(e)

    executor = ThreadPoolExecutor(readers, thread_name_prefix="sllmctl-read")
    try:
        for p in todo:
            executor.submit(read, p)
        for _ in todo:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            p, buf = item
            yield p, buf, partial(pool.free.put, buf)
    finally:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
        while not done.empty():  # buffers read after a failure go back to the pool
            item = done.get()
            if not isinstance(item, BaseException):
                pool.free.put(item[1])
        files.close()


def _copy_pipeline(
    model: StoredModel,
    device: Any,
    source: Iterator[tuple[Piece, torch.Tensor, Callable[[], None]]],
    verify: bool,
) -> dict[str, torch.Tensor]:
    """Copy every piece the source yields to the GPU, checksum it there, build views."""
    import torch

    device = torch.device(device)
    files = model.manifest.files
    with torch.cuda.device(device):
        # one allocation per data file, made when its first piece arrives, so that it
        # overlaps the copies of the files before it
        gpu: list[torch.Tensor | None] = [None] * len(files)

        def allocate(i: int) -> torch.Tensor:
            t = gpu[i]
            if t is None:
                t = gpu[i] = torch.empty(files[i].size, dtype=torch.uint8, device=device)
            return t

        copy_stream = torch.cuda.Stream(device)
        sum_stream = torch.cuda.Stream(device)
        checker = GpuChecker(model, device) if verify else None
        sum_stream.wait_stream(torch.cuda.current_stream(device))  # the checker's zeroed sums
        recycle: queue.Queue[Any] = queue.Queue()

        def recycler() -> None:
            while (item := recycle.get()) is not None:
                event, release = item
                event.synchronize()
                release()

        thread = threading.Thread(target=recycler, name="sllmctl-recycle", daemon=True)
        thread.start()
        try:
            for p, buf, release in source:
                dst = allocate(p.file)[p.offset:p.offset + p.length]
                with torch.cuda.stream(copy_stream):
                    dst.copy_(buf[: p.length], non_blocking=True)
                    copied = torch.cuda.Event()
                    copied.record(copy_stream)
                recycle.put((copied, release))
                if checker is not None:
                    sum_stream.wait_event(copied)
                    with torch.cuda.stream(sum_stream):
                        checker.add(p.file, p.offset, dst)
        finally:
            recycle.put(None)
            thread.join()
        # views and expected sums are built while the last copies are still running
        state = tensor_views(model, [allocate(i) for i in range(len(files))])
        torch.cuda.current_stream(device).wait_stream(copy_stream)
        torch.cuda.current_stream(device).wait_stream(sum_stream)
        if checker is not None:
            checker.check(expected_sums(model, device))  # one synchronisation, at the end
        else:
            torch.cuda.current_stream(device).synchronize()
    return state


def load_to_gpu(model: StoredModel, device: Any, *, verify: bool = True,
                direct: bool | None = None, pool: PinnedPool | None = None,
                readers: int = READERS, read_threads: int = READ_THREADS,
                ) -> dict[str, torch.Tensor]:
    """Disk -> pinned pool -> GPU, pipelined. `direct`: None picks per piece by page-cache
    residency, True forces O_DIRECT (where possible), False forces buffered reads.
    `readers` pieces are read at once, each by `read_threads` threads."""
    pool = pool or default_pool()
    source = _read_pieces(model, pieces(model, pool.size), pool, direct, readers, read_threads)
    return _copy_pipeline(model, device, source, verify)


# ---------------------------------------------------------------- the in-memory path

@dataclass
class PinnedModel:
    """A model's data files held in pinned host memory, as chunk-aligned pieces."""

    model: StoredModel
    pieces: list[tuple[Piece, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p, _ in self.pieces)


def load_pinned(model: StoredModel, piece_size: int = 256 << 20) -> PinnedModel:
    """Read a model into freshly pinned host memory (checksums are checked on the GPU)."""
    import torch

    from sllmctl import native

    out = []
    fds = [open_data(model, f) for f in model.manifest.files]
    try:
        for p in pieces(model, piece_size):
            buf = torch.empty(p.length, dtype=torch.uint8, pin_memory=True)
            n = native.pread_into(fds[p.file], buf.data_ptr(), p.length, p.offset, 8, 8 << 20)
            if n != p.length:
                raise CorruptCheckpoint(f"model {model.name}: data file ended early",
                                        hint=reconvert_hint(model))
            out.append((p, buf))
    finally:
        for fd in fds:
            os.close(fd)
    return PinnedModel(model, out)


def pinned_to_gpu(pinned: PinnedModel, device: Any, *, verify: bool = True,
                  copy_size: int = 256 << 20) -> dict[str, torch.Tensor]:
    """Feed the GPU from chunks already resident in pinned memory.

    Pinned pieces must start at chunk boundaries; copies are whole chunks (`copy_size` is
    rounded up to a multiple of the chunk size) so that each can be checksummed alone."""
    chunk = pinned.model.manifest.chunk_size
    copy_size = -(-copy_size // chunk) * chunk

    def source() -> Iterator[tuple[Piece, torch.Tensor, Callable[[], None]]]:
        for p, buf in pinned.pieces:
            for off in range(0, p.length, copy_size):
                n = min(copy_size, p.length - off)
                yield Piece(p.file, p.offset + off, n), buf[off:off + n], _keep

    return _copy_pipeline(pinned.model, device, source(), verify)


def _keep() -> None:
    return None
