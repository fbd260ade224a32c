"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in plain PyTorch.

After gpt-fast: built on the `meta` device, then handed the loaded tensors (no second copy);
no I/O, no printing, no compile or CUDA graphs (those are applied from outside). Module names
are transformers' less the leading "model.", so a checkpoint loads without a renaming table.

Every forward writes its keys and values into a `KVCache` at `input_pos` and attends over the
whole cache through an explicit mask, so that prefill and decode share one path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sllmctl.engine.config import ModelConfig
from sllmctl.errors import SllmError


def rope_frequencies(config: ModelConfig) -> tuple[Tensor, float]:
    """Inverse frequencies [head_dim/2] (float32, CPU) and the cos/sin scale, computed exactly
    as transformers' ROPE_INIT_FUNCTIONS do."""
    dim, base, s = config.head_dim, config.rope_theta, config.rope_scaling or {}
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    kind = s.get("rope_type")
    if kind == "linear":
        return inv_freq / s["factor"], 1.0
    if kind == "llama3":
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) * ~(wavelen > old / low)
        return torch.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        return _yarn(s, dim, base)
    return inv_freq, 1.0


def _yarn(s: dict[str, Any], dim: int, base: float) -> tuple[Tensor, float]:
    factor, original = s["factor"], s["original_max_position_embeddings"]

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = s.get("attention_factor")
    if attention is None:
        m, m_all = s.get("mscale"), s.get("mscale_all_dim")
        attention = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)

    def correction(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction(s.get("beta_fast") or 32), correction(s.get("beta_slow") or 1)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolation) + (1 / pos_freqs) * extrapolation
    return inv_freq, float(attention)


class KVCache:
    """Keys and values of every layer, each [batch, kv_heads, max_len, head_dim]."""

    def __init__(
        self, config: ModelConfig, batch: int, max_len: int, device: Any, dtype: torch.dtype
    ) -> None:
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.batch, self.max_len = batch, max_len

    def update(self, layer: int, pos: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v [B, kv_heads, T, head_dim] at positions pos [B, T]; return the layer's
        whole cache for those B rows."""
        rows = torch.arange(k.shape[0], device=pos.device)[:, None]
        self.k[layer][rows, :, pos] = k.transpose(1, 2)
        self.v[layer][rows, :, pos] = v.transpose(1, 2)
        return self.k[layer][: k.shape[0]], self.v[layer][: k.shape[0]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer, self.head_dim = layer, c.head_dim
        self.heads, self.kv_heads = c.heads, c.kv_heads
        self.q_proj = nn.Linear(c.hidden, c.heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden, c.kv_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=c.o_bias)
        self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None
        self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps) if c.qk_norm else None

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pos: Tensor, cache: KVCache
    ) -> Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = rotate(q.transpose(1, 2), cos, sin)
        k = rotate(k.transpose(1, 2), cos, sin)
        k, v = cache.update(self.layer, pos, k, v)
        if self.heads != self.kv_heads:
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=c.mlp_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(c, layer)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, pos: Tensor, cache: KVCache
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, pos, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab, config.hidden)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.layers))
        self.norm = RMSNorm(config.hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden, config.vocab, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.windows = [
            config.sliding_window if i in config.sliding_layers else None
            for i in range(config.layers)
        ]
        self.cache: KVCache | None = None
        self.rope: tuple[Tensor, Tensor] | None = None  # cos, sin [max_len, head_dim] float32

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None
    ) -> Transformer:
        """Build on the meta device and take the given tensors as the parameters (no copy,
        unless `dtype` asks for a conversion). Names are transformers'."""
        with torch.device("meta"):
            model = cls(config)
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
            model.lm_head.weight = model.embed_tokens.weight
        return model.eval().requires_grad_(False)

    def setup_cache(
        self, batch: int, max_len: int, device: Any = None, dtype: torch.dtype | None = None
    ) -> KVCache:
        """Allocate a KV cache of `max_len` positions (and the rope tables for them)."""
        weight = self.embed_tokens.weight
        device = weight.device if device is None else torch.device(device)
        self.cache = KVCache(self.config, batch, max_len, device, dtype or weight.dtype)
        inv_freq, scale = rope_frequencies(self.config)
        t = torch.arange(max_len, device=device, dtype=torch.float32)
        freqs = t[:, None] * inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.rope = (emb.cos() * scale, emb.sin() * scale)
        return self.cache

    def forward(self, tokens: Tensor, input_pos: Tensor, last_only: bool = False) -> Tensor:
        """tokens [B, T] at positions input_pos [T] or [B, T] -> float32 logits [B, T, vocab]
        ([B, 1, vocab] with `last_only`). Writes the KV cache at input_pos."""
        if self.cache is None or self.rope is None:
            raise RuntimeError("call setup_cache() before forward()")
        b, t = tokens.shape
        pos = input_pos.expand(b, t) if input_pos.dim() == 1 else input_pos
        x = self.embed_tokens(tokens)
        cos, sin = (r[pos].unsqueeze(1).to(x.dtype) for r in self.rope)  # [B, 1, T, head_dim]
        kpos = torch.arange(self.cache.max_len, device=pos.device)
        causal = kpos <= pos[..., None]  # [B, T, max_len]: True where attending
        masks: dict[int | None, Tensor] = {None: causal.unsqueeze(1)}
        for block, window in zip(self.layers, self.windows, strict=True):
            if window is not None and window not in masks:
                masks[window] = (causal & (kpos > pos[..., None] - window)).unsqueeze(1)
            x = block(x, cos, sin, masks[window], pos, self.cache)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x)).float()


def _few(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
