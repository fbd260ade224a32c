"""The Triton kernel of gpu/decode.py (a module of its own: importing it needs Triton).

One program decodes BLOCK words of an exp23 frame (codec_exp23.py): each word's raw byte and
2-bit code at fixed places; for the words coded 3, their places in the second list and, for
its escapes, in the escape list, from the block's stored offsets plus prefix sums over the
block. Every load is masked to the frame's `limit` bytes.
"""

import triton
import triton.language as tl


@triton.jit
def _bits(src, at, j, mask, planes: tl.constexpr, stride):
    """The `planes`-bit codes of entries j of bit planes starting at `at`."""
    byte = at + (j >> 3)
    bit = j & 7
    c = (tl.load(src + byte, mask=mask, other=0).to(tl.int32) >> bit) & 1
    for b in tl.static_range(1, planes):
        c |= ((tl.load(src + byte + b * stride, mask=mask, other=0).to(tl.int32) >> bit)
              & 1) << b
    return c


@triton.jit
def _u32(src, at):
    return (tl.load(src + at).to(tl.int32) | tl.load(src + at + 1).to(tl.int32) << 8
            | tl.load(src + at + 2).to(tl.int32) << 16
            | tl.load(src + at + 3).to(tl.int32) << 24)


@triton.jit
def exp23_decode(src, dst, m, limit, BLOCK: tl.constexpr, HEAD: tl.constexpr):
    pid = tl.program_id(0)
    i = pid * BLOCK + tl.arange(0, BLOCK)
    inside = i < m
    r = tl.load(src + i, mask=inside, other=0).to(tl.int32)
    p = m // 8
    a = _bits(src, m, i, inside, 2, p)
    head = m + 2 * p
    e1 = tl.load(src + head + a, mask=inside & (a < 3), other=0).to(tl.int32)
    s_total = _u32(src, head + 16)
    e_total = _u32(src, head + 20)
    ob = head + HEAD + 8 * pid
    # where this block's entries of the second list and of the escapes begin
    further = (a == 3) & inside
    f = further.to(tl.int32)
    j = _u32(src, ob) + tl.cumsum(f, axis=0) - f
    p2 = (s_total + 7) >> 3
    second = head + HEAD + 8 * tl.cdiv(m, BLOCK)
    ok = further & (j >= 0) & (j < s_total) & (second + 2 * p2 + (j >> 3) < limit)
    c = _bits(src, second, j, ok, 3, p2)
    e2 = tl.load(src + head + 3 + c, mask=ok & (c < 7), other=0).to(tl.int32)
    esc = ok & (c == 7)
    x32 = esc.to(tl.int32)
    k = _u32(src, ob + 4) + tl.cumsum(x32, axis=0) - x32
    at = second + 3 * p2 + k
    x = tl.load(src + at, mask=esc & (k >= 0) & (k < e_total) & (at < limit),
                other=0).to(tl.int32)
    e = tl.where(further, tl.where(esc, x, e2), e1)
    w = ((r & 0x80) << 8) | (e << 7) | (r & 0x7F)
    tl.store(dst + i, w.to(tl.int16), mask=inside)
