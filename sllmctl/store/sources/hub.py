"""Models from the Hugging Face Hub, through huggingface_hub, into its own cache.

`resolve` asks the Hub which commit a revision is and which files it holds (or, offline, reads
the cache); `choose` picks the files a model needs (safetensors, else PyTorch .bin, never both;
or one GGUF file; and the config, generation, tokenizer and chat-template files); `download`
brings each into the HF cache: small files with hf_hub_download, LFS files resumable and
verified (hub_blob.py), then linked into the snapshot by hf_hub_download, so that every HF
tool reads the cache as its own. `hub_error` turns the Hub's errors into one line each.
"""

from __future__ import annotations

import fnmatch
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sllmctl.errors import NotFound, SllmError
from sllmctl.store.sources.base import KEPT_FILES
from sllmctl.store.sources.hub_blob import PullCancelled, blob_path, fetch_blob

TOKEN_HINT = "set HF_TOKEN or accept the licence"
WEIGHTS = {
    "safetensors": ("*.safetensors", "model.safetensors.index.json"),
    "pytorch": ("pytorch_model*.bin", "pytorch_model.bin.index.json"),
}


@dataclass
class HubOptions:
    """Where the Hub and the cache are; None: huggingface_hub's own defaults (HF_ENDPOINT,
    HF_TOKEN, HF_HOME/HF_HUB_CACHE, HF_HUB_OFFLINE)."""

    endpoint: str | None = None
    token: str | None = None
    cache_dir: str | None = None
    offline: bool | None = None

    @property
    def cache(self) -> Path:
        from huggingface_hub import constants

        return Path(self.cache_dir or constants.HF_HUB_CACHE).expanduser()

    @property
    def is_offline(self) -> bool:
        from huggingface_hub import constants

        return self.offline if self.offline is not None else constants.is_offline_mode()


@dataclass
class RemoteFile:
    name: str
    size: int
    sha256: str | None = None  # an LFS file's; None for a file kept in git


@dataclass
class Resolved:
    repo_id: str
    revision: str
    commit: str
    kind: str  # safetensors | pytorch | gguf
    files: list[RemoteFile] = field(default_factory=list)

    @property
    def storage(self) -> str:
        return "models--" + self.repo_id.replace("/", "--")

    @property
    def weights(self) -> list[RemoteFile]:
        return [f for f in self.files if f.name not in KEPT_FILES]


def hub_error(e: BaseException, repo_id: str, revision: str) -> SllmError:
    """One line for what the Hub (or huggingface_hub) refused."""
    from huggingface_hub import errors

    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, errors.GatedRepoError) or status in (401, 403):
        return SllmError(f"{repo_id}: access refused ({status or 'gated'}): {TOKEN_HINT}",
                         hint=f"accept the licence at https://huggingface.co/{repo_id}, "
                         "then export HF_TOKEN=hf_…")
    if isinstance(e, errors.RevisionNotFoundError):
        return NotFound(f"{repo_id}: no such revision {revision!r}")
    if isinstance(e, errors.RepositoryNotFoundError) or status == 404:
        return NotFound(f"{repo_id}: no such repo on the Hub",
                        hint="check the repo id (org/name), or the catalogue: sllmctl pull --list")
    if isinstance(e, errors.RemoteEntryNotFoundError):
        return NotFound(f"{repo_id}: a file the Hub listed is missing ({e})")
    if isinstance(e, errors.LocalEntryNotFoundError | errors.OfflineModeIsEnabled):
        return SllmError(f"{repo_id}@{revision} is not in the Hugging Face cache and the Hub "
                         "is not asked (offline)", hint="unset HF_HUB_OFFLINE, or pull it "
                         "once online")
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return SllmError(f"{repo_id}: the Hub could not be reached or refused: {first}",
                     hint="check HF_ENDPOINT and the network; HF_HUB_OFFLINE=1 uses the cache")


