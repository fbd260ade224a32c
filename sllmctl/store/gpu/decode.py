"""Decoding exp3 frames (codec_exp3.py, format version 4) on the GPU, bit-exact with the CPU.

`decode_frame` decodes one frame already in GPU memory with one Triton kernel: a program per
block of 4096 words reads each word's raw byte and its 3 code bits at fixed places, looks
its exponent up in the frame's table, or, for an escape, in the escape list at the block's
stored offset plus a prefix sum of the block's escapes, and writes the 16-bit word. Every
read is bounded by the frame, so a damaged frame decodes to wrong bytes, which the
checksums then name, never to a read outside it.

`FrameDecoder` is the pipeline from pinned host memory: each piece of stored frames is copied
to a GPU staging buffer on the caller's copy stream and decoded on a stream of its own, so
the copy engine never waits for a decode; a ring of staging buffers bounds the memory.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

from sllmctl.store.codec_exp3 import BLOCK, ESCAPE, TABLE, blocks, header_size

if TYPE_CHECKING:
    import torch

STAGES = 3  # staging buffers: one being copied into, one being decoded, one spare


@functools.cache
def _kernel() -> Any:
    """The Triton kernel, compiled on first use (so that importing this module needs no
    Triton); SllmError where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        from sllmctl.errors import SllmError

        raise SllmError("decoding exp3 frames on the GPU needs Triton, which is not installed",
                        hint="python3 -m pip install triton") from None

    @triton.jit
    def exp3_decode(src, dst, m, p, count, BLOCK: tl.constexpr, ESCAPE: tl.constexpr,
                    TABLE: tl.constexpr):
        pid = tl.program_id(0)
        i = pid * BLOCK + tl.arange(0, BLOCK)
        inside = i < m
        r = tl.load(src + i, mask=inside, other=0).to(tl.int32)
        byte = m + (i >> 3)
        bit = i & 7
        c = (tl.load(src + byte, mask=inside, other=0).to(tl.int32) >> bit) & 1
        c |= ((tl.load(src + byte + p, mask=inside, other=0).to(tl.int32) >> bit) & 1) << 1
        c |= ((tl.load(src + byte + 2 * p, mask=inside, other=0).to(tl.int32) >> bit) & 1) << 2
        at = m + 3 * p
        t = tl.load(src + at + c, mask=inside, other=0).to(tl.int32)
        ob = at + TABLE + 4 * pid
        o = (tl.load(src + ob).to(tl.int32) | tl.load(src + ob + 1).to(tl.int32) << 8
             | tl.load(src + ob + 2).to(tl.int32) << 16 | tl.load(src + ob + 3).to(tl.int32) << 24)
        esc = (c == ESCAPE) & inside
        e32 = esc.to(tl.int32)
        k = o + tl.cumsum(e32, axis=0) - e32
        ok = esc & (k >= 0) & (k < count)
        xb = at + TABLE + 4 * tl.cdiv(m, BLOCK)
        x = tl.load(src + xb + k, mask=ok, other=0).to(tl.int32)
        e = tl.where(esc, x, t)
        w = ((r & 0x80) << 8) | (e << 7) | (r & 0x7F)
        tl.store(dst + i, w.to(tl.int16), mask=inside)

    return exp3_decode


def decode_frame(stored: torch.Tensor, n: int, z: int, out: torch.Tensor) -> None:
    """Queue on the current stream the decoding of one frame: `stored` its bytes on the GPU
    (uint8, at least n/2 + z of them, or n for a plain frame), `out` its n decoded bytes."""
    import torch

    if z == 0:
        out.copy_(stored[:n])
        return
    m = n // 2
    count = max(0, z - header_size(m))
    if m % 2048 or len(stored) < m + z:
        raise ValueError(f"not an exp3 frame of {n} bytes: {len(stored)} stored, z = {z}")
    _kernel()[(blocks(m),)](stored, out.view(torch.int16), m, m // 8, count, BLOCK=BLOCK,
                            ESCAPE=ESCAPE, TABLE=TABLE, num_warps=8)


class FrameDecoder:
    """Copies pieces of stored exp3 frames from pinned host memory to one GPU and decodes them
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
