"""exp23 frames (format version 4) decoded on the GPU, against the pinned copy limit, in one run.

    python benchmarks/gpu_decode.py [--gib 8] [--repeats 5] [--out benchmarks/results]
                                    [--disk-layers N --dir bench-data]

Makes `--gib` GiB of bf16 `randn * 0.02` weights in host memory, encodes them chunk by chunk
with codec_exp23 on every core (with their sum64x2 checksums, as a manifest holds them), and
measures, in the same process and without the disk:

- `pinned_h2d_GBps`: the pinned copy limit (one 4 GiB pinned buffer copied, best of 5);
- `plain_copy_s`: the plain bytes, pinned, copied in 64 MiB pieces and nothing else;
- `plain_verified_s`: today's DRAM tier (gpu_paths.pinned_to_gpu: copies and checksums);
- `exp23_verified_s`: the model held compressed (gpu/coded.py's coded_to_gpu: stored
  bytes copied, decoded on the GPU, checksummed after decoding, compared with the sums);
- `decode_GBps`: decoded bytes per second of the kernel alone, frames already on the GPU;
- `exact`: the decoded bytes equal the plain ones; nvCOMP's zstd decode of the split-zstd
  high planes where `nvidia.nvcomp` imports (for the choice of code); the CPU twin's rate;
- with `--disk-layers N`: warm (page cache) and cold (dropped) loads from disk to the GPU of
  benchmarks/load.py's 8B-shaped checkpoint of N layers, plain and exp23, interleaved.

Loads reuse the allocator's cached memory (fresh=False), as the DRAM tier's do.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import GB, have_cuda, save_results
from gpu_paths import pinned_to_gpu
from limits import pinned_copy_limit, timed

from sllmctl.store import codec_exp23
from sllmctl.store.datafile import Piece
from sllmctl.store.format import CHUNK_SIZE, DataFile, Manifest, TensorEntry, checksum_numpy
from sllmctl.store.gpu.coded import PinnedCoded, coded_to_gpu
from sllmctl.store.gpu.decode import NUM_WARPS, Coded, decode_frame, warm_up
from sllmctl.store.gpu.pinned import PinnedModel
from sllmctl.store.store import StoredModel

PIECE = 64 << 20


def make_plain(nbytes: int) -> torch.Tensor:
    """Pinned host bytes of bf16 randn * 0.02 (made on the GPU, 1 GiB at a time)."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    step = 1 << 30
    for off in range(0, nbytes, step):
        n = min(step, nbytes - off)
        w = (torch.randn(n // 2, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
        host[off:off + n].copy_(w.view(torch.uint8))
    return host


def encode(plain: torch.Tensor) -> tuple[list[tuple[int, list[Any], str]], float]:
    """Each chunk's (z, frame parts, checksum), and the seconds that took on every core."""
    arr = plain.numpy()

    def one(off: int) -> tuple[int, list[Any], str]:
        chunk = arr[off:off + CHUNK_SIZE]
        z, parts = codec_exp23.encode_chunk(chunk)
        return z, parts, checksum_numpy(chunk)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count() or 4) as ex:
        out = list(ex.map(one, range(0, len(arr), CHUNK_SIZE)))
    return out, time.perf_counter() - t0


def models(nbytes: int, enc: list[tuple[int, list[Any], str]]) -> tuple[StoredModel, StoredModel]:
    sums = [s for _, _, s in enc]
    frames = [z for z, _, _ in enc]
    lengths = [sum(memoryview(p).nbytes for p in parts) for _, parts, _ in enc]
    tensors = {"w": TensorEntry("BF16", [nbytes // 2], 0, 0, nbytes)}
    plain = Manifest("bench", [DataFile("data-00000.bin", nbytes, sums)], tensors)
    coded = Manifest("bench-exp23", [DataFile("data-00000.bin", nbytes, sums, "exp23", frames,
                                             sum(lengths))], tensors, format_version=4)
    coded.validate("bench")
    return StoredModel("bench", Path("."), plain), StoredModel("bench-exp23", Path("."), coded)


def pin_coded(model: StoredModel, enc: list[tuple[int, list[Any], str]]) -> PinnedCoded:
    """The stored frames in pinned pieces of at most PIECE bytes, whole frames each."""
    out: list[tuple[Piece, Coded]] = []
    group: list[int] = []

    def flush() -> None:
        parts = [np.frombuffer(memoryview(p).cast("B"), np.uint8) for k in group
                 for p in enc[k][1]]
        host = torch.from_numpy(np.concatenate(parts)).pin_memory()
        frames, at = [], 0
        for k in group:
            frames.append((at, k * CHUNK_SIZE, CHUNK_SIZE, enc[k][0]))
            at += sum(memoryview(p).nbytes for p in enc[k][1])
        out.append((Piece(0, group[0] * CHUNK_SIZE, len(group) * CHUNK_SIZE),
                    Coded(host, frames)))

    size = 0
    for k, (_, parts, _) in enumerate(enc):
        n = sum(memoryview(p).nbytes for p in parts)
        if group and size + n > PIECE:
            flush()
            group, size = [], 0
        group.append(k)
        size += n
    flush()
    return PinnedCoded(model, out)


def decode_rate(pinned: PinnedCoded, repeats: int, num_warps: int = NUM_WARPS) -> float:
    """Decoded GB/s of the kernel alone: every frame already in GPU memory."""
    dev = [(c.host.cuda(), c.frames) for _, c in pinned.pieces]
    out = torch.empty(pinned.model.manifest.files[0].size, dtype=torch.uint8, device="cuda")
    times = []
    for _ in range(repeats + 1):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for stored, frames in dev:
            for at, off, n, z in frames:
                decode_frame(stored[at:], n, z, out[off:off + n], num_warps)
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return out.numel() / statistics.median(times[1:]) / GB


def chunked_copy_s(plain: torch.Tensor, repeats: int) -> float:
    dst = torch.empty_like(plain, device="cuda")
    times = []
    for _ in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for off in range(0, plain.numel(), PIECE):
            dst[off:off + PIECE].copy_(plain[off:off + PIECE], non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


def nvcomp_zstd(plain: torch.Tensor, chunks: int = 64) -> dict[str, Any]:
    """nvCOMP's decode rate of zstd frames of high-byte planes (split-zstd's), on the GPU."""
    try:
        import zstandard
        from nvidia import nvcomp

        arr = plain.numpy()
        highs = [np.ascontiguousarray(arr[k * CHUNK_SIZE:(k + 1) * CHUNK_SIZE][1::2])
                 for k in range(chunks)]
        zc = zstandard.ZstdCompressor(level=1, write_content_size=True)
        frames = [torch.frombuffer(bytearray(zc.compress(h.data)), dtype=torch.uint8).cuda()
                  for h in highs]
        codec = nvcomp.Codec(algorithm="Zstd", bitstream_kind=nvcomp.BitstreamKind.RAW)
        arrays = nvcomp.as_arrays(frames)  # one batch
        got = codec.decode(arrays)  # warm-up, and the check
        torch.cuda.synchronize()
        firsts = [torch.as_tensor(got[i], device="cuda").view(torch.uint8) for i in range(4)]
        same = all(np.array_equal(g.cpu().numpy(), h)
                   for g, h in zip(firsts, highs[:4], strict=True))
        times = []
        for _ in range(3):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            codec.decode(arrays)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        planes = sum(h.nbytes for h in highs)
        return {"version": nvcomp.__version__, "high_plane_GBps": planes / min(times) / GB,
                "chunk_GBps_upper_bound": 2 * planes / min(times) / GB, "exact": same,
                "frames": chunks}
    except Exception as e:  # recorded, not fatal: the comparison is optional
        return {"error": f"{type(e).__name__}: {e}"}


def cpu_twin_GBps(plain: torch.Tensor, enc: list[tuple[int, list[Any], str]]) -> float:
    stored = [np.concatenate([np.frombuffer(memoryview(p).cast("B"), np.uint8) for p in parts])
              for _, parts, _ in enc[:4]]
    out = np.empty(CHUNK_SIZE, np.uint8)
    t0 = time.perf_counter()
    for (z, _, _), s in zip(enc[:4], stored, strict=True):
        codec_exp23.decode_frame(s, CHUNK_SIZE, z, out)
    return 4 * CHUNK_SIZE / (time.perf_counter() - t0) / GB


def disk_loads(folder: Path, layers: int, repeats: int) -> dict[str, Any]:
    """Loads from disk to the GPU (gpu.loader.load_to_gpu) of the 8B-shaped checkpoint of
    `layers` layers, plain and exp23, warm (page cache) and cold (dropped), interleaved."""
    from checkpoint import drop_caches, prepare, warm_files

    from sllmctl import native
    from sllmctl.store.gpu.loader import PinnedPool, load_to_gpu
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    _, model, _, convert_s = prepare(folder, layers)
    t0 = time.perf_counter()
    name = f"{model.name}-exp23"
    if not Store().exists(name):
        convert(folder / "src", name, compress="exp23")
    xmodel = Store().get(name)
    out: dict[str, Any] = {
        "layers": layers, "bytes": model.manifest.total_bytes, "native_io": native.NATIVE,
        "stored_exp23": sum(f.on_disk for f in xmodel.manifest.files),
        "convert_s": convert_s, "convert_exp23_s": time.perf_counter() - t0}

    def files(m: StoredModel) -> list[Path]:
        return [m.path / f.path for f in m.manifest.files]

    pool = PinnedPool(eager=True)
    warm_files(files(model) + files(xmodel))
    for mode in ("warm", "cold"):
        for _ in range(repeats):
            for m, key in ((model, "plain"), (xmodel, "exp23")):
                if mode == "cold":
                    drop_caches()
                else:
                    warm_files(files(m))
                seconds = timed(lambda m=m: load_to_gpu(m, "cuda", pool=pool), False)[0]
                out.setdefault(f"{mode}_{key}_s", []).append(seconds)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--gib", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    ap.add_argument("--disk-layers", type=int, default=0,
                    help="also load an 8B-shaped checkpoint of this many layers from disk")
    ap.add_argument("--disk-repeats", type=int, default=3)
    ap.add_argument("--dir", type=Path, default=Path("bench-data"))
    args = ap.parse_args()
    if not have_cuda():
        return 1
    import triton

    nbytes = args.gib << 30
    r: dict[str, Any] = {"conditions": {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "cpus": os.cpu_count(), "bytes": nbytes,
        "data": "bf16 randn*0.02, one data file, 16 MiB chunks, host memory (no disk)",
        "repeats": args.repeats, "allocator": "cached (fresh=False)"}}
    warm_up("cuda")
    plain = make_plain(nbytes)
    enc, r["encode_s"] = encode(plain)
    pm, cm = models(nbytes, enc)
    coded = pin_coded(cm, enc)
    r["stored_bytes"] = coded.nbytes
    r["ratio"] = coded.nbytes / nbytes
    lists = np.array([np.frombuffer(memoryview(parts[3]).cast("B"), "<u4", 2, 16)
                      for z, parts, _ in enc if z])
    r["second_list_per_word"], r["escapes_per_word"] = (lists.sum(axis=0) / (nbytes // 2)
                                                        ).tolist()
    del enc[4:]
    r["pinned_h2d_GBps"] = pinned_copy_limit()
    r["plain_limit_s"] = nbytes / r["pinned_h2d_GBps"] / GB
    r["plain_copy_s"] = chunked_copy_s(plain, args.repeats)
    r["decode_GBps"] = decode_rate(coded, args.repeats)
    r["decode_GBps_by_warps"] = {w: decode_rate(coded, 2, w) for w in (4, 8, 16)}
    pinned = PinnedModel(pm, [(Piece(0, off, min(PIECE, nbytes - off)), plain[off:off + PIECE])
                              for off in range(0, nbytes, PIECE)])
    runs: dict[str, list[float]] = {"plain_verified_s": [], "exp23_verified_s": []}
    for _ in range(args.repeats):  # interleaved, so that drift hits both alike
        runs["plain_verified_s"].append(timed(lambda: pinned_to_gpu(pinned, "cuda"), False)[0])
        runs["exp23_verified_s"].append(timed(lambda: coded_to_gpu(coded, "cuda"), False)[0])
    for k, v in runs.items():
        r[k], r[k + "_all"] = statistics.median(v), v
    state = coded_to_gpu(coded, "cuda")
    r["exact"] = bool(torch.equal(state["w"].view(torch.uint8), plain.cuda()))
    del state
    r["pinned_h2d_GBps_end"] = pinned_copy_limit()
    r["cpu_twin_GBps_1thread"] = cpu_twin_GBps(plain, enc)
    r["nvcomp_zstd"] = nvcomp_zstd(plain)
    limit = r["plain_limit_s"]
    r["summary"] = {
        "decode_vs_pinned_copy": r["decode_GBps"] / r["pinned_h2d_GBps"],
        "exp23_verified_vs_pinned_limit": r["exp23_verified_s"] / limit,
        "exp23_verified_vs_plain_copy": r["exp23_verified_s"] / r["plain_copy_s"],
        "plain_verified_vs_pinned_limit": r["plain_verified_s"] / limit,
    }
    for k, v in r.items():
        print(f"{k}: {v}")
    save_results(args.out, f"gpu-decode-{args.gib}g", r)
    if args.disk_layers:
        del plain, coded, pinned
        d = disk_loads(args.dir, args.disk_layers, args.disk_repeats)
        for k, v in d.items():
            print(f"disk {k}: {v}")
        save_results(args.out, f"gpu-decode-disk-{args.disk_layers}l", d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
