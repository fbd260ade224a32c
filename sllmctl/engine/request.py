"""One request's whole state, in one object that can be written out and rebuilt elsewhere.

A `Request` holds what was asked (prompt ids, sampling parameters, eos ids), how far it has
got (the tokens sampled so far, the text emitted, its random generator) and its text-side
machinery (the streaming decoder and the stop checker). Two threads share it, each writing its
own fields: the engine thread appends tokens and ends the request on eos, its token limit or a
full context (`record`); the thread that reads `stream()` turns tokens into text (`take`).

`to_dict()` is plain JSON (the generator's state as hex) and `Request.from_dict` rebuilds the
request, on this host or another, once its stream has been drained: an engine then prefills
the prompt and the tokens so far and carries on where it left off, with the same greedy tokens.
"""

from __future__ import annotations

import queue
import secrets
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from sllmctl.engine.tokenizer import StopChecker, StreamDecoder
from sllmctl.errors import SllmError

if TYPE_CHECKING:
    from sllmctl.engine.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0  # 0 is greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 is off
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class ContextTooLong(SllmError):
    """A prompt (with the tokens already generated) that leaves no room in the engine."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"the prompt has {tokens} tokens; this model holds {limit} per "
                         f"request (prompt and answer together)",
                         hint="shorten the prompt")
        self.tokens, self.limit = tokens, limit


class Request:
    def __init__(self, prompt: Iterable[int], params: SamplingParams | None = None, *,
                 eos: Iterable[int] = (), tokenizer: Tokenizer | None = None,
                 generator: torch.Generator | None = None, device: Any = "cpu",
                 id: str | None = None) -> None:
        self.id = id or "req-" + secrets.token_hex(8)
        self.prompt = list(prompt)
        self.params = params or SamplingParams()
        self.eos = set(eos)
        self.tokens: list[int] = []  # sampled so far (eos included), by the engine thread
        self.pieces: list[str] = []  # text emitted so far, by the reading thread
        self.finish: str | None = None  # stop (eos or stop string), length or abort
        if generator is None and self.params.seed is not None:
            generator = torch.Generator(device=device).manual_seed(self.params.seed)
        self.generator = generator
        self.decoder = None if tokenizer is None else StreamDecoder(tokenizer, self.prompt)
        self.stops = StopChecker(self.params.stop)
        self.cancelled = threading.Event()
        self.out: queue.Queue[int | BaseException | None] = queue.Queue()  # None: the end

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    def context(self) -> list[int]:
        """What a prefill runs: the prompt and every token sampled so far."""
        return self.prompt + self.tokens

    def cancel(self) -> None:
        """Ask the engine to let the request go (at its next step)."""
        self.cancelled.set()

    # ------------------------------------------------------------ the engine thread
    def record(self, token: int, max_len: int) -> bool:
        """Append a sampled token; True when the request is done (eos, limit, full context)."""
        self.tokens.append(token)
        self.out.put(token)
        if token in self.eos:
            self.end("stop")
        elif len(self.tokens) >= self.params.max_tokens or len(self.context()) >= max_len:
            self.end("length")
        return self.finish is not None

    def end(self, reason: str, error: BaseException | None = None) -> None:
        if self.finish is None:
            self.finish = reason
        if error is not None:
            self.out.put(error)
        self.out.put(None)

    # ------------------------------------------------------------ the reading thread
    def stream(self) -> Iterator[int]:
        """The sampled token ids as they come (eos included); a reader that stops early
        cancels the request."""
        try:
            while True:
                item = self.out.get()
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    return
                yield item
        finally:
            self.cancel()

    def take(self, token: int) -> tuple[str, bool]:
        """The text a token adds (held back while it may begin a stop string), and whether
        the request ends here (an eos id, or a stop string: the engine is told to stop)."""
        if token in self.eos or self.decoder is None:
            return "", token in self.eos
        text, stopped = self.stops.feed(self.decoder.push(token))
        self._emit(text)
        if stopped:
            self.finish = "stop"
            self.cancel()
        return text, stopped

    def flush(self) -> str:
        """The text still held back at the end (by the decoder or the stop checker)."""
        if self.decoder is None or self.stops.stopped:
            return ""
        text, stopped = self.stops.feed(self.decoder.flush())
        if stopped:
            self.finish = "stop"
        else:
            text += self.stops.flush()
        self._emit(text)
        return text

    def _emit(self, text: str) -> None:
        if text:
            self.pieces.append(text)

    # ------------------------------------------------------------ moving elsewhere
    def to_dict(self) -> dict[str, Any]:
        g = self.generator
        rng = None if g is None else {"device": g.device.type,
                                      "state": bytes(g.get_state().tolist()).hex()}
        return {"id": self.id, "prompt": list(self.prompt), "params": asdict(self.params),
                "eos": sorted(self.eos), "tokens": list(self.tokens), "pieces": list(self.pieces),
                "finish": self.finish, "rng": rng,
                "decoder": None if self.decoder is None else self.decoder.to_dict(),
                "stops": self.stops.to_dict()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], tokenizer: Tokenizer | None = None,
                  device: Any = None) -> Request:
        """Rebuild a request from `to_dict()`; its random generator is remade on `device`
        (default: the device type it was on), which must be of the same type."""
        generator = None
        if d["rng"] is not None:
            target = torch.device(device or d["rng"]["device"])
            if target.type != d["rng"]["device"]:
                raise SllmError(f"a {d['rng']['device']} random generator cannot continue on "
                                f"{target.type}")
            generator = torch.Generator(device=target)
            state = bytes.fromhex(d["rng"]["state"])
            generator.set_state(torch.tensor(list(state), dtype=torch.uint8))
        req = cls(d["prompt"], SamplingParams(**d["params"]), eos=d["eos"],
                  generator=generator, id=d["id"])
        req.tokens, req.pieces = list(d["tokens"]), list(d["pieces"])
        # a request stopped to be moved (cancelled: "abort") carries on where it was
        req.finish = None if d["finish"] == "abort" else d["finish"]
        if tokenizer is not None and d["decoder"] is not None:
            req.decoder = StreamDecoder.from_dict(tokenizer, d["decoder"])
        req.stops = StopChecker.from_dict(d["stops"])
        return req
