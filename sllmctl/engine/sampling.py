"""Choosing the next token from logits, and a simple batch-1 generation loop."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from sllmctl.engine.model import Transformer

Param = float | int | Tensor


def _rows(value: Param, batch: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype).reshape(-1).expand(batch)
    return torch.full((batch,), value, device=device, dtype=dtype)


def sample(
    logits: Tensor,
    temperature: Param = 0.0,
    top_p: Param = 1.0,
    top_k: Param = 0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Next tokens [B] from logits [B, vocab].

    Each parameter is a number or a per-row tensor [B]. temperature 0 is greedy (argmax);
    top_k <= 0 and top_p >= 1 turn those filters off. top_k applies first, then top_p keeps the
    smallest set of most likely tokens whose probability reaches top_p.
    """
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if not isinstance(temperature, Tensor) and temperature <= 0:
        return greedy
    b, vocab = logits.shape
    temp = _rows(temperature, b, logits.device, torch.float32)
    scaled = logits / torch.where(temp > 0, temp, 1.0)[:, None]
    no_k = not isinstance(top_k, Tensor) and top_k <= 0
    no_p = not isinstance(top_p, Tensor) and top_p >= 1
    if not (no_k and no_p):
        k = _rows(top_k, b, logits.device, torch.int64)
        p = _rows(top_p, b, logits.device, torch.float32)
        ordered, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)
        ordered = ordered.masked_fill(rank >= torch.where(k > 0, k, vocab)[:, None], -torch.inf)
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of the more likely tokens
        ordered = ordered.masked_fill(before > p[:, None], -torch.inf)
        scaled = torch.full_like(scaled, -torch.inf).scatter(-1, order, ordered)
    chosen = torch.multinomial(scaled.softmax(dim=-1), 1, generator=generator).squeeze(-1)
    return torch.where(temp > 0, chosen, greedy)


@torch.inference_mode()
def stream(
    model: Transformer,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_ids: Iterable[int] | None = None,
    generator: torch.Generator | None = None,
) -> Iterator[int]:
    """Continue one prompt, yielding each new token id as it is sampled; ends after an eos
    id (which is yielded) or `max_new_tokens`. eos_ids default to the model config's."""
    device = model.embed_tokens.weight.device
    stop = set(model.config.eos_ids if eos_ids is None else eos_ids)
    model.setup_cache(1, len(prompt_ids) + max_new_tokens, device)
    tokens = torch.tensor([list(prompt_ids)], device=device)
    pos = torch.arange(len(prompt_ids), device=device)
    for _ in range(max_new_tokens):
        logits = model(tokens, pos, last_only=True)[:, -1]
        token = sample(logits, temperature, top_p, top_k, generator)
        tid = int(token.item())  # one device sync per step
        yield tid
        if tid in stop:
            return
        tokens, pos = token.view(1, 1), pos[-1:] + 1


def generate(model: Transformer, prompt_ids: Sequence[int], max_new_tokens: int,
             **options: Any) -> list[int]:
    """Continue one prompt; returns the new token ids, ending with the eos id if one came
    (as transformers' generate does). Options as for `stream`."""
    return list(stream(model, prompt_ids, max_new_tokens, **options))
