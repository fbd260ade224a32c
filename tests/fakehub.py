"""A fake Hugging Face Hub on 127.0.0.1, answering as the Hub does (huggingface_hub 0.2x-2.x):

- GET /api/models/{repo}/revision/{rev}[?blobs=true]: the model info JSON (sha, siblings with
  rfilename, size, blobId and, for LFS files, lfs {sha256, size, pointerSize});
- HEAD/GET /{repo}/resolve/{rev}/{file}: a file kept in git answers 200 with ETag (its git
  blob id), X-Repo-Commit and Content-Length; an LFS file answers 302 to the "CDN" (a second
  port, so another origin, as cas-bridge/cdn-lfs are) with X-Linked-Etag (its sha256),
  X-Linked-Size, X-Repo-Commit and ETag;
- the CDN serves the bytes, honouring `Range: bytes=N-` with 206 and Content-Range;
- errors with X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound, GatedRepo), 401
  for a private repo without the token.

`cut_after` makes the CDN close the connection after that many bytes of the next GET (once),
`stall_after` stops sending (holds the connection) after that many bytes of a GET (of
`stall_name` only, if set) until `release` is set, then closes it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = "0123456789abcdef0123456789abcdef01234567"
    lfs: set[str] = field(default_factory=set)  # names stored in LFS
    gated: bool = False  # needs the token: 403 GatedRepo without it
    private: bool = False  # needs the token: 401 without it
    token: str = "hf_test_token"
    _sha: dict[str, str] = field(default_factory=dict)

    def blob_id(self, name: str) -> str:
        """The git blob id: of the file, or for an LFS file of its pointer (as the Hub)."""
        data = self.files[name]
        if name in self.lfs:
            data = (f"version https://git-lfs.github.com/spec/v1\noid sha256:"
                    f"{self.sha256(name)}\nsize {len(data)}\n").encode()
        return git_blob_id(data)

    def sha256(self, name: str) -> str:
        if name not in self._sha:
            self._sha[name] = hashlib.sha256(self.files[name]).hexdigest()
        return self._sha[name]

    @classmethod
    def from_folder(cls, folder: Path, **kw: Any) -> Repo:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
        lfs = {n for n, b in files.items() if len(b) > 4096 or n.endswith(
            (".safetensors", ".bin", ".gguf"))}
        return cls(files, lfs=lfs, **kw)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.log: list[tuple[str, str, str | None]] = []  # method, path, Range
        self.sent: dict[str, int] = {}  # CDN bytes sent per file name
        self.cut_after: int | None = None
        self.stall_after: int | None = None
        self.stall_name: str | None = None  # stall only this file (None: any)
        self.stall_times: int | None = None  # stall this many GETs (None: every one)
        self.release = threading.Event()
        self.stalled = threading.Event()  # set when a GET starts to stall
        self.rate: float | None = None  # CDN bytes per second (None: as fast as it goes)
        hub = self
        self.api = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, cdn=False))
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub, cdn=True))
        for s in (self.api, self.cdn):
            s.daemon_threads = True
            threading.Thread(target=s.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.api.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        return f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def close(self) -> None:
        self.release.set()
        for s in (self.api, self.cdn):
            s.shutdown()
            s.server_close()

    def gets(self, name: str) -> list[str | None]:
        """The Range header of every GET of `name` from the CDN."""
        return [rng for m, p, rng in self.log if m == "GET" and p.endswith("/" + name)
                and p.startswith("/cdn/")]


def _handler(hub: FakeHub, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_HEAD(self) -> None:
            self._answer(head=True)

        def do_GET(self) -> None:
            self._answer(head=False)

        def _answer(self, head: bool) -> None:
            hub.log.append((self.command, self.path, self.headers.get("Range")))
            path = self.path.split("?")[0]
            if cdn:
                return self._cdn(path, head)
            m = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
            if m:
                return self._info(m.group(1), m.group(2) or "main")
            m = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
            if m:
                return self._resolve(m.group(1), m.group(2), m.group(3), head)
            self._error(404, "RepoNotFound", "Repository not found")

        def _repo(self, repo_id: str, revision: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            authorized = self.headers.get("Authorization") == f"Bearer {repo.token}"
            if repo.private and not authorized:
                self._error(401, None, "Invalid username or password.")
                return None
            if revision not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", "Invalid rev id")
                return None
            return repo

        def _info(self, repo_id: str, revision: str) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            siblings = []
            for name, data in repo.files.items():
                s: dict[str, Any] = {"rfilename": name, "size": len(data),
                                     "blobId": repo.blob_id(name)}
                if name in repo.lfs:
                    s["lfs"] = {"sha256": repo.sha256(name), "size": len(data),
                                "pointerSize": 134}
                siblings.append(s)
            body = json.dumps({"_id": "x", "id": repo_id, "modelId": repo_id,
                               "sha": repo.commit, "private": repo.private,
                               "gated": "manual" if repo.gated else False,
                               "disabled": False, "tags": [], "siblings": siblings}).encode()
            self._send(200, body, {"Content-Type": "application/json"})

        def _resolve(self, repo_id: str, revision: str, name: str, head: bool) -> None:
            repo = self._repo(repo_id, revision)
            if repo is None:
                return
            authorized = self.headers.get("Authorization") == f"Bearer {repo.token}"
            if repo.gated and not authorized:
                return self._error(403, "GatedRepo", "Access to model is restricted")
            data = repo.files.get(name)
            if data is None:
                return self._error(404, "EntryNotFound", "Entry not found",
                                   {"X-Repo-Commit": repo.commit})
            common = {"X-Repo-Commit": repo.commit}
            if name in repo.lfs:
                sha = repo.sha256(name)
                loc = f"{hub.cdn_url}/cdn/{repo_id}/{sha}/{name}"
                return self._send(302, b"", {**common, "Location": loc,
                                             "X-Linked-Etag": f'"{sha}"',
                                             "X-Linked-Size": str(len(data)),
                                             "ETag": f'"{repo.blob_id(name)}"'}, head=True)
            self._send(200, data, {**common, "ETag": f'"{repo.blob_id(name)}"'}, head=head)

        def _cdn(self, path: str, head: bool) -> None:
            m = re.fullmatch(r"/cdn/(.+)/([0-9a-f]{64})/(.+)", path)
            repo = hub.repos.get(m.group(1)) if m else None
            data = repo.files.get(m.group(3)) if repo and m else None
            if data is None or m is None:
                return self._send(404, b"not found", {})
            start, stop = 0, len(data)
            rng = self.headers.get("Range")
            if rng:
                r = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
                assert r is not None, rng
                start = int(r.group(1))
                stop = min(stop, int(r.group(2)) + 1) if r.group(2) else stop
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
            headers = {"ETag": f'"{m.group(2)}"', "Accept-Ranges": "bytes"}
            if rng:
                headers["Content-Range"] = f"bytes {start}-{stop - 1}/{len(data)}"
            self._body(206 if rng else 200, data[start:stop], headers, m.group(3), head)

        def _body(self, code: int, body: bytes, headers: dict[str, str], name: str,
                  head: bool) -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if head:
                return
            stalls = hub.stall_after is not None and hub.stall_name in (None, name)
            limit = hub.cut_after if hub.cut_after is not None else (
                hub.stall_after if stalls else None)
            stall = hub.cut_after is None and stalls
            hub.cut_after = None
            if limit is None or limit >= len(body):
                self._write(body)
                hub.sent[name] = hub.sent.get(name, 0) + len(body)
                return
            self.wfile.write(body[:limit])
            self.wfile.flush()
            hub.sent[name] = hub.sent.get(name, 0) + limit
            if stall:
                hub.stalled.set()
                if hub.stall_times is not None:
                    hub.stall_times -= 1
                    if hub.stall_times <= 0:
                        hub.stall_after = None
                hub.release.wait(60)
            self.close_connection = True

        def _write(self, body: bytes) -> None:
            if not hub.rate:
                self.wfile.write(body)
                return
            start, piece = time.monotonic(), 1 << 18
            for i in range(0, len(body), piece):
                self.wfile.write(body[i:i + piece])
                ahead = (i + piece) / hub.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)

        def _error(self, code: int, error_code: str | None, message: str,
                   extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Message": message, **(extra or {})}
            if error_code:
                headers["X-Error-Code"] = error_code
            self._send(code, json.dumps({"error": message}).encode(), headers)

        def _send(self, code: int, body: bytes, headers: dict[str, str],
                  head: bool = False) -> None:
            self.send_response(code)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if not head and self.command != "HEAD":
                self.wfile.write(body)

    return Handler
