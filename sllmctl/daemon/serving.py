"""The daemon's HTTP side: one OpenAI-compatible listener per host, and the models it serves
(loaded from the fastest tier that holds them, GPU > DRAM > disk)."""

from __future__ import annotations

import logging
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
        """A servable model from the fastest tier that holds it: GPU > DRAM > disk."""
        from sllmctl.engine.chat import ChatModel
        from sllmctl.store.store import Store

        self._tiers()
        model = Store().get(name)
        if self.gpu.count:
            resident = name in self.gpu.models
            from_disk = not resident and not self.dram.has(model)
            if from_disk and self.dram.pinned and model.manifest.total_bytes <= self.dram.capacity:
                # through the DRAM tier, so that the model stays there after its keep-alive
                self.dram.warm(model, lambda *_: None)
            e = self.gpu.warm(model, None, self.dram)
            chat = ChatModel.from_state(name, e.state, f"cuda:{e.device}", e.load_seconds)
            tier = "gpu" if resident else ("disk" if from_disk else e.loaded_from)
        else:
            chat, tier = ChatModel.load(name, "cpu"), "disk"
        chat.start_batching()
        return chat, tier

    def _start_http(self, host: str, port: int, api_key: str | None) -> str:
        from sllmctl.daemon import http
        from sllmctl.engine.host import ModelHost
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
        self.host.release(served)
        return {"name": name, "endpoint": f"{address}/v1", "tier": served.tier,
                "load_seconds": served.load_seconds, "keep_alive": served.keep_alive}

    def op_unserve(self, args: dict[str, Any], progress: Any) -> dict[str, Any]:
        name = _name(args)
        if self.host is None or not self.host.unload(name):
            raise NotFound(f"model {name} is not being served")
        return {"name": name, "unserved": True}

