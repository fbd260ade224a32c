"""Checkpoint load benchmark: sllmctl against its peers, on one CUDA machine, in one run.

    python benchmarks/load.py [--layers 32] [--dir bench-data] [--peers all]

Generates a random Llama-3.1-8B-shaped bf16 checkpoint (5 safetensors shards, real shapes;
fewer layers with --layers for a quick run), converts it with sllmctl (plain, and a copy with
--compress), then prints:
  - the limits: one pinned host->GPU copy, and the disk's O_DIRECT read rate;
  - time to a usable state dict on the GPU (allocation, copies, views, checksums for
    sllmctl) and GB/s for sllmctl, safetensors load_file(device="cuda"),
    runai-model-streamer, fastsafetensors (nogds) and instanttensor, each cold (page cache
    dropped) and warm (page cache hot), sllmctl for both copies, and sllmctl's in-memory
    mode (chunks already pinned);
  - ratios against the limits and against the best peer of the same run.
Writes the figures as JSON under benchmarks/results/. Needs root (drop_caches) and CUDA.
"""

from __future__ import annotations

import datetime
import gc
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from checkpoint import (
    GB,
    arguments,
    compressed_copy,
    drop_caches,
    have_cuda,
    prepare,
    save_results,
    warm_files,
)
from daemon_load import bench_daemon
from limits import (
    PairedLimit,
    chunked_copy_seconds,
    disk_rate,
    free_gpu,
    malloc_seconds,
    pinned_copy_limit,
    timed,
)


def load_safetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for p in paths:
        out.update(load_file(p, device="cuda:0"))
    return out


def load_runai(paths: list[Path]) -> dict[str, torch.Tensor]:
    from runai_model_streamer import SafetensorsStreamer

    out = {}
    with SafetensorsStreamer() as s:
        s.stream_files([str(p) for p in paths])
        for name, t in s.get_tensors():
            out[name] = t.to("cuda:0", non_blocking=True)
    return out


def load_fastsafetensors(paths: list[Path]) -> dict[str, torch.Tensor]:
    from fastsafetensors import fastsafe_open

    with fastsafe_open([str(p) for p in paths], device="cuda:0", nogds=True) as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def load_instanttensor(paths: list[Path]) -> dict[str, torch.Tensor]:
    from instanttensor import safe_open

    with safe_open([str(p) for p in paths], framework="pt", device=0) as f:
        return dict(f.tensors())


PEERS: dict[str, Callable[[list[Path]], dict[str, torch.Tensor]]] = {
    "safetensors": load_safetensors,
    "runai-model-streamer": load_runai,
    "fastsafetensors": load_fastsafetensors,
    "instanttensor": load_instanttensor,
}


