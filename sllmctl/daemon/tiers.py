"""The daemon's memory tiers: pinned DRAM and GPU. State lives here, in the daemon only.

DRAM tier: a pool of 64 MiB slabs of host memory (pinned where CUDA is present),
allocated in the background from the daemon's start so that it answers at once. A model is
cached as chunk-aligned pieces, one slab each, checksummed as they are read. Eviction:
least recently used first, skipping models in use (being read or copied to a GPU). A model
larger than the whole pool is refused by the DRAM tier; loaded to a GPU, it streams through
the loader's small pinned pool instead.

GPU tier: every visible GPU; a model warmed to a GPU stays there until unloaded or evicted
(LRU, when another model needs the room). A load picks the GPU with the most free memory
unless told which, and reads from the fastest tier that holds the model: DRAM, else disk.
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sllmctl.errors import CorruptCheckpoint, SllmError
from sllmctl.store.format import ALIGNMENT
from sllmctl.store.gpu_loader import Piece, PinnedModel, PinnedPool, load_to_gpu, pinned_to_gpu
from sllmctl.store.reader import check_chunks, open_data, reconvert_hint
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch

SLAB = 64 << 20  # bytes; a multiple of the checksum chunk
Progress = Callable[[str, int, int], None]


class DoesNotFit(SllmError):
    """A model larger than the room a tier has."""


class NoGpu(SllmError):
    """A GPU was asked for on a host without one."""


class BadArguments(SllmError):
    """A request whose arguments make no sense (an unknown tier, a GPU that is not there)."""


def parse_size(text: str, total: int) -> int:
    """'8GiB', '512MB', '25%' (of `total`), or plain bytes."""
    t = text.strip().lower().replace(" ", "")
    if t.endswith("%"):
        return int(total * float(t[:-1]) / 100)
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 1 << 10,
             "m": 1 << 20, "g": 1 << 30, "b": 1}
    for suffix, scale in units.items():
        if t.endswith(suffix):
            return int(float(t[: -len(suffix)]) * scale)
    return int(t)


def total_ram() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


@dataclass
class DramEntry:
    name: str
    path: str  # the stored folder; a model converted again is a different entry
    nbytes: int
    slabs: list[int] = field(default_factory=list)
    pieces: list[tuple[Piece, int]] = field(default_factory=list)  # (piece, slab index)
    ready: bool = False
    users: int = 0
    last_used: float = field(default_factory=time.time)


class DramTier:
    def __init__(self, capacity: int, pinned: bool) -> None:
        self.capacity = max(0, capacity) // SLAB * SLAB
        self.pinned = pinned
        self.slabs: list[torch.Tensor] = []
        self.free: list[int] = []
        self.models: OrderedDict[str, DramEntry] = OrderedDict()  # least recently used first
        self.lock = threading.Condition()
        self.allocation_error: str | None = None
        self._thread = threading.Thread(target=self._allocate, name="sllmctl-dram",
                                        daemon=True)
        self._thread.start()

    @property
    def allocated(self) -> int:
        return len(self.slabs) * SLAB

    def _allocate(self) -> None:
        import torch

        try:
            for _ in range(self.capacity // SLAB):
                slab = torch.empty(SLAB, dtype=torch.uint8, pin_memory=self.pinned)
                with self.lock:
                    self.slabs.append(slab)
                    self.free.append(len(self.slabs) - 1)
                    self.lock.notify_all()
        except (RuntimeError, MemoryError) as e:  # keep what we got; say why in status
            with self.lock:
                self.allocation_error = f"{type(e).__name__}: {str(e).splitlines()[0]}"
                self.capacity = self.allocated
                self.lock.notify_all()

    def has(self, model: StoredModel) -> bool:
        with self.lock:
            e = self.models.get(model.name)
            return bool(e and e.ready and e.path == str(model.path))

    def warm(self, model: StoredModel, progress: Progress) -> tuple[DramEntry, bool]:
        """Make `model` resident; returns its entry and whether it was read now (False:
        it was resident already)."""
        files = model.manifest.files
        layout = [Piece(i, off, min(SLAB, f.size - off))
                  for i, f in enumerate(files) for off in range(0, f.size, SLAB)]
        need = len(layout)
        if need * SLAB > self.capacity:
            raise DoesNotFit(
                f"model {model.name} needs {need * SLAB / 1e9:.2f} GB of DRAM; the DRAM pool "
                f"holds {self.capacity / 1e9:.2f} GB",
                hint="start the daemon with a larger --dram-pool, or warm it to a GPU "
                "(--tier gpu streams through the pool)")
        with self.lock:
            while True:
                old = self.models.get(model.name)
                if old is None or old.path != str(model.path):
                    break
                if old.ready:
                    self._touch(old)
                    return old, False
                self.lock.wait(0.5)  # another job is reading it: wait for it to end, then look
            if old is not None:
                if old.users:
                    raise SllmError(f"an older copy of {model.name} is in use in the DRAM "
                                    "tier", hint="wait for the loads in flight, then warm again")
                self._drop(old)
            entry = DramEntry(model.name, str(model.path), model.manifest.total_bytes, users=1)
            self.models[model.name] = entry
            while len(self.free) < need:
                if not self._evict_one() and len(self.slabs) * SLAB >= self.capacity:
                    self._drop(entry)
                    raise DoesNotFit(f"model {model.name} does not fit in the DRAM pool: the "
                                     "models holding it are in use",
                                     hint="wait for the loads in flight, then warm again")
                if len(self.free) < need:
                    progress("allocating", self.allocated, self.capacity)
                    self.lock.wait(0.5)
            entry.slabs = [self.free.pop() for _ in range(need)]
            entry.pieces = list(zip(layout, entry.slabs, strict=True))
        try:
            self._read(model, entry, progress)
        except BaseException:
            with self.lock:
                self._drop(entry)
            raise
        with self.lock:
            entry.ready, entry.users = True, 0
            self._touch(entry)
            self.lock.notify_all()
        return entry, True

    def _read(self, model: StoredModel, entry: DramEntry, progress: Progress) -> None:
        from sllmctl import native

        chunk = model.manifest.chunk_size
        fds = [open_data(model, f) for f in model.manifest.files]
        done = 0
        try:
            for piece, slab in entry.pieces:
                buf = self.slabs[slab]
                f = model.manifest.files[piece.file]
                n, sums = native.read_verify(fds[piece.file], buf.data_ptr(), piece.length,
                                             piece.offset, chunk, 4)
                if n != piece.length:
                    raise CorruptCheckpoint(
                        f"model {model.name}: data file {f.path} ended after byte "
                        f"{piece.offset + n}", hint=reconvert_hint(model))
                check_chunks(model, f, piece.offset // chunk, sums)
                done += piece.length
                progress("reading", done, entry.nbytes)
        finally:
            for fd in fds:
                os.close(fd)

    def pinned_model(self, model: StoredModel) -> PinnedModel | None:
        """The model's pieces as a PinnedModel (marked in use), or None if not resident."""
        with self.lock:
            e = self.models.get(model.name)
            if not (e and e.ready and e.path == str(model.path)):
                return None
            e.users += 1
            self._touch(e)
            return PinnedModel(model, [(p, self.slabs[s][: p.length]) for p, s in e.pieces])

    def release(self, name: str) -> None:
        with self.lock:
            e = self.models.get(name)
            if e:
                e.users = max(0, e.users - 1)

    def unload(self, name: str) -> bool:
        with self.lock:
            e = self.models.get(name)
            if e is None:
                return False
            if e.users:
                raise SllmError(f"model {name} is in use in the DRAM tier",
                                hint="wait for the loads in flight to finish")
            self._drop(e)
            return True

    def _touch(self, e: DramEntry) -> None:
        e.last_used = time.time()
        self.models.move_to_end(e.name)

    def _evict_one(self) -> bool:
        for e in self.models.values():
            if e.ready and not e.users:
                self._drop(e)
                return True
        return False

    def _drop(self, e: DramEntry) -> None:
        self.free.extend(e.slabs)
        e.slabs = []
        if self.models.get(e.name) is e:
            del self.models[e.name]
        self.lock.notify_all()

    def status(self) -> dict[str, Any]:
        with self.lock:
            return {
                "capacity": self.capacity, "allocated": self.allocated,
                "used": sum(len(e.slabs) for e in self.models.values()) * SLAB,
                "pinned": self.pinned, "allocation_error": self.allocation_error,
                "models": [{"name": e.name, "bytes": e.nbytes, "ready": e.ready,
                            "in_use": e.users, "last_used": e.last_used}
                           for e in self.models.values()],
            }