def resolve(repo_id: str, revision: str, opts: HubOptions, gguf_file: str | None = None,
            quant: str | None = None) -> Resolved:
    """The commit `revision` stands for and the files to download."""
    if opts.is_offline:
        commit, listing = _cached_listing(repo_id, revision, opts)
    else:
        from huggingface_hub import HfApi

        try:
            info = HfApi(endpoint=opts.endpoint, token=opts.token).model_info(
                repo_id, revision=revision, files_metadata=True)
        except Exception as e:
            raise hub_error(e, repo_id, revision) from None
        commit = str(info.sha)
        listing = [RemoteFile(s.rfilename, int(s.size or 0), s.lfs.sha256 if s.lfs else None)
                   for s in info.siblings or []]
    kind, names = choose([f.name for f in listing], gguf_file, quant, repo_id)
    by_name = {f.name: f for f in listing}
    return Resolved(repo_id, revision, commit, kind, [by_name[n] for n in names])


def _cached_listing(repo_id: str, revision: str, opts: HubOptions) -> tuple[str, list[RemoteFile]]:
    storage = opts.cache / ("models--" + repo_id.replace("/", "--"))
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    snapshot = storage / "snapshots" / commit
    if not snapshot.is_dir():
        from huggingface_hub.errors import LocalEntryNotFoundError

        raise hub_error(LocalEntryNotFoundError(repo_id), repo_id, revision)
    files = []
    for p in sorted(snapshot.iterdir()):
        if p.is_dir():  # a subfolder (original/, onnx/): never chosen
            continue
        target = Path(os.path.realpath(p))
        sha = target.name if len(target.name) == 64 else None
        files.append(RemoteFile(p.name, target.stat().st_size, sha))
    return commit, files


def choose(names: list[str], gguf_file: str | None, quant: str | None,
           repo_id: str = "the repo") -> tuple[str, list[str]]:
    """The files a model needs from a repo's listing: (format, names)."""
    top = [n for n in names if "/" not in n]
    kept = [n for n in KEPT_FILES if n in top]
    ggufs = [n for n in top if n.endswith(".gguf")]
    if gguf_file or quant:
        return "gguf", [_pick_gguf(ggufs, gguf_file, quant, repo_id)]
    for kind, (pattern, index) in WEIGHTS.items():
        found = [n for n in top if fnmatch.fnmatch(n, pattern)
                 and not n.startswith("consolidated")]
        if found:
            return kind, kept + ([index] if index in top else []) + sorted(found)
    if len(ggufs) == 1:
        return "gguf", ggufs
    if ggufs:
        raise SllmError(f"{repo_id} holds {len(ggufs)} GGUF files: name one",
                        hint="add --quant Q4_K_M or --file NAME.gguf; there are: "
                        + ", ".join(ggufs[:8]))
    raise SllmError(f"{repo_id} holds no model weights sllmctl reads "
                    "(*.safetensors, pytorch_model*.bin or *.gguf)")


def _pick_gguf(ggufs: list[str], gguf_file: str | None, quant: str | None,
               repo_id: str) -> str:
    if gguf_file:
        if gguf_file in ggufs:
            return gguf_file
        found = []
    else:
        assert quant is not None
        found = [n for n in ggufs if quant.lower() in n.lower()]
        if len(found) == 1:
            return found[0]
    what = f"--file {gguf_file}" if gguf_file else f"--quant {quant}"
    raise SllmError(f"{repo_id}: {what} matches {len(found) or 'no'} GGUF file(s)",
                    hint="there are: " + (", ".join(ggufs[:8]) or "none"))


@dataclass
class Downloaded:
    folder: Path  # the snapshot folder
    paths: dict[str, Path]  # file name -> its path in the snapshot
    downloaded: int = 0  # bytes over the network
    cached: int = 0  # bytes already in the cache (whole blobs or partial files)
    resent: int = 0


def missing_bytes(res: Resolved, opts: HubOptions) -> int:
    """Bytes still to download into the cache (whole files not there, less partial files)."""
    storage = opts.cache / res.storage
    need = 0
    for f in res.files:
        snap = storage / "snapshots" / res.commit / f.name
        if snap.exists() or (f.sha256 and blob_path(storage, f.sha256).exists()):
            continue
        partial = blob_path(storage, f.sha256 + ".incomplete") if f.sha256 else None
        need += f.size - (partial.stat().st_size if partial and partial.exists() else 0)
    return max(0, need)


