"""Decoding exp23 frames (codec_exp23.py, format version 4) on the GPU, bit-exact with the CPU.

`decode_frame` decodes one frame already in GPU memory with one Triton kernel (_kernels.py):
a program per block of 4096 words reads each word's raw byte and 2-bit code at fixed places,
and finds the entries of the words that look further in the second list and the escapes from
the block's stored offsets plus prefix sums over the block. Every read is bounded by the
frame, so a damaged frame decodes to wrong bytes, which the checksums then name, never to a
read outside it.

`FrameDecoder` is the pipeline from pinned host memory: each piece of stored frames is copied
to a GPU staging buffer on the caller's copy stream and decoded on a stream of its own, so
the copy engine never waits for a decode; a ring of staging buffers bounds the memory.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sllmctl.store.codec_exp23 import BLOCK, HEAD, blocks, fixed_size

if TYPE_CHECKING:
    import torch

    from sllmctl.store.codec import Layout

STAGES = 3  # staging buffers: one being copied into, one being decoded, one spare
NUM_WARPS = 8  # per program of BLOCK words


@functools.cache
def _kernel() -> Any:
    """The Triton kernel (_kernels.py), compiled on first use, so that importing this module
    needs no Triton; SllmError where Triton is missing."""
    try:
        from sllmctl.store.gpu import _kernels
    except ImportError:
        from sllmctl.errors import SllmError

        raise SllmError("decoding exp23 frames on the GPU needs Triton, which is not installed",
                        hint="python3 -m pip install triton") from None
    return _kernels.exp23_decode


def decode_frame(stored: torch.Tensor, n: int, z: int, out: torch.Tensor,
                 num_warps: int = NUM_WARPS) -> None:
    """Queue on the current stream the decoding of one frame: `stored` its bytes on the GPU
    (uint8, at least n/2 + z of them, or n for a plain frame), `out` its n decoded bytes. A
    frame too short for its fixed part decodes to zeros (for the checksum to name)."""
    import torch

    if z == 0:
        out.copy_(stored[:n])
        return
    m = n // 2
    if m % 2048 or len(stored) < m + z:
        raise ValueError(f"not an exp23 frame of {n} bytes: {len(stored)} stored, z = {z}")
    if z < fixed_size(m):
        out.zero_()
        return
    _kernel()[(blocks(m),)](stored, out.view(torch.int16), m, m + z, BLOCK=BLOCK, HEAD=HEAD,
                            num_warps=num_warps)


def warm_up(device: Any) -> None:
    """Compile and run the kernel once on `device` (Triton compiles on first use, about a
    second, which a load should not pay)."""
    import numpy as np
    import torch

    from sllmctl.store import codec_exp23

    data = np.zeros(1 << 14, dtype=np.uint8)
    z, parts = codec_exp23.encode_chunk(data)
    stored = np.concatenate([np.frombuffer(memoryview(p).cast("B"), np.uint8) for p in parts])
    out = torch.empty(len(data), dtype=torch.uint8, device=device)
    decode_frame(torch.from_numpy(stored).to(device), len(data), z, out)
    torch.cuda.synchronize(device)


@dataclass
class Coded:
    """A piece of an exp23 data file in pinned host memory, as stored: `host` its bytes,
    `frames` (offset in `host`, offset in the file, decoded length n, z) per frame. GpuLoad
    copies it as is and decodes it on the GPU."""

    host: torch.Tensor
    frames: list[tuple[int, int, int, int]]


def coded_piece(layout: Layout, offset: int, length: int, buf: torch.Tensor,
                start: int) -> Coded:
    """The frames of chunks [offset, offset + length) of an exp23 file, read as stored into
    `buf` from byte `start` of the file."""
    end = layout.stored_range(offset, length)[1]
    frames = [(at - start, i * layout.chunk, n, z) for i, n, at, z in layout.frames(offset, length)]
    return Coded(buf[:end - start], frames)


class FrameDecoder:
    """Copies pieces of stored exp23 frames from pinned host memory to one GPU and decodes them
    there, on a decode stream of its own, through a ring of staging buffers."""

    def __init__(self, device: Any, size: int, stages: int = STAGES) -> None:
        """`size`: the most stored bytes one piece may hold."""
        import torch

        self.device = torch.device(device)
        with torch.cuda.device(self.device):
            self.stream = torch.cuda.Stream(self.device)
            self.stages = [torch.empty(size, dtype=torch.uint8, device=self.device)
                           for _ in range(stages)]
        self._free: list[Any] = [None] * stages
        self._next = 0

    def queue(self, host: torch.Tensor, frames: list[tuple[int, int, int, int]],
              out: torch.Tensor, copy_stream: Any) -> tuple[Any, Any]:
        """Queue one piece: `host` its stored bytes (pinned), `frames` (offset in `host`,
        offset in `out`, decoded length n, z) per frame, `out` the GPU memory it decodes
        into. Returns (copied, decoded): events after which `host` may be reused and `out`
        holds the decoded bytes."""
        import torch

        k = self._next
        self._next = (k + 1) % len(self.stages)
        stage = self.stages[k][:len(host)]
        if len(host) > self.stages[k].numel():
            raise ValueError(f"a piece of {len(host)} stored bytes does not fit a staging "
                             f"buffer of {self.stages[k].numel()}")
        if self._free[k] is not None:  # the stage's last decode must have read it
            copy_stream.wait_event(self._free[k])
        with torch.cuda.stream(copy_stream):
            stage.copy_(host, non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(copy_stream)
        self.stream.wait_event(copied)
        with torch.cuda.stream(self.stream):
            for at, off, n, z in frames:
                decode_frame(stage[at:], n, z, out[off:off + n])
            decoded = torch.cuda.Event()
            decoded.record(self.stream)
        self._free[k] = decoded
        return copied, decoded
