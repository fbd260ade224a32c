"""Continuous batching: one thread owns the model and interleaves every request in flight.

Each request gets a slot, a row of the batch KV cache. A new request is prefilled alone (in a
one-row cache, then copied into its slot) between decode steps; every decode step then
advances all active slots at once, each at its own position, and samples every row with one
device round trip. A request leaves its slot when it samples an eos id or reaches its token
limit, and a waiting request takes the slot (the lowest free one, so that few rows run).

A step runs the first `bucket(highest active slot + 1)` rows and attends over
`bucket(longest context)` positions; on CUDA each such shape replays a captured graph
(sllmctl.engine.graphs).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from sllmctl.engine.graphs import DecodeGraphs, bucket
from sllmctl.engine.model import KVCache, Transformer
from sllmctl.engine.sampling import sample
from sllmctl.errors import SllmError

_DONE = -1
MIN_KV = 256  # the shortest attended length (a power of two)


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
    def __init__(self, model: Transformer, slots: int = 8, max_len: int = 2048,
                 graphs: bool | None = None) -> None:
        self.model, self.slots = model, slots
        self.max_len = min(max_len, model.config.max_position_embeddings)
        device = model.embed_tokens.weight.device
        self.device = device
        self.batch_cache = model.setup_cache(slots, self.max_len, device)
        self.prefill_cache = KVCache(model.config, 1, self.max_len, device,
                                     model.embed_tokens.weight.dtype)
        use_graphs = device.type == "cuda" if graphs is None else graphs
        self.graphs = DecodeGraphs(model, slots) if use_graphs else None
        self.waiting: queue.Queue[_Request] = queue.Queue()
        self.active: list[_Request | None] = [None] * slots
        self.steps = 0
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
        if self.graphs is not None:
            self.graphs.clear()

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
            try:
                self._prefill(slot, req)
            except BaseException as e:  # this request fails; the others go on
                self.active[slot] = None
                req.out.put(e)

    def _prefill(self, slot: int, req: _Request) -> None:
        m = self.model
        n = len(req.ids)
        m.cache = self.prefill_cache
        try:
            logits = m(torch.tensor([req.ids], device=self.device),
                       torch.arange(n, device=self.device), last_only=True,
                       kv_len=bucket(n, MIN_KV, self.max_len))
        finally:
            m.cache = self.batch_cache
        for layer in range(len(self.batch_cache.k)):
            self.batch_cache.k[layer][slot, :, :n] = self.prefill_cache.k[layer][0, :, :n]
            self.batch_cache.v[layer][slot, :, :n] = self.prefill_cache.v[layer][0, :, :n]
        req.pos = n
        self.active[slot] = req
        self._emit([slot], logits[:, -1])

    def _decode(self) -> None:
        rows = [i for i, r in enumerate(self.active) if r is not None]
        b = bucket(rows[-1] + 1, 1, self.slots)
        longest = max(r.pos for r in self.active if r is not None) + 1
        kv_len = bucket(longest, MIN_KV, self.max_len)
        host = torch.zeros(2, b, dtype=torch.long)
        for i in rows:
            r = self.active[i]
            assert r is not None
            host[0, i], host[1, i] = r.last, r.pos
        if self.graphs is not None:
            self.graphs.tokens[:b, 0].copy_(host[0], non_blocking=False)
            self.graphs.pos[:b, 0].copy_(host[1], non_blocking=False)
            logits = self.graphs.run(b, kv_len)
        else:
            dev = host.to(self.device)
            logits = self.model(dev[0, :, None], dev[1, :, None], last_only=True,
                                kv_len=kv_len)[:, -1]
        self.steps += 1
        for i in rows:
            r = self.active[i]
            assert r is not None
            r.pos += 1
        self._emit(rows, logits)

    def _emit(self, rows: list[int], logits: torch.Tensor) -> None:
        """Sample the next token of each active slot in `rows` from `logits` (indexed by
        slot, or [1, vocab] for a single prefilled slot) with one device round trip."""
        reqs = [self.active[i] for i in rows]
        pick = torch.tensor(rows, device=logits.device) if logits.shape[0] > 1 else None
        sub = logits if pick is None else logits.index_select(0, pick)
        tokens = self._sample(sub, [r for r in reqs if r is not None]).tolist()
        for slot, r, token in zip(rows, reqs, tokens, strict=True):
            assert r is not None
            r.last, r.generated = token, r.generated + 1
            r.out.put(token)
            if token in r.eos or r.generated >= r.max_tokens or r.cancelled.is_set():
                r.out.put(_DONE)
                self.active[slot] = None

    @staticmethod
    def _sample(logits: torch.Tensor, reqs: list[_Request]) -> torch.Tensor:
        if all(r.temperature <= 0 for r in reqs):
            return logits.argmax(dim=-1)
        seeded = [j for j, r in enumerate(reqs) if r.generator is not None]
        plain = [j for j, r in enumerate(reqs) if r.generator is None]
        out = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
        if plain:
            def rows(values: list[float]) -> torch.Tensor:
                return torch.tensor(values, device=logits.device)

            idx = torch.tensor(plain, device=logits.device)
            out[idx] = sample(logits.index_select(0, idx),
                              rows([reqs[j].temperature for j in plain]),
                              rows([reqs[j].top_p for j in plain]),
                              rows([float(reqs[j].top_k) for j in plain]))
        for j in seeded:  # a seeded request draws from its own generator
            r = reqs[j]
            out[j] = sample(logits[j:j + 1], r.temperature, r.top_p, r.top_k, r.generator)[0]
        return out
