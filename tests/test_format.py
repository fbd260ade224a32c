"""Convert -> load round trips, bit for bit, for every dtype and source format."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import sllmctl
from sllmctl.errors import AlreadyExists, CorruptCheckpoint, NotFound, SllmError
from sllmctl.store.format import ALIGNMENT, DTYPES, Manifest, checksum_numpy, torch_dtype
from sllmctl.store.store import Store
from sllmctl.store.writer import convert


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Every bit pattern is fair game: random bytes viewed as the dtype (NaNs included)."""
    g = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    n = int(np.prod(shape)) if shape else 1
    raw = torch.randint(0, 256, (n * itemsize,), dtype=torch.uint8, generator=g)
    if dtype == torch.bool:
        raw = raw % 2
    return raw.view(dtype).reshape(shape)


def all_dtype_tensors() -> dict[str, torch.Tensor]:
    out = {}
    for i, (name, _) in enumerate(DTYPES.items()):
        dt = torch_dtype(name)
        out[f"{name}.matrix"] = random_tensor(dt, (7, 13), i)
        out[f"{name}.scalar"] = random_tensor(dt, (), 100 + i)
        out[f"{name}.empty"] = random_tensor(dt, (0, 3), 200 + i)
    return out


def assert_bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        x, y = a[k].contiguous().reshape(-1), b[k].contiguous().reshape(-1)
        assert torch.equal(x.view(torch.uint8), y.view(torch.uint8)), k


def safetensors_dtypes() -> set[torch.dtype]:
    from safetensors.torch import _TYPES  # what this safetensors version can save

    return set(_TYPES.values())


def test_every_dtype_roundtrips_bit_exactly_from_bin(tmp_path: Path) -> None:
    tensors = all_dtype_tensors()
    torch.save(tensors, tmp_path / "pytorch_model.bin")
    convert(tmp_path, "allbin")
    assert_bit_equal(tensors, sllmctl.load_state_dict("allbin"))


def test_every_dtype_roundtrips_bit_exactly(tmp_path: Path) -> None:
    supported = safetensors_dtypes()
    tensors = {k: v for k, v in all_dtype_tensors().items() if v.dtype in supported}
    assert len(tensors) >= 3 * 16
    save_file(tensors, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    convert(tmp_path, "all")
    loaded = sllmctl.load_state_dict("all")
    assert_bit_equal(tensors, loaded)
    m = Store().get("all").manifest
    assert all(e.offset % ALIGNMENT == 0 for e in m.tensors.values())
    assert m.extra_files["config.json"]["size"] == len('{"model_type": "llama"}')
    assert (Store().path("all") / "files" / "config.json").read_text() == '{"model_type": "llama"}'


@pytest.mark.parametrize("with_index", [True, False])
def test_sharded_safetensors(tmp_path: Path, with_index: bool) -> None:
    shards = [
        {f"model.layers.{i}.w": random_tensor(torch.bfloat16, (64, 33), i) for i in range(3)},
        {"model.norm.weight": random_tensor(torch.float32, (33,), 9),
         "lm_head.weight": random_tensor(torch.bfloat16, (10, 33), 10)},
    ]
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file(shard, tmp_path / fname)
        weight_map.update(dict.fromkeys(shard, fname))
    if with_index:
        (tmp_path / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {}, "weight_map": weight_map}))
    # tiny data files force the writer to split across several of them
    convert(tmp_path, "sharded", max_file_size=8192)
    loaded = sllmctl.load_state_dict("sharded")
    assert_bit_equal({k: v for s in shards for k, v in s.items()}, loaded)
    assert len(Store().get("sharded").manifest.files) > 1


def test_dtype_cast(tmp_path: Path) -> None:
    t = {"w": torch.randn(16, 16), "ids": torch.arange(5)}
    save_file(t, tmp_path / "model.safetensors")
    convert(tmp_path, "cast", dtype="bf16")
    loaded = sllmctl.load_state_dict("cast")
    assert loaded["w"].dtype == torch.bfloat16
    assert torch.equal(loaded["w"], t["w"].to(torch.bfloat16))
    assert torch.equal(loaded["ids"], t["ids"])  # integers are never cast
    with pytest.raises(SllmError, match="unsupported --dtype"):
        convert(tmp_path, "cast2", dtype="int4")