@dataclass
class GpuEntry:
    name: str
    path: str
    device: int
    nbytes: int
    state: dict[str, Any]
    loaded_from: str
    load_seconds: float
    last_used: float = field(default_factory=time.time)


class GpuTier:
    MARGIN = 256 << 20  # bytes left free on a GPU for activations and the allocator

    def __init__(self) -> None:
        try:
            import torch

            self.count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            self.count = 0
        self.models: OrderedDict[str, GpuEntry] = OrderedDict()
        self.lock = threading.Lock()  # the models table; held briefly, so status never waits
        self.load_lock = threading.Lock()  # one load at a time (they share the PCIe link)
        self._pool: PinnedPool | None = None

    def _free(self, device: int) -> int:
        import torch

        return torch.cuda.mem_get_info(device)[0]

    def _pick(self, nbytes: int, gpu: int | None) -> int:
        if self.count == 0:
            raise NoGpu("this host has no GPU", hint="warm it to DRAM instead: --tier dram")
        if gpu is not None and not 0 <= gpu < self.count:
            raise BadArguments(f"no GPU {gpu}: this host has {self.count}",
                               hint=f"pick one of 0-{self.count - 1}")
        candidates = [gpu] if gpu is not None else list(range(self.count))
        import torch

        largest = max(torch.cuda.mem_get_info(d)[1] for d in candidates)
        if nbytes + self.MARGIN > largest:  # would never fit: evict nothing
            raise DoesNotFit(f"{nbytes / 1e9:.2f} GB does not fit on "
                             f"{'GPU ' + str(gpu) if gpu is not None else 'any GPU'} "
                             f"({largest / 1e9:.1f} GB)")
        while True:
            fits = [d for d in candidates if self._free(d) >= nbytes + self.MARGIN]
            if fits:
                return max(fits, key=self._free)
            victims = [e for e in self.models.values() if e.device in candidates]
            if not victims:  # other processes hold the memory
                raise DoesNotFit(f"{nbytes / 1e9:.2f} GB does not fit in the free memory of "
                                 f"{'GPU ' + str(gpu) if gpu is not None else 'any GPU'}")
            self._evict(victims[0])  # least recently used

    def _evict(self, e: GpuEntry) -> None:
        import torch

        with self.lock:
            self.models.pop(e.name, None)
        e.state.clear()
        with torch.cuda.device(e.device):
            torch.cuda.empty_cache()

    def warm(self, model: StoredModel, gpu: int | None, dram: DramTier) -> GpuEntry:
        with self.load_lock:
            with self.lock:
                e = self.models.get(model.name)
                if e and e.path == str(model.path) and (gpu is None or gpu == e.device):
                    e.last_used = time.time()
                    self.models.move_to_end(e.name)
                    return e
            if e:
                self._evict(e)
            device = self._pick(model.manifest.total_bytes, gpu)
            start = time.perf_counter()
            pinned = dram.pinned_model(model) if dram.pinned else None
            try:
                if pinned is not None:
                    state, source = pinned_to_gpu(pinned, f"cuda:{device}"), "dram"
                else:
                    if self._pool is None:
                        self._pool = PinnedPool()
                    state = load_to_gpu(model, f"cuda:{device}", pool=self._pool)
                    source = "disk"
            finally:
                if pinned is not None:
                    dram.release(model.name)
            entry = GpuEntry(model.name, str(model.path), device, model.manifest.total_bytes,
                             state, source, time.perf_counter() - start)
            with self.lock:
                self.models[model.name] = entry
            return entry

    def unload(self, name: str) -> bool:
        with self.load_lock:
            e = self.models.get(name)
            if e is None:
                return False
            self._evict(e)
            return True

    def status(self) -> dict[str, Any]:
        gpus = []
        if self.count:
            import torch

            for d in range(self.count):
                free, total = torch.cuda.mem_get_info(d)
                gpus.append({"index": d, "name": torch.cuda.get_device_name(d),
                             "total": total, "free": free})
        with self.lock:
            models = [{"name": e.name, "gpu": e.device, "bytes": e.nbytes,
                       "loaded_from": e.loaded_from, "load_seconds": round(e.load_seconds, 4),
                       "last_used": e.last_used} for e in self.models.values()]
        return {"gpus": gpus, "models": models}


assert SLAB % ALIGNMENT == 0
