"""The load benchmarks' checkpoint and the machine's caches: a random Llama-3.1-8B-shaped
bf16 checkpoint of the real shapes (made on the GPU, converted once), results written as JSON,
the page cache dropped or filled."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

GB = 1e9
HIDDEN, INTER, VOCAB, HEADS, KV_HEADS = 4096, 14336, 128256, 32, 8


def llama_shapes(layers: int) -> dict[str, tuple[int, ...]]:
    head = HIDDEN // HEADS
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (HIDDEN,),
            p + "self_attn.q_proj.weight": (HIDDEN, HIDDEN),
            p + "self_attn.k_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.v_proj.weight": (KV_HEADS * head, HIDDEN),
            p + "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
            p + "post_attention_layernorm.weight": (HIDDEN,),
            p + "mlp.gate_proj.weight": (INTER, HIDDEN),
            p + "mlp.up_proj.weight": (INTER, HIDDEN),
            p + "mlp.down_proj.weight": (HIDDEN, INTER),
        }
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes


def generate(src: Path, layers: int, shards: int = 5) -> list[Path]:
    """Random bf16 weights of the real shapes, split into `shards` safetensors files."""
    from safetensors.torch import save_file

    index = src / "model.safetensors.index.json"
    if index.exists() and json.loads(index.read_text())["metadata"].get("layers") == layers:
        return sorted(src.glob("*.safetensors"))
    src.mkdir(parents=True, exist_ok=True)
    for old in src.glob("*.safetensors"):
        old.unlink()
    shapes = llama_shapes(layers)
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    per_shard = total / shards
    groups: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        if size >= per_shard * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append(name)
        size += torch.Size(shape).numel() * 2
    weight_map = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {n: (torch.randn(shapes[n], generator=g, device="cuda", dtype=torch.float32)
                       * 0.02).to(torch.bfloat16).cpu() for n in names}
        save_file(tensors, src / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, fname))
        del tensors
    index.write_text(json.dumps({"metadata": {"total_size": total, "layers": layers},
                                 "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTER, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "tie_word_embeddings": False}))
    os.sync()
    return sorted(src.glob("*.safetensors"))


def prepare(folder: Path, layers: int) -> tuple[list[Path], Any, float, float]:
    """The benchmark checkpoint under `folder`, made if missing: its safetensors shards, the
    converted model (in a store at `folder`/home, which becomes SLLMCTL_HOME), and the
    seconds spent generating and converting."""
    os.environ["SLLMCTL_HOME"] = str((folder / "home").resolve())
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    t0 = time.perf_counter()
    shards = generate(folder / "src", layers)
    gen_s = time.perf_counter() - t0
    name, store = f"llama-{layers}l", Store()
    t0 = time.perf_counter()
    if not store.exists(name):
        convert(folder / "src", name)
    return shards, store.get(name), gen_s, time.perf_counter() - t0


def save_results(folder: Path, stem: str, results: dict[str, Any]) -> Path:
    """Write `results` as JSON under `folder` (and under $OUT on the lent GPU machine)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}-{datetime.datetime.now():%Y%m%d-%H%M%S}.json"
    path.write_text(json.dumps(results, indent=1) + "\n")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], path.name).write_text(path.read_text())
    print(f"wrote {path}")
    return path


def drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def warm_files(paths: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def compressed_copy(folder: Path, model: Any) -> tuple[Any, float]:
    """The benchmark model converted again with --compress (made if missing), and the
    seconds that took."""
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    name, store = f"{model.name}-z", Store()
    t0 = time.perf_counter()
    if not store.exists(name):
        convert(folder / "src", name, compress=True)
    return store.get(name), time.perf_counter() - t0


def arguments(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's command line, with the options they all take: --layers (32 is the
    Llama-3.1-8B shape), --dir (where the checkpoint lives) and --out (the results)."""
    ap = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    ap.add_argument("--layers", type=int, default=32, help="32 is the Llama-3.1-8B shape")
    ap.add_argument("--dir", type=Path, default=Path("bench-data"))
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    return ap


def have_cuda() -> bool:
    """Whether a CUDA GPU is here; says so on stderr when not."""
    if torch.cuda.is_available():
        return True
    print("needs a CUDA GPU", file=sys.stderr)
    return False
