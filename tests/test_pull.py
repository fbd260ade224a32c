"""`pull` from the Hub: the real huggingface_hub code against a fake Hub on 127.0.0.1
(tests/fakehub.py), for a tiny generated Llama in two safetensors shards."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fakehub import FakeHub, Repo

from sllmctl.errors import SllmError
from sllmctl.store.pull import PullRequest, pull
from sllmctl.store.sources.hub import HubOptions, choose, hub_error
from sllmctl.store.store import Store

REPO = "org/tiny"
CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
          "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
          "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 128,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True}


def tiny_model(folder: Path) -> Path:
    """Two shards with an index, the config and tokenizer files, and files a pull skips."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir()
    g = torch.Generator().manual_seed(0)

    def t(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(torch.bfloat16)

    shards: list[dict[str, torch.Tensor]] = [{"model.embed_tokens.weight": t(256, 64)},
                                             {"model.norm.weight": t(64)}]
    for i in range(2):
        p = f"model.layers.{i}."
        shards[i].update({
            p + "self_attn.q_proj.weight": t(64, 64), p + "self_attn.k_proj.weight": t(32, 64),
            p + "self_attn.v_proj.weight": t(32, 64), p + "self_attn.o_proj.weight": t(64, 64),
            p + "mlp.gate_proj.weight": t(128, 64), p + "mlp.up_proj.weight": t(128, 64),
            p + "mlp.down_proj.weight": t(64, 128), p + "input_layernorm.weight": t(64),
            p + "post_attention_layernorm.weight": t(64)})
    weight_map = {}
    for k, sd in enumerate(shards):
        name = f"model-{k + 1:05d}-of-00002.safetensors"
        save_file(sd, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "generation_config.json").write_text('{"eos_token_id": 2}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    (folder / "pytorch_model.bin").write_bytes(b"never downloaded: safetensors win")
    (folder / "README.md").write_text("a model card, not needed")
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model(tmp_path_factory.mktemp("tiny") / "src")


@pytest.fixture
def hub(tiny: Path) -> Iterator[FakeHub]:
    h = FakeHub()
    h.repos[REPO] = Repo.from_folder(tiny)
    yield h
    h.close()


@pytest.fixture
def opts(hub: FakeHub, tmp_path: Path) -> HubOptions:
    return HubOptions(endpoint=hub.endpoint, cache_dir=str(tmp_path / "hf"), offline=False)


SHARD = "model-00001-of-00002.safetensors"
SHARD2 = "model-00002-of-00002.safetensors"


def ranges(hub: FakeHub, name: str, size: int) -> list[tuple[int, int]]:
    """The byte ranges each GET of `name` asked for, [start, end)."""
    out = []
    for rng in hub.gets(name):
        if rng is None:
            out.append((0, size))
            continue
        a, _, b = rng.removeprefix("bytes=").partition("-")
        out.append((int(a), int(b) + 1 if b else size))
    return out


def assert_each_byte_once(hub: FakeHub, name: str, size: int) -> None:
    assert hub.sent[name] == size


def test_choose_takes_safetensors_else_bin_never_both() -> None:
    names = ["config.json", "README.md", "model.safetensors", "pytorch_model.bin",
             "consolidated.safetensors", "original/model.safetensors", "tokenizer.json"]
    assert choose(names, None, None) == ("safetensors", ["config.json", "tokenizer.json",
                                                         "model.safetensors"])
    assert choose(["config.json", "pytorch_model.bin", "training_args.bin"], None, None) == (
        "pytorch", ["config.json", "pytorch_model.bin"])
    ggufs = ["m-Q4_K_M.gguf", "m-Q8_0.gguf"]
    assert choose(ggufs, None, "q4_k_m") == ("gguf", ["m-Q4_K_M.gguf"])
    assert choose(ggufs, "m-Q8_0.gguf", None) == ("gguf", ["m-Q8_0.gguf"])
    with pytest.raises(SllmError, match="2 GGUF files"):
        choose(ggufs, None, None)
    with pytest.raises(SllmError, match="matches no GGUF"):
        choose(ggufs, None, "Q2_K")


def test_fresh_pull(hub: FakeHub, opts: HubOptions, tiny: Path) -> None:
    r = pull(PullRequest(REPO, "tiny"), opts)
    commit = hub.repos[REPO].commit
    assert (r["commit"], r["format"], r["up_to_date"]) == (commit, "safetensors", False)
    assert "pytorch_model.bin" not in r["files"] and "README.md" not in r["files"]
    model = Store().get("tiny")
    prov = model.manifest.provenance
    assert (prov["repo"], prov["revision"], prov["commit"]) == (REPO, "main", commit)
    assert len(model.manifest.tensors) == 20
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(
        model.manifest.extra_files)
    # what landed in the HF cache is the HF cache's own: HF tools read it, offline
    from huggingface_hub import hf_hub_download, scan_cache_dir

    cached = scan_cache_dir(opts.cache).repos
    assert [c.repo_id for c in cached] == [REPO] and not scan_cache_dir(opts.cache).warnings
    path = hf_hub_download(REPO, SHARD, cache_dir=opts.cache_dir, local_files_only=True)
    assert Path(path).read_bytes() == (tiny / SHARD).read_bytes()
    # a second pull of the same commit downloads nothing
    requests = len(hub.log)
    again = pull(PullRequest(REPO, "tiny"), opts)
    assert again["up_to_date"] and again["commit"] == commit
    assert all(p.startswith("/api/") for _, p, _ in hub.log[requests:])


def test_pull_from_the_cache_offline(hub: FakeHub, opts: HubOptions) -> None:
    pull(PullRequest(REPO, "tiny"), opts)
    requests = len(hub.log)
    hub.close()  # nothing answers now
    offline = HubOptions(cache_dir=opts.cache_dir, offline=True)
    r = pull(PullRequest(REPO, "tiny-offline"), offline)
    assert r["downloaded"] == 0 and r["cached"] > 0 and len(hub.log) == requests
    a, b = Store().get("tiny").manifest, Store().get("tiny-offline").manifest
    assert [f.checksums for f in a.files] == [f.checksums for f in b.files]
    with pytest.raises(SllmError, match="not in the Hugging Face cache"):
        pull(PullRequest("org/other", "other"), offline)


def test_cut_mid_file_is_resumed_without_a_byte_twice(hub: FakeHub, opts: HubOptions,
                                                      tiny: Path) -> None:
    hub.cut_after = 10_000  # the first weights GET ends after 10 kB
    r = pull(PullRequest(REPO, "tiny"), opts)
    size = (tiny / SHARD).stat().st_size
    assert ranges(hub, SHARD, size)[1][0] == 10_000  # asked again from where it was cut
    assert_each_byte_once(hub, SHARD, size)
    assert r["resent"] == 0 and r["overlapped"]


def test_a_stalled_read_is_retried_from_where_it_stopped(
        hub: FakeHub, opts: HubOptions, tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sllmctl.store.sources import hub_blob, hub_stream

    monkeypatch.setattr(hub_blob, "STALL_S", 0.5)
    hub.stall_after, hub.stall_name, hub.stall_times = 30_000, SHARD, 1  # one GET hangs
    r = pull(PullRequest(REPO, "tiny"), opts)
    size = (tiny / SHARD).stat().st_size
    starts = [a for a, _ in ranges(hub, SHARD, size)]
    assert hub.stalled.is_set() and starts[-1] == hub_stream.HEAD_BYTES + 30_000  # from there
    assert_each_byte_once(hub, SHARD, size)
    assert r["commit"] == hub.repos[REPO].commit
    hub.release.set()


def partial_size(opts: HubOptions, hub: FakeHub, name: str) -> int:
    sha = hub.repos[REPO].sha256(name)
    p = opts.cache / "models--org--tiny" / "blobs" / f"{sha}.incomplete"
    return p.stat().st_size if p.exists() else 0


def test_killed_pull_resumes_on_rerun(hub: FakeHub, opts: HubOptions, tiny: Path,
                                      tmp_path: Path) -> None:
    """A process killed mid-file leaves its partial file; the rerun asks for the rest."""
    hub.stall_after, hub.stall_name = 30_000, SHARD
    code = ("import sys; from sllmctl.store.pull import PullRequest, pull; "
            "from sllmctl.store.sources.hub import HubOptions; "
            "pull(PullRequest('org/tiny', 'tiny'), HubOptions(sys.argv[1], None, sys.argv[2], "
            "False))")
    proc = subprocess.Popen([sys.executable, "-c", code, hub.endpoint, str(opts.cache)],
                            stderr=subprocess.PIPE)
    try:
        assert hub.stalled.wait(60), proc.stderr
        deadline = time.monotonic() + 60
        while (have := partial_size(opts, hub, SHARD)) < hub.sent[SHARD]:  # all sent is on disk
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    hub.stall_after = None
    hub.release.set()
    before = len(hub.gets(SHARD))
    pull(PullRequest(REPO, "tiny"), opts)
    size = (tiny / SHARD).stat().st_size
    assert have > 30_000 and ranges(hub, SHARD, size)[before][0] == have  # only the rest
    assert_each_byte_once(hub, SHARD, size)
    assert Store().get("tiny").manifest.provenance["commit"] == hub.repos[REPO].commit


def test_conversion_overlaps_the_download(hub: FakeHub, opts: HubOptions,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """While the second shard is held mid-file, the first shard's tensors are converted;
    the result is the same model as converting after the download."""
    import threading

    from sllmctl.store.sources import hub_stream

    reads: list[str] = []
    read = hub_stream.Stream.read

    def recorded(self: hub_stream.Stream, name: str, start: int, end: int) -> bytes:
        data = read(self, name, start, end)
        reads.append(name)
        return data

    monkeypatch.setattr(hub_stream.Stream, "read", recorded)
    hub.stall_after, hub.stall_name = 20_000, SHARD2  # after its header and 20 kB more
    done: list[dict[str, object]] = []
    t = threading.Thread(target=lambda: done.append(pull(PullRequest(REPO, "tiny"), opts)))
    t.start()
    deadline = time.monotonic() + 60
    while reads.count(SHARD) < 10:  # embed and layer 0's nine tensors: all of shard 1
        assert time.monotonic() < deadline and t.is_alive()
        time.sleep(0.05)
    assert not done and hub.sent[SHARD2] < hub.repos[REPO].files[SHARD2].__len__()
    hub.release.set()
    t.join(60)
    assert done and done[0]["overlapped"]
    import sllmctl.store.pull as pull_mod

    monkeypatch.setattr(pull_mod, "STREAM", False)
    after = pull(PullRequest(REPO, "tiny-after"), opts)
    assert not after["overlapped"]
    a, b = Store().get("tiny").manifest, Store().get("tiny-after").manifest
    assert [f.checksums for f in a.files] == [f.checksums for f in b.files]
    assert a.extra_files == b.extra_files


@pytest.mark.parametrize("overlap", [True, False])
def test_a_partial_file_of_other_bytes_fails_the_sha256_and_is_removed(
        hub: FakeHub, opts: HubOptions, tiny: Path, overlap: bool,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import sllmctl.store.pull as pull_mod

    monkeypatch.setattr(pull_mod, "STREAM", overlap)
    sha = hub.repos[REPO].sha256(SHARD)
    partial = opts.cache / "models--org--tiny" / "blobs" / f"{sha}.incomplete"
    partial.parent.mkdir(parents=True)
    start = bytearray((tiny / SHARD).read_bytes()[:20_000])
    start[19_000] ^= 0xFF  # one flipped bit-pattern inside the tensor data
    partial.write_bytes(bytes(start))
    with pytest.raises(SllmError, match="do not match the Hub's sha256"):
        pull(PullRequest(REPO, "tiny"), opts)
    assert not partial.exists() and not Store().exists("tiny")  # nothing published
    pull(PullRequest(REPO, "tiny"), opts)  # the rerun starts afresh
    assert Store().exists("tiny")


def test_a_partial_file_that_is_not_the_start_of_the_file_is_fetched_again(
        hub: FakeHub, opts: HubOptions, tiny: Path) -> None:
    sha = hub.repos[REPO].sha256(SHARD)
    partial = opts.cache / "models--org--tiny" / "blobs" / f"{sha}.incomplete"
    partial.parent.mkdir(parents=True)
    partial.write_bytes(b"\xff" * 1000)
    assert pull(PullRequest(REPO, "tiny"), opts)["overlapped"]
    assert Store().exists("tiny")


def test_no_such_repo_is_one_line(opts: HubOptions) -> None:
    with pytest.raises(SllmError) as e:
        pull(PullRequest("org/missing", "m"), opts)
    assert e.value.message == "org/missing: no such repo on the Hub"


@pytest.mark.parametrize("kind", ["private", "gated"])
def test_refused_without_a_token(hub: FakeHub, opts: HubOptions, kind: str) -> None:
    setattr(hub.repos[REPO], kind, True)
    with pytest.raises(SllmError) as e:
        pull(PullRequest(REPO, "tiny"), opts)
    assert "set HF_TOKEN or accept the licence" in e.value.message
    assert ("401" if kind == "private" else "403") in e.value.message
    assert "\n" not in e.value.message and not Store().exists("tiny")
    token = HubOptions(opts.endpoint, hub.repos[REPO].token, opts.cache_dir, False)
    assert pull(PullRequest(REPO, "tiny"), token)["commit"] == hub.repos[REPO].commit


def test_hub_errors_map_to_one_line() -> None:
    from huggingface_hub.errors import LocalEntryNotFoundError

    assert "not in the Hugging Face cache" in hub_error(LocalEntryNotFoundError("x"), "a/b",
                                                        "main").message


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "small"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_is_one_line_before_any_download(hub: FakeHub, small_disk: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLLMCTL_HOME", str(small_disk / "home"))
    opts = HubOptions(endpoint=hub.endpoint, cache_dir=str(small_disk / "hf"), offline=False)
    with pytest.raises(SllmError) as e:
        pull(PullRequest(REPO, "tiny"), opts)
    msg = e.value.message
    assert msg.startswith("not enough disk space for org/tiny: it needs about ") and "free" in msg
    assert "\n" not in msg and hub.gets(SHARD) == []


def test_a_disk_that_fills_up_mid_download_is_one_line(
        hub: FakeHub, small_disk: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sllmctl.store.pull as pull_mod

    monkeypatch.setattr(pull_mod, "check_space", lambda *a: None)  # as if another writer
    monkeypatch.setenv("SLLMCTL_HOME", str(small_disk / "home"))
    opts = HubOptions(endpoint=hub.endpoint, cache_dir=str(small_disk / "hf"), offline=False)
    with pytest.raises(SllmError) as e:
        pull(PullRequest(REPO, "tiny"), opts)
    assert e.value.message.startswith("the disk is full writing ") and "\n" not in e.value.message


def test_one_repo_under_two_names_downloads_each_file_once(hub: FakeHub, opts: HubOptions,
                                                           tiny: Path) -> None:
    import threading

    hub.stall_after, hub.stall_name, hub.stall_times = 20_000, SHARD, 1
    threads = [threading.Thread(target=pull, args=(PullRequest(REPO, n), opts)) for n in "ab"]
    threads[0].start()
    assert hub.stalled.wait(60)
    threads[1].start()

    def heads() -> int:
        return sum(1 for m, p, _ in hub.log if m == "HEAD" and p.endswith("/" + SHARD))

    deadline = time.monotonic() + 60
    while heads() < 2:  # the second pull has reached the shard (and waits on its lock)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    hub.release.set()
    for t in threads:
        t.join(60)
    assert Store().exists("a") and Store().exists("b")
    assert_each_byte_once(hub, SHARD, (tiny / SHARD).stat().st_size)
