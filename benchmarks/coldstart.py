"""The first request of a fresh daemon, per tier, with the load and the rest split out; and,
in one process, where that first request's time goes.

    python benchmarks/coldstart.py --layers 32            # Llama-3.1-8B shape, on CUDA
    python benchmarks/coldstart.py --layers 8 --modes off-cold,on-cold,on-warm

Each mode starts fresh daemons (one per tier) on one store:
  off-cold  SLLMCTL_WARMUP=0 and an empty Triton cache: what a new host met before issue 20
  off-warm  SLLMCTL_WARMUP=0, Triton's cache filled by off-cold: a host that had served before
  on-cold   the start-up warm-up, the daemon's own Triton cache emptied first (its first start)
  on-warm   the same again: every later start
For each daemon: seconds to `ready` (the warm-up is part of it), then, from the DRAM tier (the
model read into it first) or from disk (page cache dropped, as root): TTFT of the daemon's
first request (which loads the model), the load's seconds (the daemon's `serving` status),
TTFT again with the model on the GPU, and TTFT of a later cold start from the DRAM tier. The
HTTP listener is started by serving a small starter model of another shape, so that the big
model's first request is its first load and its first forward in that process.

`--inproc` instead profiles one fresh process: the load, the model and engine built, the first
and second chat request, each timed, and the first request's cProfile (the top functions).
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import arguments, drop_caches, generate, save_results
from serve import ttft_http, write_tokenizer

PROMPT = "Say hi."
MODES = ("off-cold", "off-warm", "on-cold", "on-warm")


def starter(folder: Path) -> str:
    """A one-layer model of another shape, to open the HTTP listener with."""
    from safetensors.torch import save_file

    from sllmctl.engine.config import ModelConfig
    from sllmctl.engine.model import Transformer
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    if Store().exists("starter"):
        return "starter"
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512,
              "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
              "tie_word_embeddings": False, "eos_token_id": 1, "torch_dtype": "bfloat16"}
    src = folder / "starter-src"
    src.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = Transformer(ModelConfig.from_hf(config)).state_dict()
    save_file({(k if k.startswith("lm_head") else f"model.{k}"):
               torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in shapes.items()},
              src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))
    write_tokenizer(src, 512)
    convert(src, "starter")
    return "starter"


def mode_env(mode: str, folder: Path) -> None:
    os.environ["SLLMCTL_WARMUP"] = "1" if mode.startswith("on") else "0"
    os.environ.pop("TRITON_CACHE_DIR", None)
    if mode.startswith("off"):
        os.environ["TRITON_CACHE_DIR"] = str(folder / "triton-off")
        if mode == "off-cold":
            shutil.rmtree(folder / "triton-off", ignore_errors=True)
    elif mode == "on-cold":
        from sllmctl import paths

        shutil.rmtree(paths.home() / "cache" / "triton", ignore_errors=True)


def served(c: Any, name: str) -> dict[str, Any]:
    return next(s for s in c.call("status")["serving"] if s["name"] == name)


def one_daemon(name: str, size: int, tier: str, port: int) -> dict[str, Any]:
    from sllmctl.wire import client as dc
    from sllmctl.wire.client import Client

    r: dict[str, Any] = {}
    t = time.perf_counter()
    c: Client = dc.start_detached(dram_pool=f"{(size >> 30) + 2}GiB", measure_bytes=64 << 20)
    try:
        while c.call("status")["daemon"]["state"] != "ready":
            time.sleep(0.02)
        r["ready_s"] = time.perf_counter() - t
        while (d := c.call("status")["dram"]) and d["allocated"] < d["capacity"]:
            time.sleep(0.1)
        if tier == "dram":
            c.call("warm", {"name": name, "tier": "dram"})
        address = c.call("serve", {"name": "starter", "port": port,
                                   "keep_alive": -1})["endpoint"].removesuffix("/v1")
        if tier == "disk" and os.geteuid() == 0:
            drop_caches()
        r["first_ttft_s"] = ttft_http(address, name, PROMPT)
        s = served(c, name)
        r["first_load_s"], r["first_from"] = s["load_seconds"], s["tier"]
        r["first_rest_s"] = r["first_ttft_s"] - r["first_load_s"]
        r["hot_ttft_s"] = ttft_http(address, name, PROMPT)
        while tier == "disk" and not any(m["name"] == name and m["ready"]
                                         for m in c.call("status")["dram"]["models"]):
            time.sleep(0.2)  # the background read into DRAM
        c.call("unserve", {"name": name})
        with contextlib.suppress(Exception):  # not resident there (CPU: no GPU tier)
            c.call("unload", {"name": name, "tier": "gpu"})
        r["later_ttft_s"] = ttft_http(address, name, PROMPT)
        s = served(c, name)
        r["later_load_s"], r["later_from"] = s["load_seconds"], s["tier"]
        r["later_rest_s"] = r["later_ttft_s"] - r["later_load_s"]
    finally:
        dc.stop()
    from sllmctl.daemon.server import ensure_runtime_dir

    log = (ensure_runtime_dir() / "daemon.log").read_text(errors="replace")
    found = re.findall(r"warm-up: (\{.*\})", log)
    r["warmup"] = found[-1] if found else None
    return r


def daemons(args: Any, name: str, results: dict[str, Any]) -> None:
    from sllmctl.store.store import Store

    size = sum(f.size for f in Store().get(name).manifest.files)
    starter(args.dir)
    from sllmctl.wire import client as dc

    os.environ["SLLMCTL_WARMUP"] = "0"  # a first daemon measures the disk, once per home
    c = dc.start_detached(dram_pool="1GiB", measure_bytes=64 << 20)
    while not c.call("status")["bandwidth"]:
        time.sleep(0.2)
    dc.stop()
    port = 18000 + os.getpid() % 1000
    for mode in args.modes.split(","):
        for tier in args.tiers.split(","):
            mode_env(mode, args.dir)  # a cold mode is cold for each tier
            r = one_daemon(name, size, tier, port)
            results[f"{mode}_{tier}"] = r
            print(f"  {mode:8s} from {tier}: ready {r['ready_s']:.2f} s; first request TTFT "
                  f"{r['first_ttft_s']:.3f} s = load {r['first_load_s']:.3f} s "
                  f"({r['first_from']}) + {r['first_rest_s']:.3f} s; on the GPU "
                  f"{r['hot_ttft_s']:.3f} s; later from {r['later_from']} "
                  f"{r['later_ttft_s']:.3f} s (load {r['later_load_s']:.3f} s); "
                  f"warm-up {r['warmup']}", flush=True)


def inproc(name: str, warm: bool, out: Path) -> dict[str, Any]:
    """One fresh process: each stage of a first and a second request, timed."""
    import sllmctl
    from sllmctl.engine.chat import ChatModel, Params

    r: dict[str, Any] = {}

    def stage(key: str, fn: Any) -> Any:
        t = time.perf_counter()
        value = fn()
        torch.cuda.synchronize()
        r[key] = time.perf_counter() - t
        return value

    stage("cuda_init_s", lambda: torch.zeros(1, device="cuda"))
    if warm:
        from sllmctl import paths
        from sllmctl.engine import warmup

        stage("warmup_s", lambda: warmup.at_start(paths.home(), 1))
    state = stage("load_s", lambda: sllmctl.load_state_dict(name, "cuda"))
    chat = stage("build_s", lambda: ChatModel.from_state(name, state, "cuda"))
    stage("engine_s", lambda: chat.start_batching(slots=32))
    messages = [{"role": "user", "content": PROMPT}]
    prof = cProfile.Profile()
    prof.enable()
    first = stage("first_request_s", lambda: chat.chat(messages, Params(max_tokens=16)))
    prof.disable()
    second = stage("second_request_s", lambda: chat.chat(messages, Params(max_tokens=16)))
    r |= {"first_ttft_s": first.ttft, "second_ttft_s": second.ttft,
          "same_text": first.text == second.text}
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    (out / f"inproc-{'warm' if warm else 'cold'}-profile.txt").write_text(buf.getvalue())
    chat.close()
    return r


def main() -> int:
    ap = arguments(__doc__)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--inproc", choices=("cold", "warm"), help="profile one fresh process")
    ap.add_argument("--tiers", default="dram,disk")
    ap.add_argument("--skip-inproc", action="store_true")
    args = ap.parse_args()
    os.environ["SLLMCTL_HOME"] = str((args.dir / "home").resolve())
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    name = f"llama-{args.layers}l-chat"
    if args.inproc:
        os.environ["TRITON_CACHE_DIR"] = str(args.dir / f"triton-inproc-{args.inproc}")
        shutil.rmtree(os.environ["TRITON_CACHE_DIR"], ignore_errors=True)
        r = inproc(name, args.inproc == "warm", Path(os.environ.get("OUT", args.out)))
        print(json.dumps(r))
        return 0
    generate(args.dir / "src", args.layers)
    write_tokenizer(args.dir / "src", 128256)
    if not Store().exists(name):
        convert(args.dir / "src", name)
    results: dict[str, Any] = {"model": name, "layers": args.layers,
                               "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if not args.skip_inproc:
        for kind in ("cold", "warm"):
            out = subprocess.run([sys.executable, __file__, "--inproc", kind, "--layers",
                                  str(args.layers), "--dir", str(args.dir), "--out",
                                  str(args.out)], capture_output=True, text=True)
            line = out.stdout.strip().splitlines()[-1:] or [out.stderr[-2000:]]
            print(f"  in one process, {kind}: {line[0]}", flush=True)
            results[f"inproc_{kind}"] = json.loads(line[0]) if out.returncode == 0 else line
    daemons(args, name, results)
    save_results(args.out, f"coldstart-{name}", results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
