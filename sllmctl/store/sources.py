"""Checkpoint sources that `convert` reads: a common shape for every input format.

A source lists its tensors without reading them; each `SourceTensor.load()` returns a
contiguous CPU tensor. `storage_key` identifies the storage a tensor lives in, so that
tensors sharing storage in the source (tied weights) are written once.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllmctl.errors import SllmError

if TYPE_CHECKING:
    import torch

# Non-weight files of a Hugging Face model folder that a converted model keeps.
KEPT_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)


@dataclass
class SourceTensor:
    name: str
    dtype: str  # format dtype name (see sllmctl.store.format.DTYPES), as stored in the source
    shape: tuple[int, ...]
    load: Callable[[], torch.Tensor]
    storage_key: Any = None  # equal keys (not None) mean the same bytes in the source


@dataclass
class Source:
    format: str  # "safetensors" | "pytorch" | "gguf"
    path: str
    tensors: list[SourceTensor]
    extra_files: dict[str, bytes] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    closers: list[Callable[[], None]] = field(default_factory=list)

    def close(self) -> None:
        for close in self.closers:
            close()
        self.closers.clear()


class SourceError(SllmError):
    """A checkpoint that cannot be read."""


def kept_files(folder: Path) -> dict[str, bytes]:
    return {n: (folder / n).read_bytes() for n in KEPT_FILES if (folder / n).is_file()}


def read_index(path: Path) -> list[str]:
    """Shard file names listed by a `*.index.json` weight map, in first-seen order."""
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{path}: not a valid index file ({e})") from None
    return list(dict.fromkeys(weight_map.values()))


def open_source(path: Path, dtype: str | None) -> Source:
    """Open a checkpoint: a GGUF file, a safetensors or .bin file, or a model folder."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_file():
        folder, files = path.parent, [path]
    else:
        folder, files = path, _weight_files(path)
    suffixes = {f.suffix for f in files}
    if suffixes == {".gguf"}:
        if len(files) != 1:
            raise SourceError(f"{path}: holds several GGUF files; name the one to convert")
        from sllmctl.store.gguf_source import open_gguf

        return open_gguf(files[0], dtype or "BF16")
    if suffixes == {".safetensors"}:
        source = _open_safetensors(files)
    elif suffixes <= {".bin", ".pt", ".pth"}:
        source = _open_torch(files)
    else:
        raise SourceError(f"{path}: cannot tell the checkpoint format from {sorted(suffixes)}")
    source.path = str(path)
    source.extra_files = kept_files(folder)
    source.provenance = {"source": str(path.resolve()), "format": source.format}
    return source


def _weight_files(folder: Path) -> list[Path]:
    for index, pattern in (
        ("model.safetensors.index.json", "*.safetensors"),
        ("pytorch_model.bin.index.json", "*.bin"),
    ):
        if (folder / index).is_file():
            names = read_index(folder / index)
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise SourceError(f"{folder}: shard {missing[0]} listed in {index} is missing")
            return [folder / n for n in names]
        found = sorted(folder.glob(pattern))
        if found:
            return found
    found = sorted(folder.glob("*.gguf"))
    if found:
        return found
    raise SourceError(
        f"{folder}: no checkpoint found (looked for *.safetensors, *.bin and *.gguf)"
    )


def _open_safetensors(files: list[Path]) -> Source:
    from safetensors import SafetensorError, safe_open

    tensors: list[SourceTensor] = []
    handles = []
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
            handles.append(handle)
            for name in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                piece = handle.get_slice(name)
                tensors.append(
                    SourceTensor(
                        name=name,
                        dtype=piece.get_dtype(),
                        shape=tuple(piece.get_shape()),
                        load=_safetensors_loader(handle, name, file),
                    )
                )
        except (SafetensorError, OSError, ValueError, TypeError) as e:
            raise SourceError(f"{file}: not a readable safetensors file ({e})") from None
    names = [t.name for t in tensors]
    if len(names) != len(set(names)):
        dup = next(n for n in names if names.count(n) > 1)
        raise SourceError(f"tensor {dup!r} appears in more than one shard")
    return Source("safetensors", str(files[0]), tensors, closers=[handles.clear])


def _safetensors_loader(handle: Any, name: str, file: Path) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import SafetensorError

        try:
            return handle.get_tensor(name)
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise SourceError(f"{file}: tensor {name!r} cannot be read ({e})") from None

    return load


def _open_torch(files: list[Path]) -> Source:
    import pickle
    import zipfile

    import torch

    tensors: list[SourceTensor] = []
    from sllmctl.store.format import dtype_name

    for file in files:
        try:
            try:
                sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):  # legacy (non-zip) checkpoints cannot be mapped
                    raise
                sd = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            why = [ln.strip() for ln in str(e).splitlines() if "Unsupported global" in ln]
            if why:  # a pickle that would run code or build arbitrary objects
                raise SourceError(f"{file}: refused by the safe loader ({why[0]})") from None
            raise SourceError(f"{file}: not a readable PyTorch checkpoint") from None
        except (RuntimeError, OSError, EOFError, ValueError, zipfile.BadZipFile) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SourceError(f"{file}: not a readable PyTorch checkpoint ({first})") from None
        if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
            sd = sd["state_dict"]
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise SourceError(f"{file}: not a state dict of tensors")
        for name, t in sd.items():
            storage = t.untyped_storage()
            key = (storage.data_ptr(), storage.nbytes(), t.storage_offset(), t.dtype,
                   tuple(t.shape), t.stride())
            tensors.append(
                SourceTensor(
                    name=str(name),
                    dtype=dtype_name(t.dtype),
                    shape=tuple(t.shape),
                    load=t.contiguous,
                    storage_key=key,
                )
            )
    return Source("pytorch", str(files[0]), tensors)
