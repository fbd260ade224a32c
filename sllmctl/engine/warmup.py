"""Warm-up at daemon start: what a first request would otherwise initialise on its own path.

A fresh process pays, on the first forward of a model shape: Triton compiling the fused
kernels (sllmctl.engine.kernels) for each specialisation it meets (decode and prefill lengths,
with and without a residual), cuBLAS choosing and CUDA loading each matrix multiply's kernel
(CUDA loads kernel code lazily), attention's backend choice, the first graph capture, and the
chat template's compilation. None of that depends on the weights, so `at_start` runs every
stored model's shape once on a stand-in: one (or, with sliding windows, two) layers of the same
widths with random weights, through the same continuous-batching engine the daemon serves with,
at each batch-row bucket and at decode and prefill lengths. Triton's cache is kept under the
daemon's own folder (`<home>/cache/triton`, unless TRITON_CACHE_DIR is set), so a later daemon
start loads the compiled kernels instead of compiling them again.

SLLMCTL_WARMUP=0 turns this off (to measure what it saves).
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from sllmctl.engine.config import ModelConfig
from sllmctl.engine.model import Transformer

SLOTS = 32  # the most rows the daemon batches (serving's _slots): every row bucket up to it
MAX_LEN = 2048  # the daemon's KV cache length per request


def enabled() -> bool:
    return os.environ.get("SLLMCTL_WARMUP", "1") != "0"


def triton_cache(home: Path) -> Path:
    """Point Triton's kernel cache at the daemon's folder (unless TRITON_CACHE_DIR says
    otherwise) and return it. Must run before the first kernel compiles."""
    folder = Path(os.environ.setdefault("TRITON_CACHE_DIR", str(home / "cache" / "triton")))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stand_in(config: ModelConfig, device: Any, dtype: torch.dtype) -> Transformer:
    """A model of `config`'s widths with one layer (two where some layers slide, so that both
    attention masks run) and random weights, laid out as the store lays them: every weight
    back to back in one buffer, so the fused q/k/v and gate/up views apply as they do on the
    real model."""
    sliding = bool(config.sliding_layers)
    small = dataclasses.replace(config, layers=2 if sliding else 1,
                                sliding_layers=(0,) if sliding else (),
                                tie_word_embeddings=True)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(small).state_dict().items()}
    shapes.pop("lm_head.weight", None)  # tied
    order = sorted(shapes, key=lambda k: k.endswith(".bias"))  # biases after all weights
    total = sum(shapes[k].numel() for k in order)
    flat = torch.empty(total, device=device, dtype=dtype)
    flat.normal_(0.0, 0.02)
    state: dict[str, torch.Tensor] = {}
    at = 0
    for k in order:
        n = shapes[k].numel()
        state[k] = flat[at:at + n].view(shapes[k])
        at += n
    return Transformer.from_state_dict(small, state)


def exercise(model: Transformer, slots: int = SLOTS, max_len: int = MAX_LEN) -> int:
    """Requests through a continuous-batching engine on `model` (graphs on CUDA): waves of
    1, 2, 4, ... `slots` concurrent streams (every row bucket), prompts of lengths that are
    and are not multiples of 16 and one past the shortest attended length; each decodes a
    few steps. Returns the number of requests run."""
    from sllmctl.engine.batch import MIN_KV, BatchEngine

    engine = BatchEngine(model, slots=slots, max_len=max_len)
    vocab = model.config.vocab
    lengths = [7, 16, MIN_KV + 9]
    waves, n = [], 1
    while n <= slots:
        waves.append(n)
        n *= 2
    count = 0
    try:
        for wave in [1, *waves]:
            streams = [engine.submit([(3 * i + 11) % vocab] * lengths[(i + wave) % 3], 3,
                                     eos=set()) for i in range(wave)]
            threads = [threading.Thread(target=lambda s=s: list(s)) for s in streams]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            count += wave
    finally:
        engine.close()
    return count


def shape_key(config: ModelConfig, dtype: torch.dtype) -> str:
    """What the kernels a model meets depend on: its widths and dtype, not its layer count,
    token ids or context beyond the daemon's."""
    return repr(dataclasses.replace(
        config, layers=0, eos_ids=(), bos_id=None,
        sliding_layers=(0,) if config.sliding_layers else (),
        max_position_embeddings=min(config.max_position_embeddings, MAX_LEN))) + str(dtype)


def stored_models() -> list[tuple[ModelConfig, torch.dtype, Path]]:
    """(config, weight dtype, files folder) of every model in the store that reads."""
    from sllmctl.store.format import torch_dtype
    from sllmctl.store.store import Store

    store, found = Store(), []
    for name in store.names():
        try:
            model = store.get(name)
            files = store.path(name) / "files"
            config = ModelConfig.from_dir(files)
            dtype = next(iter(model.manifest.tensors.values())).dtype
            found.append((config, torch_dtype(dtype), files))
        except Exception:  # a broken entry is `ls`'s and `serve`'s to report, not start-up's
            continue
    return found


def compile_templates(folders: list[Path]) -> int:
    """Compile each model's chat template(s) now (jinja2, cached per template)."""
    from sllmctl.engine.chat_template import compile_template, find_chat_template, read_json

    count = 0
    for files in folders:
        try:
            found = find_chat_template(files, read_json(files / "tokenizer_config.json"))
        except Exception:
            continue
        for template in ([found] if isinstance(found, str) else list((found or {}).values())):
            try:
                compile_template(template)
                count += 1
            except Exception:  # a broken template fails the request that uses it
                continue
    return count


def at_start(home: Path, gpus: int) -> dict[str, Any]:
    """The daemon's warm-up: Triton's cache under `home`, then every stored model shape run
    once on each of the `gpus` GPUs (none: nothing to do). Returns what it did, for the log."""
    if not enabled() or gpus <= 0:
        return {"skipped": True}
    start = time.perf_counter()
    cache = triton_cache(home)
    models = stored_models()
    distinct = {shape_key(c, d): (c, d) for c, d, _ in reversed(models)}
    for gpu in range(gpus):
        device = torch.device("cuda", gpu)
        with torch.cuda.device(device):
            for config, dtype in distinct.values():
                with torch.inference_mode():
                    model = stand_in(config, device, dtype)
                exercise(model)
                del model
            torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # the stand-ins' memory goes back to the GPU tier
    templates = compile_templates([files for _, _, files in models])
    return {"shapes": len(distinct), "gpus": gpus, "templates": templates,
            "triton_cache": str(cache), "seconds": round(time.perf_counter() - start, 3)}


def at_daemon_start(home: Path, gpus: int) -> dict[str, Any]:
    """`at_start`, best effort: a warm-up that fails leaves the first request to initialise
    what it needs, as without one, and says why in what it returns."""
    try:
        return at_start(home, gpus)
    except Exception as e:
        return {"failed": f"{type(e).__name__}: {e}".splitlines()[0]}
