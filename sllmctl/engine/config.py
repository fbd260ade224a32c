"""The model shape, read once from a transformers `config.json` dict.

`ModelConfig` is all that `sllmctl.engine.model` needs; the model itself never reads files.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sllmctl.errors import SllmError

# transformers class name -> model_type, for every architecture the engine runs.
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
ROPE_TYPES = ("linear", "llama3", "yarn")


@dataclass
class ModelConfig:
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None, or transformers' rope parameters with "rope_type" in ROPE_TYPES
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v bias (Qwen2; Llama's attention_bias)
    o_bias: bool = False  # o_proj bias (Llama's and Qwen3's attention_bias)
    mlp_bias: bool = False  # Llama's mlp_bias
    qk_norm: bool = False  # RMSNorm over each head of q and k before rope (Qwen3)
    sliding_window: int | None = None
    sliding_layers: tuple[int, ...] = ()  # the layers that use sliding_window
    eos_ids: tuple[int, ...] = ()
    bos_id: int | None = None
    model_type: str = "llama"

    @classmethod
    def from_hf(
        cls, config: dict[str, Any], generation_config: dict[str, Any] | None = None
    ) -> ModelConfig:
        """Read a transformers config dict (and, for more eos ids, its generation config)."""
        model_type = _model_type(config)
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        layers = int(config["num_hidden_layers"])
        if (act := config.get("hidden_act", "silu")) != "silu":
            raise SllmError(f"activation {act!r} is not supported (supported: silu)")
        if config.get("partial_rotary_factor", 1.0) != 1.0:
            raise SllmError("partial rotary embeddings are not supported")
        bias = bool(config.get("attention_bias") or False)
        window, sliding = _sliding(config, model_type, layers)
        theta, scaling = _rope(config)
        eos: list[int] = []
        for source in (config, generation_config or {}):
            ids = source.get("eos_token_id")
            for i in ids if isinstance(ids, list) else [] if ids is None else [ids]:
                if int(i) not in eos:
                    eos.append(int(i))
        bos = config.get("bos_token_id")
        return cls(
            vocab=int(config["vocab_size"]),
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            layers=layers,
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=int(config.get("max_position_embeddings") or 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias={"qwen2": True, "mistral": False}.get(model_type, bias),
            o_bias=bias if model_type in ("llama", "qwen3") else False,
            mlp_bias=bool(config.get("mlp_bias") or False) if model_type == "llama" else False,
            qk_norm=model_type == "qwen3",
            sliding_window=window,
            sliding_layers=sliding,
            eos_ids=tuple(eos),
            bos_id=None if bos is None else int(bos),
            model_type=model_type,
        )

    @classmethod
    def from_dir(cls, files: Path) -> ModelConfig:
        """Read `config.json` (and `generation_config.json` if there) from a model's files/."""
        try:
            config = json.loads((files / "config.json").read_text())
            gen_path = files / "generation_config.json"
            gen = json.loads(gen_path.read_text()) if gen_path.exists() else None
        except (OSError, ValueError) as e:
            raise SllmError(f"cannot read the model config in {files}: {e}") from e
        return cls.from_hf(config, gen)


# generation_config.json keys the API takes as sampling defaults (as vLLM does), and their ranges
SAMPLING_KEYS = {"temperature": (0.0, 2.0), "top_p": (1e-9, 1.0), "top_k": (0, 1 << 30)}


def sampling_defaults(files: Path) -> dict[str, float | int]:
    """The temperature, top_p and top_k a model's generation_config.json sets (values out of
    range, or of the wrong type, are left out); empty if it sets none."""
    try:
        gen = json.loads((files / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    out: dict[str, float | int] = {}
    for key, (lo, hi) in SAMPLING_KEYS.items():
        v = gen.get(key) if isinstance(gen, dict) else None
        if isinstance(v, int | float) and not isinstance(v, bool) and lo <= v <= hi:
            out[key] = int(v) if key == "top_k" else float(v)
    return out


def _model_type(config: dict[str, Any]) -> str:
    archs = config.get("architectures") or []
    name = archs[0] if archs else config.get("model_type")
    if name in ARCHITECTURES:
        return ARCHITECTURES[str(name)]
    if not archs and name in ARCHITECTURES.values():
        return str(name)
    raise SllmError(
        f"architecture {name} is not supported (supported: {', '.join(ARCHITECTURES)})",
        hint="convert a Llama, Mistral, Qwen2 or Qwen3 model",
    )


def _rope(config: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """rope_theta and scaling from either transformers 4 (rope_theta + rope_scaling) or 5
    (rope_parameters, holding rope_theta too)."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    theta = float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    params.pop("type", None)
    params.pop("rope_theta", None)
    if kind == "default":
        return theta, None
    if kind not in ROPE_TYPES:
        raise SllmError(
            f"rope scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    if kind in ("llama3", "yarn"):
        original = config.get("original_max_position_embeddings")
        params["original_max_position_embeddings"] = int(
            original
            or params.get("original_max_position_embeddings")
            or config["max_position_embeddings"]
        )
    if kind == "yarn" and not params.get("factor"):
        params["factor"] = (
            config["max_position_embeddings"] / params["original_max_position_embeddings"]
        )
    return theta, {"rope_type": kind, **params}


def _sliding(
    config: dict[str, Any], model_type: str, layers: int
) -> tuple[int | None, tuple[int, ...]]:
    window = config.get("sliding_window")
    if model_type == "mistral":
        return (int(window), tuple(range(layers))) if window else (None, ())
    # Qwen: windowed only with use_sliding_window, on layers from max_window_layers on
    if model_type not in ("qwen2", "qwen3") or not window or not config.get("use_sliding_window"):
        return None, ()
    if types := config.get("layer_types"):
        sliding = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    else:
        sliding = tuple(range(int(config.get("max_window_layers") or 0), layers))
    return (int(window), sliding) if sliding else (None, ())
