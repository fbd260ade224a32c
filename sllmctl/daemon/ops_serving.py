"""The operations of the HTTP side: serve and unserve, with the models the HTTP API loads
from the fastest tier that holds them (GPU > DRAM > disk), and its housekeeping."""

from __future__ import annotations

import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from sllmctl.daemon.state import Progress, State
from sllmctl.errors import NotFound, SllmError
from sllmctl.store.store import Store, StoredModel
from sllmctl.wire.codes import BadRequest
from sllmctl.wire.messages import Serve, Unserve

log = logging.getLogger("sllmctl.daemon")


def serve(state: State, msg: Serve, progress: Progress) -> dict[str, Any]:
    Store().get(msg.name)  # an unknown model fails before the listener starts
    address = start_http(state, msg.host, msg.port, msg.api_key)
    host = state.http.host
    progress("loading", 0, 1)
    served = host.get(msg.name, msg.keep_alive, request=False)
    try:
        host.wait_loaded(served)
    finally:
        host.release(served)
    return {"name": msg.name, "endpoint": f"{address}/v1", "tier": served.tier,
            "load_seconds": served.load_seconds, "keep_alive": served.keep_alive}


def unserve(state: State, msg: Unserve, progress: Progress) -> dict[str, Any]:
    host = state.http.host
    if host is None or not host.unload(msg.name):
        raise NotFound(f"model {msg.name} is not being served")
    return {"name": msg.name, "unserved": True}


def start_http(state: State, host: str, port: int, api_key: str | None) -> str:
    """Start the one HTTP listener, or check that the running one is what was asked for: the
    same address, and the key asked for (a listener is never left open when a key was
    asked; one with a key serves a request for none, still wanting its key)."""
    from sllmctl.daemon import http

    address = f"http://{host}:{port}"
    side = state.http
    with side.lock:
        if side.address is not None:
            if side.address != address:
                raise BadRequest(f"this daemon already serves HTTP on {side.address}",
                                 hint="one HTTP listener per host serves every model",
                                 field="host")
            if api_key is not None and not secrets.compare_digest(
                    api_key.encode(), (side.api_key or "").encode()):
                what = "another API key" if side.api_key else "no API key"
                raise SllmError(f"the HTTP listener on {address} already runs with {what}",
                                hint="it keeps the key it started with: restart the daemon "
                                "(sllmctl daemon stop), then serve with the key")
            return address
        sock = http.bind(host, port)
        if side.host is None:  # a migration into this daemon may have made it
            side.host = model_host(state)
        app = http.make_app(side.host, lambda: Store().names(), api_key,
                            ready=lambda: state.is_ready)
        side.server = http.serve_in_thread(app, sock)
        side.address, side.api_key = address, api_key
        log.info("serving HTTP on %s%s", address, " (API key required)" if api_key else "")
        return address


def model_host(state: State) -> Any:
    from sllmctl.daemon.http import ModelHost

    return ModelHost(lambda name: load_chat(state, name),
                     on_unload=lambda name: unload_gpu(state, name))


def unload_gpu(state: State, name: str) -> None:
    """A served model that goes idle leaves the GPU (it stays in the DRAM tier)."""
    if state.gpu is not None and state.gpu.count:
        state.gpu.unload(name)


def load_chat(state: State, name: str) -> tuple[Any, str]:
    """A servable model from the fastest tier that holds it: GPU > DRAM > disk."""
    from sllmctl.engine.chat import ChatModel

    state.tiers()
    model = Store().get(name)
    if state.gpu.count:
        return _load_gpu(state, model)
    pinned = state.dram.pinned_model(model)  # held in use while it is copied
    if pinned is None:
        chat, tier = ChatModel.load(name, "cpu"), "disk"
    else:
        try:
            weights = _copy_out(model, pinned.pieces)
        finally:
            state.dram.release(model.name)
        chat, tier = ChatModel.from_state(name, weights, "cpu"), "dram"
    chat.start_batching()
    return chat, tier


