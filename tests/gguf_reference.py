"""What the GGUF tests share: texts and messages to compare tokenizers and templates on, the
config keys compared, and transformers' side of each comparison."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")

DEMO_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXTS = [
    "Hello world!",
    "  leading spaces,\ttabs\n\nand newlines  ",
    "héllo wörld — ünïcödé, 你好世界, emoji 🤗🚀",
    "def f(x):\n    return x**2  # square\n\nprint(f(12345))",
    "<|im_start|>user\nhi<|im_end|>",
    "",
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "Danke schön 😀"},
]
CONFIG_KEYS = (
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "max_position_embeddings", "vocab_size", "tie_word_embeddings",
    "bos_token_id", "eos_token_id",
)  # fmt: skip


def reference(path: Path) -> tuple[Any, dict[str, Any]]:
    """transformers' config and float32 state dict for a GGUF file."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(
        str(path), return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    return config, parsed["tensors"]


def save_extra_files(source: Any, folder: Path) -> Path:
    folder.mkdir()
    for name, data in source.extra_files.items():
        (folder / name).write_bytes(data)
    return folder


def assert_config_matches(folder: Path, ref: Any) -> None:
    from transformers import AutoConfig

    ours = AutoConfig.from_pretrained(folder)
    for key in CONFIG_KEYS:
        assert getattr(ours, key) == getattr(ref, key), key
    assert np.float32(ours.rms_norm_eps) == np.float32(ref.rms_norm_eps)
    assert ours.rope_parameters["rope_theta"] == ref.rope_parameters["rope_theta"]


def load_tokenizers(folder: Path, path: Path) -> tuple[Any, Any]:
    """(ours from the rebuilt files, transformers' own from the GGUF file)."""
    from transformers import AutoTokenizer

    ours = AutoTokenizer.from_pretrained(folder)
    return ours, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def assert_tokenizers_match(ours: Any, ref: Any, texts: list[str]) -> None:
    for text in texts:
        ids = ref(text)["input_ids"]
        assert ours(text)["input_ids"] == ids, text
        assert ours.decode(ids) == ref.decode(ids), text
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(
            ids, skip_special_tokens=True
        )
    assert ours.all_special_ids == ref.all_special_ids
    names = ("bos_token", "eos_token", "pad_token", "unk_token")
    assert [getattr(ours, n) for n in names] == [getattr(ref, n) for n in names]
