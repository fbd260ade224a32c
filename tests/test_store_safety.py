"""The store never follows a link out of itself, and names and paths cannot leave it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sllmctl
from sllmctl.errors import CorruptCheckpoint, SllmError
from sllmctl.store.store import Store, check_name
from sllmctl.store.writer import convert


def tiny(tmp_path: Path, name: str) -> Path:
    src = tmp_path / f"src-{name}"
    src.mkdir()
    save_file({"w": torch.arange(1024, dtype=torch.float32)}, src / "model.safetensors")
    (src / "config.json").write_text("{}")
    convert(src, name)
    return Store().path(name)


def victim(tmp_path: Path) -> Path:
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("keep me")
    return outside


def test_an_absolute_link_is_refused_and_its_target_kept(tmp_path: Path) -> None:
    tiny(tmp_path, "good")
    outside = victim(tmp_path)
    store = Store()
    os.symlink(outside, store.root / "evil")
    with pytest.raises(CorruptCheckpoint, match="model evil: its link points outside"):
        store.remove("evil")
    with pytest.raises(CorruptCheckpoint, match="points outside"):
        sllmctl.load_state_dict("evil")
    listed = {e.name: e for e in store.entries()}
    assert listed["evil"].corrupt and not listed["good"].corrupt
    assert (outside / "keep.txt").read_text() == "keep me"


@pytest.mark.parametrize("target", ["../precious", ".data/../../precious", ".data/x/..",
                                    "precious"])
def test_relative_links_out_of_data_are_refused(tmp_path: Path, target: str) -> None:
    tiny(tmp_path, "good")
    outside = victim(tmp_path)
    store = Store()
    (store.root / "precious").symlink_to(outside)  # so that "precious" resolves too
    os.symlink(target, store.root / "evil")
    with pytest.raises(CorruptCheckpoint, match="points outside"):
        store.remove("evil")
    assert (outside / "keep.txt").exists()


def test_a_model_folder_that_is_a_link_is_refused(tmp_path: Path) -> None:
    folder = tiny(tmp_path, "m")
    outside = victim(tmp_path)
    store = Store()
    os.symlink(outside, store.data_dir / "fake.0")
    os.unlink(store.root / "m")
    os.symlink(".data/fake.0", store.root / "m")
    with pytest.raises(CorruptCheckpoint, match="points outside"):
        store.remove("m")
    assert (outside / "keep.txt").exists() and folder.exists()


def test_rm_removes_links_inside_a_model_without_following_them(tmp_path: Path) -> None:
    folder = tiny(tmp_path, "m")
    outside = victim(tmp_path)
    (folder / "files" / "sneaky").symlink_to(outside)
    Store().remove("m")
    assert not folder.exists() and (outside / "keep.txt").exists()


def test_a_linked_data_or_extra_file_is_corrupt(tmp_path: Path) -> None:
    folder = tiny(tmp_path, "m")
    data = folder / "data-00000.bin"
    copy = tmp_path / "copy.bin"
    copy.write_bytes(data.read_bytes())
    data.unlink()
    data.symlink_to(copy)
    with pytest.raises(CorruptCheckpoint, match=r"data file data-00000\.bin cannot be opened"):
        sllmctl.load_state_dict("m")
    assert Store().entries()[0].error == "model m: data-00000.bin is not a regular file"
    data.unlink()
    data.write_bytes(copy.read_bytes())
    config = folder / "files" / "config.json"
    config.unlink()
    config.symlink_to(tmp_path / "src-m" / "config.json")
    with pytest.raises(CorruptCheckpoint, match=r"files/config\.json"):
        sllmctl.load_state_dict("m")


def test_garbage_collection_leaves_a_linked_data_folder_alone(tmp_path: Path) -> None:
    tiny(tmp_path, "m")
    outside = victim(tmp_path)
    (outside / "old.0").mkdir()
    store = Store()
    os.rename(store.data_dir, tmp_path / "real-data")
    store.data_dir.symlink_to(outside)
    assert store.collect_garbage() == []
    assert (outside / "old.0").exists()


@pytest.mark.parametrize("name", ["m\n", "m\nx", "\nm", "m/x", ".m", "m ", ""])
def test_names_are_whole_matches(name: str) -> None:
    with pytest.raises(SllmError, match="invalid model name"):
        check_name(name)
