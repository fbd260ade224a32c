"""The sllmctl checkpoint format, versions 1 to 3 (specified in docs/format.md).

A model is a folder holding `manifest.json`, one or more raw data files
(`data-00000.bin`, ...) and the source's non-weight files under `files/`.
Every tensor starts at a multiple of ALIGNMENT in its data file and every data file is
padded to a multiple of ALIGNMENT, so any chunk can be read with O_DIRECT straight into
an aligned buffer and any tensor viewed in place. Each data file is covered by
checksums over fixed-size chunks (the last one may be shorter). Version 2 adds compressed
data files, stored chunk by chunk as frames (codec.py); sizes, offsets and checksums still
refer to the decoded bytes. Version 3 adds the manifest's own checksum (`manifest_sha256`),
so that a damaged manifest is refused rather than read as a different model.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from sllmctl.errors import CorruptCheckpoint

MAGIC = "sllmctl-checkpoint"
READ_VERSIONS = (1, 2, 3, 4)
WRITE_VERSION = 3  # the manifest's own checksum; an encoding may need a later version
MANIFEST_SUM = "manifest_sha256"
# encoding -> the first format version that holds it (codec.py, codec_exp23.py)
ENCODINGS = {"split-zstd": 2, "exp23": 4}
ALIGNMENT = 4096  # bytes; O_DIRECT block and page size, and a multiple of every GPU access width
CHUNK_SIZE = 16 << 20  # bytes covered by one checksum; a multiple of ALIGNMENT
CHECKSUM = "sum64x2"
PAGE_WORDS = 512  # 4096 bytes of 64-bit words per checksum page
MANIFEST = "manifest.json"
FILES_DIR = "files"
# a data file or non-weight file name: one path component that cannot leave the model folder
FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
_SUM_FIELD = re.compile(rb'"manifest_sha256": "([0-9a-f]{64})"')
_UNSET = "0" * 64

# format dtype name -> (bytes per element, torch dtype attribute name).
# The names are those of safetensors; F8_E8M0 and C64 follow its spelling too.
DTYPES: dict[str, tuple[int, str]] = {
    "BOOL": (1, "bool"),
    "U8": (1, "uint8"),
    "I8": (1, "int8"),
    "U16": (2, "uint16"),
    "I16": (2, "int16"),
    "U32": (4, "uint32"),
    "I32": (4, "int32"),
    "U64": (8, "uint64"),
    "I64": (8, "int64"),
    "F16": (2, "float16"),
    "BF16": (2, "bfloat16"),
    "F32": (4, "float32"),
    "F64": (8, "float64"),
    "C64": (8, "complex64"),
    "F8_E4M3": (1, "float8_e4m3fn"),
    "F8_E5M2": (1, "float8_e5m2"),
    "F8_E4M3FNUZ": (1, "float8_e4m3fnuz"),
    "F8_E5M2FNUZ": (1, "float8_e5m2fnuz"),
    "F8_E8M0": (1, "float8_e8m0fnu"),
}

# --dtype spellings accepted on the command line
DTYPE_ALIASES = {
    "bf16": "BF16", "bfloat16": "BF16",
    "f16": "F16", "fp16": "F16", "float16": "F16", "half": "F16",
    "f32": "F32", "fp32": "F32", "float32": "F32", "float": "F32",
    "f64": "F64", "float64": "F64",
}


class FrameError(ValueError):
    """A stored frame that does not decode to its chunk's length (codec.py, codec_exp23.py)."""


def torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, DTYPES[name][1])


def dtype_name(dtype: Any) -> str:
    """Format name of a torch dtype."""
    attr = str(dtype).removeprefix("torch.")
    for name, (_, a) in DTYPES.items():
        if a == attr:
            return name
    raise ValueError(f"dtype {dtype} has no sllmctl format name")


def align_up(n: int, a: int = ALIGNMENT) -> int:
    return (n + a - 1) // a * a


