"""The in-memory path: a model whose chunks already sit in pinned host memory (the daemon's
DRAM tier) goes to the GPU with copies and checksums only, in copies as large as the memory
allows (neighbouring pieces of one pinned region are merged).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sllmctl.store.datafile import Piece
from sllmctl.store.gpu.copy import GpuLoad, Source
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch


@dataclass
class PinnedModel:
    """A model's data files held in pinned host memory, as chunk-aligned pieces."""

    model: StoredModel
    pieces: list[tuple[Piece, torch.Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(p.length for p, _ in self.pieces)


def start_pinned_to_gpu(pinned: PinnedModel, device: Any, *, verify: bool = True,
                        copy_size: int = 256 << 20) -> GpuLoad:
    """Copy a pinned model to the GPU in the background, its views available at once (see
    GpuLoad). Pinned pieces must start at chunk boundaries; pieces that continue each other
    in the file and in host memory are copied together, in copies of whole chunks of about
    `copy_size` bytes, so that each can be checksummed alone."""
    load = GpuLoad(pinned.model, device, verify, allocate_now=True)
    return load.start(pinned_source(pinned, copy_size))


def coalesce(pieces: list[tuple[Piece, torch.Tensor]]) -> Iterator[tuple[Piece, torch.Tensor]]:
    """Merge neighbours that continue each other in the same file and the same host memory
    (one storage, consecutive addresses) into single pieces. A generator: the first merged
    piece comes out (and can be copied) before the rest are looked at."""
    import torch

    def merged(run: list[tuple[Piece, torch.Tensor]]) -> tuple[Piece, torch.Tensor]:
        (first, buf), (last, _) = run[0], run[-1]
        if len(run) == 1:
            return first, buf
        n = last.offset + last.length - first.offset
        t = torch.empty(0, dtype=torch.uint8, device=buf.device)
        t.set_(buf.untyped_storage(), buf.storage_offset(), (n,), (1,))
        return Piece(first.file, first.offset, n), t

    run: list[tuple[Piece, torch.Tensor]] = []
    storage = end = 0
    for p, buf in pieces:
        here = buf.untyped_storage().data_ptr()
        if run:
            q = run[-1][0]
            if (q.file == p.file and q.offset + q.length == p.offset and here == storage
                    and buf.data_ptr() == end):
                run.append((p, buf))
                end += p.length
                continue
            yield merged(run)
        run, storage, end = [(p, buf)], here, buf.data_ptr() + p.length
    if run:
        yield merged(run)


def pinned_source(pinned: PinnedModel, copy_size: int, tail: int | None = None
                   ) -> Source:
    """Copies of about `copy_size`, whole chunks each; the last `copy_size` bytes of the load
    go as copies of `tail` bytes (default: a sixteenth), so that little is left to checksum
    once the last copy lands."""
    chunk = pinned.model.manifest.chunk_size
    copy_size = -(-copy_size // chunk) * chunk
    tail = -(-(tail or copy_size // 16) // chunk) * chunk
    left = pinned.nbytes
    for p, buf in coalesce(pinned.pieces):
        off = 0
        while off < p.length:
            n = min(copy_size if left > copy_size else tail, p.length - off)
            yield Piece(p.file, p.offset + off, n), buf[off:off + n], None
            off += n
            left -= n
