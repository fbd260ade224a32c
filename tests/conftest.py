from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Every test gets its own store, runtime folder and config file."""
    from sllmctl import paths

    h = tmp_path / "home"
    monkeypatch.setenv("SLLMCTL_HOME", str(h))
    monkeypatch.setenv("SLLMCTL_CONFIG", str(tmp_path / "config.toml"))
    run = Path(tempfile.mkdtemp(prefix="sl", dir="/tmp"))  # short: ipc paths <= 107 bytes
    monkeypatch.setenv("SLLMCTL_RUNTIME_DIR", str(run))
    monkeypatch.setattr(paths, "_overrides", {})
    paths.config.cache_clear()
    yield h
    paths.config.cache_clear()
    for p in sorted(run.rglob("*"), reverse=True):
        p.unlink() if not p.is_dir() else p.rmdir()
    run.rmdir()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    if cuda and not os.environ.get("SLLMCTL_NO_GPU_TESTS"):
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
