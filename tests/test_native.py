"""sllmctl.native: the C extension against its Python twin and format.checksum_numpy.

Every function is run on both implementations (the native ones skip themselves when the
extension is not built) and compared byte for byte with the reference.
"""

from __future__ import annotations

import errno
import importlib
import inspect
import os
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from sllmctl import native
from sllmctl.native import twin
from sllmctl.store.format import checksum_numpy

FASTIO: ModuleType | None = (
    importlib.import_module("sllmctl.native._fastio") if native.NATIVE else None
)
needs_native = pytest.mark.skipif(FASTIO is None, reason=f"no extension: {native.why_not}")


def ext() -> ModuleType:
    """The extension, in tests marked needs_native."""
    assert FASTIO is not None
    return FASTIO


IMPLS = [
    pytest.param(twin, id="twin"),
    pytest.param(FASTIO, id="native", marks=needs_native),
]
FUNCTIONS = ["checksum", "checksums", "pread_into", "read_verify"]
MiB = 1 << 20
SIZES = [0, 8, 16, 4088, 4096, 4104, 4096 * 512 + 8, 33 * MiB + 8, 33 * MiB - 8 * 1001]


def random_bytes(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def aligned(n: int, align: int = 4096, shift: int = 0) -> np.ndarray:
    """n zero bytes whose address is `shift` past a multiple of `align`."""
    raw = np.zeros(n + align + shift, dtype=np.uint8)
    start = -raw.ctypes.data % align + shift
    return raw[start : start + n]


def addr(a: np.ndarray) -> int:
    return int(a.ctypes.data)


def reference(data: Any, chunk: int) -> list[str]:
    """format.checksum_numpy per chunk; a ragged last word is zero-extended."""
    out = []
    for s in range(0, len(data), chunk):
        piece = bytes(data[s : s + chunk])
        out.append(checksum_numpy(piece + bytes(-len(piece) % 8)))
    return out


@pytest.fixture
def datafile(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A file of 5 MiB + 4096 random bytes (a multiple of 4096, not of the chunk sizes)."""
    data = random_bytes(5 * MiB + 4096, seed=7)
    path = tmp_path / "data.bin"
    path.write_bytes(data.tobytes())
    return path, data


def open_direct(path: Path) -> int:
    """An O_DIRECT fd for path, or skip where the filesystem refuses O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        pytest.skip("no O_DIRECT on this platform")
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError as e:
        if e.errno == errno.EINVAL:
            pytest.skip(f"{path.parent} does not support O_DIRECT")
        raise


# ---------------------------------------------------------------- the package


def test_package_says_which_implementation() -> None:
    assert isinstance(native.NATIVE, bool)
    if native.NATIVE:
        assert native.why_not == ""
        assert native.checksum is ext().checksum
    else:
        assert native.why_not
        assert "\n" not in native.why_not
        assert native.checksum is twin.checksum


@needs_native
@pytest.mark.parametrize("name", FUNCTIONS)
def test_signatures_match(name: str) -> None:
    ours = inspect.signature(getattr(FASTIO, name)).parameters
    theirs = inspect.signature(getattr(twin, name)).parameters
    assert [(p.name, p.default) for p in ours.values()] == [
        (p.name, p.default) for p in theirs.values()
    ]
    assert ext().ABI == twin.ABI


# ---------------------------------------------------------------- checksums


def test_known_answers() -> None:
    ones = np.ones(1024, dtype="<u8")  # two pages of 512: P = 512, 512
    assert twin.checksum(addr(ones), ones.nbytes) == f"{1024:016x}{512 + 2 * 512:016x}"
    full = np.full(513, 2**64 - 1, dtype="<u8")  # P0 = -512, P1 = -1 (mod 2**64)
    s1, s2 = (-513) % 2**64, (-512 - 2) % 2**64
    assert twin.checksum(addr(full), full.nbytes) == f"{s1:016x}{s2:016x}"
    assert checksum_numpy(full.tobytes()) == f"{s1:016x}{s2:016x}"
    assert twin.checksum(0, 0) == "0" * 32


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES)
def test_checksum_matches_reference(impl: ModuleType, size: int) -> None:
    data = random_bytes(size, seed=size)
    assert impl.checksum(addr(data), size) == checksum_numpy(data)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shift", [1, 3, 8])
def test_checksum_unaligned_address(impl: ModuleType, shift: int) -> None:
    buf = aligned(4096 * 3 + 64, shift=shift)
    buf[:] = random_bytes(len(buf), seed=shift)
    assert impl.checksum(addr(buf), len(buf)) == checksum_numpy(buf.tobytes())


@pytest.mark.parametrize("impl", IMPLS)
def test_checksum_wraps_mod_2_64(impl: ModuleType) -> None:
    data = np.full(4096 * 512 // 8 + 5, 2**64 - 3, dtype="<u8")
    assert impl.checksum(addr(data), data.nbytes) == checksum_numpy(data.tobytes())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("size", "chunk"),
    [
        (0, 8),
        (8, 8),
        (4096 * 5, 4096),
        (4096 * 5 + 24, 4096),
        (33 * MiB + 8, 16 * MiB),
        (MiB, 3 * 4096 + 8),
        (4096, MiB),
    ],
)
def test_checksums_per_chunk(impl: ModuleType, size: int, chunk: int) -> None:
    data = random_bytes(size, seed=size + chunk)
    assert impl.checksums(addr(data), size, chunk) == reference(data, chunk)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m, a: m.checksum(a, 12), "multiple of 8"),
        (lambda m, a: m.checksum(a, -8), "length"),
        (lambda m, a: m.checksum(-1, 8), "addr"),
        (lambda m, a: m.checksum(0, 8), "NULL"),
        (lambda m, a: m.checksums(a, 16, 0), "chunk_size"),
        (lambda m, a: m.checksums(a, 16, 12), "chunk_size"),
        (lambda m, a: m.pread_into(0, a, 8, -1), "offset"),
        (lambda m, a: m.pread_into(0, a, 8, 0, threads=0), "threads"),
        (lambda m, a: m.pread_into(0, a, 8, 0, piece=0), "piece"),
        (lambda m, a: m.read_verify(0, a, 8, 0, 8, 0), "threads"),
    ],
)
def test_bad_arguments(impl: ModuleType, call: Any, message: str) -> None:
    buf = np.zeros(64, dtype=np.uint8)
    with pytest.raises(ValueError, match=message):
        call(impl, addr(buf))


