"""The host's measured bandwidths, which placement relies on: the disk's O_DIRECT read rate
on the store's own file system, and pinned host-to-GPU copies per GPU. Measured at daemon
start (in the background), cached in `<home>/bandwidth.json`, re-measured on request.

The disk measurement's scratch file is named `.sllmctl-measure-<pid>-<hex>.tmp` in the store's
folder: the daemon removes its own at a graceful stop (which may cut a measurement short), and
`sweep` collects those of dead processes (a daemon killed mid-measurement) at the next start."""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

MEASURE_BYTES = 256 << 20
SCRATCH_RE = re.compile(r"\.sllmctl-measure-(\d+)-[0-9a-f]+\.tmp|\.bandwidth-(\d+)-[0-9a-f]+")


def sweep(folder: Path, *, mine: bool = False) -> list[str]:
    """Remove measurement scratch files left by dead processes (`mine`: this process's own
    too); returns their names."""
    from sllmctl.procs import alive

    gone: list[str] = []
    try:
        names = os.listdir(folder)
    except OSError:
        return gone
    for name in names:
        m = SCRATCH_RE.fullmatch(name)
        if m is None:
            continue
        pid = int(m.group(1) or m.group(2))
        if (mine and pid == os.getpid()) or (pid != os.getpid() and not alive(pid)):
            try:
                (folder / name).unlink()
                gone.append(name)
            except OSError:
                pass
    return gone


def measure_disk(folder: Path, nbytes: int = MEASURE_BYTES) -> dict[str, Any]:
    """Write a scratch file of random bytes (synced), read it back with O_DIRECT."""
    from sllmctl import native
    from sllmctl.store.datafile import aligned_empty

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f".sllmctl-measure-{os.getpid()}-{os.urandom(4).hex()}.tmp"
    nbytes = max(4096, nbytes // 4096 * 4096)
    block = os.urandom(1 << 20)
    try:
        with open(path, "wb") as f:
            for off in range(0, nbytes, len(block)):
                f.write(block[: min(len(block), nbytes - off)])
            f.flush()
            os.fsync(f.fileno())
        flags = os.O_RDONLY | getattr(os, "O_DIRECT", 0)
        try:
            fd, direct = os.open(path, flags), True
        except OSError:
            fd, direct = os.open(path, os.O_RDONLY), False
        try:
            if not direct:  # drop what we just wrote from the page cache, where we can
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            buf = aligned_empty(nbytes)
            start = time.perf_counter()
            n = native.pread_into(fd, buf.data_ptr(), nbytes, 0, 8, 4 << 20)
            seconds = time.perf_counter() - start
        finally:
            os.close(fd)
    finally:
        path.unlink(missing_ok=True)
    return {"path": str(folder), "bytes": n, "GBps": round(n / seconds / 1e9, 3),
            "o_direct": direct}


def measure_h2d(device: int, nbytes: int = MEASURE_BYTES) -> float:
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{device}")
    best = float("inf")
    for _ in range(4):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return round(nbytes / best / 1e9, 3)


def measure(store_root: Path, gpus: int, nbytes: int = MEASURE_BYTES) -> dict[str, Any]:
    result: dict[str, Any] = {"measured_at": time.time(), "disk": measure_disk(store_root, nbytes)}
    result["h2d_GBps"] = {str(d): measure_h2d(d, nbytes) for d in range(gpus)}
    return result


def load_cached(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