def version_of(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    dist = {"runai-model-streamer": "runai-model-streamer"}.get(module, module)
    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--peers", default="all", help="comma list, 'all' or 'none'")
    ap.add_argument("--warm-repeats", type=int, default=3)
    ap.add_argument("--cold-rounds", type=int, default=2)
    ap.add_argument("--sections", default="direct,memory,daemon",
                    help="which parts to run: direct (loaders from disk), memory (in-memory "
                    "mode), daemon (warm --tier gpu through the daemon)")
    ap.add_argument("--no-compressed", action="store_true",
                    help="skip the copy converted with --compress (exponent bytes in zstd)")
    ap.add_argument("--daemon-compressed", action="store_true",
                    help="the daemon section warms the --compress copy (needs it)")
    ap.add_argument("--other-read-setting", action="store_true",
                    help="also time O_DIRECT reads of 16 pieces x 1 thread x 16 MiB")
    ap.add_argument("--small-files", action="store_true",
                    help="also time the in-memory mode on a copy converted into 1 GiB files")
    args = ap.parse_args()
    if not have_cuda():
        return 1

    shards, model, gen_s, convert_s = prepare(args.dir, args.layers)
    from gpu_memory import MappedGpuLoad
    from gpu_paths import eager_pool, load_pinned, pinned_to_gpu

    from sllmctl import native
    from sllmctl.store.gpu.copy import GpuLoad
    from sllmctl.store.gpu.loader import load_to_gpu
    from sllmctl.store.gpu.pinned import pinned_source
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    sections = set(args.sections.split(","))
    peers = list(PEERS) if args.peers == "all" else [
        p for p in args.peers.split(",") if p and p != "none"]
    name, store = model.name, Store()
    data_files = [model.path / f.path for f in model.manifest.files]
    model_bytes = model.manifest.total_bytes
    src_bytes = sum(p.stat().st_size for p in shards)
    print(f"checkpoint: {args.layers} layers, {src_bytes / GB:.2f} GB in {len(shards)} "
          f"safetensors shards (made in {gen_s:.0f} s); sllmctl: {model_bytes / GB:.2f} GB in "
          f"{len(data_files)} data files (converted in {convert_s:.0f} s); native I/O: "
          f"{native.NATIVE}", flush=True)

    zmodel, zfiles = None, []
    if not args.no_compressed:
        zmodel, zconvert_s = compressed_copy(args.dir, model)
        zfiles = [zmodel.path / f.path for f in zmodel.manifest.files]
        stored = sum(f.on_disk for f in zmodel.manifest.files)
        results_z = {"stored_bytes": stored, "convert_s": zconvert_s}
        print(f"compressed copy ({zmodel.name}): {stored / GB:.2f} GB on disk, "
              f"{100 * stored / model_bytes:.1f} % of {model_bytes / GB:.2f} GB (converted in "
              f"{results_z['convert_s']:.0f} s)", flush=True)

    # grow the VM's memory once, so no loader pays the first touch of page cache memory
    warm_files(shards + data_files + zfiles)
    pool = eager_pool()  # made once, before any timing, as a daemon keeps it
    results: dict[str, Any] = {"limits": {}, "runs": []}
    if zmodel is not None:
        results["compressed"] = results_z
    limit = pinned_copy_limit()
    results["limits"]["pinned_h2d_GBps"] = limit
    print(f"pinned host->GPU copy limit: {limit:.1f} GB/s", flush=True)
    disk = disk_rate(data_files, direct=True, threads=32)
    results["limits"]["disk_odirect_GBps"] = disk
    print(f"disk O_DIRECT read rate:     {disk:.2f} GB/s", flush=True)
    buffered = disk_rate(data_files, direct=False, threads=16)
    results["limits"]["disk_buffered_cold_GBps"] = buffered
    print(f"disk buffered read rate (page cache dropped, 16 readers): {buffered:.2f} GB/s",
          flush=True)

    def record(loader: str, mode: str, seconds: list[float], nbytes: int, **extra: Any) -> None:
        run = {"loader": loader, "mode": mode, "seconds": seconds,
               "median_s": statistics.median(seconds), "bytes": nbytes,
               "GBps": nbytes / statistics.median(seconds) / GB, **extra}
        results["runs"].append(run)
        print(f"  {loader:22s} {mode:10s} {run['median_s']:7.3f} s  {run['GBps']:6.2f} GB/s"
              f"  (runs: {', '.join(f'{s:.3f}' for s in seconds)})", flush=True)

    if "direct" in sections:
        loaders: list[tuple[str, Callable[[], dict[str, torch.Tensor]], list[Path]]] = [
            ("sllmctl", lambda: load_to_gpu(model, "cuda:0", pool=pool), data_files)]
        if zmodel is not None:
            loaders.append(("sllmctl --compress", lambda: load_to_gpu(zmodel, "cuda:0",
                                                                      pool=pool), zfiles))
        if args.other_read_setting:
            # the other read setting that disk_sweep.py favoured (16 pieces, one thread each,
            # in 16 MiB preads), for comparison
            loaders.append(("sllmctl (O_DIRECT 16x1x16MiB)", lambda: load_to_gpu(
                model, "cuda:0", pool=pool, direct=True, readers=16, read_threads=1,
                read_piece=16 << 20), data_files))
        for peer in peers:
            try:
                __import__({"runai-model-streamer": "runai_model_streamer"}.get(peer, peer))
            except ImportError as e:
                results["runs"].append({"loader": peer, "error": f"not installed: {e}"})
                print(f"  {peer:22s} not installed here ({e})", flush=True)
                continue
            loaders.append((f"{peer} {version_of(peer)}", lambda peer=peer: PEERS[peer](shards),
                            shards))

        def attempt(loader: str, fn: Callable[[], dict[str, torch.Tensor]]) -> tuple[float, int]:
            try:
                return timed(fn)
            except Exception as e:  # a peer that fails is reported, not fatal
                print(f"  {loader:22s} failed: {type(e).__name__}: {e}", flush=True)
                return float("nan"), 0

        print("time to a usable state dict on cuda:0", flush=True)
        # cold: page cache dropped before each run; rounds alternate the loaders, so that no
        # loader always runs first (the virtual disk's speed drifts within a run)
        cold: dict[str, list[float]] = {n: [] for n, _, _ in loaders}
        sizes: dict[str, int] = {}
        for _ in range(args.cold_rounds):
            for loader, fn, _files in loaders:
                drop_caches()
                s, n = attempt(loader, fn)
                cold[loader].append(s)
                sizes[loader] = n or sizes.get(loader, 0)
            loaders.reverse()
        for loader, _, _ in loaders:
            if sizes.get(loader):
                record(loader, "cold", cold[loader], sizes[loader])
            else:
                results["runs"].append({"loader": loader, "mode": "cold", "error": "failed"})
        for loader, fn, files in loaders:
            if not loader.startswith("sllmctl (") and sizes.get(loader):
                runs = []
                for _ in range(args.warm_repeats):
                    warm_files(files)
                    s, n = attempt(loader, fn)
                    runs.append(s)
                    if s > 5:  # a loader that ignores the page cache: one run says it all
                        break
                record(loader, "warm", runs, n)

    if "memory" in sections:
        for size in (4 << 30, 1 << 30):
            s = statistics.median(malloc_seconds(size) for _ in range(3))
            results["limits"][f"cudaMalloc_{size >> 30}GiB_s"] = s
            print(f"fresh cudaMalloc of {size >> 30} GiB: {1e3 * s:.1f} ms", flush=True)

        print("in-memory mode (chunks already in pinned DRAM):", flush=True)
        variants = [(name, model)]  # (name, model)
        if args.small_files:
            small = f"{name}-1g"
            if not store.exists(small):
                convert(args.dir / "src", small, max_file_size=1 << 30)
            variants.append((small, store.get(small)))
        for _, m in variants:
            pinned = load_pinned(m)
            nfiles = len(m.manifest.files)
            if m is model:
                plain = chunked_copy_seconds(pinned)
                results["limits"]["chunked_pinned_copy_s"] = plain
                print(f"  copies alone (same pinned pieces, preallocated GPU memory, no checksums, "
                      f"no views): {plain:.3f} s, {model_bytes / plain / GB:.1f} GB/s", flush=True)
            # the first load of a process loads CUDA modules and kernels (the daemon does it
            # once at start, warm_up); like the limit's first copy, it is reported, not timed
            first, _ = timed(lambda p=pinned: pinned_to_gpu(p, "cuda:0"))
            print(f"  first load of this process (not counted): {first:.3f} s", flush=True)
            paired = PairedLimit()
            # +cached: the allocator keeps the previous load's memory; +mapped: fresh memory
            # mapped piece by piece while the copies run (benchmarks/gpu_memory.py)
            for verify, fresh, mapped in ((True, True, False), (False, True, False),
                                          (True, False, False), (True, True, True)):
                runs, ratios = [], []
                stages: list[dict[str, float]] = []
                for _ in range(7):
                    def run(v: bool = verify, mp: bool = mapped, p: Any = pinned,
                            out: list[dict[str, float]] = stages) -> dict[str, torch.Tensor]:
                        # pinned_to_gpu, keeping the load's stage timings (and not the load,
                        # which holds the memory that `timed` frees)
                        load = (MappedGpuLoad if mp else GpuLoad)(p.model, "cuda:0", v)
                        state = load.run(pinned_source(p, 256 << 20))
                        out.append(load.timings)
                        return state

                    s, n = timed(run, fresh=fresh, after=paired.measure)
                    runs.append(s)
                    ratios.append(n / s / GB / paired.rates[-1])
                mode = (("verified" if verify else "unverified") + ("" if fresh else "+cached")
                        + ("+mapped" if mapped else ""))
                first = statistics.median(t["first_copy"] for t in stages)
                copies = statistics.median(t["gpu_copies"] for t in stages)
                record(f"sllmctl in-memory {nfiles}f", mode, runs, n, vs_paired_limit=ratios,
                       stages=stages)
                print(f"    each against the copy limit taken right after it: median "
                      f"{100 * statistics.median(ratios):.1f} % (runs: "
                      f"{', '.join(f'{100 * r:.1f}' for r in ratios)}); first copy queued "
                      f"after {1e3 * first:.2f} ms, copies {1e3 * copies:.1f} ms (medians)",
                      flush=True)
            paired.close()
            free_gpu()
            pinned.pieces.clear()  # unpin
            del pinned
            gc.collect()

    if "daemon" in sections:
        try:
            if args.daemon_compressed and zmodel is not None:
                results["daemon_model"] = zmodel.name
                bench_daemon(zmodel.name, model_bytes, limit, results, record)
            else:
                bench_daemon(name, model_bytes, limit, results, record)
        except Exception as e:  # reported and saved with the rest of the run, then exit 1
            results["daemon_error"] = f"{type(e).__name__}: {e}"
            print(f"daemon section failed: {results['daemon_error']}", flush=True)

    # the limit again at the end (the VM's copy rate drifts): ratios use the higher of the two
    end = pinned_copy_limit()
    results["limits"]["pinned_h2d_GBps_end"] = end
    print(f"pinned host->GPU copy limit, measured again: {end:.1f} GB/s", flush=True)
    limit = max(limit, end)

    # ---- summary
    def best(mode: str, loaders: str) -> dict[str, Any] | None:
        rs = [r for r in results["runs"] if r.get("mode") == mode and "error" not in r
              and r["loader"].startswith(loaders)]
        return min(rs, key=lambda r: r["median_s"]) if rs else None

    print("\nsummary", flush=True)
    summary = {}
    for mode in ("cold", "warm"):
        for loader, key in (("sllmctl", ""), ("sllmctl --compress", "compressed_")):
            ours = next((r for r in results["runs"] if r["loader"] == loader
                         and r.get("mode") == mode and "error" not in r), None)
            if ours is None:
                continue
            peer_runs = [r for r in results["runs"] if r.get("mode") == mode
                         and "error" not in r and not r["loader"].startswith("sllmctl")]
            bp = min(peer_runs, key=lambda r: r["median_s"]) if peer_runs else None
            line = f"  {mode}: {loader} {ours['median_s']:.3f} s ({ours['GBps']:.2f} GB/s)"
            if bp:
                summary[f"{key}{mode}_speedup_vs_best_peer"] = bp["median_s"] / ours["median_s"]
                line += f", best peer {bp['loader']} {bp['median_s']:.3f} s " \
                        f"({loader} {bp['median_s'] / ours['median_s']:.2f}x faster)"
            if mode == "cold":
                # for the compressed copy: the model's bytes per second against the disk's,
                # and the bytes it read from disk per second
                rate = max(disk, buffered)
                summary[f"{key}cold_vs_disk"] = ours["GBps"] / rate
                line += (f"; {100 * ours['GBps'] / rate:.1f} % of the disk's read rate (the "
                         "faster of O_DIRECT and buffered)")
                if key:
                    read = results["compressed"]["stored_bytes"] / ours["median_s"] / GB
                    summary["compressed_cold_read_GBps"] = read
                    line += f", reading {read:.2f} GB/s from it"
            print(line)
    for mode in ("verified", "verified+cached", "verified+mapped"):
        mem = best(mode, "sllmctl in-memory")
        if mem:
            summary[f"in_memory_{mode}_vs_pinned_limit"] = mem["GBps"] / limit
            pair = statistics.median(mem["vs_paired_limit"])
            summary[f"in_memory_{mode}_vs_paired_limit"] = pair
            print(f"  {mem['loader']}, checksums {mode}: {mem['median_s']:.3f} s, "
                  f"{mem['GBps']:.1f} GB/s = {100 * mem['GBps'] / limit:.1f} % of the pinned "
                  f"copy limit; {100 * pair:.1f} % of the limit taken right after each load")
    daemon = next((r for r in results["runs"] if r.get("loader") == "daemon warm gpu"
                   and r.get("mode") == "from dram"), None)
    if daemon:
        inside = statistics.median(daemon["in_daemon_s"])
        summary["daemon_from_dram_vs_pinned_limit"] = model_bytes / inside / GB / limit
        pair = statistics.median(daemon["in_daemon_vs_paired_limit"])
        summary["daemon_from_dram_vs_paired_limit"] = pair
        print(f"  daemon, DRAM tier to GPU, checksums verified: {inside:.3f} s in the daemon "
              f"= {100 * model_bytes / inside / GB / limit:.1f} % of the pinned copy limit; "
              f"{100 * pair:.1f} % of the limit taken right after each load")
    results["summary"] = summary
    results["conditions"] = {
        "gpu": torch.cuda.get_device_name(0),
        "torch": torch.__version__,
        "host": platform.node(), "cpus": os.cpu_count(),
        "model": f"Llama-3.1-8B shape, {args.layers} layers, bf16, random weights",
        "model_bytes": model_bytes, "source_bytes": src_bytes,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "native_io": native.NATIVE,
        "peer_versions": {p: version_of(p) for p in PEERS},
        "nvidia_smi": subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,"
                                      "pcie.link.gen.current,pcie.link.width.current",
                                      "--format=csv,noheader"], capture_output=True,
                                     text=True).stdout.strip(),
    }
    save_results(args.out, f"load-{args.layers}l", results)
    return 1 if "daemon_error" in results else 0


if __name__ == "__main__":
    sys.exit(main())
