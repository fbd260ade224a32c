"""Compressed data files, encoding "exp3" (format version 4): decoded on the GPU at HBM speed.

A bf16 weight is a sign bit, an 8-bit exponent and 7 mantissa bits. The sign and mantissa are
close to random; the exponent takes few values (2.5 bits of entropy for `randn * 0.02`, about
2.6 for trained Llama weights by DFloat11's count), and seven of them cover about 98 % of a
weight matrix. So each 16-bit word is split into a raw byte, its sign and mantissa, and its
exponent, coded in 3 bits: a code of 0-6 names one of the chunk's seven commonest exponents,
7 is an escape whose exponent is stored as a byte in a list. That is about 11.2 bits a
weight (70 %), near DFloat11's Huffman code (about 11), and every word decodes on its own:
its 3 bits are at a fixed place, and its escape's place in the list is the block's offset
(stored) plus the escapes before it in its block (a prefix sum). The GPU decodes a frame in
one pass (gpu/decode.py); this module is the encoder and the CPU twin.

A frame, for a chunk of n bytes (m = n/2 little-endian 16-bit words w[i]):

    [r: m bytes][plane 0, 1, 2: m/8 bytes each][table: 8 bytes][offsets: 4 * ceil(m/4096)]
    [escapes: E bytes][zeros to ALIGNMENT]

with r[i] = (w[i] >> 8 & 0x80) | (w[i] & 0x7f), e[i] = w[i] >> 7 & 0xff, code c[i] = k where
e[i] == table[k] (k < 7), else 7; bit b of c[i] is bit i % 8 of byte i // 8 of plane b;
offsets[j] (uint32) counts the escapes among words [0, 4096 j), and the escapes are the e[i]
of the words coded 7, in order. The manifest's frame length z is everything after r (so a
frame is stored in align_up(n/2 + z) bytes, as in split-zstd); 0 means a plain frame.
docs/format-v4.md is the specification.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sllmctl.store.codec import FrameError
from sllmctl.store.format import align_up

ENCODING = "exp3"
FORMAT_VERSION = 4  # the first version that may hold exp3 files
BLOCK = 4096  # words per escape offset (and per GPU program)
CODES = 7  # exponents with a short code; code 7 is the escape
ESCAPE = 7
TABLE = 8  # bytes: the 7 exponents and one reserved zero byte


def blocks(m: int) -> int:
    return -(-m // BLOCK)


def header_size(m: int) -> int:
    """Bytes of a frame after r and before the escapes: the planes, table and offsets."""
    return 3 * (m // 8) + TABLE + 4 * blocks(m)


def split_words(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r, e): each 16-bit word's sign-and-mantissa byte and its exponent byte."""
    w = data.view("<u2")
    r = ((w >> 8) & 0x80 | (w & 0x7F)).astype(np.uint8)
    e = ((w >> 7) & 0xFF).astype(np.uint8)
    return r, e


def encode_chunk(data: np.ndarray) -> tuple[int, list[Any]]:
    """(z, the frame's bytes in parts) for one chunk whose length is a multiple of 16;
    z = 0 and the chunk itself where coding would not save a block."""
    n = len(data)
    m = n // 2
    r, e = split_words(data)
    counts = np.bincount(e, minlength=256)
    table = np.argsort(-counts, kind="stable")[:CODES].astype(np.uint8)
    lut = np.full(256, ESCAPE, dtype=np.uint8)
    lut[table] = np.arange(CODES, dtype=np.uint8)
    c = lut[e]
    escaped = c == ESCAPE
    escapes = e[escaped]
    z = header_size(m) + len(escapes)
    stored = align_up(m + z)
    if stored >= n:
        return 0, [data]
    planes = [np.packbits((c >> b) & 1, bitorder="little") for b in range(3)]
    per_block = np.add.reduceat(escaped.astype(np.uint32), np.arange(0, m, BLOCK))
    offsets = np.zeros(blocks(m), dtype="<u4")
    np.cumsum(per_block[:-1], out=offsets[1:])
    head = np.zeros(TABLE, dtype=np.uint8)
    head[:CODES] = table
    return z, [r, *planes, head, offsets, escapes, bytes(stored - m - z)]


def decode_frame(stored: np.ndarray, n: int, z: int, out: np.ndarray) -> None:
    """A frame's n decoded bytes into `out` (uint8, n bytes) from its stored bytes; FrameError
    where the escapes or offsets do not match the codes."""
    if z == 0:
        out[:] = stored[:n]
        return
    m = n // 2
    count = z - header_size(m)
    if count < 0 or len(stored) < m + z:
        raise FrameError(f"exp3 frame of {z} coded bytes is too short for {n} bytes")
    p = m // 8
    c = np.zeros(m, dtype=np.uint8)
    for b in range(3):
        plane = stored[m + b * p:m + (b + 1) * p]
        c |= np.unpackbits(plane, bitorder="little") << b
    at = m + 3 * p
    table = stored[at:at + TABLE].copy()
    offsets = stored[at + TABLE:at + TABLE + 4 * blocks(m)].view("<u4")
    escapes = stored[m + header_size(m):m + z]
    escaped = c == ESCAPE
    if int(escaped.sum()) != count:
        raise FrameError(f"exp3 frame codes {int(escaped.sum())} escapes, stores {count}")
    per_block = np.add.reduceat(escaped.astype(np.uint32), np.arange(0, m, BLOCK))
    want = np.zeros(blocks(m), dtype=np.uint32)
    np.cumsum(per_block[:-1], out=want[1:])
    if not np.array_equal(offsets, want):
        raise FrameError("exp3 frame's escape offsets do not match its codes")
    e = table[c]
    e[escaped] = escapes
    r = stored[:m]
    w = out.view("<u2")
    np.left_shift(r & 0x80, 8, out=w, dtype=np.uint16)
    w |= e.astype(np.uint16) << 7
    w |= r & 0x7F
