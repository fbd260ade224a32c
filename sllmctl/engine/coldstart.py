"""Layer-pipelined cold start: the first request computes on the layers that have reached the
GPU while later ones are still being copied, so that time to first token approaches
max(load, prefill) rather than their sum.

The store lays tensors out in load order (embedding, layer 0, layer 1, ..., head), and the
loader copies in file order, so layer i is complete long before the last layer. `LayerGate` is
the model's `gate`: before layer i runs it waits (on the host) until that layer's bytes are
queued for copying, then makes the compute stream wait for exactly those copies. Before the
head it waits for the whole load and its checksums, so no token is ever produced from weights
that fail verification; after that the gate removes itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sllmctl.engine.model import Transformer
    from sllmctl.store.gpu.copy import GpuLoad


def layer_of(name: str) -> int | None:
    """The layer a tensor belongs to: -1 for the embedding, None for what comes after the
    layers (the final norm, the head)."""
    n = name.removeprefix("model.")
    if n.startswith("layers."):
        return int(n.split(".")[1])
    if n.startswith("embed_tokens."):
        return -1
    return None


class LayerGate:
    def __init__(self, load: GpuLoad, model: Transformer) -> None:
        self.load, self.model = load, model
        self.ranges: dict[int, dict[int, tuple[int, int]]] = {}  # layer -> file -> bytes
        for name, e in load.model.manifest.tensors.items():
            layer = layer_of(name)
            if layer is None:
                continue
            files = self.ranges.setdefault(layer, {})
            lo, hi = files.get(e.file, (e.offset, e.offset + e.nbytes))
            files[e.file] = (min(lo, e.offset), max(hi, e.offset + e.nbytes))
        self.passed: set[int] = set()
        self.waits = 0  # layers that had to wait for their weights (for tests and metrics)

    def __call__(self, layer: int) -> None:
        if layer in self.passed:
            return
        if layer >= len(self.model.layers):  # the head: everything, verified
            self.load.result()
            self.model.gate = None
            return
        for file, (lo, hi) in self.ranges.get(layer, {}).items():
            self.load.wait_range(file, lo, hi)
        self.waits += not self.load.done
        self.passed.add(layer)
