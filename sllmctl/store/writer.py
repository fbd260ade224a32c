"""`convert`: write a source checkpoint into the store, atomically."""

from __future__ import annotations

import datetime
import hashlib
import os
import re
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from sllmctl._version import __version__
from sllmctl.errors import AlreadyExists, SllmError
from sllmctl.store.codec import encoder
from sllmctl.store.format import (
    CHUNK_SIZE,
    DTYPE_ALIASES,
    DTYPES,
    ENCODINGS,
    FILES_DIR,
    MANIFEST,
    WRITE_VERSION,
    DataFile,
    Manifest,
    TensorEntry,
    align_up,
    torch_dtype,
)
from sllmctl.store.sources import open_source
from sllmctl.store.sources.base import Source, SourceTensor
from sllmctl.store.store import Store, _fsync_dir, check_name

MAX_FILE_SIZE = 4 << 30  # a new data file starts past this (a larger tensor gets its own)
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
ENCODE_THREADS = max(1, min(16, os.cpu_count() or 1))  # zstd releases the GIL


def parse_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    name = DTYPE_ALIASES.get(dtype.lower(), dtype.upper())
    if name not in FLOAT_DTYPES:
        raise SllmError(f"unsupported --dtype {dtype!r}", hint="use bf16, f16, f32 or f64")
    return name


def convert(
    src: Path,
    name: str,
    *,
    dtype: str | None = None,
    force: bool = False,
    store: Store | None = None,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
    max_file_size: int = MAX_FILE_SIZE,
    compress: bool | str = False,
    provenance: dict[str, Any] | None = None,
    source: Source | None = None,
    ready: Callable[[], None] | None = None,
) -> Manifest:
    """Convert the checkpoint at `src` into the store as `name`; returns its manifest.
    `provenance` is added to the manifest's (a pull records the repo and commit there).
    `source` is read instead of opening `src` (a pull's tensors, as they arrive); `ready`
    runs once everything is written, before the model is published, and may refuse it.

    `compress` stores the data files encoded (codec.py: the high byte of each 16-bit word
    zstd-compressed), for disks slower than the CPU's decoding; or an encoding's name:
    "exp23" (codec_exp23.py, format version 4) is decoded on the GPU. Nothing is visible under
    `name` until the whole model is written and synced.
    """
    store = store or Store()
    check_name(name)
    target = parse_dtype(dtype)
    if store.exists(name) and not force:
        raise AlreadyExists(
            f"model {name!r} already exists", hint="add --force to replace it, or pick a name"
        )
    source = source or open_source(src, target)
    source.provenance.update(provenance or {})
    try:
        store.root.mkdir(parents=True, exist_ok=True)
        store.collect_garbage()
        tmp = store.new_tmp(name)
        try:
            manifest = _write(source, name, target, tmp, progress, on_total, max_file_size,
                              compress)
            if ready is not None:
                ready()
            store.publish(name, tmp)
        except BaseException:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        source.close()
    return manifest


def _write(
    source: Source,
    name: str,
    target: str | None,
    folder: Path,
    progress: Callable[[int], None] | None,
    on_total: Callable[[int], None] | None,
    max_file_size: int,
    compress: bool | str = False,
) -> Manifest:
    plan = _plan(source.tensors, target, max_file_size)
    if on_total:
        on_total(sum(align_up(e.nbytes) for _, e in plan.entries))
    files: list[DataFile] = []
    writer: _ChunkWriter | None = None
    try:
        for tensor, entry in plan.entries:
            if writer is None or entry.file != len(files):
                if writer is not None:
                    files.append(writer.close())
                writer = None
                writer = _ChunkWriter(folder / f"data-{entry.file:05d}.bin", compress)
            data = _tensor_bytes(tensor, entry.dtype)
            if len(data) != entry.nbytes:
                raise SllmError(f"tensor {tensor.name!r}: source holds {len(data)} bytes, "
                                f"expected {entry.nbytes} for its shape")
            writer.pad_to(entry.offset)
            writer.write(data)
            if progress:
                progress(align_up(entry.nbytes))
        if writer is not None:
            files.append(writer.close())
            writer = None
    finally:
        if writer is not None:  # a failure part-way: no thread or descriptor left behind
            writer.abort()
    extra = _write_extra_files(folder, source.extra_files)
    provenance = {
        **source.provenance,
        "dtype": target or _dominant_dtype(plan.tensors),
        "converted_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "sllmctl_version": __version__,
    }
    manifest = Manifest(name=name, files=files, tensors=plan.tensors, aliases=plan.aliases,
                        extra_files=extra, provenance=provenance,
                        format_version=max([WRITE_VERSION] + [ENCODINGS[f.encoding] for f in files
                                                              if f.encoding is not None]))
    manifest.validate(f"model {name}")
    _write_synced(folder / MANIFEST, manifest.to_json().encode())
    _fsync_dir(folder)
    return manifest


