"""The inference engine: a Llama-family decoder in plain PyTorch (after gpt-fast).

`ModelConfig` (config.py) describes the shape; `Transformer` (model.py, the network only) is
built from it and the loaded tensors (weights.py); `sample` and `generate` (sampling.py) pick
tokens. Serving: one request's whole state is a `Request` (request.py); `BatchEngine`
(batch.py) runs many at once, the `Scheduler` (scheduler.py) choosing which hold its slots
and the `ModelRunner` (runner.py) prefilling and decoding them; `ChatModel` (chat.py) adds the
tokenizer and chat template.
"""

from sllmctl.engine.config import ModelConfig
from sllmctl.engine.model import KVCache, Transformer
from sllmctl.engine.sampling import generate, sample

__all__ = ["KVCache", "ModelConfig", "Transformer", "generate", "sample"]
