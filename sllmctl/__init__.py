"""sllmctl: start large language models fast.

The public Python API is `load_state_dict`; it is imported lazily so that the CLI starts
without torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sllmctl._version import __version__ as __version__

if TYPE_CHECKING:
    import torch


def load_state_dict(name: str, device: Any = "cpu", **kwargs: Any) -> dict[str, torch.Tensor]:
    """Load a stored model's tensors, every checksum verified.

    See `sllmctl.store.reader.load_state_dict` for the options.
    """
    from sllmctl.store.reader import load_state_dict as load

    return load(name, device=device, **kwargs)
