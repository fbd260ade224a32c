"""Load paths that only the benchmarks and the GPU tests use, built on the product's loader.

`load_pinned` reads a model into freshly pinned memory (the DRAM tier does this with its own
pool), `pinned_to_gpu` copies it to a GPU in the caller's thread (the product starts the same
load in the background), `mapped=True` maps the GPU memory piece by piece while the copies
run (gpu_memory.py), and `eager_pool` makes every pinned buffer before any timing.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from sllmctl import native
from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.datafile import check_chunks, open_data, read_verify, reconvert_hint
from sllmctl.store.gpu.copy import GpuLoad
from sllmctl.store.gpu.loader import PinnedPool, pieces
from sllmctl.store.gpu.pinned import PinnedModel, pinned_source
from sllmctl.store.store import StoredModel


def eager_pool(**kwargs: Any) -> PinnedPool:
    """A PinnedPool with all its buffers made (pinning is slow; a daemon's pool is warm)."""
    pool = PinnedPool(**kwargs)
    made = [pool.take(0) for _ in range(pool.limit)]
    for buf in made:
        assert buf is not None
        pool.give(buf)
    return pool


def load_pinned(model: StoredModel, piece_size: int = 256 << 20) -> PinnedModel:
    """Read a model into freshly pinned host memory (checksums are checked on the GPU)."""
    out = []
    fds = [open_data(model, f) for f in model.manifest.files]
    try:
        for p in pieces(model, piece_size, decoded=True):
            buf = torch.empty(p.length, dtype=torch.uint8, pin_memory=True)
            f = model.manifest.files[p.file]
            if f.encoding is None:
                n = native.pread_into(fds[p.file], buf.data_ptr(), p.length, p.offset, 8,
                                      8 << 20)
            else:
                n, sums = read_verify(model, f, fds[p.file], buf.data_ptr(), p.length,
                                      p.offset, 8)
                check_chunks(model, f, p.offset // model.manifest.chunk_size, sums)
            if n != p.length:
                raise CorruptCheckpoint(f"model {model.name}: data file ended early",
                                        hint=reconvert_hint(model))
            out.append((p, buf))
    finally:
        for fd in fds:
            os.close(fd)
    return PinnedModel(model, out)


def pinned_to_gpu(pinned: PinnedModel, device: Any, *, verify: bool = True,
                  copy_size: int = 256 << 20, mapped: bool = False
                  ) -> dict[str, torch.Tensor]:
    """start_pinned_to_gpu in the caller's thread. `mapped`: the GPU memory is mapped piece
    by piece while the copies run (gpu_memory.py) instead of allocated before them."""
    if mapped:
        from gpu_memory import MappedGpuLoad

        load: GpuLoad = MappedGpuLoad(pinned.model, device, verify)
    else:
        load = GpuLoad(pinned.model, device, verify)
    return load.run(pinned_source(pinned, copy_size))
