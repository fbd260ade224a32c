"""Encoded pieces on their way to a GPU (codec.py's split-zstd): each split frame's high bytes
are decompressed on the CPU into the pinned buffer past the stored bytes (`split_piece`), and
both planes are copied to the GPU and woven together there (`unsplit`), so the host never
writes the decoded chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.codec import Layout, decompress_into
from sllmctl.store.datafile import reconvert_hint
from sllmctl.store.format import FrameError, align_up
from sllmctl.store.store import StoredModel

if TYPE_CHECKING:
    import torch


@dataclass
class Split:
    """A piece of an encoded data file in host memory, frame by frame (codec.py): (offset in
    the file, length, the low bytes or the whole chunk, the high bytes or None)."""

    frames: list[tuple[int, int, torch.Tensor, torch.Tensor | None]]


def unsplit(buffer: torch.Tensor, split: Split) -> None:
    """Queue on the current stream the copies of an encoded piece's frames into `buffer` (its
    data file's memory): a plain frame straight to its place, a split one as its two planes
    into a staging buffer and from there woven into place. The staging memory is reused by
    the next frame once this one's weave is done, in stream order."""
    import torch

    for off, n, a, b in split.frames:
        dst = buffer[off:off + n]
        if b is None:
            dst.copy_(a, non_blocking=True)
            continue
        h = n // 2
        stage = torch.empty(n, dtype=torch.uint8, device=buffer.device)
        stage[:h].copy_(a, non_blocking=True)
        stage[h:].copy_(b, non_blocking=True)
        dst.view(h, 2).copy_(stage.view(2, h).t())


def split_piece(model: StoredModel, offset: int, length: int, buf: torch.Tensor, start: int,
                layout: Layout) -> Split:
    """A piece's frames, read from disk into `buf` (from byte `start` of the file), made
    ready for the GPU: each split frame's high bytes are decompressed into `buf` past the
    stored bytes. CorruptCheckpoint names a frame that does not decode."""
    out: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []
    spare = length  # stored bytes never exceed the logical ones; the high planes go after
    for i, n, at, z in layout.frames(offset, length):
        rel = at - start
        if z == 0:
            out.append((i * layout.chunk, n, buf[rel:rel + n], None))
            continue
        h = n // 2
        hi = buf[spare:spare + h]
        try:
            if buf[rel + h + z:rel + align_up(h + z)].any():
                raise FrameError("its padding is not zero")
            decompress_into(buf[rel + h:rel + h + z].numpy(), hi.numpy())
        except FrameError as e:
            raise CorruptCheckpoint(
                f"model {model.name}: data file {layout.file.path} chunk {i} does not "
                f"decode ({e})", hint=reconvert_hint(model)) from None
        out.append((i * layout.chunk, n, buf[rel:rel + h], hi))
        spare += h
    return Split(out)
