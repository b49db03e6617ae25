"""The fused drop-in blocks (mixer_fast.MixerBlock / ResMLPBlock) against the reference blocks."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from torch import nn

import mixer_fast
from mixer_fast import reference as ref
from conftest import grads, perturb_
from mixer64 import mixer_block64, resmlp_block64
from tolerances import assert_numerics, max_err

PAIRS = [(mixer_fast.MixerBlock, ref.MixerBlock, mixer_block64), (mixer_fast.ResMLPBlock, ref.ResMLPBlock, resmlp_block64)]


def _pair(fused_cls, ref_cls, dim=64, seq_len=49, dtype=torch.float32, **kw):
    theirs = perturb_(ref_cls(dim, seq_len, dtype=dtype, **kw)).eval()
    ours = fused_cls(dim, seq_len, dtype=dtype, **kw).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("fused_cls, ref_cls, block64", PAIRS, ids=["mixer", "resmlp"])
def test_state_dict_keys_match_reference(fused_cls, ref_cls, block64):
    assert list(fused_cls(32, 16).state_dict()) == list(ref_cls(32, 16).state_dict())


@pytest.mark.parametrize("fused_cls, ref_cls, block64", PAIRS, ids=["mixer", "resmlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1, 49, 100), (3, 16, 64), (2, 196, 64)], ids=lambda s: "x".join(map(str, s)))
def test_forward_and_backward_numerics(fused_cls, ref_cls, block64, dtype, shape):
    B, S, C = shape
    ours, theirs = _pair(fused_cls, ref_cls, C, S, dtype)
    ref64 = ref_cls(C, S, dtype=torch.float64).eval()
    ref64.load_state_dict(theirs.state_dict())
    x = torch.randn(B, S, C, dtype=torch.float64)
    want = block64(ref64, x)
    xs = [x.to(dtype).requires_grad_() for _ in range(2)]
    out_ours, out_theirs = ours(xs[0]), theirs(xs[1])
    assert_numerics(out_ours, out_theirs, want)
    x64 = x.clone().requires_grad_()
    out64 = ref64(x64)
    g = torch.randn_like(out64)
    out64.backward(g)
    out_ours.backward(g.to(dtype))
    out_theirs.backward(g.to(dtype))
    assert_numerics(xs[0].grad, xs[1].grad, x64.grad, "grad x")
    g_ours, g_theirs, g64 = grads(ours), grads(theirs), grads(ref64)
    for name in g64:
        assert_numerics(g_ours[name], g_theirs[name], g64[name], f"grad {name}")


@pytest.mark.parametrize("fused_cls, ref_cls, block64", PAIRS, ids=["mixer", "resmlp"])
def test_gradcheck_fused_block_float64(fused_cls, ref_cls, block64):
    block = perturb_(fused_cls(12, 10, dtype=torch.float64)).eval()
    x = torch.randn(2, 10, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(block, (x,))


@pytest.mark.parametrize("fused_cls, ref_cls, block64", PAIRS, ids=["mixer", "resmlp"])
def test_empty_batch_and_non_contiguous_input(fused_cls, ref_cls, block64):
    ours, theirs = _pair(fused_cls, ref_cls, 64, 16)
    empty = torch.randn(0, 16, 64, requires_grad=True)
    out = ours(empty)
    assert out.shape == (0, 16, 64)
    out.sum().backward()
    assert empty.grad.shape == empty.shape
    # A (B, S, C) view of a (B, C, S) tensor: strided along C.
    x = torch.randn(3, 64, 16).transpose(1, 2)
    assert not x.is_contiguous()
    assert max_err(ours(x), theirs(x.contiguous())) == 0.0
    x = torch.randn(6, 16, 64)[::2]
    assert max_err(ours(x), theirs(x.contiguous())) == 0.0


@pytest.mark.parametrize("fused_cls, ref_cls, block64", PAIRS, ids=["mixer", "resmlp"])
def test_nan_in_one_sample_stays_there(fused_cls, ref_cls, block64):
    ours, _ = _pair(fused_cls, ref_cls, 32, 16)
    x = torch.randn(3, 16, 32)
    x[1, 3, 5] = float("nan")
    out = ours(x)
    assert out[1].isnan().any()
    assert out[0].isfinite().all() and out[2].isfinite().all()


def test_autocast_bf16_matches_eager_autocast():
    ours, theirs = _pair(mixer_fast.MixerBlock, ref.MixerBlock, 64, 16)
    x = torch.randn(2, 16, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = ours(x), theirs(x)
    assert a.dtype == b.dtype
    assert max_err(a, b) == 0.0


def test_tanh_gelu_via_approximate_or_act_layer():
    a = mixer_fast.MixerBlock(32, 16, approximate="tanh")
    b = mixer_fast.MixerBlock(32, 16, act_layer=partial(nn.GELU, approximate="tanh"))
    assert a.mlp_tokens.act.approximate == b.mlp_channels.act.approximate == "tanh"
    assert mixer_fast.MixerBlock(32, 16).mlp_tokens.act.approximate == "none"
    with pytest.raises(ValueError, match="approximate: expected 'none' to agree with act_layer, got 'tanh'"):
        mixer_fast.MixerBlock(32, 16, act_layer=nn.GELU, approximate="tanh")


def test_eps_from_argument_or_norm_layer():
    assert mixer_fast.MixerBlock(32, 16).norm1.eps == 1e-6
    assert mixer_fast.MixerBlock(32, 16, eps=1e-5).norm2.eps == 1e-5
    assert mixer_fast.MixerBlock(32, 16, norm_layer=nn.LayerNorm).norm1.eps == 1e-5
    with pytest.raises(ValueError, match="eps: expected 1e-05 to agree with norm_layer, got 0.001"):
        mixer_fast.MixerBlock(32, 16, norm_layer=nn.LayerNorm, eps=1e-3)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(dim=0), ValueError, "dim: expected a positive int, got 0"),
    (dict(seq_len=2.5), ValueError, "seq_len: expected a positive int, got 2.5"),
    (dict(mlp_ratio=(0.5, 4.0, 1.0)), ValueError, "mlp_ratio: expected a number or a pair"),
    (dict(mlp_ratio=0.001), ValueError, r"mlp_ratio\[0\] \* dim: expected a positive int, got 0"),
    (dict(drop=1.0), ValueError, r"drop: expected a finite number in \[0.0, 1.0\), got 1.0"),
    (dict(drop_path=float("nan")), ValueError, "drop_path: expected a finite number"),
    (dict(eps=0.0), ValueError, r"eps: expected a finite number in \(0.0, inf\), got 0.0"),
    (dict(approximate="sigmoid"), ValueError, r"approximate: expected one of \['none', 'tanh'\], got 'sigmoid'"),
    (dict(act_layer=nn.ReLU), ValueError, "act_layer: expected nn.GELU"),
    (dict(norm_layer=nn.BatchNorm1d), ValueError, "norm_layer: expected nn.LayerNorm"),
    (dict(backend="cuda"), ValueError, r"backend: expected one of \['triton', 'cpu', 'reference'\]"),
    (dict(backend=3), TypeError, "backend: expected a backend name"),
    (dict(foo=1), TypeError, r"MixerBlock: unexpected keyword argument\(s\) \['foo'\]"),
])
def test_mixer_block_constructor_errors(kwargs, exc, match):
    args = dict(dim=32, seq_len=16) | kwargs
    with pytest.raises(exc, match=match):
        mixer_fast.MixerBlock(**args)


def test_resmlp_block_constructor_errors():
    with pytest.raises(ValueError, match="norm_layer: expected an Affine"):
        mixer_fast.ResMLPBlock(32, 16, norm_layer=nn.LayerNorm)
    with pytest.raises(ValueError, match="init_values: expected a finite number"):
        mixer_fast.ResMLPBlock(32, 16, init_values=float("inf"))
    with pytest.raises(ValueError, match="mlp_channels: expected an Mlp"):
        mixer_fast.ResMLPBlock(32, 16, mlp_layer=lambda *a, **k: nn.Linear(32, 32))


@pytest.mark.parametrize("fused_cls", [mixer_fast.MixerBlock, mixer_fast.ResMLPBlock])
def test_forward_input_errors(fused_cls):
    block = fused_cls(32, 16)
    with pytest.raises(ValueError, match=r"x: expected shape \(B, seq_len=16, dim=32\), got \(2, 15, 32\)"):
        block(torch.randn(2, 15, 32))
    with pytest.raises(ValueError, match=r"x: expected shape \(B, seq_len=16, dim=32\), got \(16, 32\)"):
        block(torch.randn(16, 32))
    with pytest.raises(TypeError, match="x: expected a torch.Tensor"):
        block([[1.0]])
    with pytest.raises(TypeError, match="x: expected a floating dtype"):
        block(torch.ones(2, 16, 32, dtype=torch.int64))
    with pytest.raises(TypeError, match=r"fc1_weight: expected dtype torch.float64 \(the dtype of x\), got torch.float32|"
                                        r"norm_weight: expected dtype torch.float64"):
        block(torch.randn(2, 16, 32, dtype=torch.float64))


def test_explicit_unavailable_backend_raises_with_reason(monkeypatch):
    # As if the C++ extension had not been built: the block asking for it says why.
    monkeypatch.delitem(mixer_fast.dispatch._loaded, ("torch", "cpu"), raising=False)
    monkeypatch.setitem(mixer_fast.dispatch._failed, ("torch", "cpu"), "the C++ extension mixer_fast._C is not built")
    block = mixer_fast.MixerBlock(32, 16, backend="cpu")
    with pytest.raises(mixer_fast.dispatch.BackendUnavailable, match="backend 'cpu' .*unavailable: the C\\+\\+ ext"):
        block(torch.randn(2, 16, 32))


def test_environment_variable_selects_backend(monkeypatch):
    block = mixer_fast.MixerBlock(32, 16)
    x = torch.randn(2, 16, 32)
    monkeypatch.setenv("MIXER_FAST_BACKEND", "reference")
    block(x)
    monkeypatch.setenv("MIXER_FAST_BACKEND", "cpu")  # the C++ kernels have no float64: the request says so
    with pytest.raises((NotImplementedError, mixer_fast.dispatch.BackendUnavailable), match="backend .cpu."):
        block.double()(x.double())
    block.float()
    # The argument beats the environment variable.
    mixer_fast.MixerBlock(32, 16, backend="reference")(x)


@pytest.mark.parametrize("name", ["mixer_s32", "resmlp_12"])
def test_convert_reference_model(name):
    theirs = perturb_(ref.create_model(name, num_classes=10)).eval()
    ours = mixer_fast.convert(ref.create_model(name, num_classes=10).eval(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    fused = mixer_fast.MixerBlock if name.startswith("mixer") else mixer_fast.ResMLPBlock
    assert all(type(b) is fused for b in ours.blocks) and not ours.training
    x = torch.randn(2, 3, 224, 224)
    assert max_err(ours(x), theirs(x)) == 0.0


def test_convert_sets_backend_on_fused_blocks_and_rejects_non_modules():
    model = nn.Sequential(mixer_fast.MixerBlock(32, 16))
    mixer_fast.convert(model, backend="reference")
    assert model[0].backend == "reference"
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module, got dict"):
        mixer_fast.convert({})


@pytest.mark.parametrize("fused_cls, ref_cls, block64", PAIRS, ids=["mixer", "resmlp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_blocks_forward_backward(triton_backend, fused_cls, ref_cls, block64, dtype):
    from conftest import DEVICE

    B, S, C = 3, 49, 64
    theirs = perturb_(ref_cls(C, S, dtype=dtype, drop_path=0.3)).train()
    ours = fused_cls(C, S, dtype=dtype, drop_path=0.3, backend="triton").to(DEVICE).train()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    ref64 = ref_cls(C, S, dtype=torch.float64, drop_path=0.3).train()
    ref64.load_state_dict(theirs.state_dict())
    x = torch.randn(B, S, C, dtype=torch.float64)
    g = torch.randn(B, S, C, dtype=torch.float64)
    outs = []
    for model, dt, dev in ((ref64, torch.float64, "cpu"), (theirs, dtype, "cpu"), (ours, dtype, DEVICE)):
        xi = x.detach().to(device=dev, dtype=dt).requires_grad_()
        torch.manual_seed(11)  # the same drop-path masks in all three
        out = model(xi)
        out.backward(g.to(device=dev, dtype=dt))
        outs.append((out.detach().cpu(), xi.grad.cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (o64, gx64, gp64), (oe, gxe, gpe), (of, gxf, gpf) = outs
    assert_numerics(of, oe, o64)
    assert_numerics(gxf, gxe, gx64, "grad x")
    for name in gp64:
        assert_numerics(gpf[name], gpe[name], gp64[name], f"grad {name}")


def test_triton_ops_launch_on_their_input_device(triton_backend, monkeypatch):
    # Triton launches on the current device whatever device the pointers are on: every custom op makes x's
    # device current first (two GPUs are needed to see the fault itself; the gpu-marked test below).
    from conftest import DEVICE
    from mixer_fast.torch import triton_backend as tb

    entered = []
    real = tb._on_device

    def recording(t):
        entered.append(t.device)
        return real(t)

    monkeypatch.setattr(tb, "_on_device", recording)
    for cls in (mixer_fast.MixerBlock, mixer_fast.SpatialGatingBlock):
        block = cls(32, 16, backend="triton").to(DEVICE)
        x = torch.randn(2, 16, 32, device=DEVICE, requires_grad=True)
        block(x).sum().backward()
    # Mixer: token and channel mixing, forward and backward; gMLP: spatial gating, forward and backward
    assert entered == [torch.device(DEVICE)] * 6


def test_on_device_makes_a_cuda_tensors_device_current():
    from types import SimpleNamespace

    from mixer_fast.torch.triton_backend import _on_device

    guard = _on_device(SimpleNamespace(device=torch.device("cuda", 1)))  # built, not entered: no GPU needed
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    with _on_device(torch.zeros(1)):  # a CPU tensor: nothing to switch
        pass


@pytest.mark.gpu
def test_triton_block_on_a_second_gpu_while_the_first_is_current(triton_backend):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    theirs = perturb_(ref.MixerBlock(64, 49)).train()
    ours = mixer_fast.MixerBlock(64, 49, backend="triton").to("cuda:1").train()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 49, 64)
    with torch.cuda.device(0):
        x1 = x.to("cuda:1").requires_grad_()
        out = ours(x1)
        out.sum().backward()
        torch.cuda.synchronize(1)
    x0 = x.clone().requires_grad_()
    want = theirs(x0)
    want.sum().backward()
    assert max_err(out.detach().cpu(), want.detach()) < 1e-4
    assert max_err(x1.grad.cpu(), x0.grad) < 1e-4


@pytest.mark.parametrize("fused_cls, ref_cls, block64", PAIRS, ids=["mixer", "resmlp"])
def test_triton_blocks_under_autocast(triton_backend, fused_cls, ref_cls, block64):
    # fp32 parameters and input, bf16 autocast: the matmuls run in bf16, statistics, epilogues and the
    # residual in fp32, as in eager autocast; output and gradients checked against eager autocast and float64.
    from conftest import DEVICE

    B, S, C = 2, 49, 64
    theirs = perturb_(ref_cls(C, S)).eval()
    ours = fused_cls(C, S, backend="triton").to(DEVICE).eval()
    ours.load_state_dict(theirs.state_dict())
    ref64 = ref_cls(C, S, dtype=torch.float64).eval()
    ref64.load_state_dict(theirs.state_dict())
    x = torch.randn(B, S, C, dtype=torch.float64)
    g = torch.randn(B, S, C, dtype=torch.float64)
    results = []
    for model, dt, dev, autocast in ((ref64, torch.float64, "cpu", False), (theirs, torch.float32, "cpu", True),
                                     (ours, torch.float32, DEVICE, True)):
        xi = x.detach().to(device=dev, dtype=dt).requires_grad_()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            out = model(xi)
        out.backward(g.to(device=dev, dtype=out.dtype))
        results.append((out.detach().cpu(), xi.grad.cpu(), {n: p.grad.cpu() for n, p in model.named_parameters()}))
    (o64, gx64, gp64), (oe, gxe, gpe), (of, gxf, gpf) = results
    assert of.dtype == oe.dtype == torch.float32
    with torch.no_grad():
        assert max_err(of, ours(x.to(device=DEVICE, dtype=torch.float32)).cpu()) > 1e-4  # bf16 matmuls did run
    # Judged as bf16 results: the bound of DESIGN.md's rule with bf16's floor.
    assert max_err(of, o64) <= 2 * max_err(oe, o64) + 1.6e-2
    assert max_err(gxf, gx64) <= 2 * max_err(gxe, gx64) + 1.6e-2
    for name in gp64:
        assert gpf[name].dtype == torch.float32
        assert max_err(gpf[name], gp64[name]) <= 2 * max_err(gpe[name], gp64[name]) + 1.6e-2, name


def test_triton_backend_rejects_differentiable_sample_scale(triton_backend):
    from mixer_fast import ops

    args = [torch.randn(2, 16, 32), None, None, torch.randn(8, 16), None, torch.randn(16, 8), None]
    with pytest.raises(NotImplementedError, match="sample_scale: the triton backend treats"):
        ops.token_mixing(*args, sample_scale=torch.ones(2, requires_grad=True), backend="triton")


def _peak_step_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes allocated during one training step of ``block`` on ``x`` (forward, loss, backward) above
    what was allocated before it: on CUDA the caching allocator's peak; on a CPU the running sum of the
    profiler's allocations and frees (torch keeps no CPU peak), in the order they happened."""
    def step():
        block(x).float().sum().backward()

    if x.is_cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("cls", [mixer_fast.MixerBlock, mixer_fast.ResMLPBlock, mixer_fast.SpatialGatingBlock],
                         ids=["mixer", "resmlp", "gmlp"])
