"""Prefill and decode on one model's batch KV cache (mechanism: no choice of what runs).

Each slot is a row of the batch cache. A prefill runs one request alone in a one-row cache
and copies its keys and values into the slot; a decode step advances the first
`bucket(highest slot + 1)` rows at once, each at its own position, attending over
`bucket(longest context)` positions; on CUDA each such shape replays a captured graph
(graphs.py). Every row of a step is sampled with one device round trip.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from sllmctl.engine.graphs import DecodeGraphs, bucket
from sllmctl.engine.model import KVCache, Transformer
from sllmctl.engine.request import Request
from sllmctl.engine.sampling import sample

MIN_KV = 256  # the shortest attended length (a power of two)


class ModelRunner:
    def __init__(self, model: Transformer, slots: int, max_len: int,
                 graphs: bool | None = None) -> None:
        self.model, self.slots = model, slots
        self.max_len = min(max_len, model.config.max_position_embeddings)
        self.device = device = model.embed_tokens.weight.device
        self.batch_cache = model.setup_cache(slots, self.max_len, device)
        self.prefill_cache = KVCache(model.config, 1, self.max_len, device,
                                     model.embed_tokens.weight.dtype)
        use_graphs = device.type == "cuda" if graphs is None else graphs
        self.graphs = DecodeGraphs(model, slots) if use_graphs else None
        self.steps = 0  # decode steps run

    def prefill(self, slot: int, ids: Sequence[int]) -> torch.Tensor:
        """Run `ids` into `slot`; the logits [1, vocab] of the last position."""
        m, n = self.model, len(ids)
        m.cache = self.prefill_cache
        try:
            logits = m(torch.tensor([list(ids)], device=self.device),
                       torch.arange(n, device=self.device), last_only=True,
                       kv_len=bucket(n, MIN_KV, self.max_len))
        finally:
            m.cache = self.batch_cache
        for layer in range(len(self.batch_cache.k)):
            self.batch_cache.k[layer][slot, :, :n] = self.prefill_cache.k[layer][0, :, :n]
            self.batch_cache.v[layer][slot, :, :n] = self.prefill_cache.v[layer][0, :, :n]
        return logits[:, -1]

    def decode(self, rows: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """One step for (slot, last token, its position) rows; logits indexed by slot."""
        b = bucket(max(slot for slot, _, _ in rows) + 1, 1, self.slots)
        kv_len = bucket(max(pos for _, _, pos in rows) + 1, MIN_KV, self.max_len)
        host = torch.zeros(2, b, dtype=torch.long)
        for slot, token, pos in rows:
            host[0, slot], host[1, slot] = token, pos
        if self.graphs is not None:
            self.graphs.tokens[:b, 0].copy_(host[0], non_blocking=False)
            self.graphs.pos[:b, 0].copy_(host[1], non_blocking=False)
            logits = self.graphs.run(b, kv_len)
        else:
            dev = host.to(self.device)
            logits = self.model(dev[0, :, None], dev[1, :, None], last_only=True,
                                kv_len=kv_len)[:, -1]
        self.steps += 1
        return logits

    def sample(self, logits: torch.Tensor, slots: Sequence[int],
               reqs: Sequence[Request]) -> list[int]:
        """The next token of each request from `logits` (indexed by slot, or [1, vocab] for
        a single prefilled request), with one device round trip."""
        if logits.shape[0] > 1:
            logits = logits.index_select(0, torch.tensor(list(slots), device=logits.device))
        return _sample(logits, reqs).tolist()

    def close(self) -> None:
        if self.graphs is not None:
            self.graphs.clear()


def _sample(logits: torch.Tensor, reqs: Sequence[Request]) -> torch.Tensor:
    """Greedy rows by one argmax; the others together, except seeded requests, which draw
    from their own generators."""
    if all(r.params.temperature <= 0 for r in reqs):
        return logits.argmax(dim=-1)
    seeded = [j for j, r in enumerate(reqs) if r.generator is not None]
    plain = [j for j, r in enumerate(reqs) if r.generator is None]
    out = torch.empty(len(reqs), dtype=torch.long, device=logits.device)
    if plain:
        def rows(values: list[float]) -> torch.Tensor:
            return torch.tensor(values, device=logits.device)

        idx = torch.tensor(plain, device=logits.device)
        ps = [reqs[j].params for j in plain]
        out[idx] = sample(logits.index_select(0, idx), rows([p.temperature for p in ps]),
                          rows([p.top_p for p in ps]), rows([float(p.top_k) for p in ps]))
    for j in seeded:
        p = reqs[j].params
        out[j] = sample(logits[j:j + 1], p.temperature, p.top_p, p.top_k, reqs[j].generator)[0]
    return out
