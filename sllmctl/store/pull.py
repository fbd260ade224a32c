"""`pull`: a model from the Hugging Face Hub into the store (resolve, download, convert).

The download goes into the HF cache (sources/hub.py). For a safetensors repo the conversion
overlaps it (sources/hub_stream.py: the headers are read ahead, then each tensor converts as
soon as its bytes are on disk, and nothing is published before every file's sha256 matched);
SLLMCTL_PULL_OVERLAP=0 converts after the download instead, as for GGUF and .bin repos and
pulls from the cache, which read the snapshot through a folder of links to exactly the chosen
files. The manifest's provenance records the repo id, the revision asked for and the commit it
resolved to.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sllmctl.errors import AlreadyExists, SllmError
from sllmctl.store.sources.hub import HubOptions, Resolved, download, missing_bytes, resolve
from sllmctl.store.store import Store, check_name

Progress = Callable[[str, int, int], None]
STREAM = os.environ.get("SLLMCTL_PULL_OVERLAP", "1") != "0"  # 0: convert after the download
GGUF_GROWTH = 4  # a GGUF's dequantized (bf16) size, at most about this many times its own


@dataclass
class PullRequest:
    repo_id: str
    name: str
    revision: str = "main"
    dtype: str | None = None
    compress: bool = False
    gguf_file: str | None = None
    quant: str | None = None
    force: bool = False


def pull(req: PullRequest, opts: HubOptions, progress: Progress | None = None,
         cancel: threading.Event | None = None, store: Store | None = None) -> dict[str, Any]:
    """Resolve, download and convert; returns what was done (bytes, seconds, commit)."""
    report = progress or (lambda *_: None)
    store = store or Store()
    check_name(req.name)
    start = time.perf_counter()
    report("resolving", 0, 0)
    res = resolve(req.repo_id, req.revision, opts, req.gguf_file, req.quant)
    result: dict[str, Any] = {"name": req.name, "repo": res.repo_id, "revision": res.revision,
                              "commit": res.commit, "format": res.kind,
                              "files": [f.name for f in res.files]}
    if store.exists(req.name) and not req.force:
        prov = store.get(req.name).manifest.provenance
        if prov.get("repo") == res.repo_id and prov.get("commit") == res.commit:
            return {**result, "up_to_date": True, "downloaded": 0, "cached": 0,
                    "seconds": round(time.perf_counter() - start, 3)}
        raise AlreadyExists(f"model {req.name!r} already exists (from "
                            f"{prov.get('repo') or prov.get('source')})",
                            hint="add --force to replace it, or --name to pick another name")
    check_space(res, opts, store, req.dtype)
    total = sum(f.size for f in res.files)
    done = [0]

    def advance(n: int) -> None:
        done[0] += n
        report("downloading", done[0], total)

    stream = (STREAM and res.kind == "safetensors" and not opts.is_offline
              and missing_bytes(res, opts) > 0
              and all(f.sha256 for f in res.files if f.name.endswith(".safetensors")))
    with _disk_errors():
        report("downloading", 0, total)
        if stream:
            dl, manifest, t_download = _pull_streaming(req, res, opts, store, advance, report,
                                                       cancel, start)
        else:
            dl = download(res, opts, advance, cancel)
            t_download = time.perf_counter() - start
            manifest = _convert(req, res, dl.paths, store, report, cancel)
    end = time.perf_counter() - start
    return {**result, "up_to_date": False, "downloaded": dl.downloaded, "cached": dl.cached,
            "resent": dl.resent, "bytes": manifest.total_bytes, "overlapped": stream,
            "download_seconds": round(t_download, 3),
            "convert_after_download_seconds": round(end - t_download, 3),
            "seconds": round(end, 3)}


class _Either(threading.Event):
    """Set when the caller's cancel is set, or this one."""

    def __init__(self, other: threading.Event | None) -> None:
        super().__init__()
        self.other = other

    def is_set(self) -> bool:
        return super().is_set() or (self.other is not None and self.other.is_set())


