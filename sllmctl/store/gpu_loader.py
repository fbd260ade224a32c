"""The GPU loader: disk or pinned DRAM to GPU at the speed of the slower of the two.

Pieces of each data file (64 MiB, chunk-aligned) are read by a pool of threads into pinned
host buffers from a reusable pool, and handed to a `GpuLoad` (gpu_copy.py), which queues an
asynchronous host-to-GPU copy per piece into the file's single GPU allocation and checksums it
on the GPU once it has landed; a recycler thread hands a pinned buffer back to the readers as
soon as its copy has finished.

Each piece is read through the page cache when all of it is resident there (mincore), and
with O_DIRECT otherwise, so a hot page cache is read at memory speed and a cold disk at
disk speed without polluting the cache.

`load_pinned` + `pinned_to_gpu` are the in-memory path: a model whose chunks already sit in
pinned host memory (the daemon's DRAM tier) goes to the GPU with copies and checksums only.

`start_load_to_gpu` / `start_pinned_to_gpu` run the same pipelines in the background and hand
out the tensor views at once, for the layer-pipelined cold start (GpuLoad.wait_range).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.codec import Layout, split_piece
from sllmctl.store.format import ALIGNMENT
from sllmctl.store.gpu.decode import coded_piece
from sllmctl.store.gpu_copy import GpuLoad, Piece, Source, Split
from sllmctl.store.reader import check_chunks, open_data, read_verify, reconvert_hint
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch

PIECE = 64 << 20  # bytes per read and per copy; a multiple of the checksum chunk
POOL_BUFFERS = 24  # pinned buffers: READERS being read, the rest on their way to the GPU
# Reads from disk: READERS pieces at once, each split among READ_THREADS threads in
# READ_PIECE preads. On the H100's virtual disk, the settings read alone
# (benchmarks/disk_sweep.py) favoured 16 pieces each read by one thread in 16 MiB preads;
# inside whole loads (benchmarks/load.py runs both, page cache dropped before each) the two
# are within the disk's noise: over four runs, 16 x 8 threads x 4 MiB was faster in 10 of 14
# paired rounds, and each had the lower median in two runs.
READERS = 16
READ_THREADS = 8
READ_PIECE = 4 << 20
CACHED_READ_THREADS = 2  # per piece read from the page cache (a memory copy; more contend)
CACHED_READ_PIECE = 4 << 20


class PinnedPool:
    """Reusable page-aligned pinned host buffers, at most `buffers` of them. Allocating and
    pinning is slow (the first touch of new memory), so a pool is made once per process and
    kept; buffers are made as loads first need them, so that a small model does not wait for
    a pool sized for a large one."""

    def __init__(self, buffers: int = POOL_BUFFERS, size: int = PIECE,
                 eager: bool = False) -> None:
        self.size = size
        self.limit = buffers
        self.buffers: list[torch.Tensor] = []
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        self._lock = threading.Lock()
        if eager:
            for _ in range(buffers):
                self.free.put(self._new())

    def _new(self) -> torch.Tensor:
        import torch

        buf = torch.empty(self.size, dtype=torch.uint8, pin_memory=True)
        self.buffers.append(buf)
        return buf

    def take(self, timeout: float) -> torch.Tensor | None:
        """A free buffer, a new one while the pool is below its size, or None after
        `timeout` seconds."""
        try:
            return self.free.get_nowait()
        except queue.Empty:
            pass
        with self._lock:
            if len(self.buffers) < self.limit:
                return self._new()
        try:
            return self.free.get(timeout=timeout)
        except queue.Empty:
            return None

    def give(self, buf: torch.Tensor) -> None:
        """Hand a buffer back."""
        self.free.put(buf)


_pools: dict[int, PinnedPool] = {}
_pool_lock = threading.Lock()


def default_pool() -> PinnedPool:
    with _pool_lock:
        if 0 not in _pools:
            _pools[0] = PinnedPool()
        return _pools[0]


def pieces(model: StoredModel, size: int = PIECE, decoded: bool = False) -> list[Piece]:
    """The pieces a load reads, each filling a host buffer of `size` bytes: `size` bytes of a
    plain data file (or, with `decoded`, of any), or of an encoded one as many whole chunks
    as leave room in the buffer for their decompressed high bytes."""
    chunk = model.manifest.chunk_size
    out = []
    for i, f in enumerate(model.manifest.files):
        step = size
        if f.encoding is not None and not decoded:
            step = size * 2 // 3 // chunk * chunk
            if not step:
                raise ValueError(f"host buffers of {size} bytes cannot hold a chunk of "
                                 f"{f.path} with its decompressed half ({chunk * 3 // 2})")
        out += [Piece(i, off, min(step, f.size - off)) for off in range(0, f.size, step)]
    return out


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
        self.layouts = [Layout(f, model.manifest.chunk_size) if f.encoding else None
                        for f in model.manifest.files]
        for i, f in enumerate(model.manifest.files):
            fd = open_data(model, f, direct=True) if direct is not False else -1
            is_direct = fd >= 0 and _is_direct(fd)
            if fd >= 0 and not is_direct:
                os.close(fd)
            self.direct.append(fd if is_direct else None)
            if direct is None:
                self.cached.append(resident_pages(self.buffered[i], f.on_disk))
            else:
                self.cached.append(None)
        self.force_direct = direct is True

    def stored_range(self, p: Piece) -> tuple[int, int]:
        """The bytes on disk that hold piece `p`."""
        layout = self.layouts[p.file]
        if layout is None:
            return p.offset, p.offset + p.length
        return layout.stored_range(p.offset, p.length)

    def fd_for(self, file: int, start: int, end: int) -> tuple[int, bool]:
        """The descriptor to read bytes [start, end) of a file with, and whether they come
        from the page cache (all of them resident there) rather than the disk."""
        cached = self.cached[file]
        lo, hi = start // ALIGNMENT, -(-end // ALIGNMENT)
        resident = cached is not None and bool(cached[lo:hi].all())
        d = self.direct[file]
        if d is None:
            return self.buffered[file], resident
        if self.force_direct or not resident:
            return d, False
        return self.buffered[file], True

    def close(self) -> None:
        for fd in self.buffered + [d for d in self.direct if d is not None]:
            os.close(fd)


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))


def _read_pieces(model: StoredModel, todo: list[Piece], pool: PinnedPool, direct: bool | None,
                 readers: int, read_threads: int, read_piece: int = READ_PIECE
                 ) -> Source:
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
                buf = pool.take(0.1)
            start, end = files.stored_range(p)
            fd, resident = files.fd_for(p.file, start, end)
            if resident:
                threads, size = CACHED_READ_THREADS, CACHED_READ_PIECE
            else:
                threads, size = read_threads, read_piece
            n = native.pread_into(fd, buf.data_ptr(), end - start, start, threads, size)
            if n != end - start:
                raise CorruptCheckpoint(
                    f"model {model.name}: data file {model.manifest.files[p.file].path} "
                    f"ended early (read {n} of {end - start} bytes at {start})",
                    hint=reconvert_hint(model))
            layout = files.layouts[p.file]
            if layout is None:
                done.put((p, buf, buf))
            elif layout.file.encoding == "exp23":  # copied as stored, decoded on the GPU
                done.put((p, coded_piece(layout, p.offset, p.length, buf, start), buf))
            else:
                frames = split_piece(model, p.offset, p.length, buf, start, layout)
                done.put((p, Split(frames), buf))
        except BaseException as e:
            if buf is not None:
                pool.give(buf)
            done.put(e)

    executor = ThreadPoolExecutor(readers, thread_name_prefix="sllmctl-read")
    try:
        for p in todo:
            executor.submit(read, p)
        for _ in todo:
            item = done.get()
            if isinstance(item, BaseException):
                raise item
            p, data, buf = item
            yield p, data, partial(pool.give, buf)
    finally:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
        while not done.empty():  # buffers read after a failure go back to the pool
            item = done.get()
            if not isinstance(item, BaseException):
                pool.give(item[2])
        files.close()


def load_to_gpu(model: StoredModel, device: Any, *, verify: bool = True,
                direct: bool | None = None, pool: PinnedPool | None = None,
                readers: int = READERS, read_threads: int = READ_THREADS,
                read_piece: int = READ_PIECE) -> dict[str, torch.Tensor]:
    """Disk -> pinned pool -> GPU, pipelined. `direct`: None picks per piece by page-cache
    residency, True forces O_DIRECT (where possible), False forces buffered reads.
    `readers` pieces are read from disk at once, each by `read_threads` threads in preads of
    `read_piece` bytes."""
    pool = pool or default_pool()
    source = _read_pieces(model, pieces(model, pool.size), pool, direct, readers, read_threads,
                          read_piece)
    return GpuLoad(model, device, verify).run(source)


def start_load_to_gpu(model: StoredModel, device: Any, *, verify: bool = True,
                      pool: PinnedPool | None = None) -> GpuLoad:
    """`load_to_gpu` in the background, views available at once (see GpuLoad)."""
    pool = pool or default_pool()
    source = _read_pieces(model, pieces(model, pool.size), pool, None, READERS, READ_THREADS)
    return GpuLoad(model, device, verify, allocate_now=True).start(source)


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
        for p in pieces(model, piece_size, decoded=True):
            buf = torch.empty(p.length, dtype=torch.uint8, pin_memory=True)
            f = model.manifest.files[p.file]
            if f.encoding is None:
                n = native.pread_into(fds[p.file], buf.data_ptr(), p.length, p.offset, 8,
                                      8 << 20)
            else:
                n, sums = read_verify(model, f, fds[p.file], buf.data_ptr(), p.length,
                                      p.offset, 8)
                check_chunks(model, f, p.offset // model.manifest.chunk_size, sums)
            if n != p.length:
                raise CorruptCheckpoint(f"model {model.name}: data file ended early",
                                        hint=reconvert_hint(model))
            out.append((p, buf))
    finally:
        for fd in fds:
            os.close(fd)
    return PinnedModel(model, out)


def pinned_to_gpu(pinned: PinnedModel, device: Any, *, verify: bool = True,
                  copy_size: int = 256 << 20, mapped: bool = False
                  ) -> dict[str, torch.Tensor]:
    """Feed the GPU from chunks already resident in pinned memory.

    Pinned pieces must start at chunk boundaries. Pieces that continue each other both in the
    file and in host memory (consecutive slabs of one pinned region) are copied together;
    copies are whole chunks of about `copy_size` (rounded up to a multiple of the chunk size)
    so that each can be checksummed alone. `mapped`: the GPU memory is mapped piece by piece
    while the copies run (gpu_memory.py) instead of allocated before them."""
    return GpuLoad(pinned.model, device, verify, mapped=mapped).run(
        _pinned_source(pinned, copy_size))


def start_pinned_to_gpu(pinned: PinnedModel, device: Any, *, verify: bool = True,
                        copy_size: int = 256 << 20) -> GpuLoad:
    """`pinned_to_gpu` in the background, views available at once (see GpuLoad)."""
    load = GpuLoad(pinned.model, device, verify, allocate_now=True)
    return load.start(_pinned_source(pinned, copy_size))


def coalesce(pieces: list[tuple[Piece, torch.Tensor]]) -> Iterator[tuple[Piece, torch.Tensor]]:
    """Merge neighbours that continue each other in the same file and the same host memory
    (one storage, consecutive addresses) into single pieces. A generator: the first merged
    piece comes out (and can be copied) before the rest are looked at."""
    import torch

    def merged(run: list[tuple[Piece, torch.Tensor]]) -> tuple[Piece, torch.Tensor]:
        (first, buf), (last, _) = run[0], run[-1]
        if len(run) == 1:
            return first, buf
        n = last.offset + last.length - first.offset
        t = torch.empty(0, dtype=torch.uint8, device=buf.device)
        t.set_(buf.untyped_storage(), buf.storage_offset(), (n,), (1,))
        return Piece(first.file, first.offset, n), t

    run: list[tuple[Piece, torch.Tensor]] = []
    storage = end = 0
    for p, buf in pieces:
        here = buf.untyped_storage().data_ptr()
        if run:
            q = run[-1][0]
            if (q.file == p.file and q.offset + q.length == p.offset and here == storage
                    and buf.data_ptr() == end):
                run.append((p, buf))
                end += p.length
                continue
            yield merged(run)
        run, storage, end = [(p, buf)], here, buf.data_ptr() + p.length
    if run:
        yield merged(run)


def _pinned_source(pinned: PinnedModel, copy_size: int, tail: int | None = None
                   ) -> Source:
    """Copies of about `copy_size`, whole chunks each; the last `copy_size` bytes of the load
    go as copies of `tail` bytes (default: a sixteenth), so that little is left to checksum
    once the last copy lands."""
    chunk = pinned.model.manifest.chunk_size
    copy_size = -(-copy_size // chunk) * chunk
    tail = -(-(tail or copy_size // 16) // chunk) * chunk
    left = pinned.nbytes
    for p, buf in coalesce(pinned.pieces):
        off = 0
        while off < p.length:
            n = min(copy_size if left > copy_size else tail, p.length - off)
            yield Piece(p.file, p.offset + off, n), buf[off:off + n], None
            off += n
            left -= n

