"""One model ready to answer: weights from the store, tokenizer, chat template, sampling
defaults, and a streaming generation loop with stop strings. `sllmctl run` builds one in the
CLI process; the daemon's HTTP serving hosts one per served model, batched by its engine."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sllmctl.engine.batch import BatchEngine
from sllmctl.engine.config import ModelConfig, sampling_defaults
from sllmctl.engine.model import Transformer
from sllmctl.engine.request import ContextTooLong, Request, SamplingParams
from sllmctl.engine.sampling import stream
from sllmctl.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from sllmctl.store.gpu.copy import GpuLoad


Params = SamplingParams  # the name `run` and the daemon know it by


@dataclass
class Completion:
    text: str
    finish_reason: str  # "stop" (eos or a stop string) or "length"
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    ttft: float

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "finish_reason": self.finish_reason,
                "usage": {"prompt_tokens": self.prompt_tokens,
                          "completion_tokens": self.completion_tokens,
                          "total_tokens": self.prompt_tokens + self.completion_tokens},
                "seconds": round(self.seconds, 4), "ttft_s": round(self.ttft, 4)}


class ChatModel:
    def __init__(self, name: str, model: Transformer, tokenizer: Tokenizer,
                 load_seconds: float, defaults: dict[str, Any] | None = None) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.load_seconds = load_seconds
        # sampling settings the model's generation_config.json gives (temperature, top_p,
        # top_k); the HTTP API starts from them where a request names none
        self.defaults: dict[str, Any] = dict(defaults or {})
        self.engine: BatchEngine | None = None  # set: requests are batched by its thread
        self.loading: GpuLoad | None = None  # set: weights still arriving (layer-pipelined)

    def start_batching(self, slots: int = 8, max_len: int = 2048) -> None:
        """Serve concurrent requests through one continuous-batching thread."""
        self.engine = BatchEngine(self.model, slots, max_len)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    @classmethod
    def from_state(cls, name: str, state: dict[str, Any], device: Any,
                   load_seconds: float = 0.0) -> ChatModel:
        """Build on tensors already loaded (e.g. resident in the daemon's GPU tier)."""
        import torch

        from sllmctl.store.store import Store

        files = Store().path(name) / "files"
        dtype = torch.float32 if torch.device(device).type == "cpu" else None
        model = Transformer.from_state_dict(ModelConfig.from_dir(files), state, dtype=dtype)
        return cls(name, model, Tokenizer.from_folder(files), load_seconds,
                   sampling_defaults(files))

    @classmethod
    def from_loading(cls, name: str, load: GpuLoad) -> ChatModel:
        """Build on a GPU load still in flight: requests start computing on the layers that
        have arrived (sllmctl.engine.coldstart)."""
        from sllmctl.engine.coldstart import LayerGate

        assert load.state is not None, "start the load with its views allocated"
        chat = cls.from_state(name, load.state, load.device)
        chat.model.gate = LayerGate(load, chat.model)
        chat.loading = load

        def loaded(error: BaseException | None) -> None:
            chat.load_seconds = load.seconds

        load.add_done_callback(loaded)
        return chat

    @classmethod
    def load(cls, name: str, device: str | None = None) -> ChatModel:
        """Load a stored model onto `device` (default: cuda if there is one, else cpu).
        On the CPU weights run in float32; on a GPU in their stored dtype."""
        import torch

        import sllmctl
        from sllmctl.store.store import Store

        start = time.perf_counter()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        Store().path(name)  # an unknown name fails here, before any loading
        state = sllmctl.load_state_dict(name, device=dev)
        model = cls.from_state(name, state, dev)
        model.load_seconds = time.perf_counter() - start
        return model

    @property
    def max_len(self) -> int:
        """Tokens one request may hold, prompt and answer together."""
        if self.engine is not None:
            return self.engine.max_len
        return self.model.config.max_position_embeddings

    @property
    def eos(self) -> set[int]:
        return self.tokenizer.eos_ids | set(self.model.config.eos_ids)

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def request(self, ids: list[int], params: Params) -> Request:
        """A request for `ids`; one that leaves no room to answer is refused here
        (ContextTooLong), before anything is generated."""
        if len(ids) + 1 > self.max_len:
            raise ContextTooLong(len(ids), self.max_len)
        return Request(ids, params, eos=self.eos, tokenizer=self.tokenizer,
                       device=self.model.embed_tokens.weight.device)

    def chat_request(self, messages: list[dict[str, Any]], params: Params) -> Request:
        return self.request(self.prompt_ids(messages), params)

    def completion_request(self, prompt: str, params: Params) -> Request:
        """A raw prompt (no chat template)."""
        return self.request(self.tokenizer.encode(prompt), params)

    def chat(self, messages: list[dict[str, Any]], params: Params,
             on_text: Callable[[str], None] | None = None) -> Completion:
        """Answer a conversation; `on_text` receives the text as it is generated."""
        return self.generate(self.chat_request(messages, params), on_text)

    def complete(self, prompt: str, params: Params,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        """Continue a raw prompt (no chat template)."""
        return self.generate(self.completion_request(prompt, params), on_text)

    def generate(self, req: Request, on_text: Callable[[str], None] | None = None) -> Completion:
        """Run a request to its end; `on_text` receives the text as it is generated."""
        import torch

        start = time.perf_counter()
        ttft, count = 0.0, 0
        before = len(req.tokens)  # a rebuilt request has some already
        with torch.inference_mode():
            for token in self._tokens(req):
                if count == 0:
                    ttft = time.perf_counter() - start
                count += 1
                text, done = req.take(token)
                if text and on_text:
                    on_text(text)
                if done:
                    break
            text = req.flush()
            if text and on_text:
                on_text(text)
        finish = "length" if req.finish == "length" else "stop"
        return Completion(req.text, finish, len(req.prompt), len(req.tokens) - before,
                          time.perf_counter() - start, ttft)

    def _tokens(self, req: Request) -> Iterator[int]:
        if self.engine is not None:
            return self.engine.add(req)
        return self._alone(req)

    def _alone(self, req: Request) -> Iterator[int]:
        """Batch 1 without an engine thread (`sllmctl run`)."""
        p = req.params
        tokens = stream(self.model, req.context(), p.max_tokens - len(req.tokens),
                        temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                        eos_ids=req.eos, generator=req.generator)
        for token in tokens:
            req.tokens.append(token)
            yield token
            if req.cancelled.is_set():
                break
        if req.tokens and req.tokens[-1] in req.eos:
            req.finish = req.finish or "stop"
        elif len(req.tokens) >= p.max_tokens:
            req.finish = req.finish or "length"
