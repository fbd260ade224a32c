"""The DRAM tier keeping a model compressed: its data files held in pinned memory as stored
(exp23 frames), copied to a GPU and decoded there (decode.py), checksummed after decoding."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sllmctl.store.gpu.decode import Coded, coded_piece

if TYPE_CHECKING:
    import torch

    from sllmctl.store.datafile import Piece
    from sllmctl.store.store import StoredModel


@dataclass
class PinnedCoded:
    """A model's data files held in pinned host memory as stored (exp23 frames; a plain file
    as plain frames), in pieces of whole frames: the DRAM tier keeping a model compressed."""

    model: StoredModel
    pieces: list[tuple[Piece, Coded]]

    @property
    def nbytes(self) -> int:
        """Host bytes held (the stored size, not the decoded one)."""
        return sum(c.host.numel() for _, c in self.pieces)


def coded_pieces(model: StoredModel, size: int = 64 << 20) -> list[tuple[Piece, int, int]]:
    """(piece, first stored byte, end) per piece of at most `size` stored bytes, whole chunks
    (one chunk at least)."""
    from sllmctl.store.codec import Layout
    from sllmctl.store.datafile import Piece

    chunk = model.manifest.chunk_size
    out = []
    for i, f in enumerate(model.manifest.files):
        starts = (Layout(f, chunk).starts.tolist() if f.encoding is not None
                  else [min(k * chunk, f.size) for k in range(-(-f.size // chunk) + 1)])
        first = 0
        for k in range(1, len(starts)):
            last = k == len(starts) - 1
            if last or starts[k + 1] - starts[first] > size:
                out.append((Piece(i, first * chunk, min(k * chunk, f.size) - first * chunk),
                            int(starts[first]), int(starts[k])))
                first = k
    return out


def load_pinned_coded(model: StoredModel, size: int = 64 << 20,
                      pin: bool = True) -> PinnedCoded:
    """Read a model's data files as stored into freshly pinned host memory (`pin` False:
    pageable, for hosts without CUDA); checksums are checked on the GPU after decoding."""
    import torch

    from sllmctl import native
    from sllmctl.errors import CorruptCheckpoint
    from sllmctl.store.codec import Layout
    from sllmctl.store.datafile import open_data, reconvert_hint

    chunk = model.manifest.chunk_size
    out = []
    fds = [open_data(model, f) for f in model.manifest.files]
    try:
        for p, start, end in coded_pieces(model, size):
            f = model.manifest.files[p.file]
            buf = torch.empty(end - start, dtype=torch.uint8, pin_memory=pin)
            if native.pread_into(fds[p.file], buf.data_ptr(), end - start, start, 8,
                                 8 << 20) != end - start:
                raise CorruptCheckpoint(f"model {model.name}: data file {f.path} ended early",
                                        hint=reconvert_hint(model))
            if f.encoding is None:
                frames = [(off - p.offset, off, min(chunk, f.size - off), 0)
                          for off in range(p.offset, p.offset + p.length, chunk)]
                out.append((p, Coded(buf, frames)))
            else:
                out.append((p, coded_piece(Layout(f, chunk), p.offset, p.length, buf, start)))
    finally:
        for fd in fds:
            os.close(fd)
    return PinnedCoded(model, out)


def coded_to_gpu(pinned: PinnedCoded, device: Any, *, verify: bool = True
                 ) -> dict[str, torch.Tensor]:
    """A model held compressed in pinned memory to one GPU: its stored bytes copied, decoded
    there and checksummed after decoding (GpuLoad)."""
    from sllmctl.store.gpu.copy import GpuLoad

    return GpuLoad(pinned.model, device, verify).run(
        (p, c, None) for p, c in pinned.pieces)


def start_coded_to_gpu(pinned: PinnedCoded, device: Any, *, verify: bool = True) -> Any:
    """`coded_to_gpu` in the background, views available at once (GpuLoad.start)."""
    from sllmctl.store.gpu.copy import GpuLoad

    return GpuLoad(pinned.model, device, verify, allocate_now=True).start(
        (p, c, None) for p, c in pinned.pieces)
