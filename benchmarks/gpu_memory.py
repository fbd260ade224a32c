"""GPU memory for a load, mapped piece by piece so that the first copy need not wait for all of it.

A fresh cudaMalloc of a 4 GiB data file took 1.7-2.2 ms on the H100, and the first copy of a
load waits for it: half a percent of a 0.3 s load from pinned memory. `MappedRange` reserves
one virtual address range per data file (so the file is still one allocation, and tensors are
views of it) and backs it with physical memory a piece at a time, 32 MiB first and doubling up
to 1 GiB, in a thread of its own: the first copy starts once the first piece is mapped, and
the rest is mapped while copies run. It uses CUDA's virtual memory management through the
driver API (libcuda, by ctypes): cuMemAddressReserve, then cuMemCreate + cuMemMap +
cuMemSetAccess per piece. The tensor is made from `__cuda_array_interface__`; the range is
unmapped and released when the last view of it is gone. `MappedGpuLoad` is a GpuLoad whose
file memory is a MappedRange.

Not in the product: benchmarks/load.py measures it against the caching allocator, which keeps
a previous load's memory and so spares the daemon the allocation altogether.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from typing import TYPE_CHECKING, Any

from sllmctl.store.gpu.copy import GpuLoad, Source

if TYPE_CHECKING:
    import torch

FIRST_PIECE = 256 << 20
LARGEST_PIECE = 1 << 30

_ALLOCATION_PINNED = 1  # CU_MEM_ALLOCATION_TYPE_PINNED
_LOCATION_DEVICE = 1  # CU_MEM_LOCATION_TYPE_DEVICE
_ACCESS_READWRITE = 3  # CU_MEM_ACCESS_FLAGS_PROT_READWRITE
_GRANULARITY_RECOMMENDED = 1  # CU_MEM_ALLOC_GRANULARITY_RECOMMENDED
_OUT_OF_MEMORY = 2  # CUDA_ERROR_OUT_OF_MEMORY


class _Prop(ctypes.Structure):  # CUmemAllocationProp
    _fields_ = [("type", ctypes.c_int), ("handle_types", ctypes.c_int),
                ("location_type", ctypes.c_int), ("location_id", ctypes.c_int),
                ("win32_metadata", ctypes.c_void_p), ("compression", ctypes.c_ubyte),
                ("rdma_capable", ctypes.c_ubyte), ("usage", ctypes.c_ushort),
                ("reserved", ctypes.c_ubyte * 4)]


class _Access(ctypes.Structure):  # CUmemAccessDesc
    _fields_ = [("location_type", ctypes.c_int), ("location_id", ctypes.c_int),
                ("flags", ctypes.c_int)]


_cu: Any = None
_cu_lock = threading.Lock()


def _driver() -> Any:
    """libcuda with the signatures used here (OSError where there is no CUDA driver)."""
    global _cu
    with _cu_lock:
        if _cu is None:
            cu = ctypes.CDLL("libcuda.so.1")
            u64, size, ptr = ctypes.c_ulonglong, ctypes.c_size_t, ctypes.c_void_p
            for name, args in {
                "cuCtxGetCurrent": [ptr],
                "cuCtxSetCurrent": [ptr],
                "cuCtxSynchronize": [],
                "cuMemGetAllocationGranularity": [ptr, ptr, ctypes.c_int],
                "cuMemAddressReserve": [ptr, size, size, u64, u64],
                "cuMemAddressFree": [u64, size],
                "cuMemCreate": [ptr, size, ptr, u64],
                "cuMemRelease": [u64],
                "cuMemMap": [u64, size, size, u64, u64],
                "cuMemUnmap": [u64, size],
                "cuMemSetAccess": [u64, size, ptr, size],
                "cuGetErrorName": [ctypes.c_int, ptr],
            }.items():
                fn = getattr(cu, name)
                fn.argtypes, fn.restype = args, ctypes.c_int
            _cu = cu
        return _cu


def _check(result: int, what: str) -> None:
    if result == 0:
        return
    name = ctypes.c_char_p()
    _driver().cuGetErrorName(result, ctypes.byref(name))
    message = f"{what}: {(name.value or b'CUDA error').decode()} ({result})"
    if result == _OUT_OF_MEMORY:
        import torch

        raise torch.cuda.OutOfMemoryError(message)
    raise RuntimeError(message)


class MappedRange:
    """One virtual range of `size` bytes on the current CUDA device of the calling thread,
    mapped piece by piece in the background from creation. `wait(end)` blocks until bytes
    [0, end) are mapped; `tensor()` is a uint8 tensor over the whole range."""

    def __init__(self, size: int, device: int) -> None:
        import torch

        cu = _driver()
        with torch.cuda.device(device):
            torch.cuda.init()
            torch.cuda.current_stream(device)  # makes the device's primary context current
            self._ctx = ctypes.c_void_p()
            _check(cu.cuCtxGetCurrent(ctypes.byref(self._ctx)), "cuCtxGetCurrent")
            if not self._ctx.value:
                raise RuntimeError(f"no CUDA context is current for cuda:{device}")
        self._prop = _Prop(type=_ALLOCATION_PINNED, location_type=_LOCATION_DEVICE,
                           location_id=device)
        self._access = _Access(location_type=_LOCATION_DEVICE, location_id=device,
                               flags=_ACCESS_READWRITE)
        granularity = ctypes.c_size_t()
        _check(cu.cuMemGetAllocationGranularity(ctypes.byref(granularity),
                                                ctypes.byref(self._prop),
                                                _GRANULARITY_RECOMMENDED),
               "cuMemGetAllocationGranularity")
        g = granularity.value
        self.size, self.bytes, self.device = size, -(-max(size, 1) // g) * g, device
        self._granularity = g
        base = ctypes.c_ulonglong()
        _check(cu.cuMemAddressReserve(ctypes.byref(base), self.bytes, 0, 0, 0),
               "cuMemAddressReserve")
        self.base = base.value
        self._pieces: list[tuple[int, int, int]] = []  # (offset, length, handle)
        self._mapped = 0
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._freed = False
        self._thread = threading.Thread(target=self._map_all, name="sllmctl-map", daemon=True)
        self._thread.start()

    def _map_all(self) -> None:
        cu = _driver()
        try:
            _check(cu.cuCtxSetCurrent(self._ctx), "cuCtxSetCurrent")
            piece = -(-FIRST_PIECE // self._granularity) * self._granularity
            while self._mapped < self.bytes and not self._freed:
                n = min(piece, self.bytes - self._mapped)
                handle = ctypes.c_ulonglong()
                _check(cu.cuMemCreate(ctypes.byref(handle), n, ctypes.byref(self._prop), 0),
                       f"cuMemCreate of {n} bytes on cuda:{self.device}")
                at = self.base + self._mapped
                try:
                    _check(cu.cuMemMap(at, n, 0, handle.value, 0), "cuMemMap")
                except BaseException:
                    cu.cuMemRelease(handle.value)
                    raise
                self._pieces.append((self._mapped, n, handle.value))
                _check(cu.cuMemSetAccess(at, n, ctypes.byref(self._access), 1),
                       "cuMemSetAccess")
                with self._cond:
                    self._mapped += n
                    self._cond.notify_all()
                piece = min(2 * piece, LARGEST_PIECE)
        except BaseException as e:
            with self._cond:
                self._error = e
                self._cond.notify_all()

    def wait(self, end: int) -> None:
        """Block until bytes [0, end) are backed by memory (raises what mapping raised)."""
        if self._mapped >= end:
            return
        with self._cond:
            while self._mapped < end and self._error is None:
                self._cond.wait()
            if self._mapped < end and self._error is not None:
                raise self._error

    def tensor(self) -> torch.Tensor:
        """The range as a uint8 tensor of `size` elements; the range is freed when it and
        every view of it are gone."""
        import torch

        return torch.as_tensor(_Owner(self), device=torch.device("cuda", self.device))

    def free(self) -> None:
        """Unmap and release everything (after all work queued on the device is done)."""
        if self._freed:
            return
        self._freed = True
        self._thread.join()
        cu = _driver()
        cu.cuCtxSetCurrent(self._ctx)
        cu.cuCtxSynchronize()  # as cudaFree would: no queued copy or kernel may still use it
        for offset, n, handle in self._pieces:
            cu.cuMemUnmap(self.base + offset, n)
            cu.cuMemRelease(handle)
        cu.cuMemAddressFree(self.base, self.bytes)
        self._pieces.clear()


class _Owner:
    """What the tensor keeps alive: it exposes the range and frees it when collected."""

    def __init__(self, mapped: MappedRange) -> None:
        self.mapped = mapped
        self.__cuda_array_interface__ = {"shape": (mapped.size,), "typestr": "|u1",
                                         "data": (mapped.base, False), "version": 3}

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit the driver may be gone
            self.mapped.free()


class MappedGpuLoad(GpuLoad):
    """A GpuLoad into MappedRanges: each copy waits only for its own bytes to be mapped."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._ranges: dict[int, MappedRange] = {}  # by the address of the file's memory
        super().__init__(*args, **kwargs)

    def _new_memory(self, size: int) -> torch.Tensor:
        if not size:
            return super()._new_memory(size)
        r = MappedRange(size, self.device.index or 0)
        t = r.tensor()
        self._ranges[t.data_ptr()] = r
        return t

    def run(self, source: Source) -> dict[str, torch.Tensor]:
        def waited() -> Source:
            for p, buf, release in source:
                r = self._ranges.get(self._allocate(p.file).data_ptr())
                if r is not None:
                    r.wait(p.offset + p.length)
                yield p, buf, release

        return super().run(waited())
