"""Direct Triton launches (sllmctl.engine.fastpath): the same results as Triton's own launch
path, one compiled kernel per specialisation, and attention without cuDNN's plans."""

from __future__ import annotations

import pytest
import torch

from sllmctl.engine import fastpath


def test_specialisations_are_told_apart() -> None:
    keys = {fastpath._spec(n) for n in (1, 7, 16, 32, 1 << 40)}
    assert len(keys) == 4  # 16 and 32 share one: both divisible by 16, neither is 1
    base = torch.zeros(64, dtype=torch.bfloat16)
    assert fastpath._spec(base) != fastpath._spec(base[1:])  # 2-byte offset: unaligned
    assert fastpath._spec(base) == fastpath._spec(base[8:])
    assert fastpath._spec(base) != fastpath._spec(base.float())
    assert fastpath._spec(True) != fastpath._spec(1)


def test_attention_needs_no_cudnn_plans() -> None:
    from sllmctl.engine import kernels  # noqa: F401  (importing it sets the backend)

    assert not torch.backends.cuda.cudnn_sdp_enabled()


@pytest.mark.gpu
def test_direct_launches_equal_tritons_own() -> None:
    from sllmctl.engine import kernels

    if not kernels.available():
        pytest.skip("the Triton kernels are off")
    launchers = [kernels._add_rmsnorm_kernel, kernels._rope_cache_kernel,
                 kernels._silu_mul_kernel]
    assert all(isinstance(k, fastpath.Launcher) for k in launchers)
    g = torch.Generator(device="cuda").manual_seed(0)

    def run() -> list[torch.Tensor]:
        out = []
        for t in (1, 7, 16):
            x = torch.randn(2, t, 256, device="cuda", generator=g, dtype=torch.bfloat16)
            r = torch.randn(2, t, 256, device="cuda", generator=g, dtype=torch.bfloat16)
            w = torch.randn(256, device="cuda", generator=g, dtype=torch.bfloat16)
            out += [*kernels.add_rmsnorm(x, r, w, 1e-5), kernels.add_rmsnorm(x, None, w, 1e-5)[1]]
            qkv = torch.randn(2, t, (4 + 2 * 2) * 64, device="cuda", generator=g,
                              dtype=torch.bfloat16)
            cos = torch.randn(64, 64, device="cuda", generator=g)
            sin = torch.randn(64, 64, device="cuda", generator=g)
            pos = torch.arange(t, device="cuda").expand(2, t) + 3
            kc = torch.zeros(2, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
            vc = torch.zeros_like(kc)
            out += [kernels.rope_cache(qkv, cos, sin, pos, kc, vc, 4, 2, 64), kc, vc]
            out.append(kernels.silu_mul(torch.randn(2, t, 2 * 1500, device="cuda",
                                                    generator=g, dtype=torch.bfloat16)))
        return out

    run()  # compiles every specialisation
    g.manual_seed(1)
    direct = run()
    assert all(len(k.compiled) >= 2 for k in launchers)
    for k in launchers:
        k.direct = False
    g.manual_seed(1)
    try:
        own = run()
    finally:
        for k in launchers:
            k.direct = True
    assert all(torch.equal(a, b) for a, b in zip(direct, own, strict=True))
