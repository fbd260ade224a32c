"""sllmctl.native's reads (pread_into, read_verify) on both implementations, against the
bytes of the file and format.checksum_numpy."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from native_twins import (
    IMPLS,
    MiB,
    addr,
    aligned,
    ext,
    needs_native,
    open_direct,
    random_bytes,
    reference,
)

from sllmctl.native import twin


@pytest.fixture
def datafile(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """A file of 5 MiB + 4096 random bytes (a multiple of 4096, not of the chunk sizes)."""
    data = random_bytes(5 * MiB + 4096, seed=7)
    path = tmp_path / "data.bin"
    path.write_bytes(data.tobytes())
    return path, data



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