def test_pytorch_bin_with_tied_weights(tmp_path: Path) -> None:
    emb = torch.randn(32, 8)
    sd = {"model.embed_tokens.weight": emb, "lm_head.weight": emb,
          "model.norm.weight": torch.randn(8).to(torch.float16)}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    convert(tmp_path, "tied")
    m = Store().get("tied").manifest
    assert m.aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    assert m.total_bytes == 8192  # the tied matrix is stored once
    loaded = sllmctl.load_state_dict("tied")
    assert_bit_equal(sd, loaded)
    assert loaded["lm_head.weight"].data_ptr() == loaded["model.embed_tokens.weight"].data_ptr()


def test_sharded_bin_with_index(tmp_path: Path) -> None:
    a, b = {"a": torch.randn(4, 4)}, {"b": torch.randint(0, 9, (3,))}
    torch.save(a, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(b, tmp_path / "pytorch_model-00002-of-00002.bin")
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": {
        "a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}))
    convert(tmp_path, "binshards")
    assert_bit_equal({**a, **b}, sllmctl.load_state_dict("binshards"))


class Evil:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (print, ("pwned",))


def test_bin_refuses_pickled_code(tmp_path: Path) -> None:
    torch.save({"w": torch.zeros(2), "x": Evil()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(SllmError, match="refused by the safe loader"):
        convert(tmp_path, "evil")
    assert Store().names() == []


def test_existing_name_needs_force(tmp_path: Path) -> None:
    save_file({"w": torch.ones(3)}, tmp_path / "model.safetensors")
    convert(tmp_path, "m")
    with pytest.raises(AlreadyExists):
        convert(tmp_path, "m")
    save_file({"w": torch.full((3,), 2.0)}, tmp_path / "model.safetensors")
    convert(tmp_path, "m", force=True)
    assert torch.equal(sllmctl.load_state_dict("m")["w"], torch.full((3,), 2.0))
    assert len(list((Store().root / ".data").iterdir())) == 1  # the old folder is gone


def test_bad_sources_fail_cleanly(tmp_path: Path) -> None:
    with pytest.raises(SllmError, match="no such file"):
        convert(tmp_path / "nope", "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SllmError, match="no checkpoint found"):
        convert(tmp_path / "empty", "x")
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.ones(1000)}, good)
    bad = tmp_path / "trunc" / "model.safetensors"
    bad.parent.mkdir()
    bad.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(SllmError, match="not a readable safetensors file"):
        convert(bad.parent, "x")
    junk = tmp_path / "junk" / "pytorch_model.bin"
    junk.parent.mkdir()
    junk.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(SllmError, match="not a readable PyTorch checkpoint"):
        convert(junk.parent, "x")
    with pytest.raises(SllmError, match="invalid model name"):
        convert(good, "../escape")
    assert Store().names() == []


def test_checksum_matches_definition() -> None:
    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, 4096 * 3 + 8, dtype=np.uint8).tobytes()
    words = [int.from_bytes(data[i:i + 8], "little") for i in range(0, len(data), 8)]
    pages = [sum(words[i:i + 512]) % 2**64 for i in range(0, len(words), 512)]
    s1 = sum(pages) % 2**64
    s2 = sum((p + 1) * v for p, v in enumerate(pages)) % 2**64
    assert checksum_numpy(data) == f"{s1:016x}{s2:016x}"


def stored_model(tmp_path: Path, name: str = "m") -> Path:
    tensors = {f"w{i}": random_tensor(torch.float32, (1024, 1024 + i), i) for i in range(5)}
    save_file(tensors, tmp_path / "model.safetensors")
    convert(tmp_path, name)
    return Store().path(name)


@pytest.mark.parametrize("where", ["start", "middle", "last"])
def test_flipped_byte_is_caught_by_load_and_verify(tmp_path: Path, where: str) -> None:
    from sllmctl.store.reader import verify

    folder = stored_model(tmp_path)
    data = folder / "data-00000.bin"
    size = data.stat().st_size
    pos = {"start": 0, "middle": size // 2 + 3, "last": size - 1}[where]
    with open(data, "r+b") as f:
        f.seek(pos)
        byte = f.read(1)
        f.seek(pos)
        f.write(bytes([byte[0] ^ 0x10]))
    chunk = pos // Manifest.chunk_size
    message = rf"model m: data file data-00000.bin chunk {chunk} "
    with pytest.raises(CorruptCheckpoint, match=message):
        sllmctl.load_state_dict("m")
    report = verify("m")
    assert not report.ok and [b["chunk"] for b in report.bad] == [chunk]


def test_truncated_or_missing_data_file_is_caught(tmp_path: Path) -> None:
    from sllmctl.store.reader import verify

    folder = stored_model(tmp_path)
    data = folder / "data-00000.bin"
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size - 4096)
    with pytest.raises(CorruptCheckpoint, match="truncated or damaged"):
        sllmctl.load_state_dict("m")
    assert not verify("m").ok
    data.unlink()
    with pytest.raises(CorruptCheckpoint, match="is missing"):
        sllmctl.load_state_dict("m")


def test_damaged_manifest_and_extra_file(tmp_path: Path) -> None:
    from sllmctl.store.reader import verify

    (tmp_path / "config.json").write_text("{}")
    folder = stored_model(tmp_path)
    (folder / "files" / "config.json").write_text("{} ")
    report = verify("m")
    assert [b["file"] for b in report.bad] == ["files/config.json"]
    manifest = folder / "manifest.json"
    manifest.write_text(manifest.read_text()[:-20])
    with pytest.raises(CorruptCheckpoint, match="manifest is not valid JSON"):
        sllmctl.load_state_dict("m")
    d = {"magic": "sllmctl-checkpoint", "format_version": 99}
    manifest.write_text(json.dumps(d))
    with pytest.raises(CorruptCheckpoint, match="format version 99"):
        sllmctl.load_state_dict("m")


def test_unknown_name_suggests(tmp_path: Path) -> None:
    stored_model(tmp_path, "llama-7b")
    with pytest.raises(NotFound) as e:
        sllmctl.load_state_dict("llama")
    assert e.value.hint == "did you mean llama-7b?"


def test_full_disk_during_convert_is_one_line_and_leaves_nothing(tmp_path: Path) -> None:
    """A write that fails (here EFBIG from a file-size limit, as ENOSPC would) mid-convert."""
    import resource
    import signal
    import subprocess
    import sys

    save_file({"w": torch.randn(8 << 20)}, tmp_path / "model.safetensors")
    convert(tmp_path, "old")

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))

    r = subprocess.run([sys.executable, "-m", "sllmctl", "convert", str(tmp_path), "--name",
                        "new"], capture_output=True, text=True, preexec_fn=limit, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    assert lines[0].startswith("error: File too large: ") and lines[0].endswith("data-00000.bin")
    assert lines[1].startswith("hint: ")
    assert Store().names() == ["old"] and list(Store().tmp_dir.iterdir()) == []
    assert sorted(sllmctl.load_state_dict("old")) == ["w"]


def test_tensors_are_laid_out_in_load_order(tmp_path: Path) -> None:
    """Embedding first, layers in numeric order (10 after 9), head last; q/k/v and gate/up
    back to back, so the engine can use one view for each group."""
    names = ["lm_head.weight", "model.norm.weight", "model.embed_tokens.weight"]
    for i in range(12):
        for part in ("mlp.down_proj", "mlp.gate_proj", "mlp.up_proj", "self_attn.k_proj",
                     "self_attn.o_proj", "self_attn.q_proj", "self_attn.v_proj",
                     "input_layernorm"):
            names.append(f"model.layers.{i}.{part}.weight")
    src = tmp_path / "src"
    src.mkdir()
    save_file({n: torch.full((8, 512), float(k)) for k, n in enumerate(names)},
              src / "model.safetensors")
    m = convert(src, "ordered")
    start = {n: (e.file, e.offset) for n, e in m.tensors.items()}
    ordered = sorted(start, key=start.__getitem__)
    assert ordered[0] == "model.embed_tokens.weight"
    assert set(ordered[-2:]) == {"lm_head.weight", "model.norm.weight"}
    layer_of = [int(n.split(".")[2]) for n in ordered[1:-2]]
    assert layer_of == sorted(layer_of)
    for i in range(12):
        p = f"model.layers.{i}."
        at = ordered.index(p + "self_attn.q_proj.weight")
        assert ordered[at:at + 3] == [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        at = ordered.index(p + "mlp.gate_proj.weight")
        assert ordered[at + 1] == p + "mlp.up_proj.weight"
    state = sllmctl.load_state_dict("ordered")
    for n in names:
        assert state[n].eq(float(names.index(n))).all()


def test_manifest_carries_its_own_checksum(tmp_path: Path) -> None:
    """Version 3: a flipped bit in a tensor name no longer passes as another name."""
    folder = stored_model(tmp_path)
    manifest = folder / "manifest.json"
    raw = manifest.read_bytes()
    assert json.loads(raw)["format_version"] == 3 and b'"manifest_sha256": "' in raw
    at = raw.index(b'"w3"') + 2
    manifest.write_bytes(raw[:at] + bytes([raw[at] ^ 0x01]) + raw[at + 1:])  # w3 -> w2
    with pytest.raises(CorruptCheckpoint, match=r"^model m: manifest fails its checksum"):
        sllmctl.load_state_dict("m")
    manifest.write_bytes(raw[:at] + b"\xe9" + raw[at + 1:])
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        Store().get("m")
    at = raw.index(b'"format_version": 3') + len(b'"format_version": ')
    manifest.write_bytes(raw[:at] + b"1" + raw[at + 1:])  # 3 -> 1 must not skip the check
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        Store().get("m")
    d = json.loads(raw)
    del d["manifest_sha256"]
    manifest.write_text(json.dumps(d, indent=1))
    with pytest.raises(CorruptCheckpoint, match="no valid manifest_sha256"):
        Store().get("m")


@pytest.mark.parametrize("version", [1, 2])
def test_versions_1_and_2_without_a_checksum_still_read(tmp_path: Path, version: int) -> None:
    folder = stored_model(tmp_path)
    manifest = folder / "manifest.json"
    d = json.loads(manifest.read_bytes())
    del d["manifest_sha256"]
    d["format_version"] = version
    manifest.write_text(json.dumps(d, indent=1))
    assert Store().get("m").manifest.format_version == version
    assert sorted(sllmctl.load_state_dict("m")) == [f"w{i}" for i in range(5)]


def test_the_checksum_is_as_specified(tmp_path: Path) -> None:
    """docs/format.md: SHA-256 of the file with the 64 digits written as zeros."""
    import hashlib

    raw = (stored_model(tmp_path) / "manifest.json").read_bytes()
    digest = json.loads(raw)["manifest_sha256"]
    assert raw.endswith(f'"manifest_sha256": "{digest}"\n}}\n'.encode())
    assert hashlib.sha256(raw.replace(digest.encode(), b"0" * 64)).hexdigest() == digest


@pytest.mark.parametrize("change, message", [
    (lambda d: d["files"][0].update(path="../../etc/passwd"), "bad data file entry"),
    (lambda d: d["files"][0].update(path="/etc/passwd"), "bad data file entry"),
    (lambda d: d["files"][0].update(size="4096"), "malformed manifest"),
    (lambda d: d["extra_files"].update({"../x": {"size": 1, "sha256": "0"}}),
     "bad non-weight file name"),
    (lambda d: d["tensors"]["w0"].update(shape=[1024.0, 1024]), "malformed manifest"),
    (lambda d: d.update(chunk_size=0), "malformed manifest"),
    (lambda d: d.update(extra=1), "malformed manifest"),
])
def test_manifests_that_leave_the_folder_or_mistype_are_corrupt(
        tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    from sllmctl.store.format import seal

    manifest = stored_model(tmp_path) / "manifest.json"
    d = json.loads(manifest.read_bytes())
    change(d)
    manifest.write_text(seal(d))
    with pytest.raises(CorruptCheckpoint, match=message):
        Store().get("m")
