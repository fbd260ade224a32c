"""Random damage to a stored model, manifest included: every case is a corrupt model.

Seeded; 240 corruptions of two tiny models (one plain with two data files, one compressed),
each checked against verify, load_state_dict, the `run` path (ChatModel.load) and the
store's listing, which must still list the intact model beside the damaged one. A subset
also goes through the CLI (`verify`, `ls --json`, `run`): exit 1 and one error line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sllmctl
from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.reader import verify
from sllmctl.store.store import Store
from sllmctl.store.writer import convert

TRIALS = 240
SEED = 20261201
# what a listing can see without reading data bytes: the manifest, and file sizes
STRUCTURAL = {"truncate", "extend", "delete"}


def make_models(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "src"
    src.mkdir()
    save_file({
        "model.embed_tokens.weight": (torch.randn(64, 512, generator=g) * 0.02).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": (torch.randn(128, 256, generator=g) * 0.02
                                              ).bfloat16(),
        "model.norm.weight": torch.randn(100, generator=g),
    }, src / "model.safetensors")
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "tokenizer_config.json").write_text('{"chat_template": "{{ messages }}"}')
    convert(src, "m", max_file_size=70000)
    convert(src, "z", compress=True)
    convert(src, "other")
    assert len(Store().get("m").manifest.files) == 2
    assert any(Store().get("z").manifest.files[0].frames or [])  # split frames to damage


def pristine(name: str) -> dict[Path, bytes]:
    folder = Store().path(name)
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def corrupt(rng: random.Random, files: dict[Path, bytes]) -> tuple[Path, str]:
    """Damage one file (the manifest four times in ten); returns it and the kind."""
    paths = sorted(files)
    manifest = next(p for p in paths if p.name == "manifest.json")
    path = manifest if rng.random() < 0.4 else rng.choice(paths)
    data = bytearray(files[path])
    kinds = ["flip", "high", "truncate", "extend", "delete"]
    kinds += ["name", "json"] if path == manifest else ["swap", "zero"]
    kind = rng.choice(kinds)
    at = rng.randrange(len(data))
    if kind == "name":  # a bit of a tensor name: read as another name before version 3
        starts = [i for i in range(len(data)) if data.startswith(b'"model.', i)]
        at = rng.choice(starts) + 1 + rng.randrange(12)
        kind = "flip"
    if kind == "json":
        data[at:at + 1] = rng.choice([b"{", b"]", b'"', b",", b"\\"])
        kind = "flip" if bytes(data) == files[path] else kind
    if kind in ("swap", "zero") and len(data) < 4096:  # a small non-weight file
        kind = "flip"
    if kind in ("swap", "zero"):
        pages = len(data) // 4096
        a, b = rng.randrange(pages), rng.randrange(pages)
        pa, pb = data[a * 4096:(a + 1) * 4096], data[b * 4096:(b + 1) * 4096]
        new = bytes(4096) if kind == "zero" else pb
        if kind == "swap":
            data[b * 4096:(b + 1) * 4096] = pa
        data[a * 4096:(a + 1) * 4096] = new
        kind = "flip" if bytes(data) == files[path] else kind
    if kind == "flip":
        data = bytearray(files[path])
        data[at] ^= 1 << rng.randrange(8)
    elif kind == "high":
        data[at] = rng.choice([v for v in range(0x80, 0x100) if v != data[at]])
    elif kind == "truncate":
        del data[rng.randrange(len(data)):]
    elif kind == "extend":
        data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 5000)))
    if kind == "delete":
        path.unlink()
    else:
        assert bytes(data) != files[path]
        path.write_bytes(bytes(data))
    return path, kind


def is_reported(name: str, fn: Callable[[], object]) -> str:
    with pytest.raises(CorruptCheckpoint) as e:
        fn()
    message = e.value.message
    assert message.startswith(f"model {name}: ") and "\n" not in message, message
    return message


def test_every_random_corruption_is_a_corrupt_model(tmp_path: Path) -> None:
    from sllmctl.engine.chat import ChatModel

    make_models(tmp_path)
    saved = {name: pristine(name) for name in ("m", "z")}
    rng = random.Random(SEED)
    kinds: dict[str, int] = {}
    for trial in range(TRIALS):
        name = rng.choice(["m", "z"])
        path, kind = corrupt(rng, saved[name])
        kinds[kind] = kinds.get(kind, 0) + 1
        why = f"trial {trial}: {kind} of {path.name} of {name}"
        try:
            report = verify(name)
        except CorruptCheckpoint as e:
            assert "\n" not in e.message and e.message.startswith(f"model {name}: "), why
        else:
            assert not report.ok, why
        is_reported(name, lambda n=name: sllmctl.load_state_dict(n))
        is_reported(name, lambda n=name: ChatModel.load(n, "cpu"))
        listed = {e.name: e for e in Store().entries()}
        assert sorted(listed) == ["m", "other", "z"], why
        assert not listed["other"].corrupt, why
        if kind in STRUCTURAL or path.name == "manifest.json":
            assert listed[name].corrupt and listed[name].error.startswith(f"model {name}: "), why
        path.write_bytes(saved[name][path])
    assert sum(kinds.values()) == TRIALS and set(kinds) >= {
        "flip", "high", "truncate", "extend", "delete", "json", "swap", "zero"}
    assert all(verify(n).ok for n in ("m", "z", "other"))


def test_the_cli_names_a_corrupt_model_in_one_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from sllmctl.cli import main

    make_models(tmp_path)
    saved = pristine("m")
    rng = random.Random(SEED + 1)

    def cli(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as e:
            main(list(args))
            raise SystemExit(0)
        out, err = capsys.readouterr()
        return int(e.value.code or 0), out, err

    for _ in range(12):
        path, kind = corrupt(rng, saved)
        for args in (("verify", "m"), ("run", "m", "hi", "--device", "cpu")):
            code, _, err = cli(*args)
            lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
            assert code == 1 and len(lines) == 1 and lines[0].startswith("error: model m: "), (
                kind, path.name, err)
        code, out, _ = cli("ls", "--json")
        rows = {r["name"]: r for r in json.loads(out)}
        assert code == 0 and sorted(rows) == ["m", "other", "z"]
        assert "error" not in rows["other"]
        if kind in STRUCTURAL or path.name == "manifest.json":
            assert rows["m"]["status"] == "corrupt" and rows["m"]["error"].startswith("model m")
        path.write_bytes(saved[path])
