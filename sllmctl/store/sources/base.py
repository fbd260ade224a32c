"""What `convert` reads, in one shape for every input format.

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
