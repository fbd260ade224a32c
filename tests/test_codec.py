"""Compressed data files (`convert --compress`): smaller on disk, the same tensors back on
every path, damage named by chunk."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sllmctl
from sllmctl.errors import CorruptCheckpoint
from sllmctl.store import codec
from sllmctl.store.datafile import tensor_views
from sllmctl.store.format import CHUNK_SIZE, MANIFEST, seal
from sllmctl.store.gpu.files import ModelFiles
from sllmctl.store.gpu.loader import pieces
from sllmctl.store.gpu.split import split_piece, unsplit
from sllmctl.store.reader import verify
from sllmctl.store.store import Store
from sllmctl.store.writer import convert


@pytest.fixture
def src(tmp_path: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.layers.0.mlp.up_proj.weight":  # bf16 of a weight's scale: exponents repeat
            (torch.randn(3000, 4000, generator=g) * 0.02).to(torch.bfloat16),
        "model.layers.1.mlp.up_proj.weight":  # random bytes: nothing to gain, stored plain
            torch.randint(0, 256, (CHUNK_SIZE + 8192,), generator=g, dtype=torch.uint8),
        "model.norm.weight": torch.randn(1001, generator=g),
        "ids": torch.arange(17, dtype=torch.int64),
        "empty": torch.empty(0, 4),
    }
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


def test_compressed_model_is_smaller_and_loads_bit_exact(src: Path) -> None:
    convert(src, "plain")
    m = convert(src, "small", compress=True)
    assert m.format_version == 3
    f = m.files[0]
    assert f.encoding == codec.ENCODING and f.frames is not None
    assert f.frames[0] and 0 in f.frames  # split bf16 chunks, and plain random ones
    assert f.stored_size == (Store().path("small") / f.path).stat().st_size
    assert f.frames[0] < 0.45 * CHUNK_SIZE / 2  # the exponent bytes of pure bf16 weights
    assert f.on_disk < 0.85 * f.size
    plain = Store().get("plain").manifest.files[0]
    assert f.checksums == plain.checksums  # the sums are those of the decoded bytes
    a, b = sllmctl.load_state_dict("plain"), sllmctl.load_state_dict("small")
    assert sorted(a) == sorted(b)
    for k in a:
        assert (a[k].dtype, a[k].shape) == (b[k].dtype, b[k].shape)
        assert torch.equal(_bytes(a[k]), _bytes(b[k])), k
    assert verify("small").ok
    text = (Store().path("small") / MANIFEST).read_text()
    assert '"format_version": 3' in text and '"encoding": "split-zstd"' in text
    assert '"encoding"' not in (Store().path("plain") / MANIFEST).read_text()


def test_split_frames_weave_back_into_the_chunks(src: Path) -> None:
    """The GPU loader's path with the CPU standing in for the GPU: pieces read as stored,
    high bytes decompressed into the spare room of the buffer, planes woven in place."""
    convert(src, "plain")
    convert(src, "small", compress=True)
    want = sllmctl.load_state_dict("plain")
    model = Store().get("small")
    size = 3 * CHUNK_SIZE
    todo = pieces(model, size)
    assert all(p.length <= 2 * CHUNK_SIZE for p in todo)
    files = ModelFiles(model, False)
    try:
        out = [torch.zeros(f.size, dtype=torch.uint8) for f in model.manifest.files]
        kinds = set()
        for p in todo:
            buf = torch.full((size,), 0xAB, dtype=torch.uint8)
            layout = files.layouts[p.file]
            assert layout is not None
            start, end = files.stored_range(p)
            fd, _ = files.fd_for(p.file, start, end)
            buf[:end - start] = torch.frombuffer(bytearray(os.pread(fd, end - start, start)),
                                                 dtype=torch.uint8)
            split = split_piece(model, p.offset, p.length, buf, start, layout)
            kinds |= {b is None for _, _, _, b in split.frames}
            unsplit(out[p.file], split)
        assert kinds == {True, False}
    finally:
        files.close()
    got = tensor_views(model, out)
    for k in want:
        assert torch.equal(_bytes(want[k]), _bytes(got[k])), k


def _flip(model: str, pos: int) -> None:
    f = Store().get(model).manifest.files[0]
    path = Store().path(model) / f.path
    raw = bytearray(path.read_bytes())
    raw[pos] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["low", "zstd", "padding"])
def test_damage_is_named_by_chunk(src: Path, where: str) -> None:
    """Padding after a zstd frame lies outside the checksums: it must be zero."""
    m = convert(src, "small", compress=True)
    f = m.files[0]
    assert f.frames is not None
    layout = codec.Layout(f, CHUNK_SIZE)
    start = int(layout.starts[1])
    zstd = start + CHUNK_SIZE // 2
    assert (CHUNK_SIZE // 2 + f.frames[1]) % 4096  # frame 1 has padding
    _flip("small", {"low": start + 999, "zstd": zstd + f.frames[1] // 2,
                    "padding": zstd + f.frames[1]}[where])
    with pytest.raises(CorruptCheckpoint, match=r"data-00000\.bin chunk 1 "):
        sllmctl.load_state_dict("small")
    report = verify("small")
    assert [b["chunk"] for b in report.bad] == [1]


def test_truncated_compressed_file_is_refused(src: Path) -> None:
    m = convert(src, "small", compress=True)
    path = Store().path("small") / m.files[0].path
    with open(path, "r+b") as fh:
        fh.truncate(m.files[0].on_disk - 4096)
    with pytest.raises(CorruptCheckpoint, match="truncated or damaged"):
        sllmctl.load_state_dict("small")


def test_frame_that_decodes_to_the_wrong_length_is_caught() -> None:
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(1 << 15, generator=g) * 0.02).to(torch.bfloat16).view(torch.uint8)
    chunk = data.numpy()
    z, parts = codec.encode_chunk(chunk)
    assert 0 < z < len(chunk) // 4
    stored = np.frombuffer(b"".join(bytes(memoryview(p).cast("B")) for p in parts), np.uint8)
    assert len(stored) % 4096 == 0
    out = np.empty(len(chunk), np.uint8)
    codec.decode_frame(stored, len(chunk), z, out)
    assert np.array_equal(out, chunk)
    h = len(chunk) // 2
    z_bytes = stored[h:h + z]
    with pytest.raises(codec.FrameError, match="more than"):
        codec.decompress_into(z_bytes, np.empty(h - 1, np.uint8))
    with pytest.raises(codec.FrameError, match=f"decodes to {h} bytes, not {h + 1}"):
        codec.decompress_into(z_bytes, np.empty(h + 1, np.uint8))
    with pytest.raises(codec.FrameError):
        codec.decompress_into(b"not zstd at all", np.empty(16, np.uint8))


@pytest.mark.parametrize("change, message", [
    (lambda f: f.update(frames=f["frames"][:-1]), "bad frame list"),
    (lambda f: f.update(frames=[-1, *f["frames"][1:]]), "bad frame list"),
    (lambda f: f.update(stored_size=f["stored_size"] + 4096), "does not match its frames"),
    (lambda f: f.update(encoding="lz4-magic"), "unknown encoding"),
    (lambda f: f["frames"].__setitem__(0, CHUNK_SIZE), "longer stored than decoded"),
])
def test_bad_frame_tables_are_refused(src: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    convert(src, "small", compress=True)
    path = Store().path("small") / MANIFEST
    d = json.loads(path.read_text())
    change(d["files"][0])
    path.write_text(seal(d))
    with pytest.raises(CorruptCheckpoint, match=message):
        Store().get("small")


def test_version_1_manifest_cannot_carry_an_encoding(src: Path) -> None:
    convert(src, "small", compress=True)
    path = Store().path("small") / MANIFEST
    d = json.loads(path.read_text())
    d["format_version"] = 1
    path.write_text(seal(d))
    with pytest.raises(CorruptCheckpoint, match="unknown encoding"):
        Store().get("small")
    d["format_version"] = 5
    path.write_text(seal(d))
    with pytest.raises(CorruptCheckpoint, match="format version 5 is not supported"):
        Store().get("small")


def test_pieces_leave_room_for_the_high_bytes(src: Path) -> None:
    convert(src, "small", compress=True)
    model = Store().get("small")
    assert {p.length for p in pieces(model, 2 * CHUNK_SIZE)} <= {CHUNK_SIZE,
                                                                model.manifest.files[0].size
                                                                % CHUNK_SIZE}
    assert max(p.length for p in pieces(model, 64 << 20)) == 32 << 20
    with pytest.raises(ValueError, match="cannot hold a chunk"):
        pieces(model, CHUNK_SIZE)
    files = ModelFiles(model, False)
    try:
        for p in pieces(model, 64 << 20):
            start, end = files.stored_range(p)
            assert 0 < end - start <= p.length and start % 4096 == 0 and end % 4096 == 0
    finally:
        files.close()


def test_cli_convert_compress_and_show(src: Path) -> None:
    import subprocess
    import sys

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "sllmctl", *args], capture_output=True,
                              text=True, env=os.environ.copy(), timeout=120)

    r = run("convert", str(src), "--name", "small", "--compress", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["stored_bytes"] < 0.85 * data["bytes"]
    shown = json.loads(run("show", "small", "--json").stdout)
    assert shown["format_version"] == 3
    assert [f["encoding"] for f in shown["files"]] == ["split-zstd"]
    assert "on disk (compressed)" in run("show", "small").stdout
    assert "on disk" in run("convert", str(src), "--name", "small", "--compress",
                            "--force").stdout


def test_a_failed_compressed_conversion_leaves_no_encoder_behind(
        src: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import threading

    from sllmctl.store import writer

    real = writer._tensor_bytes
    seen: list[str] = []

    def failing(tensor, dtype):  # type: ignore[no-untyped-def]
        seen.append(tensor.name)
        if len(seen) == 3:  # after two tensors, whose chunks are being encoded
            raise OSError(28, "No space left on device")
        return real(tensor, dtype)

    monkeypatch.setattr(writer, "_tensor_bytes", failing)
    with pytest.raises(OSError, match="No space left"):
        convert(src, "small", compress=True)
    assert not Store().exists("small")
    assert not [t for t in threading.enumerate() if t.name.startswith("sllmctl-encode")]


def test_without_zstandard_the_error_is_one_line(src: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from sllmctl.errors import SllmError

    convert(src, "small", compress=True)
    monkeypatch.setitem(sys.modules, "zstandard", None)  # as if not installed
    with pytest.raises(SllmError, match="need the zstandard package"):
        sllmctl.load_state_dict("small")
    with pytest.raises(SllmError, match="need the zstandard package"):
        convert(src, "again", compress=True)


def test_compress_setting_from_environment_and_config(src: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    def stored_as(name: str, *flags: str, **env: str) -> str | None:
        r = subprocess.run([sys.executable, "-m", "sllmctl", "convert", str(src), "--name", name,
                            *flags, "--json"], capture_output=True, text=True,
                           env={**os.environ, **env}, timeout=120)
        assert r.returncode == 0, r.stderr
        return Store().get(name).manifest.files[0].encoding

    assert stored_as("a") is None
    assert stored_as("b", SLLMCTL_COMPRESS="1") == codec.ENCODING
    assert stored_as("c", "--no-compress", SLLMCTL_COMPRESS="1") is None
    config = tmp_path / "config.toml"
    config.write_text("compress = true\n")
    assert stored_as("d", SLLMCTL_CONFIG=str(config)) == codec.ENCODING
    assert stored_as("e", SLLMCTL_CONFIG=str(config), SLLMCTL_COMPRESS="off") is None
