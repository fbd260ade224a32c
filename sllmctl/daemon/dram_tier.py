"""The daemon's DRAM tier (the GPU tier, side by side, is gpu_tier.py).

DRAM tier: a pool of host memory (pinned where CUDA is present), allocated in the background
from the daemon's start so that it answers at once, as regions of 256 MiB (the remainder as
smaller regions of powers of two, since the pinned allocator rounds every allocation up to one)
cut into 64 MiB slabs that are views of their region. A model is cached as chunk-aligned pieces,
one slab each, checksummed as they are read; it takes the lowest run of consecutive free slabs
of one region that holds it whole, else the longest runs first, so that the GPU copy can merge
neighbouring pieces into one large transfer. A model larger than the whole pool is refused by
the DRAM tier; loaded to a GPU, it streams through the loader's small pinned pool instead.

DRAM eviction: GreedyDual-Size-Frequency. Each model has a priority
H = L + uses * cost / size, where uses counts its warms and GPU loads, cost is the seconds to
read it back from disk (its bytes / `reload_rate`), size the pool bytes it holds, and L the
tier's clock: the H of the last model evicted, so that models not used for a while age out.
The lowest H goes first, the least recently used of equals, skipping models in use (being read
or copied to a GPU). As cost grows with size, H per byte comes down to uses / rate: a model
used often outlives one used once whatever their sizes, and equal uses give LRU.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sllmctl.errors import CorruptCheckpoint, SllmError
from sllmctl.store.datafile import Piece, check_chunks, open_data, read_verify, reconvert_hint
from sllmctl.store.format import ALIGNMENT
from sllmctl.store.gpu.pinned import PinnedModel
from sllmctl.store.store import StoredModel
from sllmctl.wire.codes import DoesNotFit

if TYPE_CHECKING:
    import torch

SLAB = 64 << 20  # bytes; a multiple of the checksum chunk
# bytes; one pinned allocation, cut into slabs. CUDA calls from other threads can wait while
# the driver pins a region, so regions are kept small: with 1 GiB ones, a fresh H100 VM (whose
# memory grows on first touch) twice left `status` unanswered for 1.5 s while the pool was
# pinned. Copies from the tier are 256 MiB at most anyway.
REGION = 256 << 20
READ_AT_ONCE = 4  # pieces being read into the DRAM tier at once
READ_THREADS = 4  # threads per piece (preads, or frames decoded)
Progress = Callable[[str, int, int], None]


def region_sizes(capacity: int) -> list[int]:
    """Whole REGIONs, then the remainder (a multiple of SLAB) as falling powers of two: the
    pinned allocator rounds each allocation up to a power of two, wasting the difference."""
    full, rest = divmod(capacity, REGION)
    return [REGION] * full + [1 << b for b in reversed(range(REGION.bit_length())) if rest >> b & 1]


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
    uses: int = 0  # warms and GPU loads
    priority: float = 0.0  # GDSF: evicted lowest first


class DramTier:
    def __init__(self, capacity: int, pinned: bool, reload_rate: float = 1.5e9) -> None:
        self.capacity = max(0, capacity) // SLAB * SLAB
        self.pinned = pinned
        self.reload_rate = reload_rate  # bytes/s read back from disk; the daemon may set it
        self.clock = 0.0  # GDSF's L: the priority of the last model evicted
        self.regions: list[torch.Tensor] = []
        self.slabs: list[torch.Tensor] = []  # views of the regions
        self.region_of: list[int] = []  # slab -> region
        self.free: list[int] = []  # sorted
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
            for size in region_sizes(self.capacity):
                region = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
                with self.lock:
                    self.regions.append(region)
                    for i in range(size // SLAB):
                        self.slabs.append(region[i * SLAB:(i + 1) * SLAB])
                        self.region_of.append(len(self.regions) - 1)
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
            entry.slabs = self._take(need)
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
        """Read the model's pieces into its slabs, READ_AT_ONCE pieces at a time (a
        compressed model's are decoded on the CPU, frame by frame, in parallel too), each
        checked against its chunk sums."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        chunk = model.manifest.chunk_size
        fds = [open_data(model, f) for f in model.manifest.files]

        def one(piece: Piece, slab: int) -> int:
            buf = self.slabs[slab]
            f = model.manifest.files[piece.file]
            n, sums = read_verify(model, f, fds[piece.file], buf.data_ptr(), piece.length,
                                  piece.offset, READ_THREADS)
            if n != piece.length:
                raise CorruptCheckpoint(
                    f"model {model.name}: data file {f.path} ended after byte "
                    f"{piece.offset + n}", hint=reconvert_hint(model))
            check_chunks(model, f, piece.offset // chunk, sums)
            return n

        done = 0
        try:
            with ThreadPoolExecutor(READ_AT_ONCE, thread_name_prefix="sllmctl-dram") as ex:
                futures = [ex.submit(one, piece, slab) for piece, slab in entry.pieces]
                try:
                    for fut in as_completed(futures):
                        done += fut.result()
                        progress("reading", done, entry.nbytes)
                finally:
                    for fut in futures:
                        fut.cancel()
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

    def _take(self, need: int) -> list[int]:
        """`need` free slabs: the lowest run of consecutive slabs of one region that is long
        enough, else the longest runs first."""
        runs: list[list[int]] = []
        for s in self.free:
            if runs and s == runs[-1][-1] + 1 and self.region_of[s] == self.region_of[s - 1]:
                runs[-1].append(s)
            else:
                runs.append([s])
        fit = next((r for r in runs if len(r) >= need), None)
        order = [fit] if fit else sorted(runs, key=len, reverse=True)
        taken = [s for r in order for s in r][:need]
        self.free = sorted(set(self.free) - set(taken))
        return taken

    def _touch(self, e: DramEntry) -> None:
        """Count a use: most recently used, and its GDSF priority raised."""
        e.uses += 1
        e.last_used = time.time()
        cost = e.nbytes / self.reload_rate  # seconds to read it back
        e.priority = self.clock + e.uses * cost / (max(1, len(e.slabs)) * SLAB)
        self.models.move_to_end(e.name)

    def _evict_one(self) -> bool:
        """Drop the idle model of lowest priority, the least recently used of equals."""
        idle = [e for e in self.models.values() if e.ready and not e.users]  # LRU first
        if not idle:
            return False
        low = min(e.priority for e in idle)  # equal in theory may differ in the last bits
        victim = next(e for e in idle if math.isclose(e.priority, low, rel_tol=1e-9))
        self.clock = max(self.clock, victim.priority)
        self._drop(victim)
        return True

    def _drop(self, e: DramEntry) -> None:
        self.free = sorted(self.free + e.slabs)
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
                "models": [{"name": e.name, "path": e.path, "bytes": e.nbytes, "ready": e.ready,
                            "in_use": e.users, "last_used": e.last_used, "uses": e.uses,
                            "priority": e.priority}
                           for e in self.models.values()],
            }


assert SLAB % ALIGNMENT == 0
