"""A Llama-family decoder (Llama, Mistral, Qwen2, Qwen3) in plain PyTorch.

After gpt-fast: built on the `meta` device, then handed the loaded tensors (no second copy);
no I/O, no printing, no compile or CUDA graphs (those are applied from outside: graphs.py).
Module names are transformers' less the leading "model.", so a checkpoint loads without a
renaming table.

Every forward writes its keys and values into a `KVCache` at `input_pos` and attends over the
first `kv_len` positions of the cache through an explicit mask, so that prefill and decode share
one path and a short context does not pay for the whole cache. Grouped-query attention folds
the query heads of each key/value head into the query length, so the cache is never repeated.
Loaded tensors, and the fused q/k/v and gate/up views over them, are assigned by weights.py.

`gate`, when set, is called with the index of each layer before it runs (-1 before the
embedding, `layers` before the head): the layer-pipelined cold start uses it to wait for the
weights of that layer and no later ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sllmctl.engine import kernels, weights
from sllmctl.engine.config import ModelConfig
from sllmctl.engine.rope import rope_frequencies


class KVCache:
    """Keys and values of every layer, each [batch, kv_heads, max_len, head_dim]."""

    def __init__(
        self, config: ModelConfig, batch: int, max_len: int, device: Any, dtype: torch.dtype
    ) -> None:
        shape = (batch, config.kv_heads, max_len, config.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.layers)]
        self.batch, self.max_len = batch, max_len

    def update(self, layer: int, rows: Tensor, pos: Tensor, k: Tensor, v: Tensor,
               kv_len: int) -> tuple[Tensor, Tensor]:
        """Write k, v [B, T, kv_heads, head_dim] at positions pos [B, T] of rows [B, 1];
        return the layer's cache for those B rows, its first kv_len positions."""
        self.k[layer][rows, :, pos] = k
        self.v[layer][rows, :, pos] = v
        b = k.shape[0]
        return self.k[layer][:b, :, :kv_len], self.v[layer][:b, :, :kv_len]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.is_cuda:  # one fused kernel (float32 inside) instead of seven
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary embedding of x [..., head_dim] in the rotate-half convention. `sin` has its
    first half negated (see Transformer.setup_cache), so that rotate_half(x) * sin is
    roll(x) * sin: three kernels."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


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
        self.sizes = [c.heads * c.head_dim, c.kv_heads * c.head_dim, c.kv_heads * c.head_dim]
        self.qkv: tuple[Tensor, Tensor | None] | None = None  # fused weight view, bias

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, rows: Tensor, pos: Tensor,
        cache: KVCache, kv_len: int,
    ) -> Tensor:
        b, t, _ = x.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        if self.qkv is not None and self.q_norm is None:
            # q and k rotated together: [B, T, heads + kv_heads, dim] is a view of the output
            out = F.linear(x, *self.qkv)
            qk = rotate(out[..., : (heads + kv_heads) * dim].view(b, t, heads + kv_heads, dim),
                        cos, sin)
            q, k = qk[:, :, :heads], qk[:, :, heads:]
            v = out[..., (heads + kv_heads) * dim:].view(b, t, kv_heads, dim)
        else:
            if self.qkv is not None:
                q, k, v = F.linear(x, *self.qkv).split(self.sizes, dim=-1)
            else:
                q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
            q = q.view(b, t, heads, dim)
            k = k.view(b, t, kv_heads, dim)
            v = v.view(b, t, kv_heads, dim)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        k, v = cache.update(self.layer, rows, pos, k, v, kv_len)
        # [B, T, heads, dim] -> [B, kv_heads, group * T, dim]: each key/value head attends for
        # its group of query heads at once (the mask is repeated to match)
        q = q.transpose(1, 2).reshape(b, kv_heads, heads // kv_heads * t, dim)
        return self._attend(q, k, v, mask)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
        b, heads, dim = q.shape[0], self.heads, self.head_dim
        t = q.shape[2] * self.kv_heads // heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.reshape(b, heads, t, dim).transpose(1, 2).reshape(b, t, heads * dim)
        return self.o_proj(y)

    def fused_forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor,
                      pos: Tensor, cache: KVCache, kv_len: int) -> Tensor:
        """The same, through the Triton kernels (no q/k norm)."""
        b, t, _ = x.shape
        heads, kv_heads, dim = self.heads, self.kv_heads, self.head_dim
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        if self.qkv is not None:
            qkv = F.linear(x, *self.qkv)
        else:  # weights not back to back (e.g. split between two data files)
            qkv = torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], dim=-1)
        q = kernels.rope_cache(qkv, rope[0], rope[1], pos, kc, vc, heads, kv_heads, dim)
        q = q.transpose(1, 2).reshape(b, kv_heads, heads // kv_heads * t, dim)
        return self._attend(q, kc[:b, :, :kv_len], vc[:b, :, :kv_len], mask)


class MLP(nn.Module):
    def __init__(self, c: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.intermediate, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden, c.intermediate, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate, c.hidden, bias=c.mlp_bias)
        self.gate_up: tuple[Tensor, Tensor | None] | None = None  # fused weight view, bias

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None:
            gate, up = F.linear(x, *self.gate_up).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)

    def fused_forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None:
            gate_up = F.linear(x, *self.gate_up)
        else:
            gate_up = torch.cat([self.gate_proj(x), self.up_proj(x)], dim=-1)
        return self.down_proj(kernels.silu_mul(gate_up))


