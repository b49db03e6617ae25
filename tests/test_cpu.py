"""The ``cpu`` backend (C++ kernels, csrc/): fused forward against its plain-loop oracle on every ISA the CPU
has and against the reference under DESIGN's rule, both dtypes, both block kinds, awkward shapes, strided
input, thread counts 1 and 2; gradients (reference recomputation); the binding's argument checks; and the
C++ checks under AddressSanitizer + UBSan. In CI the extension must have been built."""
from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from conftest import IN_CI
from mixer_fast import dispatch
from mixer_fast.reference import functional as F
from tolerances import ATOL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cpu():
    try:
        dispatch.load("cpu")
    except dispatch.BackendUnavailable as e:
        if IN_CI:
            pytest.fail(f"the cpu backend must load in CI: {e}")
        pytest.skip(str(e))
    from mixer_fast import _C
    from mixer_fast.torch import cpu_backend

    yield cpu_backend, _C
    _C.force_isa("")


def _args(op, B, S, C, D, dtype, resmlp, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s, std=0.3: (torch.randn(*s, generator=g) * std).to(dtype)  # noqa: E731
    x = r(B, S, C, std=1.0)
    n = S if op == "token_mixing" else C
    if resmlp and op == "token_mixing":
        w = (r(S, S, std=S ** -0.5), r(S), None, None)
    else:
        w = (r(D, n, std=n ** -0.5), r(D), r(n, D, std=D ** -0.5), r(n))
    kw = dict(eps=1e-6, approximate="none" if resmlp else "tanh", norm="affine" if resmlp else "layernorm",
              scale=r(C, std=1.0) if resmlp else None,
              sample_scale=torch.tensor([0.0, 1.5, 2.0, 0.5][:B]) if resmlp else None)
    return (x, 1 + r(C), r(C), *w), kw


def _f64(args, kw):
    d = lambda t: t.double() if isinstance(t, torch.Tensor) else t  # noqa: E731
    return [d(a) for a in args], {k: d(v) for k, v in kw.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(2, 13, 37, 29), (1, 49, 64, 24), (3, 196, 48, 96)], ids=["13x37", "49x64", "196x48"])
@pytest.mark.parametrize("resmlp", [False, True], ids=["mixer", "resmlp"])
@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_fused_against_oracle_and_reference(cpu, op, resmlp, shape, dtype):
    backend, _C = cpu
    args, kw = _args(op, *shape, dtype, resmlp)
    ref64 = getattr(F, op)(*_f64(args, kw)[0], **_f64(args, kw)[1])
    eager = getattr(F, op)(*args, **kw)
    eager_err = (eager.double() - ref64).abs().max().item()
    oracle = backend.forward(op, *args, **kw, reference=True)
    for isa in ("portable", "avx2", "avx512", "avx512_bf16"):
        if not _C.force_isa(isa):
            continue
        got = backend.forward(op, *args, **kw)
        assert got.dtype == dtype and got.shape == args[0].shape
        err = (got.double() - ref64).abs().max().item()
        assert err <= 2 * eager_err + ATOL[dtype] * max(1.0, ref64.abs().max().item()), (isa, err, eager_err)
        assert (got.double() - oracle.double()).abs().max().item() <= (2e-5 if dtype == torch.float32 else 1.6e-2) * max(
            1.0, ref64.abs().max().item()), isa


@pytest.mark.parametrize("shape", [(2, 13, 37, 29), (1, 49, 64, 24), (3, 7, 40, 1100), (2, 196, 24, 33)],
                         ids=["odd", "49x64", "k_blocks", "odd_hidden"])
@pytest.mark.parametrize("resmlp", [False, True], ids=["mixer", "resmlp"])
@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_bf16_dot_products_match_fp32_fmas(cpu, op, resmlp, shape):
    # The avx512_bf16 family's k-pair dot products against the AVX-512 FMAs: the same exact products summed
    # in another order, so bf16 outputs agree to within one rounding (the oracle check's 1.6e-2 tolerance
    # would let a lost k — an odd K's last pair, a K block's edge — through). Odd K, K blocks past 512.
    backend, _C = cpu
    if not _C.force_isa("avx512_bf16"):
        pytest.skip("this CPU has no AVX512-BF16")
    args, kw = _args(op, *shape, torch.bfloat16, resmlp)
    pairs = backend.forward(op, *args, **kw).float()
    assert _C.force_isa("avx512")
    fmas = backend.forward(op, *args, **kw).float()
    _C.force_isa("")
    # One bf16 step of the larger value, floored at 2⁻⁶ of the output's peak: where x + y cancels to near
    # zero, a hidden value rounded the other way moves the output by a step of y, not of the output.
    floor = 2.0 ** -6 * float(fmas.abs().max())
    one_step = torch.maximum(pairs.abs(), fmas.abs()).clamp_min(floor) * 2.0 ** -7
    assert ((pairs - fmas).abs() <= one_step).all(), (pairs - fmas).abs().max()
    assert (pairs != fmas).float().mean() < 0.05


