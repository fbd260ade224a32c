"""open_gguf against transformers on tiny GGUF files written here, for what the demo model
does not cover: an untied head, qwen2/qwen3, a SentencePiece vocabulary, Llama 3 rope."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf_reference import (
    TEXTS,
    assert_config_matches,
    assert_tokenizers_match,
    load_tokenizers,
    reference,
    save_extra_files,
)

from sllmctl.store.sources.base import SourceError
from sllmctl.store.sources.gguf import open_gguf

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")


# --- tiny files written here ----------------------------------------------------------------

HIDDEN, HEADS, KV_HEADS, FFN, LAYERS = 64, 4, 2, 96, 2


def byte_level_vocab() -> tuple[list[str], list[int], list[str]]:
    """A GPT-2 style vocabulary: the byte alphabet, a few merges, three control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens += sorted(set(bytes_to_unicode().values()))
    merges = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "Ġwor l", "Ġworl d", "Ġ Ġ"]
    tokens += [m.replace(" ", "") for m in merges] + ["<think>"]
    types = [3, 3, 3] + [1] * (len(tokens) - 4) + [4]
    return tokens, types, merges


def sentencepiece_vocab() -> tuple[list[str], list[int], list[float]]:
    pieces = "▁ ▁t ▁th ▁the e h l o t w r d n a ▁h ▁he ll llo ▁hello ▁w or ▁wor ld ▁world ▁and"
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces.split()
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces.split())
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces.split()))]
    return tokens, types, scores


