"""The operations on the daemon itself: ping, status, shutdown, reload."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sllmctl import paths
from sllmctl._version import __version__
from sllmctl.daemon.state import Progress, State
from sllmctl.store.store import Store
from sllmctl.wire.envelope import PROTOCOL_VERSION
from sllmctl.wire.messages import Ping, Reload, Shutdown, Status


def ping(state: State, msg: Ping, progress: Progress) -> dict[str, Any]:
    deadline = time.monotonic() + msg.delay
    while time.monotonic() < deadline and not state.stop.is_set():
        progress("waiting", 0, 0)
        time.sleep(min(0.05, max(0.0, deadline - time.monotonic())))
    return {"pong": True, "pid": os.getpid()}


def shutdown(state: State, msg: Shutdown, progress: Progress) -> dict[str, Any]:
    state.stop.set()
    return {"stopping": True, "pid": os.getpid()}


def reload(state: State, msg: Reload, progress: Progress) -> dict[str, Any]:
    """Read the allow-list again; a malformed one is an error and the list in force stays."""
    result: dict[str, Any] = state.guard.reload()
    return result


def status(state: State, msg: Status, progress: Progress) -> dict[str, Any]:
    """Everything at a glance; never waits for a load. Models whose stored folder is gone
    (removed with `rm`) are left out: the housekeeping thread drops them."""
    with state.jobs_lock:
        jobs = [j.public() for j in state.jobs.values()]
    ready = state.is_ready
    s = state.settings
    dram = state.dram.status() if ready else None
    gpu = state.gpu.status() if ready else None
    for tier in (dram, gpu):
        if tier is not None:
            tier["models"] = [m for m in tier["models"] if Path(m.pop("path")).exists()]
    host = state.http.host
    serving = [m for m in host.status() if Store().exists(m["name"])] if host is not None else []
    return {
        "daemon": {"pid": os.getpid(), "version": __version__,
                   "protocol_version": PROTOCOL_VERSION, "endpoint": s.endpoint,
                   "started_at": state.started,
                   "uptime_s": round(time.time() - state.started, 3),
                   "state": "ready" if ready else (state.init_error or "starting"),
                   "store": str(paths.models_dir()), "log_file": state.log_file,
                   "security": state.guard.describe() if state.guard else {"mode": "local"},
                   "settings": {"endpoint": s.endpoint, "dram_pool": s.dram_pool,
                                "dram_pool_bytes": s.dram_pool_bytes,
                                "measure_bytes": s.measure_bytes}},
        "dram": dram,
        "gpu": gpu,
        "jobs": jobs,
        "bandwidth": state.bandwidth,
        "http": state.http.address,
        "serving": serving,
    }
