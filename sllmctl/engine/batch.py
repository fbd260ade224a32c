"""Continuous batching: one thread owns the model and interleaves every request in flight.

Each request gets a slot, a row of the batch KV cache. A new request is prefilled alone (in a
one-row cache, then copied into its slot) between decode steps; every decode step then
advances all active slots at once, each at its own position. A request leaves its slot when
it samples an eos id or reaches its token limit, and a waiting request takes the slot.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sllmctl.engine.model import KVCache, Transformer
from sllmctl.engine.sampling import sample
from sllmctl.errors import SllmError

_DONE = -1


@dataclass
class _Request:
    ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    eos: set[int]
    generator: torch.Generator | None
    out: queue.Queue[int | BaseException] = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    generated: int = 0
    pos: int = 0
    last: int = 0


class BatchEngine:
    def __init__(self, model: Transformer, slots: int = 8, max_len: int = 2048) -> None:
        self.model, self.slots = model, slots
        self.max_len = min(max_len, model.config.max_position_embeddings)
        device = model.embed_tokens.weight.device
        self.batch_cache = model.setup_cache(slots, self.max_len, device)
        self.prefill_cache = KVCache(model.config, 1, self.max_len, device,
                                     model.embed_tokens.weight.dtype)
        self.waiting: queue.Queue[_Request] = queue.Queue()
        self.active: list[_Request | None] = [None] * slots
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="sllmctl-batch", daemon=True)
        self.thread.start()

    def submit(self, ids: list[int], max_tokens: int, *, temperature: float = 0.0,
               top_p: float = 1.0, top_k: int = 0, eos: set[int] | None = None,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Queue a prompt; iterate the sampled token ids as they come (eos included)."""
        if len(ids) + 1 > self.max_len:
            raise SllmError(f"the prompt has {len(ids)} tokens; this engine holds "
                            f"{self.max_len} per request")
        req = _Request(list(ids), min(max_tokens, self.max_len - len(ids)), temperature, top_p,
                       top_k, set(eos if eos is not None else self.model.config.eos_ids),
                       generator)
        self.waiting.put(req)
        return self._drain(req)

    @staticmethod
    def _drain(req: _Request) -> Iterator[int]:
        try:
            while True:
                item = req.out.get()
                if isinstance(item, BaseException):
                    raise item
                if item == _DONE:
                    return
                yield item
        finally:
            req.cancelled.set()  # a consumer that stops early frees the slot

    def close(self) -> None:
        self._stop.set()
        self.waiting.put(_Request([], 0, 0, 1, 0, set(), None))  # wake the loop
        self.thread.join(timeout=10)

    # ------------------------------------------------------------ the engine thread
    def _loop(self) -> None:
        with torch.inference_mode():
            while not self._stop.is_set():
                try:
                    self._admit()
                    if any(self.active):
                        self._decode()
                except BaseException as e:  # fail the requests in flight, keep serving
                    for i, r in enumerate(self.active):
                        if r is not None:
                            r.out.put(e)
                            self.active[i] = None

    def _admit(self) -> None:
        while None in self.active:
            block = not any(self.active)
            try:
                req = self.waiting.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if self._stop.is_set() or req.cancelled.is_set() or not req.ids:
                continue
            slot = self.active.index(None)
            self._prefill(slot, req)

    def _prefill(self, slot: int, req: _Request) -> None:
        m = self.model
        m.cache = self.prefill_cache
        try:
            n = len(req.ids)
            logits = m(torch.tensor([req.ids], device=self.prefill_cache.k[0].device),
                       torch.arange(n, device=self.prefill_cache.k[0].device), last_only=True)
        finally:
            m.cache = self.batch_cache
        for layer in range(len(self.batch_cache.k)):
            self.batch_cache.k[layer][slot, :, :n] = self.prefill_cache.k[layer][0, :, :n]
            self.batch_cache.v[layer][slot, :, :n] = self.prefill_cache.v[layer][0, :, :n]
        req.pos = n
        self.active[slot] = req
        self._emit(slot, logits[0, -1])

    def _decode(self) -> None:
        device = self.batch_cache.k[0].device
        tokens = torch.zeros(self.slots, 1, dtype=torch.long, device=device)
        pos = torch.zeros(self.slots, 1, dtype=torch.long, device=device)
        for i, r in enumerate(self.active):
            if r is not None:
                tokens[i, 0], pos[i, 0] = r.last, r.pos
        logits = self.model(tokens, pos, last_only=True)[:, -1]
        for i, r in enumerate(self.active):
            if r is not None:
                r.pos += 1
                self._emit(i, logits[i])

    def _emit(self, slot: int, logits: torch.Tensor) -> None:
        r = self.active[slot]
        assert r is not None
        token = int(sample(logits[None], r.temperature, r.top_p, r.top_k, r.generator).item())
        r.last, r.generated = token, r.generated + 1
        r.out.put(token)
        if token in r.eos or r.generated >= r.max_tokens or r.cancelled.is_set():
            r.out.put(_DONE)
            self.active[slot] = None
