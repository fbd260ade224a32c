"""A model's data files opened for the GPU loader: each twice, buffered and with O_DIRECT, and
which of their pages the page cache holds (mincore), so that each piece is read from where
it is fastest: memory speed from the cache, disk speed past it without filling it.
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np

from sllmctl.store.codec import Layout
from sllmctl.store.datafile import Piece, open_data
from sllmctl.store.format import ALIGNMENT
from sllmctl.store.store import StoredModel

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]


def resident_pages(fd: int, size: int) -> np.ndarray | None:
    """Per 4 KiB page of the file, whether the page cache holds it (None: unknown)."""
    if size == 0:
        return np.zeros(0, dtype=bool)
    if mmap.PAGESIZE != ALIGNMENT:
        return None
    addr = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = (ctypes.c_ubyte * (size // ALIGNMENT))()
        if _libc.mincore(addr, size, vec) != 0:
            return None
        return (np.frombuffer(memoryview(vec).cast('B'), dtype=np.uint8) & 1).astype(bool)
    finally:
        _libc.munmap(addr, size)


class ModelFiles:
    """Two descriptors per data file: buffered, and O_DIRECT where the file system allows."""

    def __init__(self, model: StoredModel, direct: bool | None) -> None:
        self.buffered = [open_data(model, f) for f in model.manifest.files]
        self.direct: list[int | None] = []
        self.cached: list[np.ndarray | None] = []
        self.layouts = [Layout(f, model.manifest.chunk_size) if f.encoding else None
                        for f in model.manifest.files]
        for i, f in enumerate(model.manifest.files):
            fd = open_data(model, f, direct=True) if direct is not False else -1
            is_direct = fd >= 0 and _is_direct(fd)
            if fd >= 0 and not is_direct:
                os.close(fd)
            self.direct.append(fd if is_direct else None)
            if direct is None:
                self.cached.append(resident_pages(self.buffered[i], f.on_disk))
            else:
                self.cached.append(None)
        self.force_direct = direct is True

    def stored_range(self, p: Piece) -> tuple[int, int]:
        """The bytes on disk that hold piece `p`."""
        layout = self.layouts[p.file]
        if layout is None:
            return p.offset, p.offset + p.length
        return layout.stored_range(p.offset, p.length)

    def fd_for(self, file: int, start: int, end: int) -> tuple[int, bool]:
        """The descriptor to read bytes [start, end) of a file with, and whether they come
        from the page cache (all of them resident there) rather than the disk."""
        cached = self.cached[file]
        lo, hi = start // ALIGNMENT, -(-end // ALIGNMENT)
        resident = cached is not None and bool(cached[lo:hi].all())
        d = self.direct[file]
        if d is None:
            return self.buffered[file], resident
        if self.force_direct or not resident:
            return d, False
        return self.buffered[file], True

    def close(self) -> None:
        for fd in self.buffered + [d for d in self.direct if d is not None]:
            os.close(fd)


def _is_direct(fd: int) -> bool:
    import fcntl

    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0))
