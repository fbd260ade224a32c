"""What the load benchmarks measure against and with: the pinned host-to-GPU copy limit
(once, or paired with each load), the disk's read rate, cudaMalloc, plain copies, and a
timed load to a usable state dict."""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from checkpoint import GB, drop_caches


def free_gpu() -> None:
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def timed(fn: Callable[[], dict[str, torch.Tensor]], fresh: bool = True,
          after: Callable[[], object] | None = None) -> tuple[float, int]:
    """Seconds to a usable state dict. `fresh`: the GPU allocator starts empty, so the time
    includes cudaMalloc; otherwise it reuses memory cached from the previous run. `after`
    runs once the load is done, before its memory is freed."""
    if fresh:
        free_gpu()
    start = time.perf_counter()
    state = fn()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if after is not None:
        after()
    nbytes = sum(t.numel() * t.element_size() for t in {id(t): t for t in state.values()}.values())
    del state
    gc.collect()
    if fresh:
        free_gpu()
    return seconds, nbytes


def chunked_copy_seconds(pinned: Any, repeats: int = 5) -> float:
    """Median wall time of copying the pinned pieces to preallocated GPU memory, nothing else."""
    files = pinned.model.manifest.files
    dst = [torch.empty(f.size, dtype=torch.uint8, device="cuda") for f in files]
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for p, buf in pinned.pieces:
            dst[p.file][p.offset:p.offset + p.length].copy_(buf, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    del dst
    free_gpu()
    return statistics.median(times)


def malloc_seconds(nbytes: int) -> float:
    free_gpu()
    start = time.perf_counter()
    t = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del t
    free_gpu()
    return seconds


# ---------------------------------------------------------------- limits

def pinned_copy_limit(nbytes: int = 4 << 30, repeats: int = 5) -> float:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host.fill_(1)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del host, dev
    free_gpu()
    return nbytes / min(times[1:]) / GB


class PairedLimit:
    """The pinned copy limit taken again right after each timed load, so that each load is
    compared with the copy rate of the same moment: on the VM that rate drifts by up to 10 %
    within a minute, so a load's median against the best of a few limit copies at the start
    mixes the loader's overhead with the machine's noise. One measurement copies one pinned
    buffer `copies` times back to back (4 x 4 GiB, about one model's bytes). It is taken
    before the load's memory is freed: copies just after a large cudaFree ran about 9 %
    slower (the fresh-allocation loads of load-32l-20261124-023717, where it was taken after
    the previous load's memory was freed)."""

    def __init__(self, nbytes: int = 4 << 30, copies: int = 4) -> None:
        self.nbytes, self.copies = nbytes, copies
        self.host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.host.fill_(1)
        self.dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
        self.dev.copy_(self.host)  # the first copy of a process is slower: not timed
        self.rates: list[float] = []

    def measure(self) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        for _ in range(self.copies):
            self.dev.copy_(self.host, non_blocking=True)
        end.record()
        end.synchronize()
        rate = self.copies * self.nbytes / (start.elapsed_time(end) / 1e3) / GB
        self.rates.append(rate)
        return rate

    def close(self) -> None:
        del self.host, self.dev
        free_gpu()


def disk_rate(files: list[Path], direct: bool, threads: int) -> float:
    """Read every data file after dropping the page cache, many reads in flight; GB/s."""
    from sllmctl import native
    from sllmctl.store.datafile import aligned_empty

    drop_caches()
    window = 512 << 20
    buf = aligned_empty(window)
    total = 0
    start = time.perf_counter()
    for path in files:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECT if direct else 0))
        size = os.fstat(fd).st_size
        for off in range(0, size, window):
            total += native.pread_into(fd, buf.data_ptr(), min(window, size - off), off,
                                       threads, 8 << 20)
        os.close(fd)
    return total / (time.perf_counter() - start) / GB
