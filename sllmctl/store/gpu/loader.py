"""The GPU loader: a stored model from disk (or the page cache) to one GPU, at the speed of the
slower of the two.

Pieces of each data file (64 MiB, chunk-aligned) are read by a pool of threads into pinned
host buffers from a reusable pool, and handed to a `GpuLoad` (copy.py), which queues an
asynchronous host-to-GPU copy per piece into the file's single GPU allocation and checksums it
on the GPU once it has landed; a recycler thread hands a pinned buffer back to the readers as
soon as its copy has finished. Each piece is read through the page cache when all of it is
resident there, and with O_DIRECT otherwise (files.py). A model already in pinned memory
(the daemon's DRAM tier) goes through pinned.py instead.

`start_load_to_gpu` runs the pipeline in the background and hands out the tensor views at
once, for the layer-pipelined cold start (GpuLoad.wait_range).
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.datafile import Piece, reconvert_hint
from sllmctl.store.gpu.copy import GpuLoad, Source
from sllmctl.store.gpu.decode import coded_piece
from sllmctl.store.gpu.files import ModelFiles
from sllmctl.store.gpu.split import split_piece
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch

PIECE = 64 << 20  # bytes per read and per copy; a multiple of the checksum chunk
POOL_BUFFERS = 24  # pinned buffers: READERS being read, the rest on their way to the GPU
# Reads from disk: READERS pieces at once, each split among READ_THREADS threads in
# READ_PIECE preads: enough requests in flight to keep a network or NVMe disk's queue full,
# in preads large enough that their count costs little (benchmarks/disk_sweep.py and
# benchmarks/load.py measure the choices; docs/benchmarks.md has the figures).
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

    def __init__(self, buffers: int = POOL_BUFFERS, size: int = PIECE) -> None:
        self.size = size
        self.limit = buffers
        self.buffers: list[torch.Tensor] = []
        self.free: queue.Queue[torch.Tensor] = queue.Queue()
        self._lock = threading.Lock()

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


def _read_pieces(model: StoredModel, todo: list[Piece], pool: PinnedPool, direct: bool | None,
                 readers: int, read_threads: int, read_piece: int = READ_PIECE
                 ) -> Source:
    """Yield (piece, pinned buffer holding it, release) as reads complete, in any order."""
    from sllmctl import native

    files = ModelFiles(model, direct)
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
                done.put((p, split_piece(model, p.offset, p.length, buf, start, layout), buf))
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


