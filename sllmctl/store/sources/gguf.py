"""GGUF checkpoints (llama.cpp's format) read as a `Source` in Hugging Face layout.

Names, layouts and values follow transformers' own GGUF loading: each tensor is dequantized to
float32 (`gguf.quants.dequantize`), llama.cpp's Q/K rope permutation is undone for the llama
family, and the result is cast to the requested dtype. The config, tokenizer and generation
files of a Hugging Face folder are rebuilt from the metadata.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sllmctl.store.format import DTYPES, torch_dtype
from sllmctl.store.sources.base import Source, SourceError, SourceTensor

if TYPE_CHECKING:
    import torch

FLOAT_DTYPES = ("BF16", "F16", "F32")

# general.architecture -> (model_type, transformers class, whether llama.cpp permuted Q/K rows).
# llama.cpp writes Mistral models as "llama"; qwen2/qwen3 use NEOX rope, left unpermuted.
ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM", True),
    "qwen2": ("qwen2", "Qwen2ForCausalLM", False),
    "qwen3": ("qwen3", "Qwen3ForCausalLM", False),
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# tokenizer.ggml.pre -> the split regex a byte-level vocabulary was trained with, as
# transformers picks it; any other value keeps GPT-2's own.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
}
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def open_gguf(path: Path, dtype: str = "BF16") -> Source:
    """A GGUF file as a `Source` whose tensors load dequantized, in HF layout, cast to `dtype`."""
    if dtype not in FLOAT_DTYPES:
        raise SourceError(f"cannot convert a GGUF file to {dtype}: use one of {FLOAT_DTYPES}")
    reader = _read(path)
    meta = {key: field.contents() for key, field in reader.fields.items()}
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise SourceError(
            f"{path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(ARCHITECTURES)})"
        )
    try:
        return _source(path, dtype, reader, meta, arch)
    except (KeyError, IndexError, TypeError, ValueError) as e:
        raise SourceError(f"{path}: malformed GGUF metadata ({type(e).__name__}: {e})") from None


def _read(path: Path) -> Any:
    import gguf

    hint = "download or convert the file again"
    try:
        with open(path, "rb") as f:
            head = f.read(8)
        if head[:4] != b"GGUF":
            raise SourceError(f"{path}: not a GGUF file (no GGUF magic bytes)")
        version = int.from_bytes(head[4:], "little")
        if len(head) == 8 and {version, int.from_bytes(head[4:], "big")}.isdisjoint({2, 3}):
            raise SourceError(f"{path}: GGUF version {version} is not supported (only 2 and 3)")
        reader = gguf.GGUFReader(path)  # memory mapped
    except OSError as e:
        raise SourceError(f"{path}: cannot read ({e.strerror or e})") from None
    except (ValueError, KeyError, IndexError, TypeError, OverflowError):
        raise SourceError(f"{path}: truncated or corrupt GGUF file", hint) from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise SourceError(f"{path}: truncated GGUF file (tensor {t.name} is cut off)", hint)
    return reader


def _source(path: Path, dtype: str, reader: Any, meta: dict[str, Any], arch: str) -> Source:
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}
    config = _config(meta, arch, shapes, dtype, path)
    tensors = []
    # rows of the rope-permuted tensors come in groups of heads: Q by all, K by key/value heads
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    for t in reader.tensors:
        if t.name == "rope_freqs.weight":
            config["rope_scaling"] = _llama3_rope_scaling(t.data, config, path)
            continue
        n_head = heads.get(t.name.split(".")[-2]) if ARCHITECTURES[arch][2] else None
        tensors.append(_tensor(t, shapes[t.name], path, dtype, n_head))

    extra = {"config.json": _json(config)}
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    eot = meta.get("tokenizer.ggml.eot_token_id")  # end of turn, for chat models that have one
    if "eos_token_id" in gen and eot not in (None, gen["eos_token_id"]):
        gen["eos_token_id"] = [gen["eos_token_id"], eot]
    extra["generation_config.json"] = _json(gen)
    if "tokenizer.ggml.model" in meta:
        extra.update(_tokenizer_files(meta, config, path))
    types = Counter(t.tensor_type.name for t in reader.tensors)
    provenance = {
        "source": str(path),
        "format": "gguf",
        "architecture": arch,
        "quantization": _quantization(meta, types),
        "ggml_types": dict(types.most_common()),
        "dtype": dtype,
        "gguf_name": meta.get("general.name"),
    }
    return Source("gguf", str(path), tensors, extra_files=extra, provenance=provenance)


def _tensor(
    t: Any, shape: tuple[int, ...], path: Path, dtype: str, n_head: int | None
) -> SourceTensor:
    stem, _, suffix = t.name.rpartition(".")
    parts = stem.split(".")
    if stem in TOP_NAMES and suffix == "weight":
        name = f"{TOP_NAMES[stem]}.weight"
    elif len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in LAYER_NAMES:
        name = f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}.{suffix}"
    else:
        raise SourceError(f"{path}: tensor {t.name!r} has no Hugging Face counterpart")

    def load() -> torch.Tensor:
        import numpy as np
        import torch
        from gguf.quants import dequantize

        try:
            values = dequantize(t.data, t.tensor_type)
        except NotImplementedError:
            raise SourceError(
                f"{path}: tensor {t.name} is {t.tensor_type.name}, which gguf cannot dequantize"
            ) from None
        values = np.asarray(values, dtype=np.float32).reshape(shape)
        w = torch.from_numpy(values if values.flags.writeable else values.copy())
        if n_head is not None:
            w = _unpermute_rope(w, n_head)
        return w.to(torch_dtype(dtype)).contiguous()

    return SourceTensor(name=name, dtype=dtype, shape=shape, load=load)


def _unpermute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row order: within each head, rows (half, pair) -> (pair, half)."""
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _config(
    meta: dict[str, Any], arch: str, shapes: dict[str, tuple[int, ...]], dtype: str, path: Path
) -> dict[str, Any]:
    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None or isinstance(value, list):
            raise SourceError(f"{path}: GGUF metadata lacks a single value for {arch}.{name}")
        return value

    model_type, cls, _ = ARCHITECTURES[arch]
    hidden, heads = key("embedding_length"), key("attention.head_count")
    config: dict[str, Any] = {
        "architectures": [cls],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": meta.get(f"{arch}.attention.key_length")
        or meta.get(f"{arch}.rope.dimension_count")
        or hidden // heads,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(key("rope.freq_base", 10000.0)),
        "max_position_embeddings": key("context_length"),
        "vocab_size": shapes["token_embd.weight"][0],
        "tie_word_embeddings": "output.weight" not in shapes,  # llama.cpp drops a tied head
        "torch_dtype": DTYPES[dtype][1],  # transformers < 5
        "dtype": DTYPES[dtype][1],
    }
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
    for name, meta_key in (("bos", "bos"), ("eos", "eos"), ("pad", "padding")):
        if (token_id := meta.get(f"tokenizer.ggml.{meta_key}_token_id")) is not None:
            config[f"{name}_token_id"] = token_id
    rope_type = meta.get(f"{arch}.rope.scaling.type")
    if rope_type in ("linear", "yarn"):
        scaling = {"rope_type": rope_type, "factor": _f32(key("rope.scaling.factor"))}
        if (original := meta.get(f"{arch}.rope.scaling.original_context_length")) is not None:
            scaling["original_max_position_embeddings"] = original
        config["rope_scaling"] = scaling
    elif rope_type not in (None, "none"):
        raise SourceError(f"{path}: rope scaling {rope_type!r} is not supported")
    return config