class Block(nn.Module):
    def __init__(self, c: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(c, layer)
        self.mlp = MLP(c)
        self.input_layernorm = RMSNorm(c.hidden, c.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor, rows: Tensor, pos: Tensor,
        cache: KVCache, kv_len: int,
    ) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, rows, pos, cache,
                               kv_len)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # on the meta device when built there; there normal_ would import torch._dynamo (1.5 s
        # of every `sllmctl run` on a 2-core CPU machine, more on the GPU machine), so skip it
        weight = torch.empty(config.vocab, config.hidden)
        if weight.device.type != "meta":
            nn.init.normal_(weight)
        self.embed_tokens = nn.Embedding(config.vocab, config.hidden, _weight=weight)
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
        # cos, sin [max_len, head_dim] float32; sin's first half negated (see rotate)
        self.rope: tuple[Tensor, Tensor] | None = None
        self.gate: Callable[[int], None] | None = None
        self.fused = False  # the Triton kernels apply (set by from_state_dict)

    @classmethod
    def from_state_dict(
        cls, config: ModelConfig, state_dict: Mapping[str, Tensor], dtype: torch.dtype | None = None
    ) -> Transformer:
        """Built on the meta device, on the given tensors (no copy unless `dtype` asks)."""
        with torch.device("meta"):
            model = cls(config)
        weights.assign(model, config, state_dict, dtype)
        model.fused = (kernels.available() and not config.qk_norm
                       and config.head_dim & (config.head_dim - 1) == 0)
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
        sin = emb.sin() * scale
        sin[:, : self.config.head_dim // 2] *= -1  # the sign of rotate_half, folded in
        self.rope = (emb.cos() * scale, sin)
        return self.cache

    def forward(self, tokens: Tensor, input_pos: Tensor, last_only: bool = False,
                kv_len: int | None = None) -> Tensor:
        """tokens [B, T] at positions input_pos [T] or [B, T] -> float32 logits [B, T, vocab]
        ([B, 1, vocab] with `last_only`). Writes the KV cache at input_pos and attends over its
        first `kv_len` positions (default: all), which must cover every position in input_pos.
        """
        if self.cache is None or self.rope is None:
            raise RuntimeError("call setup_cache() before forward()")
        b, t = tokens.shape
        kv_len = self.cache.max_len if kv_len is None else min(kv_len, self.cache.max_len)
        pos = input_pos.expand(b, t) if input_pos.dim() == 1 else input_pos
        gate = self.gate
        if gate is not None:
            gate(-1)
        x = self.embed_tokens(tokens)
        cos, sin = (r[pos].unsqueeze(2).to(x.dtype) for r in self.rope)  # [B, T, 1, head_dim]
        rows = torch.arange(b, device=pos.device)[:, None]
        kpos = torch.arange(kv_len, device=pos.device)
        causal = kpos <= pos[..., None]  # [B, T, kv_len]: True where attending
        masks: dict[int | None, Tensor] = {None: self._fold(causal, x.dtype)}
        if self.fused and x.is_cuda:
            return self._fused_layers(x, masks, causal, kpos, pos, kv_len, last_only)
        for i, (block, window) in enumerate(zip(self.layers, self.windows, strict=True)):
            if window is not None and window not in masks:
                masks[window] = self._fold(causal & (kpos > pos[..., None] - window), x.dtype)
            if gate is not None:
                gate(i)
            x = block(x, cos, sin, masks[window], rows, pos, self.cache, kv_len)
        if last_only:
            x = x[:, -1:]
        if gate is not None:
            gate(len(self.layers))
        return self.lm_head(self.norm(x)).float()

    def _fold(self, attend: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, T, L] True where attending -> additive mask [B, 1, group * T, L] (see
        Attention: each key/value head's query heads are folded into the query length)."""
        group = self.config.heads // self.config.kv_heads
        add = torch.zeros(attend.shape, dtype=dtype, device=attend.device)
        return add.masked_fill_(~attend, -torch.inf).unsqueeze(1).repeat(1, 1, group, 1)

    def _fused_layers(self, x: Tensor, masks: dict[int | None, Tensor], causal: Tensor,
                      kpos: Tensor, pos: Tensor, kv_len: int, last_only: bool) -> Tensor:
        """forward's layers and head through the Triton kernels: each residual add is fused
        into the norm that follows it."""
        assert self.cache is not None and self.rope is not None
        gate = self.gate
        residual: Tensor | None = None
        for i, (block, window) in enumerate(zip(self.layers, self.windows, strict=True)):
            assert isinstance(block, Block)
            if window is not None and window not in masks:
                masks[window] = self._fold(causal & (kpos > pos[..., None] - window), x.dtype)
            if gate is not None:
                gate(i)
            eps = block.input_layernorm.eps
            residual, h = kernels.add_rmsnorm(x, residual, block.input_layernorm.weight, eps)
            a = block.self_attn.fused_forward(h, self.rope, masks[window], pos, self.cache,
                                              kv_len)
            residual, h = kernels.add_rmsnorm(a, residual,
                                              block.post_attention_layernorm.weight, eps)
            x = block.mlp.fused_forward(h)
        assert residual is not None
        if last_only:
            x, residual = x[:, -1:], residual[:, -1:]
        if gate is not None:
            gate(len(self.layers))
        _, h = kernels.add_rmsnorm(x, residual, self.norm.weight, self.norm.eps)
        return self.lm_head(h).float()
