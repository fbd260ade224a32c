"""Where a decode step's time goes: kernels of one eager step (count, device time by kind) and
the replay time of the captured step alone, without sampling or Python in between.

    python benchmarks/profile_decode.py NAME [--rows 1] [--kv-len 512]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("name")
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--kv-len", type=int, default=512)
    args = ap.parse_args()
    import sllmctl
    from sllmctl.engine.config import ModelConfig
    from sllmctl.engine.graphs import DecodeGraphs
    from sllmctl.engine.model import Transformer
    from sllmctl.store.store import Store

    config = ModelConfig.from_dir(Store().path(args.name) / "files")
    model = Transformer.from_state_dict(config, sllmctl.load_state_dict(args.name, "cuda"))
    model.setup_cache(args.rows, args.kv_len)
    graphs = DecodeGraphs(model, args.rows)
    graphs.pos.fill_(100)
    with torch.inference_mode():
        graphs.run(args.rows, args.kv_len)
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(50):
            graphs.run(args.rows, args.kv_len)
        torch.cuda.synchronize()
        step = (time.perf_counter() - t) / 50
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        print(f"graph replay: {1e3 * step:.2f} ms per step = {args.rows / step:.1f} tokens/s; "
              f"weights {weights / 1e9:.2f} GB -> {weights / step / 1e9:.0f} GB/s", flush=True)
        fused = model.fused
        for model.fused in sorted({fused, False}, reverse=True):  # Triton kernels, then plain
            tokens, pos = graphs.tokens[: args.rows], graphs.pos[: args.rows]
            for _ in range(3):
                model(tokens, pos, last_only=True, kv_len=args.kv_len)
            torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(20):
                model(tokens, pos, last_only=True, kv_len=args.kv_len)
            torch.cuda.synchronize()
            eager = (time.perf_counter() - t) / 20
            print(f"eager step ({'Triton kernels' if model.fused else 'plain PyTorch'}): "
                  f"{1e3 * eager:.2f} ms = {args.rows / eager:.1f} tokens/s", flush=True)
        model.fused = fused
        from torch.profiler import ProfilerActivity, profile

        tokens, pos = graphs.tokens[: args.rows], graphs.pos[: args.rows]
        model(tokens, pos, last_only=True, kv_len=args.kv_len)
        with profile(activities=[ProfilerActivity.CUDA]) as p:
            model(tokens, pos, last_only=True, kv_len=args.kv_len)
            torch.cuda.synchronize()
    events = [e for e in p.key_averages() if e.device_time_total > 0]
    total = sum(e.device_time_total for e in events)
    count = sum(e.count for e in events)
    print(f"eager step: {count} kernels, {total / 1e3:.2f} ms of device time", flush=True)
    for e in sorted(events, key=lambda e: -e.device_time_total)[:14]:
        print(f"  {e.device_time_total / 1e3:7.3f} ms {e.count:5d}x  {e.key[:90]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
