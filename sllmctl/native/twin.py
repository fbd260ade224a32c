"""Pure-Python twin of the `_fastio` C extension: the same functions with the same results.

It is the reference the extension is tested against and the fallback where the extension
is not built. Memory is reached through ctypes at a raw address, so callers must keep it
alive (and writable, for the reads) until the call returns, as with the C version.

sum64x2 (docs/format.md): the bytes as little-endian uint64 words in pages of 512 words;
with P_p the sum of page p, s1 = sum(P_p) and s2 = sum((p+1) * P_p), all mod 2**64, written
as 32 hex digits, s1 then s2. The read functions may end on a partial word at a ragged EOF;
its missing bytes count as zeros.
"""

from __future__ import annotations

import ctypes
import operator
import os
import stat
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from typing import TypeVar

import numpy as np

ABI = 1  # must equal _fastio.ABI; bump both when a signature or result changes
PAGE_WORDS = 512
PAGE_BYTES = 8 * PAGE_WORDS
DEFAULT_PIECE = 8 << 20  # bytes per pread in pread_into
MAX_IO = 1 << 30  # bytes per pread call (Linux stops near 2 GiB); 4096-aligned for O_DIRECT
_BLOCK_PAGES = 4096  # pages summed per numpy pass: 16 MiB, bounds the temporaries
_MASK = (1 << 64) - 1

T = TypeVar("T")


class _Cancelled(Exception):
    """A task skipped because an earlier one failed; never seen by callers."""


def checksum(addr: int, length: int) -> str:
    """sum64x2 of `length` bytes at address `addr`; `length` must be a multiple of 8."""
    addr, length, _ = _check(addr, length, 0)
    _check_words(length)
    return _sum64x2(_view(addr, length))


def checksums(addr: int, length: int, chunk_size: int) -> list[str]:
    """One sum64x2 per `chunk_size` bytes at `addr` (the last chunk may be shorter)."""
    addr, length, _ = _check(addr, length, 0)
    _check_words(length)
    _check_chunk(chunk_size)
    mv = _view(addr, length)
    return [_sum64x2(mv[s : s + chunk_size]) for s in range(0, length, chunk_size)]


def pread_into(
    fd: int, addr: int, length: int, offset: int, threads: int = 1, piece: int = DEFAULT_PIECE
) -> int:
    """Read `length` bytes of `fd` at `offset` into memory at `addr`.

    The range is read as `piece`-sized preads shared by `threads` threads. Returns the bytes
    read from the start without a gap: less than `length` only at EOF. Raises OSError.
    """
    addr, length, offset = _check(addr, length, offset)
    if threads < 1:
        raise ValueError("threads must be >= 1")
    if piece < 1:
        raise ValueError("piece must be >= 1")
    eof = _file_end(fd)
    mv = _view(addr, length)
    starts = range(0, length, piece)

    def task(s: int) -> int:
        return _read_full(fd, mv[s : s + piece], offset + s, eof)

    got = _run(threads, task, starts)
    return _contiguous(got, [min(piece, length - s) for s in starts])


