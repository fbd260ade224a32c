"""The GPU loader, on a CUDA machine: bit-exact with the CPU path, corruption caught."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

import sllmctl
from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.format import CHUNK_SIZE
from sllmctl.store.store import Store
from sllmctl.store.writer import convert

pytestmark = pytest.mark.gpu


def benchmark_paths() -> tuple[Any, Any]:
    """load_pinned and pinned_to_gpu, which live with the benchmarks (benchmarks/gpu_paths.py)."""
    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if benchmarks not in sys.path:
        sys.path.insert(0, benchmarks)
    import gpu_paths

    return gpu_paths.load_pinned, gpu_paths.pinned_to_gpu


@pytest.fixture(params=[False, True], ids=["plain", "compressed"])
def model(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "big": torch.randn(3000, 4000, generator=g).to(torch.bfloat16),  # spans chunks
        "f32": torch.randn(1000, 1001, generator=g),
        "scalar": torch.tensor(3.5),
        "ids": torch.arange(17, dtype=torch.int64),
        "empty": torch.empty(0, 4),
        "f8": torch.randn(64, 64, generator=g).to(torch.float8_e4m3fn),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    convert(tmp_path, "g", max_file_size=20 << 20, compress=request.param)  # several files
    if request.param:  # the bf16 chunks are stored split, so the tests cover both kinds
        assert any(z for f in Store().get("g").manifest.files for z in f.frames or [])
    return "g"


@pytest.mark.parametrize("direct", [None, True, False])
def test_gpu_load_is_bit_exact_with_cpu(model: str, direct: bool | None) -> None:
    from sllmctl.store.gpu.loader import load_to_gpu

    cpu = sllmctl.load_state_dict(model)
    gpu = load_to_gpu(Store().get(model), "cuda:0", direct=direct)
    assert sorted(cpu) == sorted(gpu)
    for k, v in cpu.items():
        assert gpu[k].device.type == "cuda"
        assert (gpu[k].dtype, gpu[k].shape) == (v.dtype, v.shape)
        a = v.reshape(-1).view(torch.uint8)
        b = gpu[k].cpu().reshape(-1).view(torch.uint8)
        assert torch.equal(a, b), k


def test_pool_grows_only_as_loads_need_buffers(model: str) -> None:
    from sllmctl.store.gpu.loader import PinnedPool, load_to_gpu, pieces

    cpu = sllmctl.load_state_dict(model)
    # a compressed chunk needs room for its decompressed half as well
    encoded = any(f.encoding for f in Store().get(model).manifest.files)
    size = CHUNK_SIZE * 2 if encoded else CHUNK_SIZE
    n = len(pieces(Store().get(model), size))
    assert n > 2
    big = PinnedPool(buffers=4 * n, size=size)
    for pool in (big, PinnedPool(buffers=1, size=size)):  # one buffer, reused
        for _ in range(2):
            gpu = load_to_gpu(Store().get(model), "cuda:0", pool=pool)
            for k, v in cpu.items():
                assert torch.equal(v.reshape(-1).view(torch.uint8),
                                   gpu[k].cpu().reshape(-1).view(torch.uint8)), k
        assert 1 <= len(pool.buffers) <= min(pool.limit, n)
        assert pool.free.qsize() == len(pool.buffers)  # every buffer came back


def test_pinned_path_is_bit_exact(model: str) -> None:
    load_pinned, pinned_to_gpu = benchmark_paths()

    pinned = load_pinned(Store().get(model), piece_size=CHUNK_SIZE)
    gpu = pinned_to_gpu(pinned, "cuda:0", copy_size=CHUNK_SIZE // 2)  # rounds up to a chunk
    cpu = sllmctl.load_state_dict(model)
    for k, v in cpu.items():
        assert torch.equal(v.reshape(-1).view(torch.uint8),
                           gpu[k].cpu().reshape(-1).view(torch.uint8)), k


def test_mapped_memory_is_bit_exact_and_given_back(model: str) -> None:
    """Loads into memory mapped piece by piece (benchmarks/gpu_memory.py): the same bytes, and the
    memory goes back to the device when the last view is gone."""
    import gc

    load_pinned, pinned_to_gpu = benchmark_paths()

    cpu = sllmctl.load_state_dict(model)
    pinned = load_pinned(Store().get(model), piece_size=CHUNK_SIZE)
    torch.cuda.empty_cache()  # free_memory() below sees only what the load holds
    before = torch.cuda.mem_get_info(0)[0]
    gpu = pinned_to_gpu(pinned, "cuda:0", mapped=True)
    for k, v in cpu.items():
        assert torch.equal(v.reshape(-1).view(torch.uint8),
                           gpu[k].cpu().reshape(-1).view(torch.uint8)), k
    def held() -> int:
        torch.cuda.empty_cache()
        return before - torch.cuda.mem_get_info(0)[0]

    assert held() >= sum(f.size for f in Store().get(model).manifest.files)
    one = gpu["big"]
    del gpu
    gc.collect()
    assert held() >= one.numel() * one.element_size()  # a view keeps its file mapped
    del one
    gc.collect()
    assert held() < 4 << 20


@pytest.mark.parametrize("where", ["low", "zstd", "padding"])
@pytest.mark.parametrize("direct", [True, False])
def test_flipped_byte_caught_on_gpu(model: str, direct: bool, where: str) -> None:
    """A flipped byte in chunk 1: in a plain file anywhere in it; in a compressed one, in the
    low bytes (stored as is), inside the compressed high bytes or in the padding after them."""
    from sllmctl.store.codec import Layout

    stored = Store().get(model)
    f = stored.manifest.files[0]
    if f.encoding is None:
        if where != "low":
            pytest.skip("a plain file has no compressed bytes")
        pos = CHUNK_SIZE + 12345
    else:
        assert f.frames is not None and f.frames[1]
        start = int(Layout(f, CHUNK_SIZE).starts[1])
        half = min(CHUNK_SIZE, f.size - CHUNK_SIZE) // 2  # the low bytes, then zstd
        pos = start + {"low": 12345, "zstd": half + f.frames[1] // 2,
                       "padding": half + f.frames[1]}[where]
    data = Store().path(model) / f.path
    raw = bytearray(data.read_bytes())
    raw[pos] ^= 0x01
    data.write_bytes(bytes(raw))
    from sllmctl.store.gpu.loader import load_to_gpu

    with pytest.raises(CorruptCheckpoint, match=r"data-00000\.bin chunk 1 "):
        load_to_gpu(Store().get(model), "cuda:0", direct=direct)
    with pytest.raises(CorruptCheckpoint, match=r"data-00000\.bin chunk 1 "):
        sllmctl.load_state_dict(model, device="cuda:0")
