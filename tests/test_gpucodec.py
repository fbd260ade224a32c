"""The exp23 code (format version 4): the CPU encoder and decoder, the GPU decoder's kernel
(on the CPU through Triton's interpreter, and on a GPU), and the two compared byte for byte."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sllmctl
from sllmctl.errors import CorruptCheckpoint
from sllmctl.store import codec, codec_exp23
from sllmctl.store.format import CHUNK_SIZE, MANIFEST, checksum_numpy, seal
from sllmctl.store.reader import verify
from sllmctl.store.store import Store
from sllmctl.store.writer import convert


def _weights(n: int, scale: float = 0.02, seed: int = 0) -> np.ndarray:
    """n bytes of bf16 `randn * scale`."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n // 2, generator=g) * scale).to(torch.bfloat16).view(
        torch.uint8).numpy().copy()


def _frame(data: np.ndarray) -> tuple[int, np.ndarray]:
    z, parts = codec_exp23.encode_chunk(data)
    return z, np.concatenate([np.frombuffer(memoryview(p).cast("B"), np.uint8) for p in parts])


def _chunks() -> list[np.ndarray]:
    """Chunks that take every path: many escapes, a partial last block, one exponent only,
    a tensor's zero padding, tiny values."""
    mixed = _weights(45056)  # 22528 words: five whole blocks and half of one
    mixed[:999] = 0
    wide = _weights(1 << 16, scale=1.0, seed=1)
    words = wide.view("<u2")
    words[::7] = _weights(1 << 16, scale=1e-30, seed=2).view("<u2")[: len(words[::7])]
    return [_weights(1 << 20), mixed, np.zeros(1 << 14, np.uint8), _weights(1 << 15, 1e-30),
            wide]


