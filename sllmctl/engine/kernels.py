"""Fused Triton kernels for the small steps between a layer's matrix multiplies, on CUDA.

At batch 1 the weight matrix multiplies of a decode step run at the memory limit; what is
left is hundreds of tiny kernels, a few microseconds each. Three fusions remove most of them:

- `add_rmsnorm`: the residual add and the RMSNorm after it, in one pass (one kernel where
  PyTorch needs an add and a norm);
- `rope_cache`: rotary embedding of q and k straight from the fused q/k/v output, with k and
  v written into the KV cache at their positions (one kernel where PyTorch needs a roll, two
  multiplies and two indexed writes);
- `silu_mul`: the MLP's SiLU(gate) * up (one kernel instead of two).

Each rounds where PyTorch's bf16/fp16 operations round, so results match the plain path to
within float rounding (tests/test_engine_gpu.py). Used only where Triton imports and a GPU is
present; SLLMCTL_TRITON=0 turns them off.
"""

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the plain PyTorch path is used
    triton = None


def available() -> bool:
    return (triton is not None and torch.cuda.is_available()
            and os.environ.get("SLLMCTL_TRITON", "1") != "0")


if triton is not None:
    @triton.jit
    def _add_rmsnorm_kernel(x_ptr, r_ptr, w_ptr, h_ptr, out_ptr,
                            n, eps, HAS_RES: tl.constexpr,
                            BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK)
        mask = cols < n
        x = tl.load(x_ptr + row * n + cols, mask=mask, other=0.0)
        if HAS_RES:
            r = tl.load(r_ptr + row * n + cols, mask=mask, other=0.0)
            x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded, as PyTorch adds
            tl.store(h_ptr + row * n + cols, x, mask=mask)
        x32 = x.to(tl.float32)
        rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / n + eps)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        y = (x32 * rstd).to(x.dtype).to(tl.float32) * w.to(tl.float32)
        tl.store(out_ptr + row * n + cols, y.to(x.dtype), mask=mask)

    @triton.jit
    def _rope_cache_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr,
                           q_ptr, k_ptr, v_ptr, qkv_row, t,
                           heads, kv_heads, cache_b, cache_h,
                           D: tl.constexpr):
        m = tl.program_id(0).to(tl.int64)  # token row, b * t + i
        h = tl.program_id(1)  # q heads, then k heads, then v heads
        d = tl.arange(0, D)
        p = tl.load(pos_ptr + m)
        b = m // t
        src = qkv_ptr + m * qkv_row + h * D
        x = tl.load(src + d)
        if h < heads + kv_heads:
            partner = tl.load(src + (d + D // 2) % D)  # rotate-half is roll(x) * signed sin
            c = tl.load(cos_ptr + p * D + d).to(x.dtype).to(tl.float32)
            s = tl.load(sin_ptr + p * D + d).to(x.dtype).to(tl.float32)
            xc = (x.to(tl.float32) * c).to(x.dtype).to(tl.float32)
            y = (xc + partner.to(tl.float32) * s).to(x.dtype)
            if h < heads:
                tl.store(q_ptr + (m * heads + h) * D + d, y)
            else:
                tl.store(k_ptr + b * cache_b + (h - heads) * cache_h + p * D + d, y)
        else:
            tl.store(v_ptr + b * cache_b + (h - heads - kv_heads) * cache_h + p * D + d, x)

    @triton.jit
    def _silu_mul_kernel(gu_ptr, out_ptr, n, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(gu_ptr + row * 2 * n + cols, mask=mask, other=0.0)
        u = tl.load(gu_ptr + row * 2 * n + n + cols, mask=mask, other=0.0)
        g32 = g.to(tl.float32)
        s = (g32 / (1.0 + tl.exp(-g32))).to(g.dtype).to(tl.float32)
        tl.store(out_ptr + row * n + cols, (s * u.to(tl.float32)).to(g.dtype), mask=mask)


def add_rmsnorm(x: Tensor, residual: Tensor | None, weight: Tensor, eps: float
                ) -> tuple[Tensor, Tensor]:
    """(x + residual, rmsnorm(x + residual) * weight); without a residual, (x, rmsnorm(x))."""
    n = x.shape[-1]
    x2 = x.contiguous().view(-1, n)
    out = torch.empty_like(x2)
    if residual is None:
        h = x2
        r2 = x2
    else:
        r2 = residual.contiguous().view(-1, n)
        h = torch.empty_like(x2)
    block = triton.next_power_of_2(n)
    _add_rmsnorm_kernel[(x2.shape[0],)](x2, r2, weight, h, out, n, eps,
                                        HAS_RES=residual is not None, BLOCK=block,
                                        num_warps=8 if block >= 4096 else 4)
    return h.view(x.shape), out.view(x.shape)


def rope_cache(qkv: Tensor, cos: Tensor, sin: Tensor, pos: Tensor, k_cache: Tensor,
               v_cache: Tensor, heads: int, kv_heads: int, head_dim: int) -> Tensor:
    """From the fused projection output qkv [B, T, (heads + 2 kv_heads) * head_dim]: the
    rotated queries [B, T, heads, head_dim]; rotated keys and the values written into the
    caches [rows, kv_heads, max_len, head_dim] at positions pos [B, T]."""
    b, t, width = qkv.shape
    qkv2 = qkv.contiguous()
    q = torch.empty(b, t, heads, head_dim, dtype=qkv.dtype, device=qkv.device)
    pos2 = pos.reshape(-1).contiguous()
    _rope_cache_kernel[(b * t, heads + 2 * kv_heads)](
        qkv2, cos, sin, pos2, q, k_cache, v_cache, width, t, heads, kv_heads,
        k_cache.stride(0), k_cache.stride(1), D=head_dim, num_warps=1)
    return q


def silu_mul(gate_up: Tensor) -> Tensor:
    """SiLU(gate) * up from the fused projection output [..., 2 * n]."""
    n = gate_up.shape[-1] // 2
    gu = gate_up.contiguous().view(-1, 2 * n)
    out = torch.empty(gu.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = 1024
    _silu_mul_kernel[(gu.shape[0], triton.cdiv(n, block))](gu, out, n, BLOCK=block,
                                                           num_warps=4)
    return out.view(*gate_up.shape[:-1], n)


# Launched without Triton's per-call overhead, and attention without cuDNN's per-shape plans,
# so that neither is paid on a request's path (sllmctl.engine.fastpath says why).
from sllmctl.engine import fastpath  # noqa: E402

fastpath.planless_attention()
if triton is not None:
    _add_rmsnorm_kernel = fastpath.Launcher(_add_rmsnorm_kernel)
    _rope_cache_kernel = fastpath.Launcher(_rope_cache_kernel)
    _silu_mul_kernel = fastpath.Launcher(_silu_mul_kernel)
