"""The daemon's GPU tier: every visible GPU.

A model warmed to a GPU stays there until unloaded or evicted (least recently used first, when
another model needs the room). A load picks the GPU with the most free memory unless told
which, and reads from the fastest tier that holds the model: DRAM, else disk. Loads run in the
background (`start`), one at a time, with the model's tensors usable as views from the start
(the layer-pipelined cold start waits per layer). Memory of an evicted model stays in this
process's allocator for the next load, and counts as free.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sllmctl.daemon.dram_tier import DramTier
from sllmctl.store.gpu.copy import GpuLoad
from sllmctl.store.gpu.loader import PinnedPool, start_load_to_gpu
from sllmctl.store.gpu.pinned import start_pinned_to_gpu
from sllmctl.store.store import StoredModel
from sllmctl.wire.codes import BadRequest, DoesNotFit, NoGpu


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
    loading: GpuLoad | None = None  # the load that filled it (maybe still running)
    settled: threading.Event = field(default_factory=threading.Event)  # its load's end handled

    @property
    def ready(self) -> bool:
        return self.loading is None or self.loading.done


class GpuTier:
    MARGIN = 256 << 20  # bytes left free on a GPU for activations and the allocator

    def __init__(self) -> None:
        try:
            import torch

            self.count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        except ImportError:
            self.count = 0
        self._names: dict[int, str] = {}
        self._memory: dict[int, tuple[int, int]] = {}  # device -> last known (free, total)
        self._query: threading.Thread | None = None  # a memory query still running
        self.models: OrderedDict[str, GpuEntry] = OrderedDict()
        self.lock = threading.Lock()  # the models table; held briefly, so status never waits
        self.load_lock = threading.Lock()  # one load at a time (they share the PCIe link)
        self._pool: PinnedPool | None = None

    def _free(self, device: int) -> int:
        """Free memory on `device`, counting what this process's allocator holds unused
        (memory of evicted models is kept there for the next load: a fresh allocation of a
        model's size costs milliseconds, a few percent of a load from DRAM)."""
        import torch

        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached

    def _pick(self, nbytes: int, gpu: int | None) -> int:
        if self.count == 0:
            raise NoGpu("this host has no GPU", hint="warm it to DRAM instead: --tier dram")
        if gpu is not None and not 0 <= gpu < self.count:
            raise BadRequest(f"no GPU {gpu}: this host has {self.count}",
                               hint=f"pick one of 0-{self.count - 1}", field="gpu")
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
            victims = [e for e in self.models.values() if e.device in candidates and e.ready]
            if not victims:  # other processes hold the memory
                raise DoesNotFit(f"{nbytes / 1e9:.2f} GB does not fit in the free memory of "
                                 f"{'GPU ' + str(gpu) if gpu is not None else 'any GPU'}")
            self._evict(victims[0])  # least recently used

    def _evict(self, e: GpuEntry) -> None:
        with self.lock:
            if self.models.get(e.name) is e:
                del self.models[e.name]
        e.state.clear()  # the memory returns to the allocator, for the next load

    def warm(self, model: StoredModel, gpu: int | None, dram: DramTier) -> GpuEntry:
        """Make `model` resident on a GPU; returns once it is loaded and verified."""
        e, _ = self.start(model, gpu, dram)
        e.settled.wait()
        if e.loading is not None:
            e.loading.result()
        return e

    def start(self, model: StoredModel, gpu: int | None, dram: DramTier
              ) -> tuple[GpuEntry, bool]:
        """Find `model` resident or start loading it (from DRAM if resident there, else
        from disk) and return at once: (entry, whether a load started now). While
        `entry.loading` is not done, its state holds views of memory still being filled
        (see sllmctl.engine.coldstart). One load at a time: they share the PCIe link."""
        self.load_lock.acquire()
        try:
            with self.lock:
                e = self.models.get(model.name)
                if e and e.path == str(model.path) and (gpu is None or gpu == e.device):
                    e.last_used = time.time()
                    self.models.move_to_end(e.name)
                    self.load_lock.release()
                    return e, False
            if e:
                self._evict(e)
            device = self._pick(model.manifest.total_bytes, gpu)
            start = time.perf_counter()
            pinned = dram.pinned_model(model) if dram.pinned else None
            try:
                if pinned is not None:
                    load, source = start_pinned_to_gpu(pinned, f"cuda:{device}"), "dram"
                else:
                    if self._pool is None:
                        self._pool = PinnedPool()
                    load = start_load_to_gpu(model, f"cuda:{device}", pool=self._pool)
                    source = "disk"
            except BaseException:
                if pinned is not None:
                    dram.release(model.name)
                raise
        except BaseException:
            self.load_lock.release()
            raise
        assert load.state is not None
        entry = GpuEntry(model.name, str(model.path), device, model.manifest.total_bytes,
                         load.state, source, 0.0, loading=load)
        with self.lock:
            self.models[model.name] = entry

        def done(error: BaseException | None) -> None:
            entry.load_seconds = time.perf_counter() - start
            if pinned is not None:
                dram.release(model.name)
            if error is not None:
                self._evict(entry)
            self.load_lock.release()
            entry.settled.set()

        load.add_done_callback(done)
        return entry, True

    def unload(self, name: str) -> bool:
        with self.load_lock:
            e = self.models.get(name)
            if e is None:
                return False
            self._evict(e)
            return True

    STATUS_WAIT = 0.2  # seconds `status` waits for the driver before using the last figures

    def refresh(self) -> None:
        """Query every GPU's name and free memory (may wait on the driver)."""
        import torch

        for d in range(self.count):
            if d not in self._names:
                self._names[d] = torch.cuda.get_device_name(d)
            self._memory[d] = torch.cuda.mem_get_info(d)

    def status(self) -> dict[str, Any]:
        """Per GPU its name, total and free memory; the resident models. The driver can keep
        a memory query waiting for seconds while another thread pins host memory (the DRAM
        pool at start), so status waits STATUS_WAIT for it and otherwise reports the last
        figures, marked stale, while the query finishes in the background."""
        stale = False
        if self.count:
            with self.lock:
                if self._query is None or not self._query.is_alive():
                    self._query = threading.Thread(target=self.refresh, daemon=True,
                                                   name="sllmctl-gpu-memory")
                    self._query.start()
                query = self._query
            query.join(self.STATUS_WAIT)
            stale = query.is_alive()
        gpus = [{"index": d, "name": self._names.get(d), "total": mem[1], "free": mem[0],
                 "stale": stale}
                for d in range(self.count) if (mem := self._memory.get(d)) is not None]
        with self.lock:
            models = [{"name": e.name, "path": e.path, "gpu": e.device, "bytes": e.nbytes,
                       "loaded_from": e.loaded_from, "load_seconds": round(e.load_seconds, 4),
                       "ready": e.ready, "last_used": e.last_used,
                       "timings": e.loading.timings if e.loading else {}}
                      for e in self.models.values()]
        return {"gpus": gpus, "models": models}
