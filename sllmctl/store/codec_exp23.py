"""Compressed data files, encoding "exp23" (format version 4): decoded on the GPU at HBM speed.

A bf16 weight is a sign bit, an 8-bit exponent and 7 mantissa bits. The sign and mantissa are
close to random; the exponent takes few values (2.5 bits of entropy for `randn * 0.02`, about
2.6 for trained Llama weights by DFloat11's count). So each 16-bit word is split into a raw
byte, its sign and mantissa, and its exponent, coded in two levels of fixed width: 2 bits
name one of the chunk's three commonest exponents (about 73 % of the words) or say "look
further" (code 3); the words that look further get 3 more bits in a second list, naming one of
the next seven exponents or an escape (code 7), whose exponent is a byte in a third list.
That is about 10.9 bits a weight (68 %; DFloat11's Huffman code: 67.8 % for Llama-3.1-8B),
and every word decodes on its own: its 2 bits are at a fixed place, and its places in the
second and third lists are its block's stored offsets plus prefix sums over the block. The
GPU decodes a frame in one pass (gpu/decode.py); this module is the encoder and the CPU twin.

A frame, for a chunk of n bytes (m = n/2 little-endian 16-bit words w[i], B = ceil(m/4096)):

    [r: m][A planes 0, 1: m/8 each][head: 24][offsets: 8 B][C planes 0, 1, 2: ceil(S/8) each]
    [escapes: E][zeros to ALIGNMENT]

r[i] = (w[i] >> 8 & 0x80) | (w[i] & 0x7f) and e[i] = w[i] >> 7 & 0xff. Code a[i] = k where
e[i] == first[k] (k < 3), else 3; the S words with a[i] == 3 get, in order, code c = k where
e == second[k] (k < 7), else 7; the E words coded 7 there have their e in the escapes, in
order. Bit b of a code is bit j % 8 of byte j // 8 of its plane b (j: its index in its
list). The head: first (3 bytes), second (7), 6 zero bytes, S and E (uint32). offsets[2k],
offsets[2k + 1] (uint32): the number of words coded 3, and of escapes, among words
[0, 4096 k). The manifest's frame length z is everything after r (so a frame is stored in
align_up(n/2 + z) bytes, as in split-zstd); 0 means a plain frame. docs/format.md (exp23,
version 4) is the specification.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sllmctl.store.format import FrameError, align_up

ENCODING = "exp23"
BLOCK = 4096  # words per pair of offsets (and per GPU program)
FIRST, SECOND = 3, 7  # exponents with a 2-bit code (3: look further), then a 3-bit one (7: escape)
HEAD = 24  # bytes: first (3), second (7), 6 zero bytes, S and E (uint32)


def blocks(m: int) -> int:
    return -(-m // BLOCK)


def fixed_size(m: int) -> int:
    """Bytes of a frame after r and before the second list: the A planes, head, offsets."""
    return 2 * (m // 8) + HEAD + 8 * blocks(m)


def coded_size(m: int, s: int, e: int) -> int:
    """z for a frame of m words, s of them coded 3, e escapes."""
    return fixed_size(m) + 3 * (-(-s // 8)) + e


def split_words(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(r, e): each 16-bit word's sign-and-mantissa byte and its exponent byte."""
    w = data.view("<u2")
    r = ((w >> 8) & 0x80 | (w & 0x7F)).astype(np.uint8)
    e = ((w >> 7) & 0xFF).astype(np.uint8)
    return r, e


def _planes(codes: np.ndarray, bits: int) -> list[np.ndarray]:
    return [np.packbits((codes >> b) & 1, bitorder="little") for b in range(bits)]


def _before(flags: np.ndarray, m: int) -> np.ndarray:
    """For each block, how many of `flags` (one bool per word) are set before it."""
    full = m // BLOCK
    per = np.zeros(blocks(m), dtype=np.uint32)
    per[:full] = np.count_nonzero(flags[:full * BLOCK].reshape(full, BLOCK), axis=1)
    if len(per) > full:
        per[full] = np.count_nonzero(flags[full * BLOCK:])
    out = np.zeros(len(per), dtype=np.uint32)
    np.cumsum(per[:-1], out=out[1:])
    return out


