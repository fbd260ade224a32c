"""The daemon's HTTP side: one OpenAI-compatible listener per host, and the models it serves
(loaded from the fastest tier that holds them, GPU > DRAM > disk)."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from sllmctl.daemon.tiers import BadArguments
from sllmctl.errors import NotFound

log = logging.getLogger("sllmctl.daemon")


def _name(args: dict[str, Any]) -> str:
    name = args.get("name")
    if not isinstance(name, str) or not name:
        raise BadArguments("the request names no model")
    return name



class ServingMixin:
    """The `serve` and `unserve` operations of the Daemon (which provides the tiers)."""

    gpu: Any
    dram: Any
    ready: threading.Event
    init_error: str | None
    host: Any
    http: Any
    http_address: str | None
    http_lock: threading.Lock

    def _tiers(self) -> None:
        raise NotImplementedError

    def _unload_gpu(self, name: str) -> None:
        """A served model that goes idle leaves the GPU (it stays in the DRAM tier)."""
        if self.gpu is not None and self.gpu.count:
            self.gpu.unload(name)

    def _load_chat(self, name: str) -> tuple[Any, str]:
        """A servable model from the fastest tier that holds it: GPU > DRAM > disk.

        On a GPU host it comes back while its weights are still being copied (layer-pipelined
        cold start; SLLMCTL_LAYER_PIPELINE=0 turns that off, to compare). A model loaded from
        disk is then also read into the DRAM tier, in the background, so that it stays there
        after its keep-alive."""
        from sllmctl.engine.chat import ChatModel
        from sllmctl.store.store import Store

        self._tiers()
        model = Store().get(name)
        if not self.gpu.count:
            chat = ChatModel.load(name, "cpu")
            chat.start_batching()
            return chat, "disk"
        e, fresh = self.gpu.start(model, None, self.dram)
        if os.environ.get("SLLMCTL_LAYER_PIPELINE", "1") == "0" and e.loading is not None:
            e.loading.result()  # for comparison: load everything, then compute
        if e.loading is not None and not e.loading.done:
            if e.loaded_from == "dram":
                # copies from pinned memory are queued in milliseconds: let that finish
                # before building the model, which holds the GIL for a while
                e.loading.wait_queued()
            chat = ChatModel.from_loading(name, e.loading)
        else:
            if e.loading is not None:
                e.loading.result()  # a load that failed raises here
            chat = ChatModel.from_state(name, e.state, f"cuda:{e.device}", e.load_seconds)
        tier = e.loaded_from if fresh else "gpu"
        if tier == "disk" and self.dram.pinned and model.manifest.total_bytes <= self.dram.capacity:
            def fill_dram(error: BaseException | None) -> None:
                if error is None:
                    threading.Thread(target=self._fill_dram, args=(model,), daemon=True,
                                     name="sllmctl-dram-fill").start()

            if chat.loading is not None:
                chat.loading.add_done_callback(fill_dram)
            else:
                fill_dram(None)
        chat.start_batching(slots=self._slots(chat.model.config, model.manifest.total_bytes))
        return chat, tier

    def _fill_dram(self, model: Any) -> None:
        try:
            self.dram.warm(model, lambda *_: None)
        except Exception as e:  # the model is served from the GPU; only its DRAM copy is lost
            log.warning("could not keep %s in the DRAM tier: %s", model.name, e)

    @staticmethod
    def _slots(c: Any, model_bytes: int) -> int:
        """Concurrent requests per model: up to 32 (decode is bound by reading the weights, so
        more rows cost little) while their KV cache stays within the model's own size, and at
        least 8."""
        per_slot = 2 * c.layers * c.kv_heads * c.head_dim * 2 * min(2048, c.max_position_embeddings)
        return max(8, min(32, model_bytes // max(1, per_slot)))

    def _start_http(self, host: str, port: int, api_key: str | None) -> str:
        from sllmctl.daemon import http
        from sllmctl.daemon.http import ModelHost
        from sllmctl.store.store import Store

        address = f"http://{host}:{port}"
        with self.http_lock:
            if self.http_address is not None:
                if self.http_address != address:
                    raise BadArguments(f"this daemon already serves HTTP on {self.http_address}",
                                       hint="one HTTP listener per host serves every model")
                return address
            sock = http.bind(host, port)
            self.host = ModelHost(self._load_chat, on_unload=self._unload_gpu)
            app = http.make_app(self.host, lambda: Store().names(), api_key,
                                ready=lambda: self.ready.is_set() and not self.init_error)
            self.http = http.serve_in_thread(app, sock)
            self.http_address = address
            log.info("serving HTTP on %s", address)
            return address

    def op_serve(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        from sllmctl.store.store import Store

        name = _name(args)
        host, port = str(args.get("host", "127.0.0.1")), int(args.get("port", 8080))
        keep_alive = float(args.get("keep_alive", 300))
        Store().get(name)  # an unknown model fails before the listener starts
        address = self._start_http(host, port, args.get("api_key"))
        progress("loading", 0, 1)
        served = self.host.get(name, keep_alive, request=False)
        try:
            self.host.wait_loaded(served)
        finally:
            self.host.release(served)
        return {"name": name, "endpoint": f"{address}/v1", "tier": served.tier,
                "load_seconds": served.load_seconds, "keep_alive": served.keep_alive}

    def op_unserve(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        name = _name(args)
        if self.host is None or not self.host.unload(name):
            raise NotFound(f"model {name} is not being served")
        return {"name": name, "unserved": True}

