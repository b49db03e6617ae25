"""The residual branch's backward (kernels/triton/residual.py) and ResMLP's affine backward
(layer_norm.affine_backward), each one pass, against the same sums in float64."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE

SHAPES = [(2, 196, 64), (3, 49, 100), (1, 7, 130), (5, 61, 24)]  # R and C across, below and off the tiles
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _rand(*shape, dtype=torch.float32, g=None):
    return torch.randn(*shape, generator=g).to(dtype).to(DEVICE)


def _rounded_once(got, want, dtype):
    # The kernels compute in fp32 and round once into dtype: within one ulp of dtype of the float64
    # value (fp32's own roundings can tip a 16-bit rounding, and a GPU may fuse into an FMA).
    ulp = torch.finfo(dtype).eps
    torch.testing.assert_close(got.double().cpu(), want.to(dtype).double().cpu(), rtol=ulp,
                               atol=4 * torch.finfo(torch.float32).eps * want.abs().max().item())


def _close(got, want, dtype, what):
    # fp32 sums over up to ~1 000 terms of products of rounded inputs; the float64 reference uses the same
    # rounded inputs, so only the fp32 accumulation differs.
    tol = 2e-5 * want.abs().max().clamp_min(1.0)
    err = (got.double().cpu() - want.double().cpu()).abs().max()
    assert err <= tol, f"{what} ({dtype}): max error {err:.3g} > {tol:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("bias", [None, "per_channel", "per_token"])
@pytest.mark.parametrize("factors", ["none", "scale", "scale_ss", "ss"])
def test_residual_grad_against_float64(triton_backend, dtype, shape, bias, factors):
    from mixer_fast.kernels.triton.residual import residual_grad

    B, S, C = shape
    g = torch.Generator().manual_seed(hash((shape, bias, factors)) % 2**31)
    dout = _rand(B, S, C, dtype=dtype, g=g)
    scale = _rand(C, dtype=dtype, g=g) if "scale" in factors else None
    ss = (torch.rand(B, generator=g) > 0.3).to(dtype).to(DEVICE) * 2.0 if "ss" in factors else None
    branch = _rand(B, S, C, dtype=dtype, g=g) if scale is not None else None
    wdt = torch.bfloat16 if dtype == torch.float32 and factors == "none" else dtype  # autocast: dO cast
    res = residual_grad(dout, scale=scale, sample_scale=ss, branch=branch, dtype=wdt, bias=bias)

    d = dout.double()
    if ss is not None:
        d = d * ss.double()[:, None, None]
    do = d * (scale.double() if scale is not None else 1.0)
    assert res.do.dtype == wdt and res.do.shape == (B, S, C)
    if scale is None and ss is None and wdt == dtype:
        assert res.do is dout  # nothing to scale: no copy
    _rounded_once(res.do, do, wdt)
    if branch is not None:
        _close(res.scale, (d * branch.double()).sum((0, 1)), dtype, "scale")
    else:
        assert res.scale is None
    if bias == "per_channel":
        assert res.bias.shape == (C,)
        _close(res.bias, do.sum((0, 1)), dtype, "bias per channel")
    elif bias == "per_token":
        assert res.bias.shape == (S,)
        _close(res.bias, do.sum((0, 2)), dtype, "bias per token")
    else:
        assert res.bias is None


def test_residual_grad_strided_dout_and_branch(triton_backend):
    from mixer_fast.kernels.triton.residual import residual_grad

    g = torch.Generator().manual_seed(1)
    B, S, C = 3, 20, 36
    dout = _rand(B, C, S, g=g).transpose(1, 2)  # (B, S, C) with channel stride S
    branch = _rand(S, B, C, g=g).transpose(0, 1)
    scale, ss = _rand(C, g=g), _rand(B, g=g)
    res = residual_grad(dout, scale=scale, sample_scale=ss, branch=branch, dtype=torch.float32, bias="per_token")
    d = dout.double() * ss.double()[:, None, None]
    torch.testing.assert_close(res.do, (d * scale.double()).float(), rtol=1e-6, atol=1e-6)
    _close(res.scale, (d * branch.double()).sum((0, 1)), torch.float32, "scale")
    _close(res.bias, (d * scale.double()).sum((0, 2)), torch.float32, "bias per token")


def test_residual_grad_empty_and_bad_arguments(triton_backend):
    from mixer_fast.kernels.triton.residual import residual_grad

    dout = torch.zeros(0, 5, 8, device=DEVICE)
    res = residual_grad(dout, scale=torch.ones(8, device=DEVICE), sample_scale=None, branch=torch.zeros_like(dout),
                        dtype=torch.float32, bias="per_token")
    assert res.do.shape == (0, 5, 8) and torch.equal(res.scale, torch.zeros(8, device=DEVICE))
    assert torch.equal(res.bias, torch.zeros(5, device=DEVICE))
    with pytest.raises(ValueError, match="bias: expected one of"):
        residual_grad(dout, scale=None, sample_scale=None, branch=None, dtype=torch.float32, bias="tokens")
    with pytest.raises(ValueError, match="branch: scale's gradient needs scale"):
        residual_grad(dout, scale=None, sample_scale=None, branch=dout, dtype=torch.float32, bias=None)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("has_weight", [True, False], ids=["weight", "no_weight"])
def test_affine_backward_against_float64(triton_backend, dtype, shape, has_weight):
    from mixer_fast.kernels.triton.layer_norm import affine_backward

    B, S, C = shape
    gen = torch.Generator().manual_seed(2)
    x = _rand(B, S, C, dtype=dtype, g=gen)
    dy = _rand(B, S, C, dtype=dtype, g=gen)
    g = _rand(B * S, C, dtype=dtype, g=gen)
    w = _rand(C, dtype=dtype, g=gen) if has_weight else None
    dx, dw, db = affine_backward(g, x, dy, w)
    g3 = g.double().view(B, S, C)
    want = dy.double() + g3 * (w.double() if w is not None else 1.0)
    assert dx.dtype == dtype and dx.shape == (B, S, C)
    _rounded_once(dx, want, dtype)
    _close(dw, (g3 * x.double()).sum((0, 1)), dtype, "weight")
    _close(db, g3.sum((0, 1)), dtype, "bias")


def test_affine_backward_strided_x_and_empty(triton_backend):
    from mixer_fast.kernels.triton.layer_norm import affine_backward

    gen = torch.Generator().manual_seed(3)
    B, S, C = 2, 9, 140
    x = _rand(B, C, S, g=gen).transpose(1, 2)
    dy = _rand(S, B, C, g=gen).transpose(0, 1)
    g = _rand(B * S, C, g=gen)
    dx, dw, db = affine_backward(g, x, dy, None)
    _rounded_once(dx, dy.double() + g.double().view(B, S, C), torch.float32)
    _close(dw, (g.double().view(B, S, C) * x.double()).sum((0, 1)), torch.float32, "weight")
    x0 = torch.zeros(0, S, C, device=DEVICE)
    dx, dw, db = affine_backward(torch.zeros(0, C, device=DEVICE), x0, x0, torch.ones(C, device=DEVICE))
    assert dx.shape == (0, S, C) and torch.equal(dw, torch.zeros(C, device=DEVICE)) and torch.equal(db, dw)


def test_resmlp_block_trains_with_frozen_layer_scales(triton_backend):
    # Freezing the layer scales (fine-tuning) leaves the forward without a stored branch: the backward
    # crashed on it (``mul(dout, None)``) before the residual gradient got its own kernel.
    import mixer_fast

    grads = {}
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        block = mixer_fast.ResMLPBlock(32, 20, backend=backend).to(DEVICE)
        block.ls1.requires_grad_(False)
        block.ls2.requires_grad_(False)
        x = torch.randn(2, 20, 32, device=DEVICE, requires_grad=True)
        block(x).square().sum().backward()
        grads[backend] = [x.grad] + [p.grad for p in block.parameters() if p.requires_grad]
        assert block.ls1.grad is None and block.ls2.grad is None
    for got, want in zip(grads["triton"], grads["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
