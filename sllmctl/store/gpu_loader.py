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

`start_load_to_gpu` / `start_pinned_to_gpu` run the same pipelines in the background and hand
out the tensor views at once, for the layer-pipelined cold start (GpuLoad.wait_range).
"""

from __future__ import annotations

import contextlib
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
        self.report(self.compare(expected))

    def compare(self, expected: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per file, which chunks differ (on the GPU; nothing waits)."""
        import torch

        return [torch.ne(r, e).any(dim=1) for r, e in zip(self.results, expected, strict=True)]

    def report(self, bad: list[torch.Tensor]) -> None:
        """Wait for `compare`'s result; raise CorruptCheckpoint naming the first bad chunk."""
        import torch

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


class GpuLoad:
    """A model on its way to one GPU: an allocation per data file, pieces copied on a copy
    stream and checksummed on a second one, one comparison with the manifest at the end.

    Run in the caller's thread (`run`) or in the background (`start`). In the background, the
    tensor views exist from the start (`state`, over memory still being filled), so that a
    model can be built at once and compute on the weights that have arrived: `wait_range`
    blocks until a byte range has been queued for copying and makes the current stream wait
    for those copies; `result` waits for the whole load and its verification."""

    def __init__(self, model: StoredModel, device: Any, verify: bool = True,
                 allocate_now: bool = False) -> None:
        import time

        import torch

        self._t0 = time.perf_counter()
        self.timings: dict[str, float] = {}  # seconds from creation to each stage
        self.model, self.device, self.verify = model, torch.device(device), verify
        files = model.manifest.files
        self.buffers: list[torch.Tensor | None] = [None] * len(files)
        with torch.cuda.device(self.device):
            self.copy_stream = torch.cuda.Stream(self.device)
            self.sum_stream = torch.cuda.Stream(self.device)
            self.checker = GpuChecker(model, self.device) if verify else None
            self.sum_stream.wait_stream(torch.cuda.current_stream(self.device))  # zeroed sums
        self.state: dict[str, torch.Tensor] | None = None
        self._views_lock = threading.Lock()
        if allocate_now:  # the views are built once the copies are under way (start)
            for i in range(len(files)):
                self._allocate(i)
        self._mark("allocated")
        self._cond = threading.Condition()
        self._copied: list[list[tuple[int, int, torch.cuda.Event]]] = [[] for _ in files]
        self._error: BaseException | None = None
        self._done = False
        self.seconds = 0.0
        self._thread: threading.Thread | None = None
        self._callbacks: list[Callable[[BaseException | None], None]] = []

    def _mark(self, stage: str) -> None:
        import time

        self.timings[stage] = round(time.perf_counter() - self._t0, 4)

    def _allocate(self, i: int) -> torch.Tensor:
        import torch

        t = self.buffers[i]
        if t is None:
            t = torch.empty(self.model.manifest.files[i].size, dtype=torch.uint8,
                            device=self.device)
            self.buffers[i] = t
        return t

    def start(self, source: Iterator[tuple[Piece, torch.Tensor, Callable[[], None]]]
              ) -> GpuLoad:
        """Run the load in a background thread."""
        def work() -> None:
            with contextlib.suppress(BaseException):  # recorded: result() raises it
                self.run(source)

        self._thread = threading.Thread(target=work, name="sllmctl-gpuload", daemon=True)
        self._thread.start()
        if all(b is not None for b in self.buffers):
            self._views()
        return self

    def _views(self) -> dict[str, torch.Tensor]:
        """The tensor views over the file buffers (built once; allocates what is missing)."""
        with self._views_lock:
            if self.state is None:
                files = range(len(self.buffers))
                self.state = tensor_views(self.model, [self._allocate(i) for i in files])
            return self.state

    def run(self, source: Iterator[tuple[Piece, torch.Tensor, Callable[[], None]]]
            ) -> dict[str, torch.Tensor]:
        """Copy every piece the source yields, check the sums, return the tensor views."""
        import time

        import torch

        t0 = time.perf_counter()
        recycle: queue.Queue[Any] = queue.Queue()

        def recycler() -> None:
            while (item := recycle.get()) is not None:
                event, release = item
                event.synchronize()
                release()

        thread = threading.Thread(target=recycler, name="sllmctl-recycle", daemon=True)
        thread.start()
        try:
            with torch.cuda.device(self.device):
                try:
                    for p, buf, release in source:
                        # allocated when its first piece arrives, so that it overlaps the
                        # copies of the files before it
                        dst = self._allocate(p.file)[p.offset:p.offset + p.length]
                        with torch.cuda.stream(self.copy_stream):
                            dst.copy_(buf[: p.length], non_blocking=True)
                            copied = torch.cuda.Event()
                            copied.record(self.copy_stream)
                        recycle.put((copied, release))
                        if "first_copy" not in self.timings:
                            self._mark("first_copy")
                        with self._cond:
                            self._copied[p.file].append((p.offset, p.offset + p.length, copied))
                            self._cond.notify_all()
                        if self.checker is not None:
                            self.sum_stream.wait_event(copied)
                            with torch.cuda.stream(self.sum_stream):
                                self.checker.add(p.file, p.offset, dst)
                    with self._cond:
                        self._mark("queued")
                        self._cond.notify_all()
                    # while the last copies run: the views, the expected sums, and the
                    # comparison queued behind the last checksums
                    self._views()
                    self.sum_stream.wait_stream(self.copy_stream)
                    with torch.cuda.stream(self.sum_stream):
                        flags = (self.checker.compare(expected_sums(self.model, self.device))
                                 if self.checker is not None else None)
                finally:
                    recycle.put(None)
                    thread.join()
                with torch.cuda.stream(self.sum_stream):  # the one synchronisation
                    if self.checker is not None and flags is not None:
                        self.checker.report(flags)
                    else:
                        self.sum_stream.synchronize()
        except BaseException as e:
            self.copy_stream.synchronize()  # nothing may still write the memory we give up
            self._finish(e)
            raise
        self.seconds = time.perf_counter() - t0
        self._mark("verified")
        self._finish(None)
        return self._views()

    def _finish(self, error: BaseException | None) -> None:
        with self._cond:
            self._error, self._done = error, True
            self._cond.notify_all()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(error)

    def add_done_callback(self, fn: Callable[[BaseException | None], None]) -> None:
        """Call fn(error or None) when the load ends (now, if it has)."""
        with self._cond:
            if not self._done:
                self._callbacks.append(fn)
                return
            error = self._error
        fn(error)

    def wait_range(self, file: int, start: int, end: int) -> None:
        """Block until bytes [start, end) of data file `file` are queued for copying, then
        make the current stream wait for those copies (not for the whole load)."""
        import torch

        with self._cond:
            while True:
                if self._error is not None:
                    raise self._error
                events = _covering(self._copied[file], start, end)
                if events is not None:
                    break
                if self._done:
                    raise RuntimeError(f"bytes {start}-{end} of data file {file} never came")
                self._cond.wait()
        stream = torch.cuda.current_stream(self.device)
        for e in events:
            stream.wait_event(e)

    def wait_queued(self) -> None:
        """Block until every copy has been queued (or the load has ended)."""
        with self._cond:
            while "queued" not in self.timings and not self._done:
                self._cond.wait()

    @property
    def done(self) -> bool:
        with self._cond:
            return self._done

    def result(self) -> dict[str, torch.Tensor]:
        """Wait for the whole load; raise its error (a failed checksum, a short file)."""
        with self._cond:
            while not self._done:
                self._cond.wait()
            if self._error is not None:
                raise self._error
        assert self.state is not None
        return self.state


