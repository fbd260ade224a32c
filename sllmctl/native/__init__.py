"""The loader's hot I/O loop: sum64x2 checksums and parallel preads into raw memory.

Two implementations with the same four functions and the same results: the C extension
`_fastio` (built by setuptools where a C compiler is present; it releases the GIL and sums
at memory bandwidth) and its pure-Python twin `twin` (the reference, and the fallback).

    checksum(addr, length) -> str
    checksums(addr, length, chunk_size) -> list[str]
    pread_into(fd, addr, length, offset, threads=1, piece=8 << 20) -> int
    read_verify(fd, addr, length, offset, chunk_size, threads) -> (int, list[str])

`addr` is a raw address (`tensor.data_ptr()`, `array.ctypes.data`); the caller keeps that
memory alive, and writable for the reads, until the call returns. NATIVE says which one is
in use and `why_not` says, in one line, why the extension is absent ("" when it is not).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

from sllmctl.native import twin

__all__ = ["NATIVE", "checksum", "checksums", "pread_into", "read_verify", "why_not"]


def _load() -> tuple[ModuleType, str]:
    try:
        mod = importlib.import_module("sllmctl.native._fastio")
    except ImportError as e:
        return twin, f"C extension sllmctl.native._fastio not built ({e}); using the Python twin"
    if getattr(mod, "ABI", None) != twin.ABI:
        return twin, (
            f"C extension sllmctl.native._fastio is stale (ABI {getattr(mod, 'ABI', None)}, "
            f"want {twin.ABI}); reinstall sllmctl to rebuild it; using the Python twin"
        )
    return mod, ""


_impl, why_not = _load()
NATIVE = _impl is not twin

if TYPE_CHECKING:
    from sllmctl.native.twin import checksum, checksums, pread_into, read_verify
else:
    checksum = _impl.checksum
    checksums = _impl.checksums
    pread_into = _impl.pread_into
    read_verify = _impl.read_verify
