"""One model ready to answer: weights from the store, tokenizer, chat template, and a
streaming generation loop with stop strings. Used by `sllmctl run` (in the CLI process for
now; the daemon's `serve` will host the same object)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sllmctl.engine.batch import BatchEngine
from sllmctl.engine.config import ModelConfig
from sllmctl.engine.model import Transformer
from sllmctl.engine.sampling import stream
from sllmctl.engine.tokenizer import StopChecker, StreamDecoder, Tokenizer

if TYPE_CHECKING:
    from sllmctl.store.gpu.copy import GpuLoad


@dataclass
class Params:
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


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
                 load_seconds: float) -> None:
        self.name, self.model, self.tokenizer = name, model, tokenizer
        self.load_seconds = load_seconds
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
        return cls(name, model, Tokenizer.from_folder(files), load_seconds)

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

    def prompt_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode(prompt, add_special_tokens=False)

    def chat(self, messages: list[dict[str, Any]], params: Params,
             on_text: Callable[[str], None] | None = None) -> Completion:
        """Answer a conversation; `on_text` receives the text as it is generated."""
        return self._generate(self.prompt_ids(messages), params, on_text)

    def complete(self, prompt: str, params: Params,
                 on_text: Callable[[str], None] | None = None) -> Completion:
        """Continue a raw prompt (no chat template)."""
        return self._generate(self.tokenizer.encode(prompt), params, on_text)

    def _generate(self, ids: list[int], params: Params,
                  on_text: Callable[[str], None] | None) -> Completion:
        import torch

        start = time.perf_counter()
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.model.embed_tokens.weight.device)
            generator.manual_seed(params.seed)
        decoder = StreamDecoder(self.tokenizer, prompt_ids=ids)
        stops = StopChecker(params.stop)
        eos = self.tokenizer.eos_ids | set(self.model.config.eos_ids)
        pieces: list[str] = []
        ttft, count, finish = 0.0, 0, "length"

        def emit(text: str) -> None:
            if text:
                pieces.append(text)
                if on_text:
                    on_text(text)

        if self.engine is not None:
            tokens = self.engine.submit(ids, params.max_tokens, temperature=params.temperature,
                                        top_p=params.top_p, top_k=params.top_k, eos=eos,
                                        generator=generator)
        else:
            tokens = stream(self.model, ids, params.max_tokens, temperature=params.temperature,
                            top_p=params.top_p, top_k=params.top_k, eos_ids=eos,
                            generator=generator)
        with torch.inference_mode():
            for token in tokens:
                if count == 0:
                    ttft = time.perf_counter() - start
                count += 1
                if token in eos:
                    finish = "stop"
                    break
                text, stopped = stops.feed(decoder.push(token))
                emit(text)
                if stopped:
                    finish = "stop"
                    break
        if not stops.stopped:  # text held back by the decoder or the stop checker
            text, stopped = stops.feed(decoder.flush())
            emit(text)
            if stopped:
                finish = "stop"
            else:
                emit(stops.flush())
        return Completion("".join(pieces), finish, len(ids), count,
                          time.perf_counter() - start, ttft)