def _pull_streaming(req: PullRequest, res: Resolved, opts: HubOptions, store: Store,
                    advance: Callable[[int], None], report: Progress,
                    cancel: threading.Event | None, start: float) -> tuple[Any, Any, float]:
    """The config and tokenizer files first, then the shards on a thread while the writer
    converts them."""
    from sllmctl.store.sources.hub_stream import Stream, stream_source

    shards = [f for f in res.files if f.name.endswith(".safetensors")]
    first = download(replace(res, files=[f for f in res.files if f not in shards]), opts,
                     advance, cancel)
    stop = _Either(cancel)
    stream = Stream(replace(res, files=shards), opts, advance, stop)
    source = stream_source(stream, first.paths)
    stream.start()
    t_download = [0.0]

    def ready() -> None:
        stream.wait()
        t_download[0] = time.perf_counter() - start

    try:
        manifest = _convert(req, res, {**first.paths}, store, report, cancel, source, ready,
                            quiet=lambda: not stream.finished.is_set())
    except BaseException:
        stop.set()  # the download thread stops at its next read
        raise
    dl = stream.wait()
    dl.paths.update(first.paths)
    dl.downloaded += first.downloaded + stream.header_bytes
    dl.cached += first.cached - stream.header_bytes
    return dl, manifest, t_download[0]


def _convert(req: PullRequest, res: Resolved, files: dict[str, Path], store: Store,
             report: Progress, cancel: threading.Event | None, source: Any = None,
             ready: Callable[[], None] | None = None,
             quiet: Callable[[], bool] = lambda: False) -> Any:
    from sllmctl.store.sources.hub_blob import PullCancelled
    from sllmctl.store.writer import convert

    state = [0, 0]

    def on_total(n: int) -> None:
        state[1] = n
        if not quiet():  # while the download runs, its progress is the one reported
            report("converting", 0, n)

    def advance(n: int) -> None:
        if cancel is not None and cancel.is_set():
            raise PullCancelled("the pull was cancelled; the download is kept in the HF cache")
        state[0] += n
        if not quiet():
            report("converting", state[0], state[1])

    provenance = {"source": f"hf://{res.repo_id}@{res.commit}", "repo": res.repo_id,
                  "revision": res.revision, "commit": res.commit}
    with tempfile.TemporaryDirectory(prefix="sllmctl-pull-") as tmp:
        for name, path in files.items():  # exactly the chosen files, nothing else there
            os.symlink(os.path.realpath(path), Path(tmp) / name)
        src = Path(tmp) / res.files[-1].name if res.kind == "gguf" else Path(tmp)
        manifest = convert(src, req.name, dtype=req.dtype, force=req.force, store=store,
                           progress=advance, on_total=on_total, compress=req.compress,
                           provenance=provenance, source=source, ready=ready)
    return manifest


def estimate_stored(res: Resolved, dtype: str | None) -> int:
    """About how many bytes the converted model takes in the store."""
    weights = sum(f.size for f in res.weights)
    if res.kind == "gguf":
        return weights * GGUF_GROWTH * (2 if dtype and dtype.lower() in ("f32", "float32")
                                        else 1)
    return weights * (2 if dtype and dtype.lower() in ("f32", "float32") else 1)


def check_space(res: Resolved, opts: HubOptions, store: Store, dtype: str | None) -> None:
    """Refuse a pull that cannot fit, naming what it needs and what is free, per disk."""
    needs: dict[int, list[Any]] = {}
    for path, n in ((opts.cache, missing_bytes(res, opts)), (store.root,
                                                             estimate_stored(res, dtype))):
        where = _existing(path)
        dev = os.stat(where).st_dev
        entry = needs.setdefault(dev, [0, where, path])
        entry[0] += n
    for need, where, path in needs.values():
        free = shutil.disk_usage(where).free
        if need > free:
            raise SllmError(f"not enough disk space for {res.repo_id}: it needs about "
                            f"{_size(need)} on the disk of {path}, which has {_size(free)} "
                            "free", hint="free some space, or point HF_HUB_CACHE or "
                            "SLLMCTL_HOME at a larger disk")


def _existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


class _disk_errors:
    """A full disk, in one line."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, e: BaseException | None, tb: Any) -> None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            where = f" writing {e.filename}" if e.filename else ""
            raise SllmError(f"the disk is full{where}",
                            hint="free some space, or point HF_HUB_CACHE or SLLMCTL_HOME at a "
                            "larger disk") from None