def test_triton_training_step_peaks_no_higher_than_eager(triton_backend, cls):
    # Issue 17's "peak training memory of each block ≤ eager's", at a small shape: one training step's
    # peak above what was allocated before it, bf16, the gradients not yet allocated. Measured on a CPU
    # (2026-11-28, B 4, S 49, C 64), triton / eager: Mixer 0.77, ResMLP 0.99, gMLP 0.46 (0.62 while the
    # gMLP forward held its hidden H to the end). On a CPU, sum(dtype=float32) of a 16-bit tensor makes
    # an fp32 copy, which the triton backend's scale and norm gradients pay for and a GPU does not.
    from conftest import DEVICE

    B, S, C = 4, 49, 64
    peaks = {}
    for backend, device in (("reference", DEVICE), ("triton", DEVICE)):
        torch.manual_seed(0)
        block = cls(C, S, dtype=torch.bfloat16, backend=backend).to(device).train()
        x = torch.randn(B, S, C, dtype=torch.bfloat16, device=device, requires_grad=True)
        block(x).float().sum().backward()  # compiled (or interpreted) once, outside the measurement
        x.grad = None
        for p in block.parameters():
            p.grad = None
        peaks[backend] = _peak_step_bytes(block, x)
    assert 0 < peaks["triton"] <= peaks["reference"], peaks


@pytest.mark.parametrize("cls", [mixer_fast.MixerBlock, mixer_fast.ResMLPBlock, mixer_fast.SpatialGatingBlock],
                         ids=["mixer", "resmlp", "gmlp"])
def test_triton_blocks_keep_fewer_activation_bytes_than_eager(triton_backend, cls):
    # Issue 17's memory target, as far as a CPU can see it: the tensors autograd keeps for the backward
    # (besides the parameters) take fewer bytes under the triton backend than under eager (reference).
    from conftest import DEVICE

    B, S, C = 2, 49, 64
    kept = {}
    for backend, device in (("reference", "cpu"), ("triton", DEVICE)):
        torch.manual_seed(0)
        block = cls(C, S, dtype=torch.bfloat16, backend=backend).to(device).train()
        params = {p.untyped_storage().data_ptr() for p in block.parameters()}
        storages = {}

        def pack(t):
            ptr = t.untyped_storage().data_ptr()
            if ptr not in params and t.numel():
                storages[ptr] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(B, S, C, dtype=torch.bfloat16, device=device, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = block(x)
        out.float().sum().backward()
        kept[backend] = sum(storages.values())
    assert 0 < kept["triton"] <= kept["reference"], kept
