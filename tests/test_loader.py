"""The GPU loader's bookkeeping that runs on any machine: merging pinned pieces into larger
copies, knowing when a byte range has been queued, and the checksum arithmetic that runs on
the GPU (here on the CPU)."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.datafile import Piece, open_data
from sllmctl.store.gpu.checksums import GpuChecker, manifest_sums
from sllmctl.store.gpu.copy import _covering
from sllmctl.store.gpu.pinned import PinnedModel, coalesce, pinned_source
from sllmctl.store.store import Store
from sllmctl.store.writer import convert


def test_coalesce_merges_only_true_neighbours() -> None:
    region = torch.arange(64, dtype=torch.uint8)
    other = torch.zeros(16, dtype=torch.uint8)
    pieces = [
        (Piece(0, 0, 16), region[0:16]),
        (Piece(0, 16, 16), region[16:32]),  # continues in the file and in memory: merged
        (Piece(0, 32, 16), other),  # continues in the file only
        (Piece(1, 0, 16), region[32:48]),  # another file
        (Piece(1, 16, 8), region[48:56]),  # a short last piece, still contiguous
        (Piece(1, 32, 8), region[56:64]),  # a gap in the file
    ]
    out = list(coalesce(pieces))
    assert [(p.file, p.offset, p.length) for p, _ in out] == [
        (0, 0, 32), (0, 32, 16), (1, 0, 24), (1, 32, 8)]
    assert torch.equal(out[0][1], region[:32])
    assert out[0][1].data_ptr() == region.data_ptr()  # a view of the region, not a copy
    assert torch.equal(out[2][1], region[32:56])


def test_covering_needs_every_byte() -> None:
    copied = [(64, 128, "b"), (0, 64, "a"), (192, 256, "d")]
    assert _covering(copied, 0, 128) == ["a", "b"]
    assert _covering(copied, 10, 20) == ["a"]
    assert _covering(copied, 100, 200) is None  # 128-192 is not queued yet
    copied.append((128, 192, "c"))
    assert _covering(copied, 100, 200) == ["b", "c", "d"]
    assert _covering(copied, 0, 300) is None


def test_pinned_copies_taper_at_the_end() -> None:
    chunk = 16
    model: Any = SimpleNamespace(manifest=SimpleNamespace(chunk_size=chunk))
    a, b = torch.arange(256, dtype=torch.uint8), torch.arange(100, dtype=torch.uint8)
    pinned = PinnedModel(model, [(Piece(0, 0, 256), a), (Piece(1, 0, 100), b)])
    out = [(p.file, p.offset, p.length) for p, _, _ in
           pinned_source(pinned, copy_size=128, tail=32)]
    # 128-byte copies while more than 128 bytes are left, then 32-byte ones; a copy never
    # crosses a file, and every byte is copied once
    assert out == [(0, 0, 128), (0, 128, 128),
                   (1, 0, 32), (1, 32, 32), (1, 64, 32), (1, 96, 4)]
    assert sum(n for _, _, n in out) == pinned.nbytes


def test_checker_sums_match_the_manifest_and_name_a_flipped_byte(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    save_file({"a": torch.randn(3000, 4000, generator=g).to(torch.bfloat16),
               "b": torch.randn(1000, 1001, generator=g)}, tmp_path / "model.safetensors")
    convert(tmp_path, "c", max_file_size=20 << 20)
    model = Store().get("c")
    files, chunk = model.manifest.files, model.manifest.chunk_size
    assert len(files) > 1 and files[0].size > chunk  # whole chunks and a short last one
    data = []
    for f in files:
        fd = open_data(model, f)
        data.append(torch.frombuffer(bytearray(os.pread(fd, f.size, 0)), dtype=torch.uint8))
        os.close(fd)
    expected = [manifest_sums(f) for f in files]

    def check(flip: tuple[int, int] | None) -> None:
        checker = GpuChecker(chunk, [f.size for f in files], "cpu")
        for i, d in enumerate(data):
            d = d.clone()
            if flip and flip[0] == i:
                d[flip[1]] ^= 1
            for off in range(0, d.numel(), 2 * chunk):  # pieces of two chunks
                checker.add(i, off, d[off:off + 2 * chunk])
        checker.report(*checker.compare(expected), model)

    check(None)
    with pytest.raises(CorruptCheckpoint, match=f"{files[0].path} chunk 1 "):
        check((0, chunk + 5))
