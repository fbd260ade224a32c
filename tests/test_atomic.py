"""SIGKILL of `convert` at any moment leaves the store as it was, and usable."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import sllmctl
from sllmctl.store.store import Store
from sllmctl.store.writer import convert


def convert_cmd(src: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sllmctl", "convert", str(src), "--name", name, "-q", *extra]


@pytest.mark.slow
def test_sigkill_during_convert_leaves_store_unchanged(tmp_path: Path) -> None:
    old = {"w": torch.zeros(16)}
    (tmp_path / "old").mkdir()
    save_file(old, tmp_path / "old" / "model.safetensors")
    convert(tmp_path / "old", "keep")
    new = {f"w{i}": torch.randn(1024, 2048) for i in range(12)}  # ~100 MB
    (tmp_path / "new").mkdir()
    save_file(new, tmp_path / "new" / "model.safetensors")

    start = time.perf_counter()
    subprocess.run(convert_cmd(tmp_path / "new", "timing"), check=True)
    duration = time.perf_counter() - start
    Store().remove("timing")

    rng = random.Random(1234)
    for attempt in range(8):
        name = rng.choice(["fresh", "keep"])
        proc = subprocess.Popen(convert_cmd(tmp_path / "new", name, "--force"))
        time.sleep(rng.uniform(0.2, 1.0) * duration)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        names = Store().names()
        # either the whole new model is there, or the store is as before
        assert set(names) <= {"keep", "fresh"} and "keep" in names, (attempt, names)
        state = sllmctl.load_state_dict("keep")
        assert sorted(state) in (["w"], sorted(new)), attempt
        if "fresh" in names:
            assert sorted(sllmctl.load_state_dict("fresh")) == sorted(new)
            Store().remove("fresh")
        if sorted(state) != ["w"]:  # the replacement finished: put the old one back
            convert(tmp_path / "old", "keep", force=True)

    # the store is usable: a new conversion works and cleans what the kills left
    convert(tmp_path / "new", "after")
    leftovers = os.listdir(Store().tmp_dir)
    assert leftovers == [], leftovers
    listing = subprocess.run([sys.executable, "-m", "sllmctl", "ls", "--json"],
                             capture_output=True, text=True, check=True)
    assert {r["name"] for r in json.loads(listing.stdout)} == {"keep", "after"}
