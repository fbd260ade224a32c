"""CUDA graphs for the decode step.

A decode step of a Llama-shaped model is a few hundred small kernels; launched one by one from
Python they cost more than the weights take to stream at batch 1. Each (batch rows, attended
length) pair gets its own graph, captured on first use: the model's forward on static token and
position buffers, writing its logits into a tensor the graph owns. Rows and lengths are rounded
up to powers of two (`bucket`), so a few graphs cover every step; all share one memory pool,
which is safe because a graph's output is read before the next graph runs.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sllmctl.engine.model import Transformer


def bucket(n: int, low: int, high: int) -> int:
    """The smallest power of two >= n, at least `low`, at most `high`."""
    b = low
    while b < n:
        b *= 2
    return min(b, high)


class DecodeGraphs:
    def __init__(self, model: Transformer, rows: int) -> None:
        if model.cache is None:
            raise RuntimeError("set up the model's cache before capturing graphs")
        device = model.cache.k[0].device
        self.model = model
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, Tensor]] = {}
        self.pool = torch.cuda.graph_pool_handle()

    def run(self, rows: int, kv_len: int) -> Tensor:
        """Logits [rows, vocab] for the first `rows` rows of the token and position buffers
        (filled by the caller), attending over `kv_len` positions."""
        entry = self.graphs.get((rows, kv_len))
        if entry is None:
            entry = self.graphs[rows, kv_len] = self._capture(rows, kv_len)
        entry[0].replay()
        return entry[1]

    def _capture(self, rows: int, kv_len: int) -> tuple[torch.cuda.CUDAGraph, Tensor]:
        m, tokens, pos = self.model, self.tokens[:rows], self.pos[:rows]
        # A warm-up on a side stream (cuBLAS picks its kernels and workspace there). It makes
        # the same cache writes as the step itself, so it changes nothing.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            m(tokens, pos, last_only=True, kv_len=kv_len)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = m(tokens, pos, last_only=True, kv_len=kv_len)[:, -1]
        return graph, out

    def clear(self) -> None:
        self.graphs.clear()