def _llama3_rope_scaling(freqs: Any, config: dict[str, Any], path: Path) -> dict[str, Any]:
    """The Llama 3 rope scaling that llama.cpp stored as per-frequency divisors.

    Every Llama 3.x release uses frequency factors 1 (low) and 4 (high) over an original
    8192-token context; the factor is then the largest divisor. The guess is checked by
    rebuilding the tensor the way llama.cpp's converter does. (transformers ignores it.)
    """
    import numpy as np

    stored, dim, theta = np.asarray(freqs, np.float32), config["head_dim"], config["rope_theta"]
    factor, low, high, context = _f32(float(stored.max())), 1.0, 4.0, 8192
    expected = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * theta ** (i / dim)
        smooth = min(max((context / wavelen - low) / (high - low), 0.0), 1.0)
        expected.append(1 / ((1 - smooth) / factor + smooth))
    if stored.shape != (dim // 2,) or not np.allclose(stored, expected, rtol=1e-3):
        raise SourceError(f"{path}: rope_freqs.weight does not match Llama 3 rope scaling")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": context,
    }


def _tokenizer_files(meta: dict[str, Any], config: dict[str, Any], path: Path) -> dict[str, bytes]:
    from tokenizers import AddedToken, processors

    kind = meta["tokenizer.ggml.model"]
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if kind == "gpt2":
        tokenizer = _byte_level(meta, tokens, types)
    elif kind == "llama":
        tokenizer = _sentencepiece(meta, tokens)
    else:
        raise SourceError(f"{path}: GGUF tokenizer model {kind!r} is not supported")

    # all four named, null where the file has none, so that no tokenizer class adds its default
    special: dict[str, str | None] = {}
    for name, meta_key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        token_id = meta.get(f"tokenizer.ggml.{meta_key}_token_id")
        special[f"{name}_token"] = None if token_id is None else tokenizer.id_to_token(token_id)
    named = set(special.values())
    # control tokens (and the named ones) are special; user-defined ones are matched whole too
    tokenizer.add_tokens(
        [
            AddedToken(token, normalized=False, special=kind_id != USER_DEFINED)
            for token, kind_id in ((tokenizer.id_to_token(i), k) for i, k in enumerate(types))
            if kind_id in (CONTROL, USER_DEFINED) or token in named
        ]
    )
    # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
    bos_token, eos_token = special["bos_token"], special["eos_token"]
    add_bos = meta.get("tokenizer.ggml.add_bos_token", kind == "llama")
    bos = [bos_token] if bos_token and add_bos else []
    eos = [eos_token] if eos_token and meta.get("tokenizer.ggml.add_eos_token") else []

    def template(sequence: str, type_id: int) -> list[str]:
        return [f"{t}:{type_id}" for t in [*bos, sequence, *eos]]

    tokenizer.post_processor = processors.TemplateProcessing(
        single=template("$A", 0),
        pair=template("$A", 0) + template("$B", 1),
        special_tokens=[(t, tokenizer.token_to_id(t)) for t in dict.fromkeys(bos + eos)],
    )
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": bool(bos),
        "add_eos_token": bool(eos),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if (chat_template := meta.get("tokenizer.chat_template")) is not None:
        tokenizer_config["chat_template"] = chat_template
    return {
        "tokenizer.json": tokenizer.to_str().encode(),
        "tokenizer_config.json": _json(tokenizer_config),
    }


