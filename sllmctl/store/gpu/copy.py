"""Copies to one GPU: the part of the GPU loader after the bytes are in pinned host memory.

`GpuLoad` copies pieces of a model's data files into one GPU allocation per file on a copy
stream, checksums each piece on a second stream once it has landed (`GpuChecker`: sum64x2 is
two integer reductions), and compares every chunk with the manifest with one synchronisation
at the end. Run in the caller's thread or in the background; in the background it hands out
the tensor views at once and says, per byte range, when the copies are queued and which
events to wait for (the layer-pipelined cold start uses this). Where the pieces come from
(disk, page cache, the DRAM tier) is loader.py's and pinned.py's business, the checksums
checksums.py's.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from sllmctl.store.datafile import Piece, tensor_views
from sllmctl.store.gpu.checksums import GpuChecker, expected_sums
from sllmctl.store.gpu.split import Split, unsplit
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch

# What a load copies, in any order: (piece, host buffer holding it or its frames, release).
# `release` is called once the copy no longer needs the buffer; None where nothing needs
# handing back.
# (Or a gpu/decode.py Coded: exp23 frames, copied as stored and decoded on the GPU.)
Source = Iterator[tuple[Piece, Any, Callable[[], None] | None]]


# ---------------------------------------------------------------- the copy pipeline

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
        # seconds from creation to each host stage; gpu_copies (first copy's start to the last
        # copy's end) and gpu_tail (last copy's end to the checksums compared), device time
        self.timings: dict[str, float] = {}
        self.model, self.device = model, torch.device(device)
        files = model.manifest.files
        self.buffers: list[torch.Tensor | None] = [None] * len(files)
        with torch.cuda.device(self.device):
            self.copy_stream = torch.cuda.Stream(self.device)
            self.sum_stream = torch.cuda.Stream(self.device)
            self.checker = (GpuChecker(model.manifest.chunk_size,
                                       [f.size for f in files], self.device)
                            if verify else None)
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
        self._decoder: Any = None  # gpu/decode.py's FrameDecoder, made for the first exp23 piece
        self._done = False
        self.seconds = 0.0
        self._callbacks: list[Callable[[BaseException | None], None]] = []

    def _mark(self, stage: str) -> None:
        import time

        self.timings[stage] = round(time.perf_counter() - self._t0, 4)

    def _allocate(self, i: int) -> torch.Tensor:
        """Data file i's GPU memory, allocated on first use."""
        t = self.buffers[i]
        if t is None:
            t = self.buffers[i] = self._new_memory(self.model.manifest.files[i].size)
        return t

    def _new_memory(self, size: int) -> torch.Tensor:
        import torch

        return torch.empty(size, dtype=torch.uint8, device=self.device)

    def start(self, source: Source) -> GpuLoad:
        """Run the load in a background thread."""
        def work() -> None:
            with contextlib.suppress(BaseException):  # recorded: result() raises it
                self.run(source)

        threading.Thread(target=work, name="sllmctl-gpuload", daemon=True).start()
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

    def run(self, source: Source) -> dict[str, torch.Tensor]:
        """Copy every piece the source yields, check the sums, return the tensor views."""
        import time

        import torch

        t0 = time.perf_counter()
        recycler = _Recycler()
        first = torch.cuda.Event(enable_timing=True)
        last = torch.cuda.Event(enable_timing=True)
        verified = torch.cuda.Event(enable_timing=True)
        # the wait for the whole load sleeps rather than spins (a blocking event); the
        # per-piece events stay plain: blocking ones cost 0.4-0.6 ms each to record here
        settled = torch.cuda.Event(blocking=True)
        try:
            with torch.cuda.device(self.device):
                try:
                    for p, buf, release in source:
                        self._copy(p, buf, release, first, recycler)
                    last.record(self.copy_stream)
                    with self._cond:
                        self._mark("queued")
                        self._cond.notify_all()
                    checked = self._queue_compare(verified, settled)
                finally:
                    recycler.close()
                settled.synchronize()  # the one wait for the whole load
                if self.checker is not None and checked is not None:
                    with torch.cuda.stream(self.sum_stream):
                        self.checker.report(*checked, self.model)
        except BaseException as e:
            self.copy_stream.synchronize()  # nothing may still write the memory we give up
            if self._decoder is not None:
                self._decoder.stream.synchronize()
            self._finish(e)
            raise
        self.seconds = time.perf_counter() - t0
        self._mark("verified")
        if "first_copy" in self.timings:
            self.timings["gpu_copies"] = round(first.elapsed_time(last) / 1e3, 4)
            self.timings["gpu_tail"] = round(last.elapsed_time(verified) / 1e3, 4)
        self._finish(None)
        return self._views()

    def _copy(self, p: Piece, buf: Any, release: Callable[[], None] | None,
              first: torch.cuda.Event, recycler: _Recycler) -> None:
        """Queue one piece's copy, hand its host buffer to the recycler, queue its checksum."""
        import torch

        # allocated when its first piece arrives, so that it overlaps the copies of the files
        # before it
        dst = self._allocate(p.file)[p.offset:p.offset + p.length]
        with torch.cuda.stream(self.copy_stream):
            if "first_copy" not in self.timings:
                first.record(self.copy_stream)
            if isinstance(buf, Split | torch.Tensor):
                if isinstance(buf, Split):
                    unsplit(self._allocate(p.file), buf)
                else:
                    dst.copy_(buf[: p.length], non_blocking=True)
                copied = landed = torch.cuda.Event()
                copied.record(self.copy_stream)
            else:  # exp23 frames (gpu/decode.py's Coded), decoded on the GPU
                copied, landed = self._decode(buf, p.file)
        if release is not None:  # None: the buffer needs no handing back
            recycler.put(copied, release)
        if "first_copy" not in self.timings:
            self._mark("first_copy")
        with self._cond:
            self._copied[p.file].append((p.offset, p.offset + p.length, landed))
            self._cond.notify_all()
        if self.checker is not None:
            self.sum_stream.wait_event(landed)
            with torch.cuda.stream(self.sum_stream):
                self.checker.add(p.file, p.offset, dst)

    def _queue_compare(self, verified: torch.cuda.Event, settled: torch.cuda.Event
                       ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """While the last copies run: the views, the expected sums, and the comparison queued
        behind the last checksums (None where nothing is verified)."""
        import torch

        self._views()
        self.sum_stream.wait_stream(self.copy_stream)
        if self._decoder is not None:  # the last decodes, checked or not
            self.sum_stream.wait_stream(self._decoder.stream)
        with torch.cuda.stream(self.sum_stream):
            checked = (self.checker.compare(expected_sums(self.model, self.device))
                       if self.checker is not None else None)
            verified.record(self.sum_stream)
            settled.record(self.sum_stream)
        return checked

    def _decode(self, coded: Any, file: int) -> tuple[Any, Any]:
        """Queue an exp23 piece's copy and its decoding on the GPU: (copied, decoded) events."""
        if self._decoder is None:
            from sllmctl.store.gpu.decode import FrameDecoder

            self._decoder = FrameDecoder(self.device, max(64 << 20, len(coded.host)))
        return self._decoder.queue(coded.host, coded.frames, self._allocate(file),
                                   self.copy_stream)

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


class _Recycler:
    """Hands each host buffer back once its copy has finished, from a thread of its own
    (started by the first buffer that needs handing back)."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Any] = queue.Queue()
        self._thread: threading.Thread | None = None

    def put(self, copied: Any, release: Callable[[], None]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, daemon=True,
                                            name="sllmctl-recycle")
            self._thread.start()
        self._queue.put((copied, release))

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            event, release = item
            event.synchronize()
            release()

    def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()


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
