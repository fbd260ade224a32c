"""The DRAM tier on its own, on the CPU (unpinned): regions and slabs, placement, eviction."""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sllmctl.daemon.dram_tier import REGION, SLAB, DramTier, region_sizes
from sllmctl.errors import CorruptCheckpoint
from sllmctl.store.store import Store, StoredModel
from sllmctl.store.writer import convert
from sllmctl.wire.codes import DoesNotFit

MiB = 1 << 20


def make_model(tmp_path: Path, name: str, files: int = 1, mib: int = 0) -> StoredModel:
    """A model of `files` tiny data files (one slab each), or one data file of `mib` MiB."""
    src = tmp_path / f"src-{name}"
    src.mkdir()
    if mib:
        save_file({"w": torch.randn(mib * MiB // 4)}, src / "model.safetensors")
        convert(src, name)
    else:
        save_file({f"w{i}": torch.randn(1024) for i in range(files)}, src / "model.safetensors")
        convert(src, name, max_file_size=4096)  # one data file per tensor
    return Store().get(name)


def tier(slabs: int) -> DramTier:
    t = DramTier(slabs * SLAB, pinned=False)
    t._thread.join()
    assert t.allocated == slabs * SLAB and t.allocation_error is None
    return t


def warm(t: DramTier, model: StoredModel) -> list[int]:
    entry, fresh = t.warm(model, lambda *_: None)
    assert fresh
    return entry.slabs


def use(t: DramTier, model: StoredModel) -> None:
    assert t.pinned_model(model) is not None
    t.release(model.name)


def names(t: DramTier) -> list[str]:
    return [m["name"] for m in t.status()["models"]]


def test_slabs_are_views_of_regions_and_a_model_gets_consecutive_slabs(tmp_path: Path) -> None:
    t = tier(4)
    region = t.regions[0]
    assert len(t.regions) == 1 and region.numel() == 4 * SLAB
    for i, slab in enumerate(t.slabs):
        assert slab._base is region and slab.data_ptr() == region.data_ptr() + i * SLAB
    model = make_model(tmp_path, "m", mib=130)  # pieces of 64, 64 and 2 MiB
    assert warm(t, model) == [0, 1, 2]
    pinned = t.pinned_model(model)
    assert pinned is not None
    pieces = [(p.file, p.offset, p.length) for p, _ in pinned.pieces]
    assert pieces == [(0, 0, SLAB), (0, SLAB, SLAB), (0, 2 * SLAB, 130 * MiB - 2 * SLAB)]
    bufs = [buf for _, buf in pinned.pieces]
    assert [b.numel() for b in bufs] == [p[2] for p in pieces]
    for a, b in pairwise(bufs):  # one run of memory: mergeable copies
        assert b.data_ptr() == a.data_ptr() + a.numel()
        assert b.untyped_storage().data_ptr() == region.untyped_storage().data_ptr()
    data = (model.path / model.manifest.files[0].path).read_bytes()
    assert bytes(torch.cat(bufs).numpy()) == data[: 130 * MiB]


def test_a_compressed_model_is_held_decoded(tmp_path: Path) -> None:
    """The DRAM tier holds a compressed model's decoded bytes, so its loads to a GPU are the
    plain copies of any other model; damage in its file is named by chunk."""
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    save_file({"w": (torch.randn(40 * MiB, generator=g) * 0.02).to(torch.bfloat16)},
              src / "model.safetensors")
    plain, small = convert(src, "plain"), convert(src, "small", compress=True)
    assert small.files[0].on_disk < plain.files[0].size
    t = tier(4)
    model = Store().get("small")
    warm(t, model)
    pinned = t.pinned_model(model)
    assert pinned is not None
    held = torch.cat([buf for _, buf in pinned.pieces])
    t.release("small")
    assert bytes(held.numpy()) == (Store().path("plain") / plain.files[0].path).read_bytes()
    t.unload("small")
    path = Store().path("small") / small.files[0].path
    raw = bytearray(path.read_bytes())
    raw[small.files[0].on_disk // 2] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="chunk 2 "):
        t.warm(Store().get("small"), lambda *_: None)
    assert names(t) == []


def test_a_capacity_not_a_multiple_of_the_region() -> None:
    n = REGION // SLAB
    assert region_sizes(2 * REGION + 3 * SLAB) == [REGION, REGION, 2 * SLAB, SLAB]
    t = tier(n + 3)
    assert [r.numel() for r in t.regions] == [REGION, 2 * SLAB, SLAB]
    assert t.region_of == [0] * n + [1] * 2 + [2]
    assert t.free == list(range(len(t.slabs)))
    assert t.slabs[-1]._base is t.regions[2] and t.status()["capacity"] == REGION + 3 * SLAB


def test_placement_takes_the_lowest_run_that_fits_else_the_longest_runs(tmp_path: Path) -> None:
    t = tier(8)
    ones = [make_model(tmp_path, f"s{i}") for i in range(8)]
    assert [warm(t, m) for m in ones[:4]] == [[0], [1], [2], [3]]
    t.unload("s1")  # free: 1, 4-7
    assert warm(t, make_model(tmp_path, "two", files=2)) == [4, 5]  # the hole at 1 is too short
    assert warm(t, ones[4]) == [1]
    assert warm(t, ones[5]) == [6]
    for name in ("s0", "s2", "s3"):
        t.unload(name)  # free: 0, 2, 3, 7
    assert t.free == [0, 2, 3, 7]
    assert warm(t, make_model(tmp_path, "three", files=3)) == [2, 3, 0]
    assert t.free == [7]


def test_runs_do_not_cross_regions(tmp_path: Path) -> None:
    n = REGION // SLAB
    t = tier(n + 2)  # a region of n slabs, then one of 2
    assert warm(t, make_model(tmp_path, "fill", files=n - 1)) == list(range(n - 1))
    assert t.free == [n - 1, n, n + 1] and t.region_of[n - 1:] == [0, 1, 1]
    assert warm(t, make_model(tmp_path, "two", files=2)) == [n, n + 1]


def test_a_model_used_often_outlives_one_used_once_more_recently(tmp_path: Path) -> None:
    t = tier(2)
    a, b, c = (make_model(tmp_path, n) for n in "abc")
    warm(t, a)
    use(t, a)
    use(t, a)
    warm(t, b)  # b is the most recently used, but used once
    warm(t, c)
    assert names(t) == ["a", "c"]
    status = {m["name"]: m for m in t.status()["models"]}
    assert (status["a"]["uses"], status["c"]["uses"]) == (3, 1)
    per_use = c.manifest.total_bytes / t.reload_rate / SLAB  # cost / size
    assert t.clock == pytest.approx(per_use)  # b's priority
    assert status["c"]["priority"] == pytest.approx(t.clock + per_use)
    assert status["a"]["priority"] == pytest.approx(3 * per_use)


def test_equal_uses_evict_the_least_recently_used(tmp_path: Path) -> None:
    t = tier(2)
    a, b, c = (make_model(tmp_path, n) for n in "abc")
    warm(t, a)
    warm(t, b)
    use(t, b)
    use(t, a)  # two uses each; a is the more recent
    warm(t, c)
    assert names(t) == ["a", "c"]


def test_the_clock_ages_a_model_no_longer_used_out(tmp_path: Path) -> None:
    t = tier(2)
    a = make_model(tmp_path, "a")
    warm(t, a)
    use(t, a)
    use(t, a)  # three uses
    kept = []
    for i in range(4):  # each newcomer starts one use above the clock, which rises
        warm(t, make_model(tmp_path, f"n{i}"))
        kept.append(names(t))
    assert kept == [["a", "n0"], ["a", "n1"], ["a", "n2"], ["n2", "n3"]]


def test_models_in_use_are_never_evicted(tmp_path: Path) -> None:
    t = tier(2)
    a, b, c, d = (make_model(tmp_path, n) for n in "abcd")
    warm(t, a)
    warm(t, b)
    assert t.pinned_model(a) is not None  # a is in use, and the lowest priority
    for _ in range(3):
        use(t, b)
    warm(t, c)
    assert names(t) == ["a", "c"]
    assert t.pinned_model(c) is not None  # now both are in use: nothing can go
    with pytest.raises(DoesNotFit, match="the models holding it are in use"):
        t.warm(d, lambda *_: None)
    assert names(t) == ["a", "c"] and t.free == []
    t.release("a")
    warm(t, d)
    assert names(t) == ["c", "d"]


def test_a_model_larger_than_the_pool_is_refused(tmp_path: Path) -> None:
    t = tier(2)
    small = make_model(tmp_path, "small")
    warm(t, small)
    with pytest.raises(DoesNotFit, match=r"needs 0\.20 GB of DRAM; the DRAM pool holds 0\.13 GB"):
        t.warm(make_model(tmp_path, "big", files=3), lambda *_: None)
    assert names(t) == ["small"] and t.free == [1]  # nothing evicted


def test_gpu_status_answers_while_the_driver_is_busy() -> None:
    """A memory query held up by the driver (pinning on another thread) does not hold up
    status: it answers with the last figures, marked stale, and fresh ones once the query
    is done."""
    import threading

    from sllmctl.daemon.gpu_tier import GpuTier

    tier = GpuTier()
    tier.count = 1
    tier._names[0], tier._memory[0] = "test GPU", (5, 10)
    release = threading.Event()

    def busy_driver() -> None:
        release.wait()
        tier._memory[0] = (7, 10)

    tier.refresh = busy_driver  # type: ignore[method-assign]
    s = tier.status()
    assert s["gpus"] == [{"index": 0, "name": "test GPU", "total": 10, "free": 5, "stale": True}]
    query = tier._query
    assert tier.status()["gpus"][0]["stale"]
    assert tier._query is query  # the query still running is not started twice
    release.set()
    assert query is not None
    query.join()
    tier.refresh = lambda: None  # type: ignore[method-assign]
    assert tier.status()["gpus"] == [
        {"index": 0, "name": "test GPU", "total": 10, "free": 7, "stale": False}]
