"""Tensors of more than 2³¹ elements (B·S·C > 2³¹): every element is addressed correctly, on the cpu
backend (4.3 GB bfloat16 tensors in host memory) and, marked gpu, on the triton backend (where launches
switch to 64-bit offsets past 2³¹).

Images differ (x[b] = base · factor[b % 5]), so an image read or written at a wrapped 32-bit offset gives
another image's result; images at the start, around the 2³¹ boundary and at the end are checked against
the op on those images alone.
"""
from __future__ import annotations

import gc

import pytest
import torch

from conftest import use_backend
from mixer_fast import ops
from tolerances import max_err

S, C, HIDDEN = 64, 1024, {"token_mixing": 8, "channel_mixing": 8}
B = 2**31 // (S * C) + 3  # just past 2³¹ elements
FACTORS = torch.tensor([1.0, -0.5, 2.0, 0.25, -1.5])


def _params(op: str, device: str, dtype: torch.dtype):
    g = torch.Generator().manual_seed(1)
    n, d = (S if op == "token_mixing" else C), HIDDEN[op]
    r = lambda *s, std=0.3: (std * torch.randn(*s, generator=g)).to(device=device, dtype=dtype)  # noqa: E731
    return [1 + r(C), r(C), r(d, n, std=n ** -0.5), r(d), r(n, d, std=d ** -0.5), r(n)]


def _checked_images():
    edge = 2**31 // (S * C)  # the image holding element 2³¹
    return sorted({0, 1, 4, edge - 1, edge, edge + 1, B - 5, B - 1})


def _images(device: str, dtype: torch.dtype):
    """x (B, S, C) with x[b] = tiles[b % 5], written by copies (one pass over 4.3 GB), and the tiles."""
    base = torch.randn(S, C, generator=torch.Generator().manual_seed(0))
    tiles = (base * FACTORS[:, None, None]).to(device=device, dtype=dtype)
    x = torch.empty(B, S, C, device=device, dtype=dtype)
    n = B // len(FACTORS) * len(FACTORS)
    x[:n].view(-1, len(FACTORS), S, C).copy_(tiles.expand(n // len(FACTORS), -1, -1, -1))
    x[n:] = tiles[:B - n]
    return x, tiles


def _run(op: str, backend: str, device: str, dtype: torch.dtype) -> None:
    assert B * S * C > 2**31
    x, tiles = _images(device, dtype)
    params = _params(op, device, dtype)
    with torch.no_grad():
        out = getattr(ops, op)(x, *params, backend=backend)
        images = _checked_images()
        got = out[images]
        del out, x
        gc.collect()
        x_small = tiles[[b % len(FACTORS) for b in images]]
        alone = getattr(ops, op)(x_small, *params, backend=backend)
        want = getattr(ops, op)(x_small.float(), *(p.float() for p in params), backend="reference")
    # The same images alone: bitwise on the cpu backend (no sum depends on the batch), within bf16
    # rounding of the fp32 reference on both.
    if backend == "cpu":
        assert torch.equal(got, alone), max_err(got, alone)
    assert max_err(got.float(), want) <= 0.05 * max(1.0, float(want.abs().max()))


@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_cpu_backend_past_2_31_elements(request, op):
    _run(op, use_backend(request, "cpu"), "cpu", torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["fused", "cublas"])
@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_triton_past_2_31_elements_forward_and_backward(request, monkeypatch, op, engine):
    # both engines (MIXER_FAST_GEMM / MIXER_FAST_TOKEN): the cuBLAS one's passes grid over B·C too
    monkeypatch.setenv("MIXER_FAST_GEMM", engine)
    monkeypatch.setenv("MIXER_FAST_TOKEN", "flash" if engine == "fused" else engine)
    use_backend(request, "triton")
    _run(op, "triton", "cuda", torch.bfloat16)
    # Backward: the gradient of x at the last image (past 2³¹) against that image alone.
    params = [p.requires_grad_() for p in _params(op, "cuda", torch.bfloat16)]
    x, tiles = _images("cuda", torch.bfloat16)
    x.requires_grad_()
    out = getattr(ops, op)(x, *params, backend="triton")
    dout = torch.zeros_like(out)
    dout[-1] = 1.0
    out.backward(dout)
    gx_last = x.grad[-1].float()
    del out, dout, x
    torch.cuda.empty_cache()
    x1 = tiles[(B - 1) % len(FACTORS)].float()[None].requires_grad_()
    getattr(ops, op)(x1, *(p.detach().float() for p in params), backend="reference").sum().backward()
    assert max_err(gx_last, x1.grad[0]) <= 0.05 * max(1.0, float(x1.grad.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("engine", ["flash", "cublas"])
def test_triton_token_mixing_past_65535_images(request, monkeypatch, engine):
    # CUDA caps grid axes 1 and 2 at 65 535: a launch with the batch there fails on a GPU only (the
    # interpreter has no limit). 65 537 small images (9 MB in bf16), forward and backward, the first and
    # last images against the same images alone.
    monkeypatch.setenv("MIXER_FAST_TOKEN", engine)
    use_backend(request, "triton")
    n_images, s, c = 65_537, 16, 32
    g = torch.Generator().manual_seed(2)
    r = lambda *shape, std=0.3: (std * torch.randn(*shape, generator=g)).to("cuda", torch.bfloat16)  # noqa: E731
    params = [(1 + r(c)).requires_grad_(), r(c).requires_grad_(), r(8, s, std=s ** -0.5).requires_grad_(),
              r(8).requires_grad_(), r(s, 8, std=8 ** -0.5).requires_grad_(), r(s).requires_grad_()]
    x = r(n_images, s, c, std=1.0).requires_grad_()
    out = ops.token_mixing(x, *params, backend="triton")
    dout = r(n_images, s, c, std=1.0)
    out.backward(dout)
    ends = [0, n_images - 1]
    x_ends = x.detach()[ends].float().requires_grad_()
    want = ops.token_mixing(x_ends, *(p.detach().float() for p in params), backend="reference")
    want.backward(dout[ends].float())
    tol = lambda t: 0.05 * max(1.0, float(t.abs().max()))  # noqa: E731
    assert max_err(out.detach()[ends].float(), want.detach()) <= tol(want)
    assert max_err(x.grad[ends].float(), x_ends.grad) <= tol(x_ends.grad)