def _covering(copied: list[tuple[int, int, Any]], start: int, end: int) -> list[Any] | None:
    """The events of the copies that cover [start, end), or None if a gap remains."""
    events, at = [], start
    for lo, hi, event in sorted(copied, key=lambda c: c[0]):
        if hi <= at or lo >= end:
            continue
        if lo > at:
            return None
        events.append(event)
        at = hi
        if at >= end:
            break
    return events if at >= end else None


def load_to_gpu(model: StoredModel, device: Any, *, verify: bool = True,
                direct: bool | None = None, pool: PinnedPool | None = None,
                readers: int = READERS, read_threads: int = READ_THREADS,
                ) -> dict[str, torch.Tensor]:
    """Disk -> pinned pool -> GPU, pipelined. `direct`: None picks per piece by page-cache
    residency, True forces O_DIRECT (where possible), False forces buffered reads.
    `readers` pieces are read at once, each by `read_threads` threads."""
    pool = pool or default_pool()
    source = _read_pieces(model, pieces(model, pool.size), pool, direct, readers, read_threads)
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

    Pinned pieces must start at chunk boundaries. Pieces that continue each other both in the
    file and in host memory (consecutive slabs of one pinned region) are copied together;
    copies are whole chunks of about `copy_size` (rounded up to a multiple of the chunk size)
    so that each can be checksummed alone."""
    return GpuLoad(pinned.model, device, verify).run(_pinned_source(pinned, copy_size))


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


def _pinned_source(pinned: PinnedModel, copy_size: int
                   ) -> Iterator[tuple[Piece, torch.Tensor, Callable[[], None]]]:
    chunk = pinned.model.manifest.chunk_size
    copy_size = -(-copy_size // chunk) * chunk
    for p, buf in coalesce(pinned.pieces):
        for off in range(0, p.length, copy_size):
            n = min(copy_size, p.length - off)
            yield Piece(p.file, p.offset + off, n), buf[off:off + n], _keep


def _keep() -> None:
    return None