# (B, S, C, D): few column tasks (2 threads share each) and many (each thread takes whole tasks).
@pytest.mark.parametrize("shape", [(3, 17, 40, 64), (4, 130, 40, 64), (20, 9, 136, 24)], ids=["few", "many", "images"])
@pytest.mark.parametrize("op", ["token_mixing", "channel_mixing"])
def test_threads_and_strided_input(cpu, op, shape):
    backend, _ = cpu
    args, kw = _args(op, *shape, torch.float32, False)
    x = args[0].transpose(1, 2).contiguous().transpose(1, 2)  # (B, S, C) with channel stride S
    assert not x.is_contiguous()
    outs, before = [], torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(backend.forward(op, x, *args[1:], **kw))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # no sum split: bitwise equal
    want = getattr(F, op)(x, *args[1:], **kw)
    assert (outs[0] - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item())


def test_empty_batch_and_gradients(cpu):
    backend, _ = cpu
    for op in ("token_mixing", "channel_mixing"):
        args, kw = _args(op, 2, 13, 24, 20, torch.float32, op == "token_mixing")
        x0 = args[0][:0]
        assert backend.forward(op, x0, *args[1:], **{**kw, "sample_scale": None}).shape == (0, 13, 24)
        leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
        ref_leaves = [a.clone().requires_grad_(True) if a is not None else None for a in args]
        out = getattr(backend, op)(*leaves, **kw, dropout=0.0)
        ref = getattr(F, op)(*ref_leaves, **kw)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        for a, b in zip(leaves, ref_leaves):
            if a is not None:
                assert (a.grad - b.grad).abs().max().item() < 1e-5


def test_blocks_on_the_cpu_backend(cpu):
    import mixer_fast
    from mixer_fast.reference.modules import MixerBlock

    ref = MixerBlock(48, 20)
    fast = mixer_fast.MixerBlock(48, 20, backend="cpu")
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 20, 48, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    assert (fast(x) - ref(x2)).abs().max().item() < 1e-5
    fast(x).sum().backward()
    ref(x2).sum().backward()
    assert (x.grad - x2.grad).abs().max().item() < 1e-5


def test_workspace_is_kept_and_released(cpu):
    backend, _C = cpu
    args, kw = _args("channel_mixing", 2, 13, 40, 64, torch.float32, False)
    first = backend.forward("channel_mixing", *args, **kw)
    assert _C.workspace_bytes() > 0  # the packed weights and task buffers wait for the next call
    assert torch.equal(backend.forward("channel_mixing", *args, **kw), first)  # reused buffers, same bits
    _C.free_workspace()
    assert _C.workspace_bytes() == 0
    assert torch.equal(backend.forward("channel_mixing", *args, **kw), first)


def test_training_runs_the_reference_ops(cpu):
    # A gradient is needed: the reference ops under autograd (exactly eager's numbers); otherwise the kernels.
    backend, _ = cpu
    args, kw = _args("token_mixing", 2, 13, 40, 24, torch.float32, False)
    leaves = [a.clone().requires_grad_(True) for a in args]
    out = backend.token_mixing(*leaves, **kw, dropout=0.0)
    # (eager under autograd too: with 16 threads torch's own kernels differ by an ulp between a forward that
    # needs a gradient and one that does not, seen on a 16-core host)
    assert out.grad_fn is not None and torch.equal(out, F.token_mixing(*leaves, **kw))
    with torch.no_grad():
        fused = backend.token_mixing(*leaves, **kw, dropout=0.0)
    assert fused.grad_fn is None and torch.equal(fused, backend.forward("token_mixing", *args, **kw))


def test_binding_checks_arguments(cpu):
    backend, _C = cpu
    args, kw = _args("channel_mixing", 2, 5, 8, 16, torch.float32, False)
    with pytest.raises(TypeError, match="fc1_weight: expected dtype float32 \\(x's\\), got bfloat16"):
        backend.forward("channel_mixing", args[0], args[1], args[2], args[3].bfloat16(), *args[4:], **kw)
    with pytest.raises(TypeError, match="x: the cpu backend supports float32 and bfloat16, got float16"):
        backend.forward("channel_mixing", *[a.half() for a in args], **kw)
    with pytest.raises(ValueError, match=r"fc2_weight: expected shape \(C, D\) = \(8, 16\), got \(8, 15\)"):
        backend.forward("channel_mixing", *args[:5], args[5][:, :15], args[6], **kw)
    with pytest.raises(NotImplementedError, match="backend 'cpu' does not support float64"):
        import mixer_fast
        mixer_fast.ops.channel_mixing(*[a.double() for a in args], backend="cpu")
    assert _C.force_isa("sse9") is False


def test_cpp_checks_under_sanitizers():
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        if IN_CI:
            pytest.fail("a C++ compiler is needed in CI")
        pytest.skip("no C++ compiler")
    r = subprocess.run(["bash", os.path.join(REPO, "csrc", "tests", "sanitize.sh")], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "0 failures" in r.stdout
