"""Which read settings a disk likes: the loader's read pattern (pieces read at once, each as
parallel preads) over the model's data files with the page cache dropped, per setting.

    python benchmarks/disk_sweep.py [--layers 32] [--dir bench-data] [--span-gib 2]

Each setting reads `--span-gib` GiB, from a different part of the files each time (a
virtual disk's host may cache what was read recently), twice, in rounds of alternating
order. Uses (and makes, if missing) the checkpoint of benchmarks/load.py. Needs root.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import GB, arguments, drop_caches, prepare, save_results

PIECE = 64 << 20
# (pieces read at once, threads per piece, bytes per pread, O_DIRECT)
SETTINGS = [(16, 8, 4 << 20, True), (8, 8, 4 << 20, True), (16, 1, 8 << 20, True),
            (32, 1, 8 << 20, True), (64, 1, 4 << 20, True), (16, 2, 8 << 20, True),
            (32, 2, 4 << 20, True), (16, 1, 16 << 20, True), (16, 4, 4 << 20, False),
            (32, 1, 8 << 20, False)]


def read_span(files: list[Path], start: int, span: int, readers: int, threads: int,
              pread: int, direct: bool) -> float:
    """Read bytes [start, start + span) of the files laid end to end; GB/s."""
    from sllmctl import native
    from sllmctl.store.datafile import aligned_empty

    fds, sizes = [], []
    for p in files:
        fds.append(os.open(p, os.O_RDONLY | (os.O_DIRECT if direct else 0)))
        sizes.append(os.fstat(fds[-1]).st_size)
    jobs, base = [], 0
    for fd, size in zip(fds, sizes, strict=True):
        for off in range(0, size, PIECE):
            if start <= base + off < start + span:
                jobs.append((fd, off, min(PIECE, size - off)))
        base += size
    bufs = [aligned_empty(PIECE) for _ in range(readers)]
    free = list(range(readers))

    def read(job: tuple[int, int, int]) -> int:
        i = free.pop()
        try:
            fd, off, n = job
            return native.pread_into(fd, bufs[i].data_ptr(), n, off, threads, pread)
        finally:
            free.append(i)

    t = time.perf_counter()
    with ThreadPoolExecutor(readers) as ex:
        total = sum(ex.map(read, jobs))
    seconds = time.perf_counter() - t
    for fd in fds:
        os.close(fd)
    return total / seconds / GB


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--span-gib", type=float, default=2.0)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    _, model, _, _ = prepare(args.dir, args.layers)
    files = [model.path / f.path for f in model.manifest.files]
    total = sum(f.size for f in model.manifest.files)
    span = int(args.span_gib * (1 << 30)) // PIECE * PIECE
    spans = max(1, total // span)
    rates: dict[str, list[float]] = {}
    order = list(SETTINGS)
    k = 0
    for _ in range(args.rounds):
        for readers, threads, pread, direct in order:
            label = f"{readers} pieces x {threads} threads x {pread >> 20} MiB " \
                    f"{'O_DIRECT' if direct else 'buffered'}"
            drop_caches()
            r = read_span(files, (k % spans) * span, span, readers, threads, pread, direct)
            k += 1
            rates.setdefault(label, []).append(r)
            print(f"  {label:40s} {r:5.2f} GB/s", flush=True)
        order.reverse()
    out: dict[str, Any] = {"span_bytes": span, "rates_GBps": rates}
    print("median per setting:")
    for label, rs in sorted(rates.items(), key=lambda kv: -statistics.median(kv[1])):
        runs = ", ".join(f"{r:.2f}" for r in rs)
        print(f"  {label:40s} {statistics.median(rs):5.2f} GB/s  ({runs})")
    save_results(args.out, f"disk-sweep-{args.layers}l", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
