"""kernels/triton/matmul.py's deterministic split-K: the weight gradients of the S × S token linears (ResMLP,
gMLP's gate) have 4 output tiles over K = B·C; they are split over K into fp32 partial products summed in a
fixed order (no atomics). The choice of split, and the split path against float64, in Triton's interpreter."""
from __future__ import annotations

import pytest


def test_split_choice(monkeypatch):
    from mixer_fast.kernels.triton import _launch, matmul

    monkeypatch.setattr(_launch, "INTERPRET", False)
    # ResMLP-24 token-linear weight gradient at batch 256: 4 tiles, K = 256 · 384
    assert matmul.split_k(196, 196, 256 * 384) == 66
    # gMLP-S/16's gate weight gradient, K = 256 · 768
    assert matmul.split_k(196, 196, 256 * 768) == 66
    # Mixer-B/16's channel dW1 (3072 × 768 = 144 tiles) fills the GPU: no split, no extra pass
    assert matmul.split_k(3072, 768, 256 * 196) == 1
    # short K: ranges of at least SPLIT_K_MIN_LEN
    assert matmul.split_k(196, 196, 2048) == 2048 // matmul.SPLIT_K_MIN_LEN
    assert matmul.split_k(196, 196, 300) == 1
    monkeypatch.setattr(_launch, "INTERPRET", True)
    assert matmul.split_k(16, 16, 65) == 2 and matmul.split_k(16, 16, 64) == 1


def test_split_plan_only_without_epilogue(monkeypatch):
    from mixer_fast.kernels.triton import _launch, matmul
    from mixer_fast.kernels.triton.matmul import flat

    monkeypatch.setattr(_launch, "INTERPRET", False)
    axes = (flat(196, 196), flat(196, 1))
    common = dict(a_pro=0, b_pro=0, has_bias=False, bias_on_m=False, epi_gelu=False, epi_gelu_grad=False,
                  store_branch=False, has_scale=False, has_ss=False, ss_on_n=False, has_res=False,
                  approximate="none", precision="ieee", idx64=False, out_numel=196 * 196)
    p = matmul.plan(196, 196, 98304, axes, axes, axes, None, None, allow_split=True, **common)
    assert p.split_k == 64 and p.grid({"BLOCK_M": 128, "BLOCK_N": 128}) == (4, 64)
    k_len, o_split = p.scalars[-2:]
    assert k_len % matmul.SPLIT_K_GRANULE == 0 and (p.split_k - 1) * k_len < 98304 <= p.split_k * k_len
    assert o_split == 196 * 196
    assert matmul.plan(196, 196, 98304, axes, axes, axes, None, None, allow_split=False, **common).split_k == 1
    with_bias = dict(common, has_bias=True)
    assert matmul.plan(196, 196, 98304, axes, axes, axes, None, None, allow_split=True, **with_bias).split_k == 1


@pytest.mark.parametrize("K", [65, 200, 1000])
def test_split_k_matches_float64_and_is_deterministic(triton_backend, K):
    import torch

    from mixer_fast.kernels.triton import matmul
    from mixer_fast.kernels.triton.matmul import flat

    g = torch.Generator().manual_seed(K)
    M, N = 40, 24
    a = torch.randn(M, K, generator=g).to(torch.bfloat16)
    b = torch.randn(K, N, generator=g).to(torch.bfloat16)
    assert matmul.split_k(M, N, K) == 2  # the interpreter's split: the path under test

    def run():
        out = torch.full((M, N), float("nan"))
        return matmul.fused_matmul(a, (flat(M, K), flat(K, 1)), b, (flat(K, N), flat(N, 1)), out,
                                   (flat(M, N), flat(N, 1)), M, N, K, variant="plain")

    out = run()
    ref = a.double() @ b.double()
    assert (out.double() - ref).abs().max() <= 1e-4 * max(1.0, ref.abs().max().item())
    assert torch.equal(out, run())