def _copy_out(model: StoredModel, pieces: list[tuple[Any, Any]]) -> dict[str, Any]:
    """The model's tensors in memory of their own, from its (verified) DRAM-tier pieces."""
    import torch

    from sllmctl.store.datafile import tensor_views

    buffers = [torch.empty(f.size, dtype=torch.uint8) for f in model.manifest.files]
    for piece, data in pieces:
        buffers[piece.file][piece.offset:piece.offset + piece.length].copy_(data)
    return tensor_views(model, buffers)


def _load_gpu(state: State, model: StoredModel) -> tuple[Any, str]:
    """On a GPU host the model comes back while its weights are still being copied
    (layer-pipelined cold start; SLLMCTL_LAYER_PIPELINE=0 turns that off, to compare). A
    model loaded from disk is then also read into the DRAM tier, in the background, so that
    it stays there after its keep-alive."""
    from sllmctl.engine.chat import ChatModel

    e, fresh = state.gpu.start(model, None, state.dram)
    if os.environ.get("SLLMCTL_LAYER_PIPELINE", "1") == "0" and e.loading is not None:
        e.loading.result()  # for comparison: load everything, then compute
    if e.loading is not None and not e.loading.done:
        if e.loaded_from == "dram":
            # copies from pinned memory are queued in milliseconds: let that finish
            # before building the model, which holds the GIL for a while
            e.loading.wait_queued()
        chat = ChatModel.from_loading(model.name, e.loading)
    else:
        if e.loading is not None:
            e.loading.result()  # a load that failed raises here
        chat = ChatModel.from_state(model.name, e.state, f"cuda:{e.device}", e.load_seconds)
    tier = e.loaded_from if fresh else "gpu"
    dram = state.dram
    if tier == "disk" and dram.pinned and model.manifest.total_bytes <= dram.capacity:
        def fill_dram(error: BaseException | None) -> None:
            if error is None:
                threading.Thread(target=_fill_dram, args=(state, model), daemon=True,
                                 name="sllmctl-dram-fill").start()

        if chat.loading is not None:
            chat.loading.add_done_callback(fill_dram)
        else:
            fill_dram(None)
    chat.start_batching(slots=slots(chat.model.config, model.manifest.total_bytes))
    return chat, tier


def _fill_dram(state: State, model: StoredModel) -> None:
    try:
        state.dram.warm(model, lambda *_: None)
    except Exception as e:  # the model is served from the GPU; only its DRAM copy is lost
        log.warning("could not keep %s in the DRAM tier: %s", model.name, e)


def slots(c: Any, model_bytes: int) -> int:
    """Concurrent requests per model: up to 32 (decode is bound by reading the weights, so
    more rows cost little) while their KV cache stays within the model's own size, and at
    least 8."""
    per_slot = 2 * c.layers * c.kv_heads * c.head_dim * 2 * min(2048, c.max_position_embeddings)
    return max(8, min(32, model_bytes // max(1, per_slot)))


def housekeeping(state: State) -> None:
    """Unload served models idle past their keep-alive, and drop from every tier the models
    whose stored folder is gone (removed with `rm`). Runs on its own thread: unloading a GPU
    copy waits for a GPU load in flight."""
    host = state.http.host
    if host is not None:
        for name in host.reap():
            log.info("unloaded %s after its keep-alive", name)
        for name in [m["name"] for m in host.status() if not Store().exists(m["name"])]:
            if host.unload(name):
                log.info("stopped serving %s: it left the store", name)
    if not state.is_ready:
        return
    for tier in (state.gpu, state.dram):
        for m in tier.status()["models"]:
            if not Path(m["path"]).exists():
                try:
                    if tier.unload(m["name"]):
                        log.info("dropped %s from a tier: it left the store", m["name"])
                except SllmError:  # in use; try again next time
                    pass
