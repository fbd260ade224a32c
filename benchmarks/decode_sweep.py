"""How fast a compressed model (`convert --compress`) loads from a hot page cache, where the
CPU's decompression, not the disk, sets the pace: zstd's rate on one core and on all of
them, then warm loads to the GPU at several reader counts.

    python benchmarks/decode_sweep.py [--layers 32] [--dir bench-data]

Uses (and makes, if missing) the checkpoint and compressed copy of benchmarks/load.py.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import GB, arguments, compressed_copy, have_cuda, prepare, save_results, warm_files
from limits import timed

READERS = (8, 16, 24, 32)
CACHED_THREADS = (1, 2)


def decode_rate(model: Any, threads: int, frames: int = 64) -> float:
    """GB/s of high bytes decompressed by `threads` threads, from frames already in memory."""
    from sllmctl.store.codec import Layout, decompress_into

    f = model.manifest.files[0]
    chunk = model.manifest.chunk_size
    todo = [fr for fr in Layout(f, chunk).frames(0, f.size) if fr[3]][:frames]
    raw = (model.path / f.path).read_bytes()
    parts = [(np.frombuffer(raw, np.uint8, z, at + n // 2), np.empty(n // 2, np.uint8))
             for _, n, at, z in todo]

    def one(p: tuple[np.ndarray, np.ndarray]) -> None:
        decompress_into(p[0], p[1])

    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(one, parts))  # first touch of the outputs
        start = time.perf_counter()
        list(ex.map(one, parts))
        seconds = time.perf_counter() - start
    return sum(out.nbytes for _, out in parts) / seconds / GB


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not have_cuda():
        return 1
    _, model, _, _ = prepare(args.dir, args.layers)
    zmodel, _ = compressed_copy(args.dir, model)
    from gpu_paths import eager_pool

    from sllmctl.store.gpu import loader as gpu_loader

    results: dict[str, Any] = {"cpus": os.cpu_count(), "decode_GBps": {}, "warm": {}}
    for threads in sorted({1, 4, 8, os.cpu_count() or 1}):
        rate = decode_rate(zmodel, threads)
        results["decode_GBps"][threads] = rate
        print(f"zstd, high bytes decompressed by {threads:2d} threads: {rate:.2f} GB/s",
              flush=True)
    files = [zmodel.path / f.path for f in zmodel.manifest.files]
    nbytes = zmodel.manifest.total_bytes
    for readers in READERS:
        pool = eager_pool(buffers=readers + 8)
        for cached in CACHED_THREADS:
            gpu_loader.CACHED_READ_THREADS = cached
            runs = []
            for _ in range(args.repeats):
                warm_files(files)
                s, _ = timed(lambda p=pool, r=readers: gpu_loader.load_to_gpu(
                    zmodel, "cuda:0", pool=p, readers=r))
                runs.append(s)
            label = f"{readers} readers x {cached} threads"
            results["warm"][label] = runs
            print(f"warm load, {label}: {statistics.median(runs):.3f} s "
                  f"({nbytes / statistics.median(runs) / GB:.1f} GB/s; runs "
                  f"{', '.join(f'{x:.3f}' for x in runs)})", flush=True)
        del pool
    save_results(args.out, f"decode-sweep-{args.layers}l", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
