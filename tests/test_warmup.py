"""The daemon's start-up warm-up (sllmctl.engine.warmup): a stand-in of each stored model's
shape run through the serving engine, Triton's cache kept in the daemon's folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sllmctl.engine import warmup
from sllmctl.engine.config import ModelConfig

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
          "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 6,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024,
          "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "eos_token_id": 2,
          "torch_dtype": "bfloat16"}
TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def store_one(tmp_path: Path, name: str, layers: int) -> None:
    from sllmctl.store.writer import convert

    src = tmp_path / name
    src.mkdir()
    config = dict(CONFIG, num_hidden_layers=layers)
    with torch.device("meta"):
        from sllmctl.engine.model import Transformer

        shapes = Transformer(ModelConfig.from_hf(config)).state_dict()
    save_file({(k if k.startswith("lm_head") else f"model.{k}"):
               torch.zeros(v.shape, dtype=torch.bfloat16) for k, v in shapes.items()},
              src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(config))
    (src / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    convert(src, name)


def test_stand_in_has_the_models_widths_and_fused_views() -> None:
    config = ModelConfig.from_hf(CONFIG)
    model = warmup.stand_in(config, "cpu", torch.float32)
    assert len(model.layers) == 1 and model.config.hidden == 64
    assert model.lm_head.weight is model.embed_tokens.weight
    block = model.layers[0]
    assert block.self_attn.qkv is not None and block.mlp.gate_up is not None
    assert torch.isfinite(model.embed_tokens.weight).all()
    assert warmup.exercise(model, slots=4, max_len=1024) == 1 + 1 + 2 + 4


def test_sliding_models_get_a_sliding_and_a_full_layer() -> None:
    config = dataclasses.replace(ModelConfig.from_hf(CONFIG), sliding_window=16,
                                 sliding_layers=(1, 3, 5))
    model = warmup.stand_in(config, "cpu", torch.float32)
    assert model.windows == [16, None]


def test_shapes_differing_only_in_depth_warm_once(tmp_path: Path) -> None:
    store_one(tmp_path, "six", 6)
    store_one(tmp_path, "two", 2)
    found = warmup.stored_models()
    assert sorted(c.layers for c, _, _ in found) == [2, 6]
    assert {d for _, d, _ in found} == {torch.bfloat16}
    assert len({warmup.shape_key(c, d) for c, d, _ in found}) == 1
    wider = dataclasses.replace(found[0][0], hidden=128)
    assert warmup.shape_key(wider, torch.bfloat16) != warmup.shape_key(found[0][0],
                                                                       torch.bfloat16)
    assert warmup.compile_templates([f for _, _, f in found]) == 2


def test_triton_cache_goes_under_the_daemons_folder(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    folder = warmup.triton_cache(tmp_path / "home")
    assert folder == tmp_path / "home" / "cache" / "triton" and folder.is_dir()
    import os

    assert os.environ["TRITON_CACHE_DIR"] == str(folder)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))
    assert warmup.triton_cache(tmp_path / "home") == tmp_path / "mine"


def test_nothing_to_do_without_a_gpu_or_when_turned_off(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert warmup.at_start(tmp_path, 0) == {"skipped": True}
    monkeypatch.setenv("SLLMCTL_WARMUP", "0")
    assert warmup.at_start(tmp_path, 1) == {"skipped": True}
    assert not (tmp_path / "cache").exists()


@pytest.mark.gpu
def test_at_start_warms_every_stored_shape_on_the_gpu(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    store_one(tmp_path, "six", 6)
    done = warmup.at_start(tmp_path / "home", 1)
    assert done["shapes"] == 1 and done["templates"] == 1
    if warmup_kernels_compiled():
        assert any((tmp_path / "home" / "cache" / "triton").iterdir())


def warmup_kernels_compiled() -> bool:
    from sllmctl.engine import kernels

    return kernels.available()
