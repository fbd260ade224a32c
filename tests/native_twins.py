"""What the native tests share: both implementations, random and aligned buffers, the
reference checksum and O_DIRECT fds."""

from __future__ import annotations

import errno
import importlib
import os
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
