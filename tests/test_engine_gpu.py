"""The engine on a CUDA machine: CUDA-graph decode gives the eager result, and a model built
on a load still in flight (layer-pipelined cold start) answers as one loaded first, and
refuses to answer from weights that fail their checksums."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sllmctl.engine.batch import BatchEngine
from sllmctl.engine.config import ModelConfig
from sllmctl.engine.model import Transformer
from sllmctl.errors import CorruptCheckpoint

pytestmark = pytest.mark.gpu

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 512,
          "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 12,
          "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 1024,
          "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
          "eos_token_id": 2, "bos_token_id": 1, "torch_dtype": "bfloat16"}


def tiny(device: str = "cuda", dtype: torch.dtype = torch.bfloat16) -> Transformer:
    torch.manual_seed(0)
    with torch.device("meta"):
        ref = Transformer(ModelConfig.from_hf(CONFIG))
    state = {(k if k.startswith("lm_head") else f"model.{k}"):
             torch.randn(v.shape, device=device, dtype=dtype) * 0.3
             for k, v in ref.state_dict().items()}
    return Transformer.from_state_dict(ModelConfig.from_hf(CONFIG), state)


def run_all(engine: BatchEngine, prompts: list[list[int]], n: int) -> list[list[int]]:
    import threading

    out: list[list[int]] = [[] for _ in prompts]

    def go(i: int) -> None:
        out[i] = list(engine.submit(prompts[i], n + i, eos=set()))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def test_graph_decode_equals_eager() -> None:
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (k,), generator=g).tolist() for k in (5, 40, 300, 7, 2)]
    plain = BatchEngine(tiny(), slots=4, max_len=1024, graphs=False)
    eager = run_all(plain, prompts, 20)
    plain.close()
    engine = BatchEngine(tiny(), slots=4, max_len=1024, graphs=True)
    graphed = run_all(engine, prompts, 20)
    assert graphed == eager
    graphs = engine.runner.graphs
    assert graphs is not None
    shapes = set(graphs.graphs)
    assert {kv for _, kv in shapes} == {256, 512} and len({b for b, _ in shapes}) > 1
    engine.close()
    assert graphs.graphs == {}


def test_a_request_moves_between_cuda_engines() -> None:
    """A seeded request stopped part-way on one engine, written out as JSON and rebuilt for
    another, draws what it would have drawn without the move (its CUDA generator's state goes
    with it); a greedy one ends with the same tokens. In float32: the move prefills what was
    decoded, and bf16 rounds the two paths differently."""
    from sllmctl.engine.request import Request, SamplingParams

    prompt = list(range(3, 40))
    a, b = (BatchEngine(tiny(dtype=torch.float32), slots=2, max_len=1024, graphs=True)
            for _ in range(2))
    for params in (SamplingParams(24), SamplingParams(24, temperature=1.0, seed=7)):
        want = list(a.add(Request(prompt, params, device="cuda")))
        req = Request(prompt, params, device="cuda")
        tokens = a.add(req)
        assert [next(tokens) for _ in range(5)] == want[:5]
        tokens.close()
        while req.out.get() is not None:
            pass
        moved = Request.from_dict(json.loads(json.dumps(req.to_dict())))
        assert moved.generator is None or moved.generator.device.type == "cuda"
        list(b.add(moved))
        assert moved.tokens == want, params
    a.close()
    b.close()


@pytest.fixture(params=[False, True], ids=["plain", "compressed"])
def stored(tmp_path: Path, request: pytest.FixtureRequest) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    from sllmctl.store.writer import convert

    src = tmp_path / "src"
    src.mkdir()
    model = tiny("cpu")
    save_file({(k if k.startswith("lm_head") else f"model.{k}"): v.contiguous()
               for k, v in model.state_dict().items()}, src / "model.safetensors")
    (src / "config.json").write_text(json.dumps(CONFIG))
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(512)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "w2"}))
    convert(src, "pipe", compress=request.param)
    return "pipe"


def test_pipelined_load_answers_like_a_finished_one(stored: str) -> None:
    from sllmctl.engine.chat import ChatModel, Params
    from sllmctl.store.gpu.loader import start_load_to_gpu
    from sllmctl.store.store import Store

    prompt = " ".join(f"w{i}" for i in range(3, 60))
    want = ChatModel.load(stored, "cuda").complete(prompt, Params(max_tokens=16))
    chat = ChatModel.from_loading(stored, start_load_to_gpu(Store().get(stored), "cuda"))
    assert chat.model.gate is not None
    chat.start_batching(slots=2)
    got = chat.complete(prompt, Params(max_tokens=16))
    assert got.text == want.text and got.completion_tokens == want.completion_tokens
    assert chat.model.gate is None  # removed once the load was verified
    assert chat.loading is not None and chat.loading.done
    chat.close()


def test_pipelined_load_refuses_corrupt_weights(stored: str) -> None:
    from sllmctl.engine.chat import ChatModel, Params
    from sllmctl.store.codec import Layout
    from sllmctl.store.gpu.loader import start_load_to_gpu
    from sllmctl.store.store import Store

    model = Store().get(stored)
    last = model.manifest.tensors["model.layers.11.mlp.down_proj.weight"]
    f = model.manifest.files[last.file]
    pos = last.offset + 100
    if f.frames is not None:  # compressed: where that byte is stored
        chunk, rest = divmod(pos, model.manifest.chunk_size)
        start = int(Layout(f, model.manifest.chunk_size).starts[chunk])
        pos = start + (rest if f.frames[chunk] == 0 else rest // 2)  # an even byte: low
    with open(model.path / f.path, "r+b") as fh:
        fh.seek(pos)
        byte = fh.read(1)
        fh.seek(pos)
        fh.write(bytes([byte[0] ^ 0x40]))
    chat = ChatModel.from_loading(stored, start_load_to_gpu(model, "cuda"))
    chat.start_batching(slots=2)
    with pytest.raises(CorruptCheckpoint, match="fails its checksum"):
        chat.complete("w5 w6 w7", Params(max_tokens=4))
    chat.close()


def test_triton_kernels_are_as_accurate_as_the_plain_path() -> None:
    """bf16 through the Triton kernels and bf16 through plain PyTorch, both against float32:
    the kernels' error is of the same size (they round where PyTorch rounds)."""
    from sllmctl.engine import kernels

    if not kernels.available():
        pytest.skip("Triton is not installed")
    torch.manual_seed(0)
    config = ModelConfig.from_hf(CONFIG)
    with torch.device("meta"):
        ref = Transformer(config)
    state = {(k if k.startswith("lm_head") else f"model.{k}"):
             torch.randn(v.shape, device="cuda") * (0.05 if v.dim() > 1 else 1.0)
             for k, v in ref.state_dict().items()}
    models = {"fp32": Transformer.from_state_dict(config, state),
              "bf16": Transformer.from_state_dict(config, state, dtype=torch.bfloat16)}
    g = torch.Generator().manual_seed(2)
    tokens = torch.randint(3, 512, (2, 40), generator=g).cuda()
    out = {}
    with torch.inference_mode():
        for key, dtype, fused in (("ref", "fp32", False), ("plain", "bf16", False),
                                  ("kernels", "bf16", True)):
            model = models[dtype]
            model.fused = fused
            model.setup_cache(2, 128)
            steps = [model(tokens[:, :30], torch.arange(30, device="cuda"), kv_len=64)]
            for i in range(30, 40):
                steps.append(model(tokens[:, i:i + 1], torch.tensor([i], device="cuda"),
                                   kv_len=64))
            out[key] = torch.cat(steps, dim=1)
    plain = (out["plain"] - out["ref"]).abs().max().item()
    fused = (out["kernels"] - out["ref"]).abs().max().item()
    assert out["ref"].std() > 0.1 and plain > 0  # bf16 is not exact: a real comparison
    assert fused < 2 * plain, (fused, plain)