@needs_native
def test_native_checksum_is_thread_safe() -> None:
    data = random_bytes(8 * MiB, seed=3)
    want = checksum_numpy(data)
    got: list[str] = []

    def run() -> None:
        got.extend(ext().checksum(addr(data), data.nbytes) for _ in range(4))

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [want] * 16


# ---------------------------------------------------------------- reads


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("offset", "length", "threads", "piece"),
    [
        (0, 5 * MiB + 4096, 1, 8 * MiB),
        (0, 5 * MiB + 4096, 4, MiB),
        (4096, 3 * MiB, 3, 64 * 1024 + 8),  # pieces that do not divide the length
        (13, 1001, 2, 100),  # buffered reads need no alignment
        (0, 0, 4, MiB),
    ],
)
def test_pread_into(
    impl: ModuleType,
    datafile: tuple[Path, np.ndarray],
    offset: int,
    length: int,
    threads: int,
    piece: int,
) -> None:
    path, data = datafile
    buf = np.full(length + 16, 0xAB, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = impl.pread_into(fd, addr(buf), length, offset, threads=threads, piece=piece)
    finally:
        os.close(fd)
    assert n == length
    assert np.array_equal(buf[:length], data[offset : offset + length])
    assert (buf[length:] == 0xAB).all()  # nothing written past the end


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("threads", [1, 3])
def test_pread_into_short_at_eof(
    impl: ModuleType, datafile: tuple[Path, np.ndarray], threads: int
) -> None:
    path, data = datafile
    size = len(data)
    buf = np.zeros(4 * MiB, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        n = impl.pread_into(fd, addr(buf), len(buf), size - MiB - 100, threads, 256 * 1024)
        assert n == MiB + 100
        assert np.array_equal(buf[:n], data[size - n :])
        assert impl.pread_into(fd, addr(buf), len(buf), size, threads) == 0
        assert impl.pread_into(fd, addr(buf), len(buf), size + 10 * MiB, threads) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ragged", [0, 100])
def test_pread_into_o_direct(impl: ModuleType, tmp_path: Path, ragged: int) -> None:
    data = random_bytes(3 * MiB + ragged, seed=ragged)
    path = tmp_path / "direct.bin"
    path.write_bytes(data.tobytes())
    fd = open_direct(path)
    try:
        buf = aligned(4 * MiB)
        n = impl.pread_into(fd, addr(buf), len(buf), 0, threads=4, piece=256 * 1024)
        assert n == len(data)
        assert np.array_equal(buf[:n], data)
        n = impl.pread_into(fd, addr(buf), MiB, 2 * MiB, threads=2, piece=64 * 1024)
        assert n == MiB
        assert np.array_equal(buf[:n], data[2 * MiB : 3 * MiB])
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_pread_into_o_direct_misaligned_raises(impl: ModuleType, tmp_path: Path) -> None:
    path = tmp_path / "direct.bin"
    path.write_bytes(bytes(64 * 1024))
    fd = open_direct(path)
    try:
        buf = aligned(64 * 1024 + 8, shift=8)
        with pytest.raises(OSError, match=os.strerror(errno.EINVAL)) as e:
            impl.pread_into(fd, addr(buf), 64 * 1024, 0)
        assert e.value.errno == errno.EINVAL
    finally:
        os.close(fd)


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_fd_raises_oserror(impl: ModuleType, tmp_path: Path) -> None:
    buf = np.zeros(4096, dtype=np.uint8)
    fd = os.open(tmp_path / "gone", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    calls: list[Callable[[], object]] = [
        lambda: impl.pread_into(fd, addr(buf), 4096, 0),
        lambda: impl.read_verify(fd, addr(buf), 4096, 0, 4096, 2),
        lambda: impl.pread_into(fd, addr(buf), 0, 0),
    ]
    for call in calls:
        with pytest.raises(OSError, match=os.strerror(errno.EBADF)) as e:
            call()
        assert e.value.errno == errno.EBADF
    dfd = os.open(tmp_path, os.O_RDONLY)  # a directory: fstat works, pread fails
    try:
        with pytest.raises(OSError, match=os.strerror(errno.EISDIR)) as e:
            impl.pread_into(dfd, addr(buf), 4096, 0, threads=2, piece=1024)
        assert e.value.errno == errno.EISDIR
    finally:
        os.close(dfd)
    r, w = os.pipe()  # not seekable
    try:
        with pytest.raises(OSError, match=os.strerror(errno.ESPIPE)) as e:
            impl.read_verify(r, addr(buf), 4096, 0, 1024, 2)
        assert e.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    ("offset", "length", "chunk", "threads"),
    [
        (0, 5 * MiB + 4096, MiB, 2),
        (0, 5 * MiB + 4096, 2 * MiB, 1),  # last chunk shorter
        (MiB, 2 * MiB + 4096, 4096 * 3, 3),
        (0, 5 * MiB + 4096, 16 * MiB, 4),  # one chunk, longer than the read
        (0, 0, MiB, 2),
    ],
)
def test_read_verify(
    impl: ModuleType,
    datafile: tuple[Path, np.ndarray],
    offset: int,
    length: int,
    chunk: int,
    threads: int,
) -> None:
    path, data = datafile
    buf = np.zeros(length, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        n, sums = impl.read_verify(fd, addr(buf), length, offset, chunk, threads)
    finally:
        os.close(fd)
    assert n == length
    assert np.array_equal(buf, data[offset : offset + length])
    assert sums == reference(data[offset : offset + length], chunk)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("tail", [0, 4096 * 5, 4096 * 5 + 8, 4096 + 3])
def test_read_verify_short_at_eof(impl: ModuleType, tmp_path: Path, tail: int) -> None:
    """The file ends inside the range: the chunks holding data are summed, ragged or not."""
    data = random_bytes(2 * MiB + tail, seed=tail)
    path = tmp_path / "short.bin"
    path.write_bytes(data.tobytes())
    buf = np.zeros(4 * MiB, dtype=np.uint8)
    fd = os.open(path, os.O_RDONLY)
    try:
        n, sums = impl.read_verify(fd, addr(buf), len(buf), 0, MiB, 3)
    finally:
        os.close(fd)
    assert n == len(data)
    assert np.array_equal(buf[:n], data)
    assert sums == reference(data, MiB)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("ragged", [0, 4096 + 100])
def test_read_verify_o_direct(impl: ModuleType, tmp_path: Path, ragged: int) -> None:
    data = random_bytes(3 * MiB + ragged, seed=ragged + 1)
    path = tmp_path / "direct.bin"
    path.write_bytes(data.tobytes())
    fd = open_direct(path)
    try:
        buf = aligned(4 * MiB)
        n, sums = impl.read_verify(fd, addr(buf), len(buf), 0, MiB, 3)
        assert (n, sums) == (len(data), reference(data, MiB))
        assert np.array_equal(buf[:n], data)
        n, sums = impl.read_verify(fd, addr(buf), 2 * MiB, MiB, 512 * 1024, 2)
        assert (n, sums) == (2 * MiB, reference(data[MiB : 3 * MiB], 512 * 1024))
    finally:
        os.close(fd)


@needs_native
def test_native_and_twin_agree_on_a_larger_file(tmp_path: Path) -> None:
    """The two implementations over one 40 MiB file, default piece size, many threads."""
    data = random_bytes(40 * MiB + 4096, seed=11)
    path = tmp_path / "big.bin"
    path.write_bytes(data.tobytes())
    fd = os.open(path, os.O_RDONLY)
    try:
        results = []
        for impl in (ext(), twin):
            buf = np.zeros(len(data), dtype=np.uint8)
            results.append(impl.read_verify(fd, addr(buf), len(buf), 0, 16 * MiB, 4))
            assert np.array_equal(buf, data)
            buf[:] = 0
            assert impl.pread_into(fd, addr(buf), len(buf), 0, 4) == len(data)
            assert np.array_equal(buf, data)
    finally:
        os.close(fd)
    assert results[0] == results[1] == (len(data), reference(data, 16 * MiB))
