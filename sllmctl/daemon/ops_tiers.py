"""The operations on the tiers: warm, unload, measure."""

from __future__ import annotations

import time
from typing import Any

from sllmctl.daemon.state import Progress, State
from sllmctl.errors import NotFound
from sllmctl.store.store import Store
from sllmctl.wire.messages import Measure, Unload, Warm


def warm(state: State, msg: Warm, progress: Progress) -> dict[str, Any]:
    state.tiers()
    model = Store().get(msg.name)
    start = time.perf_counter()
    if msg.tier == "dram":
        _, fresh = state.dram.warm(model, progress)
        return {"name": model.name, "tier": "dram", "seconds": time.perf_counter() - start,
                "bytes": model.manifest.total_bytes,
                "loaded_from": "disk" if fresh else "resident"}
    progress("loading", 0, model.manifest.total_bytes)
    e = state.gpu.warm(model, msg.gpu, state.dram)
    return {"name": model.name, "tier": "gpu", "gpu": e.device,
            "seconds": time.perf_counter() - start, "load_seconds": e.load_seconds,
            "loaded_from": e.loaded_from, "bytes": e.nbytes,
            "timings": e.loading.timings if e.loading else {}}


def unload(state: State, msg: Unload, progress: Progress) -> dict[str, Any]:
    """Out of the named tiers (both by default). The HTTP API's copy goes too when both are
    named, or the GPU tier on a GPU host (where the served copy is the GPU copy)."""
    name, tier = msg.name, msg.tier
    state.tiers()
    removed = []
    on_gpu = name in state.gpu.models
    host = state.http.host
    served_there = tier is None or (tier == "gpu" and state.gpu.count)
    if served_there and host is not None and host.unload(name):
        removed.append("http")
    if tier in (None, "gpu") and (state.gpu.unload(name) or on_gpu):
        removed.append("gpu")
    if tier in (None, "dram") and state.dram.unload(name):
        removed.append("dram")
    if not removed:
        raise NotFound(f"model {name} is not resident"
                       + (f" in the {tier} tier" if tier else ""),
                       hint="sllmctl ps lists resident models")
    return {"name": name, "unloaded": removed}


def measure(state: State, msg: Measure, progress: Progress) -> dict[str, Any]:
    state.tiers()
    progress("measuring", 0, 1)
    return state.measure()
