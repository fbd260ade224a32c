"""Checkpoint sources that `convert` reads: a Hugging Face folder or file of safetensors or
PyTorch weights (folder.py), or a GGUF file (gguf.py), each as a `Source` (base.py)."""

from __future__ import annotations

from pathlib import Path

from sllmctl.store.sources.base import Source, SourceError, kept_files
from sllmctl.store.sources.folder import open_safetensors, open_torch, weight_files


def open_source(path: Path, dtype: str | None) -> Source:
    """Open a checkpoint: a GGUF file, a safetensors or .bin file, or a model folder."""
    if not path.exists():
        raise SourceError(f"{path}: no such file or folder")
    if path.is_file():
        folder, files = path.parent, [path]
    else:
        folder, files = path, weight_files(path)
    suffixes = {f.suffix for f in files}
    if suffixes == {".gguf"}:
        if len(files) != 1:
            raise SourceError(f"{path}: holds several GGUF files; name the one to convert")
        from sllmctl.store.sources.gguf import open_gguf

        return open_gguf(files[0], dtype or "BF16")
    if suffixes == {".safetensors"}:
        source = open_safetensors(files)
    elif suffixes <= {".bin", ".pt", ".pth"}:
        source = open_torch(files)
    else:
        raise SourceError(f"{path}: cannot tell the checkpoint format from {sorted(suffixes)}")
    source.path = str(path)
    source.extra_files = kept_files(folder)
    source.provenance = {"source": str(path.resolve()), "format": source.format}
    return source