def encode_chunk(data: np.ndarray) -> tuple[int, list[Any]]:
    """(z, the frame's bytes in parts) for one chunk whose length is a multiple of 16;
    z = 0 and the chunk itself where coding would not save a block."""
    n = len(data)
    m = n // 2
    r, e = split_words(data)
    order = np.argsort(-np.bincount(e, minlength=256), kind="stable").astype(np.uint8)
    first, second = order[:FIRST], order[FIRST:FIRST + SECOND]
    lut = np.full(256, FIRST, dtype=np.uint8)
    lut[first] = np.arange(FIRST, dtype=np.uint8)
    a = lut[e]
    further = a == FIRST
    rest = e[further]
    lut2 = np.full(256, SECOND, dtype=np.uint8)
    lut2[second] = np.arange(SECOND, dtype=np.uint8)
    c = lut2[rest]
    escapes = rest[c == SECOND]
    z = coded_size(m, len(rest), len(escapes))
    stored = align_up(m + z)
    if stored >= n:
        return 0, [data]
    escaped = np.zeros(m, dtype=bool)
    escaped[np.flatnonzero(further)[c == SECOND]] = True
    head = np.zeros(HEAD, dtype=np.uint8)
    head[:FIRST], head[FIRST:FIRST + SECOND] = first, second
    head[16:] = np.array([len(rest), len(escapes)], dtype="<u4").view(np.uint8)
    offsets = np.stack([_before(further, m), _before(escaped, m)], axis=1).astype("<u4")
    return z, [r, *_planes(a, 2), head, offsets, *_planes(c, 3), escapes,
               bytes(stored - m - z)]


def decode_frame(stored: np.ndarray, n: int, z: int, out: np.ndarray) -> None:
    """A frame's n decoded bytes into `out` (uint8, n bytes) from its stored bytes; FrameError
    where its lists or offsets do not match its codes."""
    if z == 0:
        out[:] = stored[:n]
        return
    m = n // 2
    p = m // 8
    at = m + 2 * p
    if z < fixed_size(m) or len(stored) < m + z:
        raise FrameError(f"exp23 frame of {z} coded bytes is too short for {n} bytes")
    head = stored[at:at + HEAD]
    s, count = (int(v) for v in head[16:24].view("<u4"))
    if z != coded_size(m, s, count):
        raise FrameError(f"exp23 frame of {z} coded bytes holds {s} second codes and "
                         f"{count} escapes")
    a = np.unpackbits(stored[m:m + p], bitorder="little")
    a |= np.unpackbits(stored[m + p:at], bitorder="little") << 1
    further = a == FIRST
    at2 = m + fixed_size(m)
    p2 = -(-s // 8)
    c = np.zeros(s, dtype=np.uint8)
    for b in range(3):
        c |= np.unpackbits(stored[at2 + b * p2:at2 + (b + 1) * p2], bitorder="little",
                           count=s) << b
    if int(further.sum()) != s or int((c == SECOND).sum()) != count:
        raise FrameError("exp23 frame's codes do not match its list lengths")
    escaped = np.zeros(m, dtype=bool)
    escaped[np.flatnonzero(further)[c == SECOND]] = True
    offsets = stored[at + HEAD:at2].view("<u4").reshape(-1, 2)
    if not (np.array_equal(offsets[:, 0], _before(further, m))
            and np.array_equal(offsets[:, 1], _before(escaped, m))):
        raise FrameError("exp23 frame's offsets do not match its codes")
    second = np.append(head[FIRST:FIRST + SECOND], 0)
    rest = second[c]
    rest[c == SECOND] = stored[at2 + 3 * p2:m + z]
    e = np.append(head[:FIRST], 0)[a]
    e[further] = rest
    r = stored[:m]
    w = out.view("<u2")
    np.left_shift(r & 0x80, 8, out=w, dtype=np.uint16)
    w |= e.astype(np.uint16) << 7
    w |= r & 0x7F
