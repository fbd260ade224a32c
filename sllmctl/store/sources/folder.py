"""A Hugging Face model folder or one weights file: safetensors, or PyTorch .bin/.pt."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllmctl.store.sources.base import Source, SourceError, SourceTensor, read_index

if TYPE_CHECKING:
    import torch


def weight_files(folder: Path) -> list[Path]:
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


def open_safetensors(files: list[Path]) -> Source:
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


def open_torch(files: list[Path]) -> Source:
    import pickle
    import zipfile

    import torch

    from sllmctl.store.format import dtype_name

    tensors: list[SourceTensor] = []
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
