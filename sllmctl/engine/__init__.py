"""The inference engine: a Llama-family decoder in plain PyTorch (after gpt-fast).

`ModelConfig` (config.py) describes the shape; `Transformer` (model.py) is built from it and
the loaded tensors; `sample` and `generate` (sampling.py) pick tokens.
"""

from sllmctl.engine.config import ModelConfig
from sllmctl.engine.model import KVCache, Transformer
from sllmctl.engine.sampling import generate, sample

__all__ = ["KVCache", "ModelConfig", "Transformer", "generate", "sample"]
