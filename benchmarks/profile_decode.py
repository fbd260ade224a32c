"""Where a decode step's time goes: the replay time of the captured step alone (without
sampling or Python in between), with cuDNN's attention and without (the engine's default);
an eager step's wall time through the Triton kernels (launched directly, and through Triton's
own launch path) and through plain PyTorch; and the kernels of one eager step (count, device
time by kind).

    python benchmarks/profile_decode.py NAME [--rows 1,32] [--kv-len 512]
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch


def replay(model: Any, rows: int, kv_len: int) -> float:
    """Seconds per replay of a freshly captured decode step of `rows` rows."""
    from sllmctl.engine.graphs import DecodeGraphs

    graphs = DecodeGraphs(model, rows)
    graphs.pos.fill_(100)
    graphs.run(rows, kv_len)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(50):
        graphs.run(rows, kv_len)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - t) / 50
    graphs.clear()
    return seconds


def eager(model: Any, rows: int, kv_len: int) -> float:
    tokens = torch.zeros(rows, 1, dtype=torch.long, device="cuda")
    pos = torch.full((rows, 1), 100, dtype=torch.long, device="cuda")
    for _ in range(3):
        model(tokens, pos, last_only=True, kv_len=kv_len)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(20):
        model(tokens, pos, last_only=True, kv_len=kv_len)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / 20


def eager_variants(model: Any, rows: int, kv_len: int) -> dict[str, float]:
    from sllmctl.engine import fastpath, kernels

    launchers = [v for v in vars(kernels).values() if isinstance(v, fastpath.Launcher)]
    out = {}
    if model.fused:
        out["Triton kernels, launched directly"] = eager(model, rows, kv_len)
        for launcher in launchers:
            launcher.direct = False
        out["Triton kernels, Triton's own launch"] = eager(model, rows, kv_len)
        for launcher in launchers:
            launcher.direct = True
    fused, model.fused = model.fused, False
    out["plain PyTorch"] = eager(model, rows, kv_len)
    model.fused = fused
    return out


def kernels_of_a_step(model: Any, rows: int, kv_len: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    tokens = torch.zeros(rows, 1, dtype=torch.long, device="cuda")
    pos = torch.full((rows, 1), 100, dtype=torch.long, device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        model(tokens, pos, last_only=True, kv_len=kv_len)
        torch.cuda.synchronize()
    events = [e for e in p.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"eager step, {rows} rows: {count} kernels, {total / 1e3:.2f} ms of device time",
          flush=True)
    for e in sorted(events, key=lambda e: -e.device_time_total)[:14]:
        print(f"  {e.device_time_total / 1e3:7.3f} ms {e.count:5d}x  {e.key[:90]}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--rows", default="1,32")
    ap.add_argument("--kv-len", type=int, default=512)
    args = ap.parse_args()
    import sllmctl
    from sllmctl.engine.config import ModelConfig
    from sllmctl.engine.model import Transformer
    from sllmctl.store.store import Store

    config = ModelConfig.from_dir(Store().path(args.name) / "files")
    model = Transformer.from_state_dict(config, sllmctl.load_state_dict(args.name, "cuda"))
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    rows = [int(r) for r in args.rows.split(",")]
    model.setup_cache(max(rows), args.kv_len)
    with torch.inference_mode():
        for n in rows:
            for cudnn in (False, True):
                torch.backends.cuda.enable_cudnn_sdp(cudnn)
                step = replay(model, n, args.kv_len)
                print(f"graph replay, {n} rows, attention {'with' if cudnn else 'without'} "
                      f"cuDNN: {1e3 * step:.3f} ms per step = {n / step:.1f} tokens/s; "
                      f"weights {weights / 1e9:.2f} GB -> {weights / step / 1e9:.0f} GB/s",
                      flush=True)
            torch.backends.cuda.enable_cudnn_sdp(False)
            for label, seconds in eager_variants(model, n, args.kv_len).items():
                print(f"eager step, {n} rows, {label}: {1e3 * seconds:.2f} ms = "
                      f"{n / seconds:.1f} tokens/s", flush=True)
        kernels_of_a_step(model, rows[0], args.kv_len)
    return 0


if __name__ == "__main__":
    sys.exit(main())