def hf_to_gguf_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny(path: Path, arch: str, tokenizer: str = "gpt2", **options: Any) -> dict[str, Any]:
    """A small random model in GGUF; returns the HF-layout float32 weights that went in."""
    rng = np.random.default_rng(0)
    head_dim = HIDDEN // HEADS
    if tokenizer == "gpt2":
        tokens, types, merges = byte_level_vocab()
    else:
        tokens, types, scores = sentencepiece_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {arch}")
    w.add_block_count(LAYERS)
    w.add_context_length(options.get("context", 256))
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(options.get("theta", 10000.0))
    w.add_rope_dimension_count(head_dim)
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if tokenizer == "gpt2":
        w.add_tokenizer_pre(options.get("pre", "default"))
        w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
    else:
        w.add_token_scores(scores)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)

    hf: dict[str, np.ndarray] = {}

    def add(gguf_name: str, hf_name: str, shape: tuple[int, ...], quantized: bool = False) -> None:
        value = rng.standard_normal(shape).astype(np.float32)
        hf[hf_name] = value
        stored = value
        if arch == "llama" and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            stored = hf_to_gguf_rope(value, HEADS if "attn_q" in gguf_name else KV_HEADS)
        if quantized:
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(gguf_name, gguf.quants.quantize(stored, q8), raw_dtype=q8)
            hf[hf_name] = gguf.quants.dequantize(gguf.quants.quantize(value, q8), q8)
        else:
            w.add_tensor(gguf_name, stored)

    add("token_embd.weight", "model.embed_tokens.weight", (len(tokens), HIDDEN), quantized=True)
    add("output_norm.weight", "model.norm.weight", (HIDDEN,))
    add("output.weight", "lm_head.weight", (len(tokens), HIDDEN))
    kv = KV_HEADS * head_dim
    per_layer = [
        ("attn_norm.weight", "input_layernorm.weight", (HIDDEN,)),
        ("ffn_norm.weight", "post_attention_layernorm.weight", (HIDDEN,)),
        ("attn_q.weight", "self_attn.q_proj.weight", (HIDDEN, HIDDEN)),
        ("attn_k.weight", "self_attn.k_proj.weight", (kv, HIDDEN)),
        ("attn_v.weight", "self_attn.v_proj.weight", (kv, HIDDEN)),
        ("attn_output.weight", "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
        ("ffn_gate.weight", "mlp.gate_proj.weight", (FFN, HIDDEN)),
        ("ffn_up.weight", "mlp.up_proj.weight", (FFN, HIDDEN)),
        ("ffn_down.weight", "mlp.down_proj.weight", (HIDDEN, FFN)),
    ]
    if arch == "qwen2":
        per_layer += [
            (f"attn_{x}.bias", f"self_attn.{x}_proj.bias", (n,))
            for x, n in (("q", HIDDEN), ("k", kv), ("v", kv))
        ]
    if arch == "qwen3":
        per_layer += [
            (f"attn_{x}_norm.weight", f"self_attn.{x}_norm.weight", (head_dim,)) for x in "qk"
        ]
    for i in range(LAYERS):
        for leaf, hf_leaf, shape in per_layer:
            quantized = leaf.startswith(("ffn_gate", "ffn_up", "ffn_down"))
            add(f"blk.{i}.{leaf}", f"model.layers.{i}.{hf_leaf}", shape, quantized)
    if "rope_freqs" in options:
        w.add_tensor("rope_freqs.weight", options["rope_freqs"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return hf


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_tiny_models_match_transformers(arch: str, tmp_path: Path) -> None:
    path = tmp_path / f"{arch}.gguf"
    written = write_tiny(path, arch, pre="qwen2" if arch != "llama" else "llama-bpe")
    ref_config, ref = reference(path)
    source = open_gguf(path, "F32")
    assert {t.name for t in source.tensors} == set(written) == set(ref)
    for t in source.tensors:
        w = t.load()
        assert torch.equal(w, ref[t.name]), t.name
        # the rope permutation is undone exactly: the file round-trips to the HF layout
        assert torch.equal(w, torch.from_numpy(written[t.name])), t.name
    folder = save_extra_files(source, tmp_path / "model")
    assert_config_matches(folder, ref_config)
    config = transformers.AutoConfig.from_pretrained(folder)
    assert not config.tie_word_embeddings and config.head_dim == HIDDEN // HEADS
    texts = [*TEXTS, "hello  world<think>", "<|im_end|>hello"]
    assert_tokenizers_match(*load_tokenizers(folder, path), texts)


def test_sentencepiece_tokenizer_matches_transformers(tmp_path: Path) -> None:
    path = tmp_path / "spm.gguf"
    write_tiny(path, "llama", tokenizer="llama")
    ours, ref = load_tokenizers(save_extra_files(open_gguf(path), tmp_path / "model"), path)
    texts = ["hello world", "the and", " hello  the", "héllo 你好 🤗", "<s>hello</s>", "", "\n"]
    assert_tokenizers_match(ours, ref, texts)
    assert ours("hello")["input_ids"][0] == 1  # llama.cpp's default for SentencePiece: add BOS


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    head_dim, theta, factor = HIDDEN // HEADS, 500000.0, 8.0
    freqs = []
    for i in range(0, head_dim, 2):  # llama.cpp's convert_hf_to_gguf.py, LlamaModel
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < 8192 / 4:
            freqs.append(1.0)
        elif wavelen > 8192 / 1:
            freqs.append(factor)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            freqs.append(1 / ((1 - smooth) / factor + smooth))
    path = tmp_path / "llama3.gguf"
    write_tiny(path, "llama", theta=theta, context=131072, rope_freqs=np.float32(freqs))
    source = open_gguf(path)
    assert "rope_freqs.weight" not in {t.name for t in source.tensors}
    folder = save_extra_files(source, tmp_path / "model")
    rope = transformers.AutoConfig.from_pretrained(folder).rope_parameters
    assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("llama3", 8.0, theta)
    assert rope["original_max_position_embeddings"] == 8192

    bad = tmp_path / "bad.gguf"
    write_tiny(bad, "llama", rope_freqs=np.full(head_dim // 2, 3.0, np.float32))
    with pytest.raises(SourceError, match="rope_freqs"):
        open_gguf(bad)


def test_unsupported_architecture_is_named(tmp_path: Path) -> None:
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SourceError, match="'falcon' is not supported"):
        open_gguf(path)
