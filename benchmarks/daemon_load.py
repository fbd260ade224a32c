"""The daemon part of benchmarks/load.py: `warm --tier gpu` through a real daemon, cold from
disk and from its DRAM tier, each load against the copy limit taken right after it."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from checkpoint import GB, drop_caches
from limits import PairedLimit


def bench_daemon(name: str, model_bytes: int, limit: float, results: dict[str, Any],
                 record: Callable[..., None]) -> None:
    """`warm --tier gpu` through a real daemon: cold from disk, and from its DRAM tier."""
    from sllmctl.wire import client as dc

    pool = f"{(model_bytes >> 30) + 2}GiB"
    c = dc.start_detached(dram_pool=pool, measure_bytes=256 << 20)
    try:
        t0 = time.perf_counter()
        while True:  # the pool is pinned in the background from the daemon's start
            dram = c.call("status")["dram"]
            if dram and dram["allocated"] >= dram["capacity"]:
                break
            time.sleep(0.2)
        print(f"daemon ({name}): DRAM pool of {dram['capacity'] / GB:.1f} GB pinned "
              f"{time.perf_counter() - t0:.1f} s after start", flush=True)

        def warm_gpu() -> tuple[float, dict[str, Any]]:
            start = time.perf_counter()
            r = c.call("warm", {"name": name, "tier": "gpu"})
            return time.perf_counter() - start, r

        drop_caches()
        wall, r = warm_gpu()
        record("daemon warm gpu", f"from {r['loaded_from']}", [wall], model_bytes,
               in_daemon_s=r["load_seconds"])
        c.call("unload", {"name": name, "tier": "gpu"})
        start = time.perf_counter()
        c.call("warm", {"name": name, "tier": "dram"})
        print("  warm --tier dram (from disk, read through the page cache): "
              f"{time.perf_counter() - start:.2f} s", flush=True)
        walls, inside, ratios = [], [], []
        paired = PairedLimit()  # in this process, over the same PCIe link, right after each
        for _ in range(7):
            wall, r = warm_gpu()
            rate = paired.measure()  # as for the in-memory loads: right after each one
            ratios.append(model_bytes / r["load_seconds"] / GB / rate)
            c.call("unload", {"name": name, "tier": "gpu"})
            assert r["loaded_from"] == "dram", r
            walls.append(wall)
            inside.append(r["load_seconds"])
            print(f"    warm --tier gpu from dram: {wall:.3f} s; in the daemon "
                  f"{r['load_seconds']:.3f} s, stages {r.get('timings')}", flush=True)
        paired.close()
        record("daemon warm gpu", "from dram", walls, model_bytes,
               in_daemon_s=inside, in_daemon_vs_start_limit=model_bytes / statistics.median(inside)
               / GB / limit, in_daemon_vs_paired_limit=ratios)
        print(f"    in the daemon: {statistics.median(inside):.3f} s = "
              f"{100 * model_bytes / statistics.median(inside) / GB / limit:.1f} % of the "
              "pinned copy limit; each against the copy limit taken right after it: median "
              f"{100 * statistics.median(ratios):.1f} % (runs: "
              f"{', '.join(f'{100 * x:.1f}' for x in ratios)})", flush=True)
        start = time.perf_counter()  # the command a CI job runs, Python start-up included
        subprocess.run([sys.executable, "-m", "sllmctl", "warm", name, "--tier", "gpu", "-q"],
                       check=True)
        cli = time.perf_counter() - start
        results["daemon_cli_warm_gpu_from_dram_s"] = cli
        print(f"  `sllmctl warm {name} --tier gpu` (DRAM tier, process start included): "
              f"{cli:.3f} s", flush=True)
    finally:
        dc.stop()


# ---------------------------------------------------------------- loaders
