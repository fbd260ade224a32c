"""Compressed data files, encoding "split-zstd": fewer bytes to read from a slow disk.

In a little-endian bf16 or fp16 weight, the high byte of each 16-bit word holds the sign and
most of the exponent, and the low byte the mantissa. The exponents of a weight matrix take
few values, so the plane of high bytes compresses to about a third of its size with zstd at
level 1, while the plane of low bytes is close to random and is stored as is: the file shrinks
by about 30 %, and a load that waits on the disk finishes that much sooner.

A data file is stored frame by frame, one frame per checksum chunk:

    split frame: [the chunk's low bytes: n/2][zstd frame of its high bytes][zeros to ALIGNMENT]
    plain frame: the chunk's n bytes as they are (where splitting would not save a block)

so every frame starts at an ALIGNMENT boundary and a run of frames is one O_DIRECT read. The
manifest lists each frame's compressed length (0 for a plain frame); the checksums stay those
of the chunk's own bytes, so a decoded chunk is checked against the same sums as an
uncompressed one. The GPU loader copies the two planes of a split frame to the GPU and weaves
them there; `read_into` decodes on the CPU (the CPU path, `verify`, the DRAM tier).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from sllmctl.store.format import DataFile, FrameError, align_up

ENCODING = "split-zstd"
LEVEL = 1  # zstd level: higher levels save about 1 % more of a plane and compress 2-4x slower
UNDECODABLE = "undecodable"  # the checksum reported for a frame that does not decode


# ---------------------------------------------------------------- layout

class Layout:
    """Where each chunk of an encoded data file lies on disk."""

    def __init__(self, f: DataFile, chunk: int) -> None:
        assert f.frames is not None
        self.file, self.chunk = f, chunk
        self.starts = np.concatenate(([0], np.cumsum(f.frame_lengths(chunk)))).astype(np.int64)

    def stored_range(self, offset: int, length: int) -> tuple[int, int]:
        """The bytes on disk holding chunks [offset, offset + length) (chunk-aligned start)."""
        first, last = offset // self.chunk, -(-(offset + length) // self.chunk)
        return int(self.starts[first]), int(self.starts[last])

    def frames(self, offset: int, length: int) -> list[tuple[int, int, int, int]]:
        """(chunk index, logical length, offset on disk, compressed length or 0) for each
        chunk of [offset, offset + length)."""
        first, last = offset // self.chunk, -(-(offset + length) // self.chunk)
        assert self.file.frames is not None
        return [(i, min(self.chunk, self.file.size - i * self.chunk), int(self.starts[i]),
                 self.file.frames[i]) for i in range(first, last)]


# ---------------------------------------------------------------- encoding

def encoder(compress: bool | str) -> tuple[str, Callable[[np.ndarray], tuple[int, list[Any]]]]:
    """(encoding, chunk encoder) for `convert(compress=...)`: True is ENCODING, or a name
    ("split-zstd", "exp23": codec_exp23.py)."""
    name = ENCODING if compress is True else compress
    if name == "exp23":
        from sllmctl.store import codec_exp23

        return name, codec_exp23.encode_chunk
    if name != ENCODING:
        raise ValueError(f"unknown encoding {name!r}")
    return name, encode_chunk


def _zstd() -> Any:
    """The zstandard module, or a one-line error saying how to get it."""
    try:
        import zstandard
    except ImportError:
        from sllmctl.errors import SllmError

        raise SllmError("compressed models need the zstandard package, which is not installed",
                        hint="python3 -m pip install zstandard") from None
    return zstandard


def encode_chunk(data: np.ndarray) -> tuple[int, list[Any]]:
    """(compressed length or 0, the frame's bytes in parts) for one chunk of even length."""
    zstandard = _zstd()
    n = len(data)
    pairs = data.reshape(-1, 2)
    z = zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(
        np.ascontiguousarray(pairs[:, 1]).data)
    stored = align_up(n // 2 + len(z))
    if stored >= n:
        return 0, [data]
    return len(z), [np.ascontiguousarray(pairs[:, 0]), z, bytes(stored - n // 2 - len(z))]


# ---------------------------------------------------------------- decoding

def decompress_into(src: Any, dst: Any) -> None:
    """Decompress the zstd frame in `src` into all of `dst` (writable buffers); FrameError
    if it does not hold exactly len(dst) bytes."""
    zstandard = _zstd()
    out = memoryview(dst).cast("B")
    want = len(out)
    try:
        with zstandard.ZstdDecompressor().stream_reader(src) as r:
            got = 0
            while got < want:
                k = r.readinto(out[got:])
                if not k:
                    break
                got += k
            extra = r.read(1) if got == want else b""
    except zstandard.ZstdError as e:
        raise FrameError(f"zstd: {e}") from None
    if got != want or extra:
        raise FrameError(f"decodes to {'more than ' if extra else ''}{got} bytes, not {want}")


def weave(lo: np.ndarray, hi: np.ndarray, out: np.ndarray) -> None:
    """out[2i] = lo[i], out[2i + 1] = hi[i] (the CPU twin of the GPU's weave)."""
    words = out.view(np.uint16)  # little-endian: the high byte is the second
    np.left_shift(hi, 8, out=words, dtype=np.uint16)
    np.bitwise_or(words, lo, out=words)


def decode_frame(stored: np.ndarray, n: int, z: int, out: np.ndarray) -> None:
    """A frame's `n` bytes into `out`, from its bytes on disk (`stored`)."""
    if z == 0:
        out[:] = stored[:n]
        return
    h = n // 2
    if stored[h + z:].any():
        raise FrameError("its padding is not zero")
    hi = np.empty(h, dtype=np.uint8)
    decompress_into(stored[h:h + z], hi)
    weave(stored[:h], hi, out)


def read_into(fd: int, f: DataFile, chunk: int, offset: int, length: int, out: np.ndarray,
              threads: int) -> tuple[int, list[str]]:
    """Read and decode chunks [offset, offset + length) of an encoded data file into `out`;
    (logical bytes read, the checksum of each chunk read). A chunk cut short by the end of
    the file ends the count; one that does not decode gets the checksum UNDECODABLE."""
    from sllmctl import native

    layout = Layout(f, chunk)
    frames = layout.frames(offset, length)
    decode = decode_frame
    if f.encoding == "exp23":
        from sllmctl.store import codec_exp23

        decode = codec_exp23.decode_frame

    def one(fr: tuple[int, int, int, int]) -> tuple[int, str]:
        i, n, at, z = fr
        size = int(layout.starts[i + 1]) - at
        stored = np.empty(size, dtype=np.uint8)
        got = native.pread_into(fd, stored.ctypes.data, size, at, 1)
        if got != size:
            return 0, ""
        dst = out[i * chunk - offset:i * chunk - offset + n]
        try:
            decode(stored, n, z, dst)
        except FrameError:
            return n, UNDECODABLE
        return n, native.checksum(dst.ctypes.data, n)

    with ThreadPoolExecutor(max(1, min(threads, len(frames)))) as ex:
        results = list(ex.map(one, frames))
    read, sums = 0, []
    for n, s in results:
        if not s:
            break
        read += n
        sums.append(s)
    return read, sums
