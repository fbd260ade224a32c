"""sllmctl.native: the C extension against its Python twin and format.checksum_numpy.

Every function is run on both implementations (the native ones skip themselves when the
extension is not built) and compared byte for byte with the reference.
"""

from __future__ import annotations

import inspect
import threading
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from native_twins import (
    FASTIO,
    FUNCTIONS,
    IMPLS,
    SIZES,
    MiB,
    addr,
    aligned,
    ext,
    needs_native,
    random_bytes,
    reference,
)

from sllmctl import native
from sllmctl.native import twin
from sllmctl.store.format import checksum_numpy

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
