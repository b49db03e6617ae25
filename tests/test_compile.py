"""torch.compile(fullgraph=True) traces models of mixer_fast blocks without a graph break."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import mixer_fast
from conftest import DEVICE, TORCH_BACKENDS, grads, perturb_, use_backend
from tolerances import max_err


def _device(backend):
    return "cpu" if backend == "cpu" else DEVICE


def _model(backend):
    return perturb_(nn.Sequential(mixer_fast.MixerBlock(32, 16, backend=backend),
                                  mixer_fast.ResMLPBlock(32, 16, backend=backend))).to(_device(backend))


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_compile_fullgraph_forward_backward(request, backend):
    use_backend(request, backend)
    torch._dynamo.reset()
    model = _model(backend)
    x = torch.randn(3, 16, 32, device=_device(backend))
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    eager_out = model(x)
    eager_out.square().sum().backward()
    eager_grads = grads(model)
    model.zero_grad(set_to_none=True)
    compiled = torch.compile(model, fullgraph=True)
    out = compiled(x)
    out.square().sum().backward()
    assert max_err(out, eager_out) < 1e-5
    for name, g in grads(model).items():
        assert max_err(g, eager_grads[name]) < 1e-4, name


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
def test_compile_fullgraph_inference(request, backend):
    # Without gradients the cpu backend runs its fused C++ kernels (a custom op), not the reference ops.
    use_backend(request, backend)
    torch._dynamo.reset()
    model = _model(backend).eval()
    x = torch.randn(3, 16, 32, device=_device(backend))
    with torch.no_grad():
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        eager_out = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    assert max_err(out, eager_out) < 1e-5


@pytest.mark.parametrize("grad", [True, False], ids=["training", "inference"])
def test_compile_fullgraph_cublas_engine(request, monkeypatch, grad):
    # The channel GEMMs on cuBLAS (MIXER_FAST_GEMM=cublas) inside the same custom ops: no graph break, the
    # fake outputs' shapes and dtypes the engine's real ones (a mismatch fails the compiled run), gMLP too.
    use_backend(request, "triton")
    monkeypatch.setenv("MIXER_FAST_GEMM", "cublas")
    torch._dynamo.reset()
    model = perturb_(nn.Sequential(mixer_fast.MixerBlock(32, 16, backend="triton"),
                                   mixer_fast.ResMLPBlock(32, 16, backend="triton"),
                                   mixer_fast.SpatialGatingBlock(32, 16, mlp_ratio=2, backend="triton"))).to(DEVICE)
    x = torch.randn(3, 16, 32, device=DEVICE)
    with torch.set_grad_enabled(grad):
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        eager_out = model(x)
        out = torch.compile(model, fullgraph=True)(x)
    assert max_err(out, eager_out) < 1e-5
    if grad:
        eager_out.square().sum().backward()
        eager_grads = grads(model)
        model.zero_grad(set_to_none=True)
        out.square().sum().backward()
        for name, g in grads(model).items():
            assert max_err(g, eager_grads[name]) < 1e-4, name
