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


# The slow set, from per-test durations of the whole suite on a 2-core host (2026-12-01,
# `pytest --durations=40`): modules whose tests share one expensive fixture (a conversion of the
# demo model, a transformers reference) and single tests over 5 s. scripts/check runs the
# rest first, then these; `pytest -m "not slow"` is the quick loop.
SLOW_MODULES = {"test_run.py", "test_serve.py", "test_gguf.py", "test_gguf_tiny.py"}
SLOW_TESTS = {
    "test_atomic.py::test_sigkill_during_convert_leaves_store_unchanged",
    "test_engine.py::test_smollm2_greedy_matches_transformers",
    "test_codec.py::test_compress_setting_from_environment_and_config",
    "test_daemon.py::test_kill_9_then_no_autostart_fails_fast_and_autostart_recovers",
}


def _mark_slow(items: list[pytest.Item]) -> None:
    for item in items:
        module = item.path.name
        name = getattr(item, "originalname", item.name)  # without [parameters]
        if module in SLOW_MODULES or f"{module}::{name}" in SLOW_TESTS:
            item.add_marker(pytest.mark.slow)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    _mark_slow(items)
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
