"""The one state the daemon's handlers act on: its settings, the tiers, the measured
bandwidths, the long jobs in flight and the HTTP side. The socket loop (server.py) owns a
State and hands it to every handler; nothing else holds daemon state."""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllmctl import paths
from sllmctl.daemon.bandwidth import load_cached, measure, save, sweep
from sllmctl.errors import SllmError

log = logging.getLogger("sllmctl.daemon")
Progress = Callable[[str, int, int], None]


@dataclass
class Settings:
    """What the daemon was started with (shown in status, compared by `daemon start`)."""

    endpoint: str
    dram_pool: str  # as given: 25%, 8GiB
    dram_pool_bytes: int
    measure_bytes: int


@dataclass
class Job:
    id: str
    op: str
    args: dict[str, Any]  # secrets redacted
    identity: bytes  # the client's ROUTER identity
    stage: str = "queued"
    done: int = 0
    total: int = 0
    started: float = field(default_factory=time.time)

    def public(self) -> dict[str, Any]:
        return {"id": self.id, "op": self.op, "args": self.args, "stage": self.stage,
                "done": self.done, "total": self.total, "started": self.started}


@dataclass
class HttpSide:
    """The one HTTP listener and the models it serves (made by the first `serve`)."""

    host: Any = None  # sllmctl.daemon.http.ModelHost
    server: Any = None  # the uvicorn server
    address: str | None = None  # http://HOST:PORT
    api_key: str | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


class State:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.started = time.time()
        self.stop = threading.Event()
        self.ready = threading.Event()  # the tiers' start-up has ended (maybe failed)
        self.init_error: str | None = None
        self.dram: Any = None  # DramTier, made at start-up (it imports torch)
        self.gpu: Any = None  # GpuTier
        self.bandwidth: dict[str, Any] | None = load_cached(self.bandwidth_file)
        self.jobs: dict[str, Job] = {}
        self.jobs_lock = threading.Lock()
        self.pulls: dict[str, Any] = {}  # model name -> ops_pull.Shared, under jobs_lock
        self.http = HttpSide()
        self.guard: Any = None  # guard.Guard: who may ask what (set by the socket loop)
        self.log_file = _log_file()

    @property
    def bandwidth_file(self) -> Path:
        return paths.home() / "bandwidth.json"

    @property
    def is_ready(self) -> bool:
        return self.ready.is_set() and self.init_error is None

    def start_tiers(self) -> None:
        """Make the tiers, then measure the host if no figures are cached (in the
        background, from the daemon's start)."""
        try:
            import torch

            from sllmctl.daemon.dram_tier import DramTier
            from sllmctl.daemon.gpu_tier import GpuTier
            from sllmctl.store.gpu.checksums import warm_up

            self.gpu = GpuTier()
            self.gpu.refresh()  # each CUDA context now, not in `status`
            for d in range(self.gpu.count):  # the loader's kernels, not in the first load
                warm_up(d)
            pinned = torch.cuda.is_available()
            self.dram = DramTier(self.settings.dram_pool_bytes, pinned)
            log.info("tiers ready: DRAM pool %.2f GB (pinned: %s), %d GPU(s)",
                     self.dram.capacity / 1e9, pinned, self.gpu.count)
            from sllmctl.engine import warmup  # kernels compiled before the first request

            log.info("warm-up: %s", warmup.at_daemon_start(paths.home(), self.gpu.count))
        except Exception as e:
            self.init_error = f"{type(e).__name__}: {e}"
            log.exception("tier initialisation failed")
        finally:
            self.ready.set()
        for name in sweep(paths.models_dir()):
            log.info("removed %s, left by a measurement that did not end", name)
        if self.bandwidth is None and self.init_error is None:
            self.measure()
        self.use_bandwidth()

    def measure(self) -> dict[str, Any]:
        data = measure(paths.models_dir(), self.gpu.count if self.gpu else 0,
                       self.settings.measure_bytes)
        self.bandwidth = data
        save(self.bandwidth_file, data)
        self.use_bandwidth()
        return data

    def use_bandwidth(self) -> None:
        """The DRAM tier weighs reload cost by the disk's measured read rate."""
        rate = ((self.bandwidth or {}).get("disk") or {}).get("GBps")
        if self.dram is not None and isinstance(rate, int | float) and rate > 0:
            self.dram.reload_rate = rate * 1e9

    def tiers(self) -> None:
        """Wait for the tiers; an error if they failed to start."""
        self.ready.wait()
        if self.init_error:
            raise SllmError(f"the daemon's tiers failed to start: {self.init_error}",
                            hint=f"see the daemon log ({self.log_file or 'its stderr'})")

    def progress(self, rid: str, stage: str, done: int, total: int) -> None:
        with self.jobs_lock:
            job = self.jobs.get(rid)
            if job is not None:
                job.stage, job.done, job.total = stage, done, total


def _log_file() -> str | None:
    """The file this daemon logs to (its stderr, when that is a file), else None."""
    try:
        if stat.S_ISREG(os.fstat(2).st_mode):
            return os.readlink("/proc/self/fd/2")
    except OSError:
        pass
    return None
