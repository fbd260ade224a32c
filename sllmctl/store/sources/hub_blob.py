"""One LFS file from the Hub into the Hugging Face cache: resumable, verified.

huggingface_hub writes each download to a process-unique temporary file and deletes it when
the download fails, so nothing resumes across a killed process, and it never checks a plain
HTTP download against its sha256. Here a large file goes to `blobs/<sha256>.incomplete` in the
same cache (the name older huggingface_hub versions resumed from), under the same lock file
huggingface_hub takes; a rerun asks for the rest with a Range request, so no byte arrives
twice; a read that stalls for STALL_S is retried from where it stopped; the whole file's
sha256 must equal the Hub's X-Linked-Etag before it is renamed to `blobs/<sha256>`, where
huggingface_hub (and every HF tool) finds it. The snapshot link is made by hf_hub_download.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from sllmctl.errors import SllmError

STALL_S = 30.0  # a read that waits this long is retried from where it stopped
ATTEMPTS = 5  # connections per file that may end early before the download fails
PIECE = 1 << 20


class PullCancelled(SllmError):
    """The pull was cancelled (Ctrl-C, or `pull --cancel`); partial files are kept."""


@dataclass
class Fetched:
    path: Path  # the blob
    downloaded: int  # bytes that came over the network this time
    resumed_from: int  # bytes of a partial file kept from an earlier attempt
    resent: int  # bytes the server sent again (it ignored a Range request)


def blob_path(storage: Path, sha256: str) -> Path:
    return storage / "blobs" / sha256


def fetch_blob(storage: Path, url: str, sha256: str, size: int, headers: dict[str, str],
               progress: Callable[[int], None], cancel: threading.Event | None = None,
               stall_s: float | None = None, stop_at: int | None = None,
               watch: Callable[[int], None] | None = None) -> Fetched:
    """Download the file at `url` (the resolved location) into `storage`'s blobs, resuming a
    partial file; returns what came over the network. With `stop_at`, only the file's first
    `stop_at` bytes, into the partial file (a header read ahead; the rest resumes from
    there). `watch` hears how many bytes of the partial file are written, as they are."""
    from huggingface_hub.utils import WeakFileLock

    blob = blob_path(storage, sha256)
    if blob.exists():
        return Fetched(blob, 0, 0, 0)
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = storage.parent / ".locks" / storage.name / f"{sha256}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(lock):
        if blob.exists():  # another process finished it while we waited
            return Fetched(blob, 0, 0, 0)
        partial = blob.with_name(sha256 + ".incomplete")
        state = _Partial(partial, size, watch)
        if stop_at is None:
            progress(state.have)
        try:
            got = _download(state, url, headers, progress, cancel, stall_s or STALL_S,
                            min(size, stop_at if stop_at is not None else size))
        finally:
            state.f.close()
        if stop_at is not None and state.have < size:
            return Fetched(partial, got[0], state.kept, got[1])
        if state.have != size:
            raise SllmError(f"{url}: the server sent {state.have} of {size} bytes",
                            hint="run the pull again: it resumes")
        if state.hash.hexdigest() != sha256:
            partial.unlink(missing_ok=True)
            raise SllmError(f"{url}: the downloaded bytes do not match the Hub's sha256 "
                            f"{sha256[:12]}…; the partial file was removed",
                            hint="run the pull again")
        _publish(partial, blob)
        return Fetched(blob, got[0], state.kept, got[1])


class _Partial:
    """The partial file and the sha256 of the bytes it already holds (read locally)."""

    def __init__(self, path: Path, size: int,
                 watch: Callable[[int], None] | None = None) -> None:
        self.watch = watch
        self.hash = hashlib.sha256()
        if path.exists() and path.stat().st_size > size:
            path.unlink()  # not a prefix of this file
        self.f = open(path, "ab+")  # noqa: SIM115 (closed by fetch_blob)
        self.f.seek(0)
        while chunk := self.f.read(PIECE):
            self.hash.update(chunk)
        self.have = self.kept = self.shown = self.f.tell()
        self.size = size
        if watch is not None:
            watch(self.have)

    def flush(self) -> None:
        self.f.flush()
        if self.watch is not None and self.shown != self.have:
            self.shown = self.have
            self.watch(self.have)

    def add(self, data: bytes) -> None:
        self.f.write(data)
        self.hash.update(data)
        self.have += len(data)
        if self.watch is not None and (self.have - self.shown >= PIECE
                                       or self.have == self.size):
            self.f.flush()  # readers of the partial file see these bytes now
            self.shown = self.have
            self.watch(self.have)


def _download(state: _Partial, url: str, headers: dict[str, str],
              progress: Callable[[int], None], cancel: threading.Event | None,
              stall_s: float, end: int) -> tuple[int, int]:
    """Fill the partial file; returns (bytes downloaded, bytes the server sent twice)."""
    import httpx2
    from huggingface_hub.utils import get_session

    session = get_session()
    downloaded = resent = failures = 0
    while state.have < end:
        if cancel is not None and cancel.is_set():
            raise PullCancelled("the pull was cancelled; what arrived is kept for a rerun")
        h = dict(headers, **{"Accept-Encoding": "identity"})
        if state.have or end < state.size:
            h["Range"] = f"bytes={state.have}-" + (str(end - 1) if end < state.size else "")
        try:
            with session.stream("GET", url, headers=h, follow_redirects=True,
                                timeout=httpx2.Timeout(stall_s, connect=10.0)) as r:
                skip = _check_response(r, state)
                resent += skip
                for data in r.iter_raw():  # as it arrives: a cut loses nothing
                    if skip:
                        data, skip = data[skip:], max(0, skip - len(data))
                    if cancel is not None and cancel.is_set():
                        raise PullCancelled("the pull was cancelled; what arrived is kept "
                                            "for a rerun")
                    state.add(data[: end - state.have])
                    downloaded += len(data)
                    progress(len(data))
                    if state.have >= end:
                        break
        except (httpx2.TransportError, httpx2.StreamError) as e:
            failures += 1
            if failures >= ATTEMPTS:
                raise SllmError(f"downloading {urlparse(url).path} failed {failures} times "
                                f"(last: {type(e).__name__}: {e})",
                                hint="run the pull again: it resumes") from None
        finally:
            state.flush()
    os.fsync(state.f.fileno())
    return downloaded, resent


def _check_response(r: Any, state: _Partial) -> int:
    """How many leading bytes of the body to drop (a 200 answer to a Range request)."""
    if r.status_code == 206:
        start = r.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
        if start != str(state.have):
            raise SllmError(f"the server answered bytes from {start}, not {state.have}")
        return 0
    if r.status_code == 200:
        return state.have
    if r.status_code == 416 and state.have == state.size:
        return 0
    from huggingface_hub.utils import hf_raise_for_status

    r.read()
    hf_raise_for_status(r)
    raise SllmError(f"the server answered {r.status_code} to a download")


def _publish(partial: Path, blob: Path) -> None:
    """Rename into place with the permissions huggingface_hub gives its blobs."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(partial, 0o666 & ~umask)
    os.replace(partial, blob)
