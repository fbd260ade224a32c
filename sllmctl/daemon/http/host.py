"""The models the daemon serves over HTTP (serving policy): loaded on the first request from
the fastest tier that holds them, unloaded after their keep-alive. Each model batches its
concurrent requests in its own engine thread (sllmctl.engine.batch).

A loader may hand back a model whose weights are still arriving on the GPU (layer-pipelined
cold start): requests go to it at once; its load time is recorded when the load ends, and a
load that fails (a bad checksum) takes the model out again, so that the next request loads it
afresh."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sllmctl.engine.chat import ChatModel

DEFAULT_KEEP_ALIVE = 300.0  # seconds; -1 keeps a model forever


@dataclass
class Served:
    name: str
    model: ChatModel
    tier: str  # where it was loaded from: gpu (already resident), dram, disk
    load_seconds: float
    keep_alive: float
    last_used: float = field(default_factory=time.time)
    active: int = 0
    requests: int = 0


class ModelHost:
    def __init__(self, loader: Callable[[str], tuple[ChatModel, str]],
                 keep_alive: float = DEFAULT_KEEP_ALIVE,
                 on_unload: Callable[[str], None] | None = None) -> None:
        self.loader = loader  # name -> (model, tier it came from)
        self.on_unload = on_unload  # called after a model is unloaded
        self.keep_alive = keep_alive
        self.models: dict[str, Served] = {}
        self.loading: set[str] = set()
        self.lock = threading.Condition()
        self.cold_starts: list[dict[str, Any]] = []

    def get(self, name: str, keep_alive: float | None = None, request: bool = True) -> Served:
        """The served model, loaded now if it is not (concurrent callers wait for one load);
        `request` counts the call as a request."""
        with self.lock:
            while name in self.loading:
                self.lock.wait()
            s = self.models.get(name)
            if s is not None:
                s.last_used = time.time()
                s.active += 1
                s.requests += request
                if keep_alive is not None:
                    s.keep_alive = keep_alive
                return s
            self.loading.add(name)
        try:
            start = time.perf_counter()
            model, tier = self.loader(name)
            seconds = time.perf_counter() - start
        finally:
            with self.lock:
                self.loading.discard(name)
                self.lock.notify_all()
        with self.lock:
            s = Served(name, model, tier, seconds,
                       self.keep_alive if keep_alive is None else keep_alive, active=1,
                       requests=int(request))
            self.models[name] = s
        if model.loading is None:
            self._record(s)
        else:
            def loaded(error: BaseException | None) -> None:
                s.load_seconds = time.perf_counter() - start
                if error is None:
                    self._record(s)
                else:
                    with self.lock:
                        gone = self.models.get(name) is s and self.models.pop(name)
                    if gone:
                        self._close(s)

            model.loading.add_done_callback(loaded)
        return s

    def _record(self, s: Served) -> None:
        with self.lock:
            self.cold_starts.append({"model": s.name, "tier": s.tier,
                                     "seconds": s.load_seconds, "at": time.time()})

    def wait_loaded(self, s: Served) -> None:
        """Block until the model's weights are all on its device and verified."""
        if s.model.loading is not None:
            s.model.loading.result()

    def release(self, s: Served) -> None:
        with self.lock:
            s.active -= 1
            s.last_used = time.time()

    def unload(self, name: str) -> bool:
        with self.lock:
            s = self.models.pop(name, None)
        if s is not None:
            self._close(s)
        return s is not None

    def _close(self, s: Served) -> None:
        s.model.close()
        if self.on_unload:
            self.on_unload(s.name)

    def reap(self) -> list[str]:
        """Unload models idle for longer than their keep-alive."""
        now = time.time()
        with self.lock:
            idle = [n for n, s in self.models.items()
                    if s.keep_alive >= 0 and not s.active and now - s.last_used > s.keep_alive]
            gone = [self.models.pop(n) for n in idle]
        for s in gone:
            self._close(s)
        return idle

    def readiness(self) -> tuple[list[str], list[str]]:
        """The served models that are ready, and those still loading."""
        with self.lock:
            loading = set(self.loading)
            ready = []
            for name, s in self.models.items():
                if s.model.loading is not None and not s.model.loading.done:
                    loading.add(name)
                else:
                    ready.append(name)
        return sorted(ready), sorted(loading)

    def status(self) -> list[dict[str, Any]]:
        with self.lock:
            return [{"name": s.name, "tier": s.tier, "load_seconds": round(s.load_seconds, 4),
                     "keep_alive": s.keep_alive, "active": s.active, "requests": s.requests,
                     "last_used": s.last_used,
                     "load_stages": s.model.loading.timings if s.model.loading else {}}
                    for s in self.models.values()]