def download(res: Resolved, opts: HubOptions, progress: Callable[[int], None],
             cancel: threading.Event | None = None,
             on_file: Callable[[str, Path], None] | None = None,
             watch: Callable[[str], Callable[[int], None] | None] | None = None) -> Downloaded:
    """Every chosen file into the HF cache, small ones first; `on_file` hears of each file as
    it lands, `watch(name)` gives a callback that hears how much of an LFS file is written."""
    from huggingface_hub import hf_hub_download

    out = Downloaded(opts.cache / res.storage / "snapshots" / res.commit, {})
    storage = opts.cache / res.storage
    for f in sorted(res.files, key=lambda f: f.sha256 is not None):
        if cancel is not None and cancel.is_set():
            raise PullCancelled("the pull was cancelled; what arrived is kept for a rerun")
        snap = out.folder / f.name
        fresh = not snap.exists() and not opts.is_offline
        if f.sha256 and fresh:
            url, headers = lfs_location(res, f, opts)
            got = fetch_lfs(storage, url, f, headers, progress, cancel,
                            watch=watch(f.name) if watch else None)
            out.downloaded += got.downloaded
            out.cached += f.size - got.downloaded
            out.resent += got.resent
        try:
            path = hf_hub_download(res.repo_id, f.name, revision=res.commit,
                                   cache_dir=opts.cache_dir, endpoint=opts.endpoint,
                                   token=opts.token, local_files_only=opts.is_offline)
        except Exception as e:
            raise hub_error(e, res.repo_id, res.revision) from None
        if not (f.sha256 and fresh):  # a small file, or one from the cache
            progress(f.size)
            out.downloaded += f.size if fresh else 0
            out.cached += 0 if fresh else f.size
        out.paths[f.name] = Path(path)
        if on_file is not None:
            on_file(f.name, Path(path))
    _write_ref(storage, res.revision, res.commit)
    return out


def lfs_location(res: Resolved, f: RemoteFile, opts: HubOptions) -> tuple[str, dict[str, str]]:
    """Where an LFS file's bytes are (the Hub's redirect) and the headers to ask with, once
    the Hub's X-Linked-Etag and X-Linked-Size agree with the listing."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.utils import build_hf_headers

    url = hf_hub_url(res.repo_id, f.name, revision=res.commit, endpoint=opts.endpoint)
    headers = build_hf_headers(token=opts.token)
    try:
        meta = get_hf_file_metadata(url, token=opts.token, endpoint=opts.endpoint)
    except Exception as e:
        raise hub_error(e, res.repo_id, res.revision) from None
    if meta.etag != f.sha256 or (meta.size is not None and meta.size != f.size):
        raise SllmError(f"{res.repo_id}/{f.name}: the Hub's file metadata (X-Linked-Etag "
                        f"{meta.etag}) disagree with its listing (sha256 {f.sha256})")
    if _origin(meta.location) != _origin(url):  # a CDN: the token stays on the Hub
        headers.pop("authorization", None)
    return meta.location, headers


def fetch_lfs(storage: Path, url: str, f: RemoteFile, headers: dict[str, str],
              progress: Callable[[int], None], cancel: threading.Event | None,
              stop_at: int | None = None, watch: Callable[[int], None] | None = None) -> Any:
    assert f.sha256 is not None
    return fetch_blob(storage, url, f.sha256, f.size, headers, progress, cancel,
                      stop_at=stop_at, watch=watch)


def _origin(url: str) -> tuple[str, str, int | None]:
    from urllib.parse import urlparse

    u = urlparse(url)
    return u.scheme, (u.hostname or "").lower(), u.port


def _write_ref(storage: Path, revision: str, commit: str) -> None:
    """refs/<revision> -> commit, as huggingface_hub keeps it (for offline use later)."""
    if revision == commit:
        return
    ref = storage / "refs" / revision
    try:
        ref.parent.mkdir(parents=True, exist_ok=True)
        if not ref.is_file() or ref.read_text() != commit:
            ref.write_text(commit)
    except OSError:
        pass
