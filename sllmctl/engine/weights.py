"""Handing loaded tensors to a model built on the meta device (no copy), and the fused views.

Names are transformers' with or without the leading "model."; a tied head takes the
embedding. Where the loader placed q/k/v (or gate/up) weights back to back, as `sllmctl
convert` does, each group gets one [sum of out, in] view over that memory, so that one matrix
multiply reads them all (Attention.qkv, MLP.gate_up).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from sllmctl.engine.config import ModelConfig
from sllmctl.errors import SllmError


def assign(model: nn.Module, config: ModelConfig, state_dict: Mapping[str, Tensor],
           dtype: torch.dtype | None = None) -> None:
    """Take the tensors as the model's parameters (converted only if `dtype` asks), then
    set up the fused views of each layer."""
    tensors = {
        k.removeprefix("model."): v if dtype is None else v.to(dtype)
        for k, v in state_dict.items()
        if not k.endswith("rotary_emb.inv_freq")
    }
    if config.tie_word_embeddings and "embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["embed_tokens.weight"]
    try:
        missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:  # shape mismatches
        raise SllmError(f"checkpoint does not match its config: {e}".splitlines()[0]) from e
    if missing or unexpected:
        raise SllmError(
            "checkpoint does not match its config: "
            f"missing {_few(missing)}, unexpected {_few(unexpected)}"
        )
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # type: ignore[union-attr]
    for block in model.layers:  # type: ignore[union-attr]
        a, m = block.self_attn, block.mlp
        a.qkv = fused(a.q_proj, a.k_proj, a.v_proj)
        m.gate_up = fused(m.gate_proj, m.up_proj)


def fused(*linears: nn.Linear) -> tuple[Tensor, Tensor | None] | None:
    """One [sum of out, in] view over weights that lie back to back in memory (as the store
    lays them out), with the biases concatenated; None if they do not."""
    ws = [m.weight for m in linears]
    first = ws[0]
    if first.dim() != 2 or first.device.type == "meta":
        return None
    ptr = first.data_ptr()
    for w in ws:
        same = (w.dtype == first.dtype and w.device == first.device and w.is_contiguous()
                and w.dim() == 2 and w.shape[1] == first.shape[1]
                and w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr())
        if not same or w.data_ptr() != ptr:
            return None
        ptr += w.numel() * w.element_size()
    rows = sum(w.shape[0] for w in ws)
    weight = first.as_strided((rows, first.shape[1]), (first.shape[1], 1))
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return weight, None
    if any(b is None for b in biases):
        return None
    return weight, torch.cat([b for b in biases if b is not None])


def _few(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
