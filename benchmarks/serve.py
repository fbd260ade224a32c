"""Serving benchmark: decode speed and time to first token, against transformers and the roofline.

    python benchmarks/serve.py                       # Llama-3.1-8B shape, random bf16, on CUDA
    python benchmarks/serve.py --model NAME --device cpu --streams 4 --tokens 16   # a quick check

Prints, in one run: the device's memory bandwidth (a large copy, bytes read + written) and the
decode roofline (weight bytes / bandwidth, tokens/s at batch 1); sllmctl's decode tokens/s at
batch 1 and with N concurrent streams through the continuous-batching engine; transformers'
`generate` (eager) at batch 1 and batch N on the same weights; and time to first token through
the daemon's HTTP API for a model loaded from the DRAM tier and from disk (page cache dropped,
as root). Writes JSON under benchmarks/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import http.client
import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import drop_caches, free_gpu, generate, save_results


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def memory_bandwidth(device: torch.device) -> float:
    """GB/s of a large copy on `device`, counting bytes read and written."""
    n = (2 << 30) if device.type == "cuda" else (512 << 20)
    a = torch.empty(n, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        b.copy_(a)
        sync(device)
        times.append(time.perf_counter() - t)
    return 2 * n / min(times) / 1e9


def ours_batch1(chat: Any, prompt: list[int], tokens: int) -> float:
    """Decode tokens/s at batch 1 (time after the first token, so prefill is excluded)."""
    from sllmctl.engine.sampling import stream

    device = chat.model.embed_tokens.weight.device
    with torch.inference_mode():
        list(stream(chat.model, prompt, 4, eos_ids=[]))  # warm-up
        it = stream(chat.model, prompt, tokens + 1, eos_ids=[])
        next(it)
        sync(device)
        t = time.perf_counter()
        n = sum(1 for _ in it)
        sync(device)
    return n / (time.perf_counter() - t)


def ours_streams(chat: Any, prompts: list[list[int]], tokens: int) -> float:
    """Total tokens/s of len(prompts) concurrent requests through the batching engine."""
    from sllmctl.engine.batch import BatchEngine

    engine = BatchEngine(chat.model, slots=len(prompts), max_len=max(map(len, prompts)) + tokens)
    list(engine.submit(prompts[0], 4, eos=set()))  # warm-up
    counts = [0] * len(prompts)

    def run(i: int) -> None:
        counts[i] = sum(1 for _ in engine.submit(prompts[i], tokens, eos=set()))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t
    engine.close()
    return sum(counts) / seconds


def transformers_generate(files: Path, state: dict[str, torch.Tensor], device: torch.device,
                          dtype: torch.dtype, batch: int, prompt: list[int], tokens: int
                          ) -> float:
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(files)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                 attn_implementation="eager")
    missing, _ = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"}, missing
    model.eval()
    ids = torch.tensor([prompt] * batch, device=device)
    kw = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False,
          "pad_token_id": 0}
    with torch.inference_mode():
        model.generate(ids, **{**kw, "max_new_tokens": 4, "min_new_tokens": 4})
        sync(device)
        t = time.perf_counter()
        model.generate(ids, **kw)
        sync(device)
    return batch * tokens / (time.perf_counter() - t)


def ttft_http(address: str, model: str) -> float:
    """Seconds from sending a streaming chat request to its first content chunk."""
    host, port = address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"model": model, "stream": True, "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": "Say hi."}]})
    t = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"content-type": "application/json"})
    resp = conn.getresponse()
    while line := resp.readline():
        if line.startswith(b"data: ") and b'"content": "' in line and b'"content": ""' not in line:
            seconds = time.perf_counter() - t
            resp.read()
            conn.close()
            return seconds
    raise RuntimeError("no token came back")


def bench_ttft(name: str, model_bytes: int, results: dict[str, Any]) -> None:
    from sllmctl.daemon import client as dc

    c = dc.start_detached(dram_pool=f"{(model_bytes >> 30) + 2}GiB", measure_bytes=64 << 20)
    try:
        while True:
            dram = c.call("status")["dram"]
            if dram and dram["allocated"] >= dram["capacity"]:
                break
            time.sleep(0.2)
        port = 18000 + os.getpid() % 1000
        c.call("warm", {"name": name, "tier": "dram"})
        r = c.call("serve", {"name": name, "port": port, "keep_alive": -1})
        address = r["endpoint"].removesuffix("/v1")
        for tier in ("dram", "disk"):
            c.call("unserve", {"name": name})
            with contextlib.suppress(Exception):  # not resident there (CPU: no GPU tier)
                c.call("unload", {"name": name, "tier": "gpu" if tier == "dram" else None})
            if tier == "disk" and os.geteuid() == 0:
                drop_caches()
            seconds = ttft_http(address, name)
            loaded = next(s for s in c.call("status")["serving"] if s["name"] == name)
            results[f"ttft_from_{tier}_s"] = seconds
            print(f"  TTFT through HTTP, model not loaded, from {tier}: {seconds:.3f} s "
                  f"(loaded from {loaded['tier']} in {loaded['load_seconds']:.3f} s)", flush=True)
    finally:
        dc.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a stored model (default: generate the 8B shape)")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--dir", type=Path, default=Path("bench-data"))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    device = torch.device(args.device)
    from sllmctl.engine.chat import ChatModel
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    if args.model:
        name = args.model
    else:
        os.environ["SLLMCTL_HOME"] = str((args.dir / "home").resolve())
        generate(args.dir / "src", args.layers)
        name = f"llama-{args.layers}l"
        if not Store().exists(name):
            convert(args.dir / "src", name)
    chat = ChatModel.load(name, str(device))
    weights = sum(p.numel() * p.element_size() for p in chat.model.parameters())
    results: dict[str, Any] = {"model": name, "device": str(device), "weight_bytes": weights}
    bw = memory_bandwidth(device)
    roofline = bw / weights * 1e9
    results |= {"memory_GBps": bw, "roofline_batch1_tps": roofline}
    print(f"{name} on {device}: {weights / 1e9:.2f} GB of weights; memory {bw:.0f} GB/s; "
          f"roofline at batch 1: {roofline:.0f} tokens/s", flush=True)
    g = torch.Generator().manual_seed(0)
    vocab = chat.model.config.vocab
    prompts = [torch.randint(10, vocab, (32,), generator=g).tolist() for _ in range(args.streams)]
    b1 = ours_batch1(chat, prompts[0], args.tokens)
    print(f"  sllmctl batch 1:           {b1:8.1f} tokens/s ({100 * b1 / roofline:.0f} % of "
          "the roofline)", flush=True)
    many = ours_streams(chat, prompts, args.tokens)
    print(f"  sllmctl {args.streams} streams:        {many:8.1f} tokens/s in total", flush=True)
    results |= {"sllmctl_batch1_tps": b1, "sllmctl_streams_tps": many, "streams": args.streams}
    if not args.skip_transformers:
        files = Store().path(name) / "files"
        state = {k: v for k, v in chat.model.state_dict().items()}
        state = {("model." + k if not k.startswith("lm_head") else k): v
                 for k, v in state.items()}
        dtype = chat.model.embed_tokens.weight.dtype
        for batch in (1, args.streams):
            tps = transformers_generate(files, state, device, dtype, batch, prompts[0],
                                        args.tokens)
            results[f"transformers_batch{batch}_tps"] = tps
            print(f"  transformers generate, batch {batch}: {tps:8.1f} tokens/s", flush=True)
    chat.close()
    del chat
    if device.type == "cuda":
        free_gpu()
    bench_ttft(name, sum(f.size for f in Store().get(name).manifest.files), results)
    results["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results["torch"] = torch.__version__
    save_results(args.out, f"serve-{name}", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