def read_verify(
    fd: int, addr: int, length: int, offset: int, chunk_size: int, threads: int
) -> tuple[int, list[str]]:
    """pread_into by `chunk_size` chunks, each summed as it is read.

    Returns (bytes read, sum64x2 of each chunk holding them); a chunk cut short by EOF is
    summed over the bytes read.
    """
    addr, length, offset = _check(addr, length, offset)
    _check_chunk(chunk_size)
    if threads < 1:
        raise ValueError("threads must be >= 1")
    eof = _file_end(fd)
    mv = _view(addr, length)
    starts = range(0, length, chunk_size)

    def task(s: int) -> tuple[int, str]:
        dst = mv[s : s + chunk_size]
        n = _read_full(fd, dst, offset + s, eof)
        return n, _sum64x2(dst[:n])

    done = _run(threads, task, starts)
    total = _contiguous([n for n, _ in done], [min(chunk_size, length - s) for s in starts])
    return total, [h for _, h in done[: -(-total // chunk_size)]]


# ---------------------------------------------------------------- helpers


def _check(addr: int, length: int, offset: int) -> tuple[int, int, int]:
    """The argument checks of _fastio, in the same order with the same messages."""
    addr, length, offset = operator.index(addr), operator.index(length), operator.index(offset)
    if not 0 <= addr <= _MASK:
        raise ValueError("addr must be a non-negative 64-bit address")
    if length < 0:
        raise ValueError("length must be >= 0")
    if offset < 0:
        raise ValueError("offset must be >= 0")
    if addr == 0 and length > 0:
        raise ValueError("addr is NULL")
    return addr, length, offset


def _check_words(length: int) -> None:
    if length % 8:
        raise ValueError("length must be a multiple of 8")


def _check_chunk(chunk_size: int) -> None:
    if chunk_size <= 0 or chunk_size % 8:
        raise ValueError("chunk_size must be a positive multiple of 8")


def _view(addr: int, length: int) -> memoryview:
    """A writable byte view of `length` bytes at `addr`."""
    if length == 0:
        return memoryview(bytearray())
    return memoryview((ctypes.c_char * length).from_address(addr)).cast("B")


def _sum64x2(buf: memoryview) -> str:
    """sum64x2 of `buf`, streamed over blocks of pages like the C loop."""
    if len(buf) % 8:  # ragged EOF: zero-extend the last word
        buf = memoryview(bytes(buf) + bytes(8 - len(buf) % 8))
    words = np.frombuffer(buf, dtype="<u8")
    s1 = s2 = 0
    block = _BLOCK_PAGES * PAGE_WORDS
    for first in range(0, len(words), block):
        part = words[first : first + block]
        full = len(part) // PAGE_WORDS * PAGE_WORDS
        pages = part[:full].reshape(-1, PAGE_WORDS).sum(axis=1, dtype=np.uint64)
        if full < len(part):
            pages = np.append(pages, part[full:].sum(dtype=np.uint64))
        p0 = first // PAGE_WORDS + 1  # 1-based number of this block's first page
        weights = np.arange(p0, p0 + len(pages), dtype=np.uint64)
        with np.errstate(over="ignore"):
            s1 += int(pages.sum(dtype=np.uint64))
            s2 += int((pages * weights).sum(dtype=np.uint64))
    return f"{s1 & _MASK:016x}{s2 & _MASK:016x}"


def _file_end(fd: int) -> int:
    """Size of a regular file, or -1: reads past it are not tried (O_DIRECT would refuse)."""
    st = os.fstat(fd)
    return st.st_size if stat.S_ISREG(st.st_mode) else -1


def _read_full(fd: int, dst: memoryview, offset: int, eof: int) -> int:
    """Fill `dst` from `offset` until it is full, the file ends or pread returns 0."""
    got = 0
    while got < len(dst) and (eof < 0 or offset + got < eof):
        n = os.preadv(fd, [dst[got : got + MAX_IO]], offset + got)  # EINTR retried (PEP 475)
        if n == 0:
            break
        got += n
    return got


def _run(threads: int, task: Callable[[int], T], starts: range) -> list[T]:
    """task(s) for each s on up to `threads` threads; the first failure cancels the rest."""
    if threads == 1 or len(starts) <= 1:
        return [task(s) for s in starts]
    failed = threading.Event()

    def guarded(s: int) -> T:
        if failed.is_set():
            raise _Cancelled
        try:
            return task(s)
        except BaseException:
            failed.set()
            raise

    with ThreadPoolExecutor(min(threads, len(starts)), thread_name_prefix="sllm-pread") as ex:
        futures: list[Future[T]] = [ex.submit(guarded, s) for s in starts]
        wait(futures, return_when=FIRST_EXCEPTION)
        if failed.is_set():
            for f in futures:
                f.cancel()
            wait(futures)
            raise next(e for f in futures if (e := _error(f)) and not isinstance(e, _Cancelled))
        return [f.result() for f in futures]


def _error(f: Future[T]) -> BaseException | None:
    return None if f.cancelled() else f.exception()


def _contiguous(got: list[int], want: list[int]) -> int:
    """Bytes read from the start up to the first short piece."""
    total = 0
    for g, w in zip(got, want, strict=True):
        total += g
        if g < w:
            break
    return total
