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
from checkpoint import arguments, drop_caches, generate, save_results
from limits import free_gpu


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


def write_tokenizer(src: Path, vocab: int) -> None:
    """A byte-level tokenizer with `vocab` ids and a Llama-3-style chat template, for the
    random model (its text is noise; what matters is that requests go through the whole
    serving path). Every byte is one token, so a prompt's length is easy to choose."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    if (src / "tokenizer.json").exists():
        return
    alphabet = sorted(ByteLevel.alphabet())
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eot_id|>"]
    ids = {c: i for i, c in enumerate(alphabet)}
    for i in range(len(ids), vocab - 256):
        ids[f"w{i}"] = i
    tok = Tokenizer(models.BPE(vocab=ids, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t in specials])
    tok.save(str(src / "tokenizer.json"))
    template = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
                "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>"
                "\n\n{% endif %}")
    (src / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
        "chat_template": template}))


def decode_rate(chat: Any, prompts: list[list[int]], tokens: int, graphs: bool,
                slots: int) -> tuple[float, float]:
    """(steady decode tokens/s, end-to-end tokens/s) of len(prompts) concurrent requests
    through the continuous-batching engine. Steady: tokens produced after every request has
    its first token, over the time since then (prefills excluded)."""
    from sllmctl.engine.batch import BatchEngine

    engine = BatchEngine(chat.model, slots=slots, max_len=max(map(len, prompts)) + tokens + 1,
                         graphs=graphs)
    run_streams(engine, prompts, tokens)  # warm-up over the same shapes (captures graphs)
    stamps, seconds = run_streams(engine, prompts, tokens)
    engine.close()
    start = max(s[0] for s in stamps)
    end = max(s[-1] for s in stamps)
    steady = sum(sum(1 for t in s if t > start) for s in stamps)
    return steady / (end - start), sum(map(len, stamps)) / seconds


def run_streams(engine: Any, prompts: list[list[int]], tokens: int
                ) -> tuple[list[list[float]], float]:
    stamps: list[list[float]] = [[] for _ in prompts]

    def run(i: int) -> None:
        for _ in engine.submit(prompts[i], tokens, eos=set()):
            stamps[i].append(time.perf_counter())

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    t = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return stamps, time.perf_counter() - t


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


def ttft_http(address: str, model: str, content: str) -> float:
    """Seconds from sending a streaming chat request to its first content chunk."""
    host, port = address.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=600)
    body = json.dumps({"model": model, "stream": True, "max_tokens": 4, "temperature": 0,
                       "messages": [{"role": "user", "content": content}]})
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


PROMPTS = {"short": "Say hi.", "long": "Tell me about this. " * 100}  # 7 and 2000 tokens


def bench_ttft(name: str, model_bytes: int, results: dict[str, Any], pipelined: bool,
               tiers: tuple[str, ...]) -> None:
    from sllmctl.wire import client as dc

    os.environ["SLLMCTL_LAYER_PIPELINE"] = "1" if pipelined else "0"
    mode = "pipelined" if pipelined else "sequential"
    c = dc.start_detached(dram_pool=f"{(model_bytes >> 30) + 2}GiB", measure_bytes=64 << 20)
    try:
        while True:
            dram = c.call("status")["dram"]
            if dram and dram["allocated"] >= dram["capacity"]:
                break
            time.sleep(0.2)
        port = 18000 + os.getpid() % 1000
        if "disk" not in tiers:
            c.call("warm", {"name": name, "tier": "dram"})
        r = c.call("serve", {"name": name, "port": port, "keep_alive": -1})
        address = r["endpoint"].removesuffix("/v1")
        while torch.cuda.is_available() and not any(
                m["name"] == name and m["ready"] for m in c.call("status")["dram"]["models"]):
            time.sleep(0.2)  # serve's own load from disk also fills the DRAM tier
        for kind, content in PROMPTS.items():
            for tier in tiers:  # from disk first: that load also fills the DRAM tier
                c.call("unserve", {"name": name})
                with contextlib.suppress(Exception):  # not resident there (CPU: no GPU tier)
                    c.call("unload", {"name": name, "tier": "gpu" if tier == "dram" else None})
                if tier == "disk" and os.geteuid() == 0:
                    drop_caches()
                seconds = ttft_http(address, name, content)
                loaded = next(s for s in c.call("status")["serving"] if s["name"] == name)
                results[f"ttft_{mode}_{tier}_{kind}_s"] = seconds
                results[f"load_{mode}_{tier}_{kind}_s"] = loaded["load_seconds"]
                print(f"  TTFT through HTTP, {mode}, from {tier}, {kind} prompt: "
                      f"{seconds:.3f} s (loaded from {loaded['tier']} in "
                      f"{loaded['load_seconds']:.3f} s; load stages {loaded.get('load_stages')})",
                      flush=True)
                filling = tier == "disk" and torch.cuda.is_available()
                while filling and not any(m["name"] == name and m["ready"]
                                          for m in c.call("status")["dram"]["models"]):
                    time.sleep(0.2)  # the background read into DRAM, before the next load
    finally:
        dc.stop()


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--model", help="a stored model (default: generate the 8B shape)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--ttft-from", default="dram,disk", help="tiers to time TTFT from")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--skip-eager", action="store_true", help="on CUDA, time graphs only")
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
        write_tokenizer(args.dir / "src", 128256)
        name = f"llama-{args.layers}l-chat"
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
    prompts = [torch.randint(300, vocab - 300, (32,), generator=g).tolist()
               for _ in range(args.streams)]
    slots = max(args.streams, 1)
    modes = [True] if args.skip_eager else [True, False]
    modes = modes if device.type == "cuda" else [False]
    for graphs in modes:
        label = "CUDA graphs" if graphs else "eager"
        one, _ = decode_rate(chat, prompts[:1], args.tokens, graphs, slots)
        print(f"  sllmctl batch 1, {label}: {one:8.1f} tokens/s ({100 * one / roofline:.0f} % "
              "of the roofline)", flush=True)
        many, e2e = decode_rate(chat, prompts, args.tokens, graphs, slots)
        print(f"  sllmctl {args.streams} streams, {label}: {many:8.1f} tokens/s decoding "
              f"({e2e:.1f} end to end, prefills included)", flush=True)
        key = "graphs" if graphs else "eager"
        results |= {f"sllmctl_{key}_batch1_tps": one, f"sllmctl_{key}_streams_tps": many,
                    f"sllmctl_{key}_streams_e2e_tps": e2e}
    results["streams"] = args.streams
    if not args.skip_transformers:
        files = Store().path(name) / "files"
        state = {k: v for k, v in chat.model.state_dict().items()}
        state = {("model." + k if not k.startswith("lm_head") else k): v
                 for k, v in state.items()}
        dtype = chat.model.embed_tokens.weight.dtype
        for batch in (1, args.streams):
            tps = transformers_generate(files, state, device, dtype, batch, prompts[0],
                                        min(args.tokens, 64))
            results[f"transformers_batch{batch}_tps"] = tps
            b1 = results.get("sllmctl_graphs_batch1_tps" if batch == 1 else
                             "sllmctl_graphs_streams_tps") or results.get(
                "sllmctl_eager_batch1_tps" if batch == 1 else "sllmctl_eager_streams_tps")
            print(f"  transformers generate (eager), batch {batch}: {tps:8.1f} tokens/s "
                  f"(sllmctl {b1 / tps:.1f}x)", flush=True)
    chat.close()
    del chat
    if device.type == "cuda":
        free_gpu()
    size = sum(f.size for f in Store().get(name).manifest.files)
    tiers = tuple(sorted((t for t in args.ttft_from.split(",") if t), key="disk,dram".find))
    if device.type == "cuda":  # disk loads take seconds: compare the modes from DRAM only
        bench_ttft(name, size, results, True, tiers)
        bench_ttft(name, size, results, False, ("dram",))
    else:
        bench_ttft(name, size, results, False, tiers)
    results["date"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    results["torch"] = torch.__version__
    save_results(args.out, f"serve-{name}", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