class _Plan:
    def __init__(self) -> None:
        self.entries: list[tuple[SourceTensor, TensorEntry]] = []
        self.tensors: dict[str, TensorEntry] = {}
        self.aliases: dict[str, str] = {}


_LAYER = re.compile(r"\.(\d+)\.")
_FUSED_ORDER = {s: i for i, s in enumerate((
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight"))}


def load_order(name: str) -> tuple[int, int, int]:
    """Where a tensor goes in the data files: the embedding first, then layer by layer in
    numeric order (so a loader can run layer i while later ones are still arriving), then
    the rest (final norm, head). Within a layer q/k/v and gate/up weights lie back to back so
    that the engine multiplies each group as one matrix, through one view."""
    m = _LAYER.search(name)
    if m is None:
        return (0 if "embed" in name or "wte" in name else 2, 0, 0)
    suffix = name[m.end():]
    return (1, int(m.group(1)), _FUSED_ORDER.get(suffix, len(_FUSED_ORDER)))


def _plan(tensors: list[SourceTensor], target: str | None, max_file_size: int) -> _Plan:
    """Lay tensors out in data files in load order, each at an aligned offset; shared storage
    once."""
    plan = _Plan()
    first_by_key: dict[Any, str] = {}
    file, offset = 0, 0
    for t in sorted(tensors, key=lambda t: load_order(t.name)):
        if t.name in plan.tensors or t.name in plan.aliases:
            raise SllmError(f"tensor {t.name!r} appears twice in the source")
        if t.storage_key is not None and t.storage_key in first_by_key:
            plan.aliases[t.name] = first_by_key[t.storage_key]
            continue
        if t.dtype not in DTYPES:
            raise SllmError(f"tensor {t.name!r} has dtype {t.dtype}, which sllmctl cannot store")
        dtype = target if target and t.dtype in FLOAT_DTYPES else t.dtype
        count = 1
        for d in t.shape:
            count *= d
        nbytes = count * DTYPES[dtype][0]
        if offset and offset + nbytes > max_file_size:
            file, offset = file + 1, 0
        entry = TensorEntry(dtype=dtype, shape=list(t.shape), file=file, offset=offset,
                            nbytes=nbytes)
        plan.entries.append((t, entry))
        plan.tensors[t.name] = entry
        if t.storage_key is not None:
            first_by_key[t.storage_key] = t.name
        offset = align_up(offset + nbytes)
    return plan


def _tensor_bytes(tensor: SourceTensor, dtype: str) -> memoryview:
    import torch

    t = tensor.load()
    if tuple(t.shape) != tensor.shape:
        raise SllmError(f"tensor {tensor.name!r}: shape {tuple(t.shape)} differs from the "
                        f"listed {tensor.shape}")
    want = torch_dtype(dtype)
    if t.dtype != want:
        t = t.to(want)
    t = t.contiguous().reshape(-1)
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).numpy().data).cast("B")


def _dominant_dtype(tensors: dict[str, TensorEntry]) -> str:
    sizes: dict[str, int] = {}
    for e in tensors.values():
        sizes[e.dtype] = sizes.get(e.dtype, 0) + e.nbytes
    return max(sizes, key=lambda k: sizes[k]) if sizes else "none"


def _write_extra_files(folder: Path, files: dict[str, bytes]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    (folder / FILES_DIR).mkdir()
    for fname, data in sorted(files.items()):
        if "/" in fname or fname.startswith("."):
            raise SllmError(f"refusing to store a non-weight file named {fname!r}")
        _write_synced(folder / FILES_DIR / fname, data)
        out[fname] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _fsync_dir(folder / FILES_DIR)
    return out


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _no_encoder(data: np.ndarray) -> tuple[int, list[Any]]:
    raise AssertionError("a plain data file encodes nothing")


class _ChunkWriter:
    """Writes a data file through one aligned chunk buffer, checksumming each chunk; with
    `compress`, each chunk is encoded (codec.py) by a pool of threads and the frames are
    written in order."""

    def __init__(self, path: Path, compress: bool | str = False) -> None:
        from sllmctl import native

        self.path = path
        self.f = open(path, "wb", buffering=0)  # noqa: SIM115 (closed in close())
        self.buf = np.zeros(CHUNK_SIZE, dtype=np.uint8)
        self.fill = 0
        self.written = 0
        self.checksums: list[str] = []
        self._checksum = native.checksum
        self.compress = bool(compress)
        self.encoding, self._encode = encoder(compress) if compress else ("", _no_encoder)
        self.frames: list[int] = []
        self.stored = 0
        self._pending: deque[Future[tuple[int, list[Any]]]] = deque()
        self._pool = (ThreadPoolExecutor(ENCODE_THREADS, thread_name_prefix="sllmctl-encode")
                      if compress else None)

    @property
    def position(self) -> int:
        return self.written + self.fill

    def pad_to(self, offset: int) -> None:
        gap = offset - self.position
        if gap < 0:
            raise AssertionError("tensor offsets must increase within a data file")
        while gap:
            n = min(gap, CHUNK_SIZE - self.fill)
            self.buf[self.fill:self.fill + n] = 0
            self._advance(n)
            gap -= n

    def write(self, data: memoryview) -> None:
        pos, size = 0, len(data)
        src = np.frombuffer(data, dtype=np.uint8) if size else None
        while pos < size:
            n = min(size - pos, CHUNK_SIZE - self.fill)
            assert src is not None
            self.buf[self.fill:self.fill + n] = src[pos:pos + n]
            self._advance(n)
            pos += n

    def _advance(self, n: int) -> None:
        self.fill += n
        if self.fill == CHUNK_SIZE:
            self._flush()

    def _flush(self) -> None:
        if not self.fill:
            return
        self.checksums.append(self._checksum(self.buf.ctypes.data, self.fill))
        if self._pool is not None:
            self._pending.append(self._pool.submit(self._encode, self.buf[:self.fill].copy()))
            while len(self._pending) > 2 * ENCODE_THREADS or (
                    self._pending and self._pending[0].done()):
                self._write_frame(self._pending.popleft().result())
        else:
            self._write_all(self.buf.data[: self.fill])
            self.stored += self.fill
        self.written += self.fill
        self.fill = 0

    def _write_frame(self, frame: tuple[int, list[Any]]) -> None:
        z, parts = frame
        self.frames.append(z)
        for part in parts:
            view = memoryview(part).cast("B")
            self._write_all(view)
            self.stored += len(view)

    def _write_all(self, view: memoryview) -> None:
        try:
            while view:
                n = self.f.write(view)
                view = view[n:]
        except OSError as e:  # a full disk: name the file being written
            raise OSError(e.errno, e.strerror, str(self.path)) from None

    def abort(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        self.f.close()

    def close(self) -> DataFile:
        try:
            self.pad_to(align_up(self.position))
            self._flush()
            while self._pending:
                self._write_frame(self._pending.popleft().result())
            os.fsync(self.f.fileno())
        finally:
            if self._pool is not None:
                self._pool.shutdown(cancel_futures=True)
            self.f.close()
        if not self.compress:
            return DataFile(path=self.path.name, size=self.written, checksums=self.checksums)
        return DataFile(path=self.path.name, size=self.written, checksums=self.checksums,
                        encoding=self.encoding, frames=self.frames, stored_size=self.stored)