def checksum_numpy(buf: Any) -> str:
    """sum64x2 of a byte buffer whose length is a multiple of 8 (the reference twin).

    Words are little-endian uint64; page p holds words [512p, 512p+512). With P_p the
    sum of page p mod 2**64: s1 = sum(P_p), s2 = sum((p+1) * P_p), both mod 2**64.
    Returns 32 hex digits, s1 then s2.
    """
    words = np.frombuffer(buf, dtype="<u8")
    full = len(words) // PAGE_WORDS * PAGE_WORDS
    pages = words[:full].reshape(-1, PAGE_WORDS).sum(axis=1, dtype=np.uint64)
    if full < len(words):
        pages = np.append(pages, words[full:].sum(dtype=np.uint64))
    weights = np.arange(1, len(pages) + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        s1 = int(pages.sum(dtype=np.uint64))
        s2 = int((pages * weights).sum(dtype=np.uint64))
    return f"{s1:016x}{s2:016x}"


@dataclass
class TensorEntry:
    dtype: str
    shape: list[int]
    file: int
    offset: int
    nbytes: int


@dataclass
class DataFile:
    path: str
    size: int  # the bytes it holds (decoded); tensor offsets and checksums refer to these
    checksums: list[str]
    encoding: str | None = None  # None: stored as is; "split-zstd", "exp23": frame by frame
    frames: list[int] | None = None  # encoded: each frame's compressed length, 0 = plain
    stored_size: int | None = None  # encoded: the file's size on disk

    @property
    def on_disk(self) -> int:
        return self.size if self.stored_size is None else self.stored_size

    def frame_lengths(self, chunk: int) -> list[int]:
        """An encoded file's frames' lengths on disk: a chunk's n bytes where it is stored
        plain, n/2 + its compressed length rounded up to ALIGNMENT where split."""
        assert self.frames is not None
        out = []
        for i, z in enumerate(self.frames):
            n = min(chunk, self.size - i * chunk)
            out.append(n if z == 0 else align_up(n // 2 + z))
        return out


@dataclass
class Manifest:
    name: str
    files: list[DataFile]
    tensors: dict[str, TensorEntry]
    aliases: dict[str, str] = field(default_factory=dict)
    extra_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    magic: str = MAGIC
    format_version: int = 1
    alignment: int = ALIGNMENT
    chunk_size: int = CHUNK_SIZE
    checksum: str = CHECKSUM

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def parameters(self) -> int:
        n = 0
        for t in self.tensors.values():
            count = 1
            for d in t.shape:
                count *= d
            n += count
        return n

    def to_json(self) -> str:
        d = asdict(self)
        d["files"] = [{k: v for k, v in f.items() if v is not None} for f in d["files"]]
        head = {k: d.pop(k) for k in ("magic", "format_version", "name")}
        return seal({**head, **d})

    @classmethod
    def from_json(cls, raw: bytes | str, where: str) -> Manifest:
        """Parse and check a manifest; CorruptCheckpoint (one line, starting with `where`)
        for anything that is not a sound manifest of a version this reader knows."""
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        sealed = check_seal(raw, where)
        try:
            d = json.loads(raw)
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CorruptCheckpoint(f"{where}: manifest is not valid JSON ({why})") from None
        if not isinstance(d, dict) or d.get("magic") != MAGIC:
            raise CorruptCheckpoint(f"{where}: not an sllmctl manifest (bad magic)")
        version = d.get("format_version")
        if type(version) is not int or version not in READ_VERSIONS:
            raise CorruptCheckpoint(
                f"{where}: format version {version!r} is not supported "
                f"(this sllmctl reads versions {', '.join(map(str, READ_VERSIONS))})",
                hint="upgrade sllmctl, or convert the model again",
            )
        if d.pop(MANIFEST_SUM, None) != sealed or (version >= 3 and sealed is None):
            raise CorruptCheckpoint(f"{where}: manifest has no valid {MANIFEST_SUM} (damaged)")
        try:
            m = cls(
                **{
                    **d,
                    "files": [DataFile(**f) for f in d["files"]],
                    "tensors": {k: TensorEntry(**t) for k, t in d["tensors"].items()},
                }
            )
            m.validate(where)
        except (TypeError, KeyError, AttributeError, ValueError) as e:
            raise CorruptCheckpoint(f"{where}: malformed manifest ({_one_line(e)})") from None
        return m

    def validate(self, where: str) -> None:
        """Reject a manifest whose entries could read outside the data files or the model
        folder. Field types are checked here; TypeError/ValueError mean a malformed one."""
        _want(isinstance(self.name, str) and _is_int(self.chunk_size, 1), "bad name or chunk")
        if self.checksum != CHECKSUM or self.chunk_size % ALIGNMENT or self.alignment != ALIGNMENT:
            raise CorruptCheckpoint(f"{where}: unsupported checksum/chunk/alignment settings")
        for f in self.files:
            self._validate_file(f, where)
        for name, t in self.tensors.items():
            _want(isinstance(t.shape, list) and all(_is_int(d) for d in t.shape)
                  and _is_int(t.offset) and _is_int(t.nbytes) and type(t.file) is int,
                  f"tensor {name!r} has a bad entry")
            if t.dtype not in DTYPES or not 0 <= t.file < len(self.files):
                raise CorruptCheckpoint(f"{where}: tensor {name!r} has a bad dtype or file")
            count = 1
            for d in t.shape:
                count *= d
            if (
                t.nbytes != count * DTYPES[t.dtype][0]
                or t.offset % ALIGNMENT
                or t.offset + t.nbytes > self.files[t.file].size
            ):
                raise CorruptCheckpoint(f"{where}: tensor {name!r} has a bad offset or size")
        for alias, target in self.aliases.items():
            if target not in self.tensors:
                raise CorruptCheckpoint(f"{where}: alias {alias!r} points to a missing tensor")
        for fname, meta in self.extra_files.items():
            if not FILE_NAME.fullmatch(fname):
                raise CorruptCheckpoint(f"{where}: bad non-weight file name {fname!r}")
            _want(isinstance(meta, dict) and _is_int(meta.get("size"))
                  and isinstance(meta.get("sha256"), str), f"file {fname!r} has a bad entry")
        _want(isinstance(self.provenance, dict), "provenance is not an object")

    def _validate_file(self, f: DataFile, where: str) -> None:
        _want(isinstance(f.path, str) and _is_int(f.size) and isinstance(f.checksums, list)
              and all(isinstance(c, str) for c in f.checksums), "bad data file entry")
        if not FILE_NAME.fullmatch(f.path) or f.size % ALIGNMENT:
            raise CorruptCheckpoint(f"{where}: bad data file entry {f.path!r}")
        if len(f.checksums) != -(-f.size // self.chunk_size):
            raise CorruptCheckpoint(f"{where}: {f.path} has the wrong number of checksums")
        if f.encoding is not None or f.frames is not None or f.stored_size is not None:
            self._validate_encoding(f, where)

    def _validate_encoding(self, f: DataFile, where: str) -> None:
        if (not isinstance(f.encoding, str) or f.encoding not in ENCODINGS
                or self.format_version < ENCODINGS[f.encoding]):
            raise CorruptCheckpoint(f"{where}: {f.path} has an unknown encoding "
                                    f"{f.encoding!r} (format version {self.format_version})")
        frames = f.frames
        if (not isinstance(frames, list) or len(frames) != len(f.checksums)
                or not all(_is_int(z) for z in frames)):
            raise CorruptCheckpoint(f"{where}: {f.path} has a bad frame list")
        lengths = f.frame_lengths(self.chunk_size)
        for i, length in enumerate(lengths):
            if length > min(self.chunk_size, f.size - i * self.chunk_size):
                raise CorruptCheckpoint(f"{where}: {f.path} frame {i} is longer stored than "
                                        "decoded")
        stored = sum(lengths)
        if f.stored_size != stored:
            raise CorruptCheckpoint(f"{where}: {f.path} stored size {f.stored_size} does not "
                                    f"match its frames ({stored})")


def seal(d: dict[str, Any]) -> str:
    """A manifest's text with its own checksum as the last field: SHA-256 of the UTF-8 text
    written with 64 "0" digits in its place (docs/format.md, *The manifest's checksum*)."""
    d = {k: v for k, v in d.items() if k != MANIFEST_SUM}
    text = json.dumps({**d, MANIFEST_SUM: _UNSET}, indent=1) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    placeholder = f'"{MANIFEST_SUM}": "{_UNSET}"'
    return text.replace(placeholder, f'"{MANIFEST_SUM}": "{digest}"')


def check_seal(raw: bytes, where: str) -> str | None:
    """The manifest checksum `raw` carries, checked (None where it carries none)."""
    found = list(_SUM_FIELD.finditer(raw))
    if not found:
        return None
    m = found[0]
    digest = m.group(1).decode()
    unsealed = raw[:m.start(1)] + _UNSET.encode() + raw[m.end(1):]
    if len(found) > 1 or hashlib.sha256(unsealed).hexdigest() != digest:
        raise CorruptCheckpoint(f"{where}: manifest fails its checksum (damaged)")
    return digest


def _is_int(v: Any, least: int = 0) -> bool:
    return type(v) is int and v >= least


def _want(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def _one_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0]
