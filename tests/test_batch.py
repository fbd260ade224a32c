"""Continuous batching gives every request exactly what it would get alone."""

from __future__ import annotations

import json
import threading

import torch

from sllmctl.engine.batch import BatchEngine
from sllmctl.engine.config import ModelConfig
from sllmctl.engine.model import Transformer
from sllmctl.engine.sampling import generate


def tiny_model(seed: int = 0) -> Transformer:
    cfg = ModelConfig(vocab=97, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                      head_dim=16, max_position_embeddings=128, eos_ids=(3,))
    torch.manual_seed(seed)
    state = {}
    reference = Transformer(cfg)  # random initialisation, then rebuilt from its tensors
    for k, v in reference.state_dict().items():
        state[f"model.{k}" if not k.startswith("lm_head") else k] = torch.randn_like(v) * 0.5
    return Transformer.from_state_dict(cfg, state)


def prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(4, 97, (n,), generator=g).tolist() for n in (1, 5, 17, 9, 30, 2, 12)]


def test_batched_greedy_equals_one_at_a_time() -> None:
    model = tiny_model()
    # eos ids that never occur, so that every request runs to its own limit
    alone = [generate(model, p, 6 + i, eos_ids=[]) for i, p in enumerate(prompts())]
    engine = BatchEngine(tiny_model(), slots=3, max_len=64)  # fewer slots than requests
    results: list[list[int]] = [[] for _ in prompts()]

    def run(i: int, p: list[int]) -> None:
        results[i] = list(engine.submit(p, 6 + i, eos=set()))

    threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(prompts())]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert results == alone


def test_eos_early_stop_and_seeds() -> None:
    model = tiny_model()
    p = prompts()[2]
    first = generate(model, p, 8, eos_ids=[])
    engine = BatchEngine(tiny_model(), slots=2, max_len=64)
    assert list(engine.submit(p, 8, eos={first[2]})) == first[:3]  # ends on (and yields) eos
    stream = engine.submit(p, 8, eos=set())
    assert next(iter(stream)) == first[0]
    del stream  # a consumer that stops early frees its slot
    seeded = [list(engine.submit(p, 8, temperature=1.0, eos=set(),
                                 generator=torch.Generator().manual_seed(5))) for _ in range(2)]
    assert seeded[0] == seeded[1]
    assert list(engine.submit(p, 8, eos=set())) == first
    engine.close()


def test_greedy_and_sampled_rows_in_one_step() -> None:
    """Rows with different sampling settings share decode steps; greedy rows are unaffected."""
    model = tiny_model()
    ps = prompts()
    alone = generate(model, ps[1], 12, eos_ids=[])
    engine = BatchEngine(tiny_model(), slots=4, max_len=64)
    results: dict[str, list[int]] = {}

    def run(key: str, **kw: object) -> None:
        results[key] = list(engine.submit(ps[1], 12, eos=set(), **kw))  # type: ignore[arg-type]

    threads = [threading.Thread(target=run, args=("greedy",)),
               threading.Thread(target=run, args=("hot",), kwargs={"temperature": 1.5}),
               threading.Thread(target=run, args=("topk",),
                                kwargs={"temperature": 1.0, "top_k": 1})]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    engine.close()
    assert results["greedy"] == alone
    assert results["topk"] == alone  # top-k 1 leaves only the most likely token
    assert len(results["hot"]) == 12 and all(0 <= t < 97 for t in results["hot"])
    assert engine.steps > 0


def test_building_on_loaded_tensors_stays_light() -> None:
    """Building a model on the meta device initialises nothing: PyTorch's meta-device
    normal_ imports torch._dynamo, which cost 1.5 s of every `sllmctl run` on a 2-core CPU
    machine."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from sllmctl.engine.config import ModelConfig\n"
        "from sllmctl.engine.model import Transformer\n"
        "cfg = ModelConfig(vocab=97, hidden=64, intermediate=128, layers=2, heads=4,\n"
        "                  kv_heads=2, head_dim=16, max_position_embeddings=128, eos_ids=(3,))\n"
        "with torch.device('meta'):\n"
        "    ref = Transformer(cfg)\n"
        "state = {(k if k.startswith('lm_head') else f'model.{k}'): torch.zeros(v.shape)\n"
        "         for k, v in ref.state_dict().items()}\n"
        "m = Transformer.from_state_dict(cfg, state)\n"
        "assert m.embed_tokens.weight.device.type == 'cpu'\n"
        "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
    cfg = ModelConfig(vocab=97, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                      head_dim=16, max_position_embeddings=128, eos_ids=(3,))
    w = Transformer(cfg).embed_tokens.weight.detach()  # built on the CPU: initialised
    assert 0.8 < float(w.std()) < 1.2 and abs(float(w.mean())) < 0.1


def test_a_request_round_trips_through_json() -> None:
    from sllmctl.engine.request import Request, SamplingParams

    params = SamplingParams(12, 0.7, 0.9, 5, seed=3, stop=["x"])
    req = Request([5, 6, 7], params, eos={3})
    torch.rand(3, generator=req.generator)  # a generator part-way through
    req.tokens, req.pieces = [9, 10], ["a", "b"]
    d = json.loads(json.dumps(req.to_dict()))
    again = Request.from_dict(d)
    assert again.to_dict() == req.to_dict()
    assert again.id == req.id and again.params == params and again.text == "ab"
    assert again.generator is not None and req.generator is not None
    assert torch.rand(4, generator=again.generator).tolist() == \
        torch.rand(4, generator=req.generator).tolist()


def test_a_request_rebuilt_mid_generation_carries_on() -> None:
    """Stopped after a few tokens, written out and rebuilt for another engine, a greedy
    request ends with the tokens it would have had alone."""
    from sllmctl.engine.request import Request, SamplingParams

    model, p = tiny_model(), prompts()[4]
    want = generate(model, p, 12, eos_ids=[])
    first, second = (BatchEngine(tiny_model(), slots=2, max_len=64) for _ in range(2))
    req = Request(p, SamplingParams(max_tokens=12))
    tokens = first.add(req)
    assert [next(tokens) for _ in range(4)] == want[:4]
    tokens.close()  # the reader stops: the engine lets the request go
    while req.out.get() is not None:  # drained once the engine has let it go
        pass
    assert req.finish == "abort" and 4 <= len(req.tokens) < 12
    moved = Request.from_dict(json.loads(json.dumps(req.to_dict())))
    rest = list(second.add(moved))
    first.close()
    second.close()
    assert moved.tokens == want and moved.finish == "length"
    assert rest == want[len(req.tokens):]


def test_a_cancelled_request_leaves_its_slot_at_the_next_step() -> None:
    from sllmctl.engine.request import Request, SamplingParams
    from sllmctl.engine.scheduler import Scheduler

    s = Scheduler(slots=1, max_len=64)
    a, b = Request([1, 2], SamplingParams(max_tokens=50)), Request([4], SamplingParams(2))
    s.add(a)
    s.add(b)
    assert s.admit() == (0, a) and s.admit() is None  # one slot: b waits
    s.record(0, a, 7)
    a.cancel()
    s.drop_cancelled()
    assert a.finish == "abort" and s.admit() == (0, b)
    s.record(0, b, 8)
    s.record(0, b, 9)
    assert b.finish == "length" and s.running() == []
