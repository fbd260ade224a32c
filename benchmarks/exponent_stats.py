"""How compressible bf16 weights are, on the CPU: the exponent's entropy, an ideal Huffman
code's bits a weight, and the sizes exp23 (format version 4) and split-zstd (version 2) store.

    python benchmarks/exponent_stats.py [--words 16777216] [--model NAME] [--out DIR]

Measures `randn * 0.02` in bf16 (what the load benchmarks' random checkpoints hold) and, with
`--model`, the bf16 tensors of a model in the store. Published for trained Llama weights:
DFloat11 (arXiv 2504.11651) counts about 2.6 bits of exponent entropy and stores
Llama-3.1-8B in 67.8 % of its bytes; ZipNN (arXiv 2411.05239) saves about 33 % on BF16
models and finds about 40 distinct exponents, the 12 commonest holding 99.9 % of weights.
"""

from __future__ import annotations

import argparse
import heapq
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from checkpoint import save_results

from sllmctl.store import codec, codec_exp23
from sllmctl.store.format import CHUNK_SIZE


def entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def huffman_bits(counts: np.ndarray) -> float:
    """Mean code length of a Huffman code for these symbol counts."""
    heap = [(int(c), i, [i]) for i, c in enumerate(counts) if c > 0]
    heapq.heapify(heap)
    length = np.zeros(len(counts))
    serial = len(counts)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for s in a[2] + b[2]:
            length[s] += 1
        heapq.heappush(heap, (a[0] + b[0], serial, a[2] + b[2]))
        serial += 1
    return float((length * counts).sum() / counts.sum())


def stats(data: np.ndarray) -> dict[str, Any]:
    """Figures for bf16 bytes `data` (whole 16 MiB chunks are coded as a writer would)."""
    w = data.view("<u2")
    e = np.bincount((w >> 7) & 0xFF, minlength=256)
    ranked = np.sort(e)[::-1] / e.sum()
    stored_exp23 = stored_zstd = 0
    for off in range(0, len(data), CHUNK_SIZE):
        chunk = data[off:off + CHUNK_SIZE]
        for enc, name in ((codec_exp23.encode_chunk, "exp23"), (codec.encode_chunk, "zstd")):
            _, parts = enc(chunk)
            n = sum(memoryview(p).nbytes for p in parts)
            if name == "exp23":
                stored_exp23 += n
            else:
                stored_zstd += n
    return {
        "words": len(w),
        "exponent_entropy_bits": entropy(e),
        "high_byte_entropy_bits": entropy(np.bincount(w >> 8, minlength=256)),
        "distinct_exponents": int((e > 0).sum()),
        "top3_exponent_share": float(ranked[:3].sum()),  # exp23's 2-bit codes
        "top10_exponent_share": float(ranked[:10].sum()),  # and its 3-bit ones
        "huffman_bits_per_weight": 8 + huffman_bits(e),
        "huffman_ratio": (8 + huffman_bits(e)) / 16,
        "exp23_ratio": stored_exp23 / len(data),
        "split_zstd_ratio": stored_zstd / len(data),
    }


def model_bytes(name: str) -> np.ndarray:
    import sllmctl

    state = sllmctl.load_state_dict(name)
    parts = [t.reshape(-1).view(torch.uint8).numpy() for t in state.values()
             if t.dtype == torch.bfloat16]
    data = np.concatenate(parts)
    return data[: len(data) // CHUNK_SIZE * CHUNK_SIZE or len(data) // 16 * 16]


def main() -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    ap.add_argument("--words", type=int, default=1 << 24)
    ap.add_argument("--model", help="a bf16 model in the store, measured too")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(args.words, generator=g) * 0.02).to(torch.bfloat16)
    r: dict[str, Any] = {"randn*0.02": stats(x.view(torch.uint8).numpy())}
    if args.model:
        r[args.model] = stats(model_bytes(args.model))
    r["published"] = {"dfloat11_llama31_8b_ratio": 0.678,
                      "dfloat11_exponent_entropy_bits": 2.6,
                      "zipnn_bf16_saving": 0.33, "zipnn_top12_exponent_share": 0.999}
    for k, v in r.items():
        print(k, v)
    save_results(args.out, "exponent-stats", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
