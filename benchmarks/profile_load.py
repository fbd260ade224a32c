"""Where an in-memory load's time goes: the pinned copy limit, the same pinned pieces copied
with nothing else (one stream, two streams, other copy sizes), then `GpuLoad` from pinned
memory with its stage timings (host: first copy queued, all queued, verified; device: the
copies from first start to last end, and the tail from the last copy to the checksums
compared), verified and not, with a fresh and a warm allocator.

    python benchmarks/profile_load.py [--layers 32] [--dir bench-data] [--repeats 5]

Uses (and makes, if missing) the same random checkpoint as benchmarks/load.py. Needs CUDA.
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import GB, arguments, have_cuda, prepare, save_results
from limits import free_gpu, pinned_copy_limit


def copies_alone(pieces: list[tuple[Any, torch.Tensor]], dst: list[torch.Tensor],
                 streams: list[torch.cuda.Stream], repeats: int) -> dict[str, Any]:
    """Wall time and device time of copying `pieces` into `dst`, round robin over `streams`."""
    walls, device = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t = time.perf_counter()
        start.record()
        for s in streams:
            s.wait_stream(torch.cuda.current_stream())
        for i, (p, buf) in enumerate(pieces):
            with torch.cuda.stream(streams[i % len(streams)]):
                dst[p.file][p.offset:p.offset + p.length].copy_(buf, non_blocking=True)
        for s in streams:
            torch.cuda.current_stream().wait_stream(s)
        end.record()
        torch.cuda.synchronize()
        walls.append(time.perf_counter() - t)
        device.append(start.elapsed_time(end) / 1e3)
    return {"wall_s": walls, "device_s": device, "median_wall_s": statistics.median(walls)}


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if not have_cuda():
        return 1
    _, model, _, _ = prepare(args.dir, args.layers)
    from gpu_paths import load_pinned

    from sllmctl.store.gpu.copy import GpuLoad
    from sllmctl.store.gpu.pinned import coalesce, pinned_source

    nbytes = model.manifest.total_bytes
    pinned = load_pinned(model)
    limit = pinned_copy_limit()
    out: dict[str, Any] = {"limit_GBps": limit, "bytes": nbytes, "copies": {}, "loads": {}}
    print(f"{nbytes / GB:.2f} GB in {len(pinned.pieces)} pinned pieces; pinned copy limit "
          f"{limit:.1f} GB/s = {nbytes / limit / GB:.4f} s for this model", flush=True)

    dst = [torch.empty(f.size, dtype=torch.uint8, device="cuda") for f in model.manifest.files]
    one, two = [torch.cuda.Stream()], [torch.cuda.Stream(), torch.cuda.Stream()]
    merged = list(coalesce(pinned.pieces))  # nothing merges across separate pinned pieces
    for label, pieces, streams in (("256 MiB, one stream", pinned.pieces, one),
                                   ("256 MiB, two streams", pinned.pieces, two),
                                   ("merged, one stream", merged, one)):
        r = copies_alone(pieces, dst, streams, args.repeats)
        out["copies"][label] = r
        print(f"copies alone, {label}: wall {r['median_wall_s']:.4f} s "
              f"({100 * nbytes / r['median_wall_s'] / GB / limit:.1f} % of the limit); device "
              f"{', '.join(f'{s:.4f}' for s in r['device_s'])}", flush=True)
    del dst
    free_gpu()

    def load(verify: bool, copy_size: int, tail: int | None) -> Callable[[], GpuLoad]:
        def run() -> GpuLoad:
            g = GpuLoad(model, "cuda:0", verify)
            g.run(pinned_source(pinned, copy_size, tail))
            return g
        return run

    variants = [
        ("verified, fresh allocator", load(True, 256 << 20, None), True),
        ("verified, warm allocator", load(True, 256 << 20, None), False),
        ("unverified, warm allocator", load(False, 256 << 20, None), False),
        ("verified, warm, no taper", load(True, 256 << 20, 256 << 20), False),
        ("verified, warm, 1 GiB copies", load(True, 1 << 30, None), False),
        ("verified, warm, 64 MiB copies", load(True, 64 << 20, None), False),
    ]
    for label, fn, fresh in variants:
        runs = []
        for i in range(args.repeats + 1):  # the first run of the process pays one-time costs
            if fresh:
                free_gpu()
            t = time.perf_counter()
            g = fn()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t
            runs.append({"wall_s": wall, **g.timings})
            del g
            if i == 0 and label == variants[0][0]:
                print(f"  first load of the process: {wall:.4f} s {runs[0]}", flush=True)
        walls = [r["wall_s"] for r in runs[1:]]
        med = statistics.median(walls)
        out["loads"][label] = runs
        print(f"{label}: median {med:.4f} s = {100 * nbytes / med / GB / limit:.1f} % of the "
              "limit", flush=True)
        for r in runs[1:]:
            print("   ", "  ".join(f"{k} {1e3 * v:.1f}" for k, v in r.items()), "(ms)", flush=True)
        free_gpu()
    save_results(args.out, f"profile-load-{args.layers}l", out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