def test_frames_round_trip_and_take_70_percent() -> None:
    for data in _chunks():
        z, stored = _frame(data)
        out = np.empty_like(data)
        codec_exp23.decode_frame(stored, len(data), z, out)
        assert np.array_equal(out, data)
        assert len(stored) % 4096 == 0 and len(stored) <= len(data)
    chunk = _weights(CHUNK_SIZE)
    z, stored = _frame(chunk)
    assert z > 0 and len(stored) < 0.685 * CHUNK_SIZE  # 10.85 bits a weight
    m = CHUNK_SIZE // 2
    head = m + 2 * (m // 8)
    second, escapes = stored[head + 16:head + 24].view("<u4")
    assert 0.2 * m < second < 0.35 * m and 0 < escapes < 0.01 * m


def test_random_bytes_are_stored_plain() -> None:
    data = np.random.default_rng(0).integers(0, 256, 1 << 16, dtype=np.uint8)
    z, stored = _frame(data)
    assert z == 0 and np.array_equal(stored, data)


@pytest.mark.parametrize("part", ["codes", "offsets", "count"])
def test_damaged_frames_do_not_decode(part: str) -> None:
    data = _weights(1 << 20)
    z, stored = _frame(data)
    m = len(data) // 2
    head = m + 2 * (m // 8)
    if part == "codes":  # a word of the commonest exponent (code 0) sent to the second list
        _, e = codec_exp23.split_words(data)
        i = int(np.flatnonzero(e == stored[head])[0])
        for b in range(2):
            stored[m + b * (m // 8) + i // 8] |= 1 << (i % 8)
    elif part == "offsets":  # block 1's count of second codes
        stored[head + codec_exp23.HEAD + 8] += 1
    else:
        z -= 1
    with pytest.raises(codec.FrameError):
        codec_exp23.decode_frame(stored, len(data), z, np.empty_like(data))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.up_proj.weight":
            (torch.randn(3000, 4000, generator=g) * 0.02).to(torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight":
            torch.randint(0, 256, (CHUNK_SIZE + 8192,), generator=g, dtype=torch.uint8),
        "model.norm.weight": torch.randn(1001, generator=g).to(torch.bfloat16),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_exp23_model_is_version_4_and_loads_bit_exact(src: Path) -> None:
    convert(src, "plain")
    m = convert(src, "small", compress="exp23")
    f = m.files[0]
    assert m.format_version == 4 and f.encoding == "exp23" and f.frames is not None
    assert f.frames[0] and 0 in f.frames
    assert f.stored_size == (Store().path("small") / f.path).stat().st_size
    assert f.checksums == Store().get("plain").manifest.files[0].checksums
    a, b = sllmctl.load_state_dict("plain"), sllmctl.load_state_dict("small")
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(_bytes(a[k]), _bytes(b[k])), k
    assert verify("small").ok
    text = (Store().path("small") / MANIFEST).read_text()
    assert '"format_version": 4' in text and '"encoding": "exp23"' in text


def test_exp23_needs_version_4_and_damage_is_named(src: Path) -> None:
    m = convert(src, "small", compress="exp23")
    path = Store().path("small") / MANIFEST
    d = json.loads(path.read_text())
    d["format_version"] = 2
    path.write_text(seal(d))
    with pytest.raises(CorruptCheckpoint, match="unknown encoding 'exp23'"):
        Store().get("small")
    d["format_version"] = 4
    path.write_text(seal(d))
    data = Store().path("small") / m.files[0].path
    raw = bytearray(data.read_bytes())
    raw[CHUNK_SIZE // 2 + 100] ^= 0x10  # a code bit of chunk 0
    data.write_bytes(bytes(raw))
    assert [b["chunk"] for b in verify("small").bad] == [0]
    with pytest.raises(CorruptCheckpoint, match=r"data-00000\.bin chunk 0 "):
        sllmctl.load_state_dict("small")


def test_unknown_encoding_is_refused_at_convert(src: Path) -> None:
    with pytest.raises(ValueError, match="unknown encoding 'lz9'"):
        convert(src, "small", compress="lz9")


def test_dram_tier_holds_the_stored_bytes_in_pieces_of_whole_frames(src: Path) -> None:
    """What the DRAM tier would hold for an exp23 model (load_pinned_coded, unpinned here):
    the stored bytes, in pieces of whole frames, each decoding back to the plain chunks."""
    from sllmctl.store.gpu.coded import load_pinned_coded

    convert(src, "plain")
    convert(src, "small", compress="exp23")
    model = Store().get("small")
    pinned = load_pinned_coded(model, size=20 << 20, pin=False)
    f = model.manifest.files[0]
    assert pinned.nbytes == f.on_disk < f.size
    assert len(pinned.pieces) > 1 and all(c.host.numel() <= 20 << 20 for _, c in pinned.pieces)
    want = (Store().path("plain") / f.path).read_bytes()
    covered = 0
    for p, c in pinned.pieces:
        host = c.host.numpy()
        for at, off, n, z in c.frames:
            out = np.empty(n, np.uint8)
            codec_exp23.decode_frame(host[at:], n, z, out)
            assert out.tobytes() == want[off:off + n]
            covered += n
        assert p.offset == c.frames[0][1] and p.length == sum(fr[2] for fr in c.frames)
    assert covered == f.size


def test_dram_tier_holds_a_plain_model_as_plain_frames(src: Path) -> None:
    from sllmctl.store.gpu.coded import load_pinned_coded

    m = convert(src, "plain", max_file_size=20 << 20)
    pinned = load_pinned_coded(Store().get("plain"), size=20 << 20, pin=False)
    assert pinned.nbytes == m.total_bytes
    for p, c in pinned.pieces:
        f = m.files[p.file]
        want = (Store().path("plain") / f.path).read_bytes()[p.offset:p.offset + p.length]
        assert c.host.numpy().tobytes() == want
        assert all(z == 0 for _, _, _, z in c.frames)
        assert [(at, off) for at, off, _, _ in c.frames] == [
            (off - p.offset, off) for off in range(p.offset, p.offset + p.length, CHUNK_SIZE)]


_INTERPRET = """
import sys, numpy as np, torch
from tests.test_gpucodec import _chunks, _frame
from sllmctl.store.gpu.decode import decode_frame
for data in _chunks():
    z, stored = _frame(data)
    out = torch.zeros(len(data), dtype=torch.uint8)
    decode_frame(torch.from_numpy(stored), len(data), z, out)
    assert np.array_equal(out.numpy(), data), len(data)
print("ok")
"""


def test_gpu_kernel_in_tritons_interpreter_matches_the_cpu() -> None:
    """The Triton kernel run on the CPU (TRITON_INTERPRET=1): the same bytes as the CPU twin."""
    pytest.importorskip("triton")
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": f"{root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    r = subprocess.run([sys.executable, "-c", _INTERPRET], capture_output=True, text=True,
                       env=env, cwd=root, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


# ---------------------------------------------------------------- on a GPU

@pytest.mark.gpu
def test_gpu_decoder_twins_the_cpu_decoder() -> None:
    from sllmctl.store.gpu.decode import decode_frame

    for data in [*_chunks(), _weights(CHUNK_SIZE, seed=3)]:
        z, stored = _frame(data)
        want = np.empty_like(data)
        codec_exp23.decode_frame(stored, len(data), z, want)
        out = torch.zeros(len(data), dtype=torch.uint8, device="cuda")
        decode_frame(torch.from_numpy(stored).cuda(), len(data), z, out)
        assert np.array_equal(out.cpu().numpy(), want)


@pytest.mark.gpu
def test_damaged_frame_decodes_inside_its_bounds_on_the_gpu() -> None:
    """Offsets pointing far outside the escape list: wrong bytes (the checksum's business),
    no read outside the frame, no crash."""
    from sllmctl.store.gpu.decode import decode_frame

    data = _weights(1 << 20)
    z, stored = _frame(data)
    m = len(data) // 2
    offsets = m + 2 * (m // 8) + codec_exp23.HEAD
    stored[offsets + 8 + 3] = 0x7F  # block 1's offsets into the second list and the escapes:
    stored[offsets + 12 + 3] = 0x7F  # huge
    out = torch.zeros(len(data), dtype=torch.uint8, device="cuda")
    decode_frame(torch.from_numpy(stored).cuda(), len(data), z, out)
    torch.cuda.synchronize()
    assert checksum_numpy(out.cpu().numpy()) != checksum_numpy(data)


@pytest.mark.gpu
def test_frame_decoder_pipeline_from_pinned_memory() -> None:
    from sllmctl.store.gpu.decode import FrameDecoder

    chunks = [_weights(1 << 20, seed=s) for s in range(5)]
    chunks.append(np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8))
    out = torch.zeros(sum(len(c) for c in chunks), dtype=torch.uint8, device="cuda")
    dec = FrameDecoder("cuda", 2 << 20, stages=2)
    copy = torch.cuda.Stream()
    keep, off = [], 0
    for c in chunks:
        z, stored = _frame(c)
        host = torch.from_numpy(stored).pin_memory()
        keep.append(host)
        dec.queue(host, [(0, off, len(c), z)], out, copy)
        off += len(c)
    torch.cuda.synchronize()
    assert np.array_equal(out.cpu().numpy(), np.concatenate(chunks))


@pytest.mark.gpu
def test_exp23_model_loads_to_the_gpu_from_disk_and_from_dram(src: Path) -> None:
    from sllmctl.store.gpu.coded import coded_to_gpu, load_pinned_coded
    from sllmctl.store.gpu.loader import load_to_gpu

    convert(src, "plain")
    convert(src, "small", compress="exp23")
    a = sllmctl.load_state_dict("plain")
    model = Store().get("small")
    for b in (load_to_gpu(model, "cuda"), coded_to_gpu(load_pinned_coded(model), "cuda")):
        for k in a:
            assert torch.equal(_bytes(a[k]), _bytes(b[k]).cpu()), k


@pytest.mark.gpu
def test_damaged_exp23_model_fails_its_checksum_on_the_gpu(src: Path) -> None:
    from sllmctl.store.gpu.coded import coded_to_gpu, load_pinned_coded
    from sllmctl.store.gpu.loader import load_to_gpu

    m = convert(src, "small", compress="exp23")
    data = Store().path("small") / m.files[0].path
    raw = bytearray(data.read_bytes())
    raw[12345] ^= 0x10  # a raw byte of chunk 0: decodes, to the wrong word
    data.write_bytes(bytes(raw))
    model = Store().get("small")
    with pytest.raises(CorruptCheckpoint, match=r"data-00000\.bin chunk 0 "):
        load_to_gpu(model, "cuda")
    with pytest.raises(CorruptCheckpoint, match=r"data-00000\.bin chunk 0 "):
        coded_to_gpu(load_pinned_coded(model), "cuda")