def _byte_level(meta: dict[str, Any], tokens: list[str], types: list[int]) -> Any:
    """GPT-2 style byte-level BPE.

    llama.cpp writes ordinary tokens in GPT-2's byte alphabet, control and user-defined ones as
    plain text; an ordinary token spelled outside the alphabet is respelled into it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = iter(range(256, 512))
    spelling = {b: chr(b if b in printable else next(others)) for b in range(256)}
    alphabet = set(spelling.values())
    vocab = {
        t
        if set(t) <= alphabet or kind in (CONTROL, USER_DEFINED)
        else "".join(spelling[b] for b in t.encode()): i
        for i, (t, kind) in enumerate(zip(tokens, types, strict=True))
    }
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre", ""))
    tokenizer.pre_tokenizer = (
        pre_tokenizers.ByteLevel(add_prefix_space=False)
        if split is None
        else pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _sentencepiece(meta: dict[str, Any], tokens: list[str]) -> Any:
    """SentencePiece BPE with byte fallback; merges rebuilt from the scores, best first."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(tokens)}
    scores = meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    found = []
    for token, score in zip(tokens, scores, strict=True):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))]
        pairs = sorted(
            (p for p in pairs if p[0] in vocab and p[1] in vocab),
            key=lambda p: (vocab[p[0]], vocab[p[1]]),
        )
        found += [(left, right, score) for left, right in pairs]
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    merges = [(left, right) for left, right, _ in found]
    tokenizer = Tokenizer(models.BPE(vocab, merges, fuse_unk=True, byte_fallback=True))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(
        [*steps, decoders.Strip(content=" ", left=1, right=0)] if prefix else steps
    )
    return tokenizer


def _quantization(meta: dict[str, Any], types: Counter[str]) -> str:
    """llama.cpp's own summary (general.file_type: "Q4_1"), else the most common tensor type."""
    import gguf

    try:
        return gguf.LlamaFileType(meta["general.file_type"]).name.split("_", 1)[1]
    except (KeyError, ValueError):
        ranked = [name for name, _ in types.most_common()]
        return ([n for n in ranked if n not in ("F32", "F16", "BF16")] or ranked or ["none"])[0]


def _f32(value: float) -> float:
    """A float32 metadata value at its shortest spelling (1e-05, not 9.999999747378752e-06)."""
    import numpy as np

    return float(str(np.float32(value)))


def _json(value: Any) -> bytes:
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode()
