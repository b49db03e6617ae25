"""mixer_fast.ops on every torch backend (reference, triton in its interpreter without a GPU, cpu) against
hostile input: every bad argument raises ValueError/TypeError naming it, expected vs given, whatever the
backend; double backward works or raises a documented NotImplementedError; strided input, B = 0 and
B = 1 work; a non-finite value in one sample never reaches another sample's output or gradient."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE, TORCH_BACKENDS, use_backend
from mixer_fast import ops
from mixer_fast.reference import functional as F_ref
from tolerances import max_err

B, S, C, DS, DC = 2, 16, 32, 8, 64


def token_args(dtype=torch.float32):
    return dict(x=torch.randn(B, S, C, dtype=dtype), norm_weight=torch.randn(C, dtype=dtype),
                norm_bias=torch.randn(C, dtype=dtype), fc1_weight=torch.randn(DS, S, dtype=dtype),
                fc1_bias=torch.randn(DS, dtype=dtype), fc2_weight=torch.randn(S, DS, dtype=dtype),
                fc2_bias=torch.randn(S, dtype=dtype))


def channel_args(dtype=torch.float32):
    return dict(x=torch.randn(B, S, C, dtype=dtype), norm_weight=torch.randn(C, dtype=dtype),
                norm_bias=torch.randn(C, dtype=dtype), fc1_weight=torch.randn(DC, C, dtype=dtype),
                fc1_bias=torch.randn(DC, dtype=dtype), fc2_weight=torch.randn(C, DC, dtype=dtype),
                fc2_bias=torch.randn(C, dtype=dtype))


def call(op, **overrides):
    args = token_args() if op == "token" else channel_args()
    kw = {k: overrides.pop(k) for k in list(overrides) if k not in args}
    args.update(overrides)
    fn = ops.token_mixing if op == "token" else ops.channel_mixing
    return fn(*args.values(), **kw)


CASES = [
    # (op, overrides, exception, message regex)
    ("token", dict(x=torch.randn(S, C)), ValueError, r"x: expected a 3-D tensor \(B, S, C\), got shape \(16, 32\)"),
    ("token", dict(x=torch.randn(B, S + 1, C)), ValueError, r"fc1_weight: expected shape \(D_S, S\) with S from x = \(8, 17\), got \(8, 16\)"),
    ("channel", dict(x=torch.randn(B, S, C + 1)), ValueError, r"norm_weight: expected shape \(C,\) = \(33,\), got \(32,\)"),
    ("channel", dict(fc1_weight=torch.randn(DC, C + 1)), ValueError, r"fc1_weight: expected shape \(D_C, C\) with C from x = \(64, 32\), got \(64, 33\)"),
    ("token", dict(fc2_weight=torch.randn(S, DS + 1)), ValueError, r"fc2_weight: expected shape \(S, D_S\) = \(16, 8\), got \(16, 9\)"),
    ("token", dict(fc1_bias=torch.randn(DS + 2)), ValueError, r"fc1_bias: expected shape \(D,\) = \(8,\), got \(10,\)"),
    ("channel", dict(fc2_bias=torch.randn(1, C)), ValueError, r"fc2_bias: expected shape \(C,\) = \(32,\), got \(1, 32\)"),
    ("token", dict(fc1_weight=torch.randn(DS, S, 1)), ValueError, r"fc1_weight: expected a 2-D weight \(out, in\), got shape \(8, 16, 1\)"),
    ("token", dict(fc2_weight=None), ValueError, r"fc1_weight: expected shape \(S, S\) when fc2_weight is None = \(16, 16\), got \(8, 16\)"),
    ("channel", dict(fc2_weight=None), TypeError, r"fc2_weight: expected a torch.Tensor, got NoneType"),
    ("token", dict(x=torch.randn(B, S, C).numpy()), TypeError, r"x: expected a torch.Tensor, got ndarray"),
    ("token", dict(x=torch.ones(B, S, C, dtype=torch.int32)), TypeError, r"x: expected a floating dtype .*got torch.int32"),
    ("token", dict(fc1_weight=torch.randn(DS, S, dtype=torch.float64)), TypeError, r"fc1_weight: expected dtype torch.float32 \(the dtype of x\), got torch.float64"),
    ("channel", dict(norm_bias=torch.randn(C, dtype=torch.bfloat16)), TypeError, r"norm_bias: expected dtype torch.float32 \(the dtype of x\), got torch.bfloat16"),
    ("channel", dict(fc2_weight=torch.randn(C, DC, device="meta")), ValueError, r"fc2_weight: expected a tensor on cpu \(the device of x\), got one on meta"),
    ("token", dict(eps=float("nan")), ValueError, r"eps: expected a finite number in \(0.0, inf\), got nan"),
    ("token", dict(eps=-1e-6), ValueError, r"eps: expected a finite number in \(0.0, inf\), got -1e-06"),
    ("channel", dict(eps="1e-6"), TypeError, r"eps: expected a number, got str"),
    ("channel", dict(approximate="exact"), ValueError, r"approximate: expected one of \['none', 'tanh'\], got 'exact'"),
    ("token", dict(norm="rms"), ValueError, r"norm: expected one of \['layernorm', 'affine'\], got 'rms'"),
    ("token", dict(scale=torch.randn(S)), ValueError, r"scale: expected shape \(C,\) = \(32,\), got \(16,\)"),
    ("channel", dict(sample_scale=torch.randn(B, 1)), ValueError, r"sample_scale: expected shape \(B,\) = \(2,\), got \(2, 1\)"),
    ("channel", dict(dropout=1.0), ValueError, r"dropout: expected a finite number in \[0.0, 1.0\), got 1.0"),
    ("channel", dict(backend="jax"), ValueError, r"backend: expected one of \['triton', 'cpu', 'reference'\] for torch, got 'jax'"),
    ("channel", dict(backend=["reference"]), TypeError, r"backend: expected a backend name \(str\) or None, got list"),
]


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("op, overrides, exc, match", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_bad_argument(request, backend, op, overrides, exc, match):
    # Every check runs before a backend is chosen, so each backend must give the same error.
    overrides = {"backend": use_backend(request, backend), **overrides}
    with pytest.raises(exc, match=match):
        call(op, **overrides)


def test_fc2_bias_without_fc2_weight():
    args = token_args()
    args["fc1_weight"] = torch.randn(S, S)
    args["fc1_bias"] = torch.randn(S)
    args["fc2_weight"] = None
    with pytest.raises(ValueError, match="fc2_bias: expected None when fc2_weight is None, got a tensor"):
        ops.token_mixing(*args.values())


@pytest.mark.parametrize("op", ["token", "channel"])
def test_ops_match_reference_functional(op):
    args = token_args() if op == "token" else channel_args()
    fn, ref_fn = (ops.token_mixing, F_ref.token_mixing) if op == "token" else (ops.channel_mixing, F_ref.channel_mixing)
    scale, sample = torch.randn(C), torch.tensor([0.0, 2.0])
    got = fn(*args.values(), approximate="tanh", scale=scale, sample_scale=sample, backend="reference")
    want = ref_fn(*args.values(), approximate="tanh", scale=scale, sample_scale=sample)
    assert max_err(got, want) == 0.0
    assert max_err(got[0], args["x"][0]) == 0.0  # sample_scale 0 drops the whole branch of sample 0


@pytest.mark.parametrize("op", ["token", "channel"])
def test_empty_batch(op):
    x = torch.randn(0, S, C)
    out = call(op, x=x, sample_scale=torch.randn(0))
    assert out.shape == (0, S, C)


@pytest.mark.parametrize("backend", [None, "reference", "cpu"])
@pytest.mark.parametrize("op", ["token", "channel"])
def test_inf_propagates_like_the_reference(request, op, backend):
    # None: the automatic choice for CPU tensors; cpu: the C++ kernels, the same non-finite elements as the
    # reference, the finite ones equal up to summation order.
    if backend == "cpu":
        use_backend(request, backend)
    args = token_args() if op == "token" else channel_args()
    args["x"][0, 2, 3] = float("inf")
    fn, ref_fn = (ops.token_mixing, F_ref.token_mixing) if op == "token" else (ops.channel_mixing, F_ref.channel_mixing)
    got, want = fn(*args.values(), backend=backend), ref_fn(*args.values())
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())
    assert not want.isfinite().all()
    assert max_err(got, want) <= (0.0 if backend == "reference" else 1e-4 * float(want[want.isfinite()].abs().max()))
    assert got[1].isfinite().all()


@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("op", ["token", "channel"])
def test_gelu_of_an_infinite_pre_activation_is_infinite_on_cpu(request, op, approximate):
    """An fc1 bias of +inf: GELU(inf) = inf, so every output is an infinity of fc2's sign. The C++ kernels give
    that in both forms. Eager PyTorch's tanh form does too, but its exact form returns NaN there (torch 2.14:
    F.gelu(inf) is nan), so the comparison is with the tanh form's reference."""
    use_backend(request, "cpu")
    args = token_args() if op == "token" else channel_args()
    args["fc1_bias"][1] = float("inf")
    fn, ref_fn = (ops.token_mixing, F_ref.token_mixing) if op == "token" else (ops.channel_mixing, F_ref.channel_mixing)
    got = fn(*args.values(), backend="cpu", approximate=approximate)
    want = ref_fn(*args.values(), approximate="tanh")
    assert want.isinf().all() and got.isinf().all()
    assert torch.equal(got.sign(), want.sign())


def _device(backend: str) -> str:
    return DEVICE if backend == "triton" else "cpu"


def _leaves(op: str, device: str, **overrides):
    args = {**(token_args() if op == "token" else channel_args()), **overrides}
    return {k: v.to(device).requires_grad_() for k, v in args.items()}


def _close(got: torch.Tensor, want: torch.Tensor, rtol: float = 1e-5) -> bool:
    """max|got − want| ≤ rtol · max(1, max|want|): the same maths in another summation order (fp32)."""
    scale = float(want.detach().abs().max()) if want.numel() else 0.0
    return max_err(got.cpu(), want.cpu()) <= rtol * max(1.0, scale)


def _fn(op: str):
    return ops.token_mixing if op == "token" else ops.channel_mixing


@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("op", ["token", "channel"])
def test_double_backward(request, backend, op):
    """reference and cpu (whose training path is the reference ops) give exact second derivatives;
    triton's backward kernels have none and say so instead of autograd's internal-op error."""
    use_backend(request, backend)
    args = _leaves(op, _device(backend))
    out = _fn(op)(*args.values(), backend=backend)
    (gx,) = torch.autograd.grad(out.square().sum(), args["x"], create_graph=True)
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="double backward: the triton backend's backward is not "
                                                      "differentiable"):
            gx.square().sum().backward()
        return
    gx.square().sum().backward()
    ref = _leaves(op, "cpu", **{k: v.detach().cpu() for k, v in args.items()})
    out_ref = _fn(op)(*ref.values(), backend="reference")
    (gx_ref,) = torch.autograd.grad(out_ref.square().sum(), ref["x"], create_graph=True)
    gx_ref.square().sum().backward()
    for name in args:
        assert _close(args[name].grad, ref[name].grad), name


def _strided(x: torch.Tensor, kind: str) -> torch.Tensor:
    B, S, C = x.shape
    if kind == "channels_first":  # stored (B, C, S): stride 1 along S, as after a patch-embedding conv
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if kind == "sliced":  # every other channel and every other image of a larger buffer
        big = torch.zeros(2 * B, S, 2 * C, dtype=x.dtype, device=x.device)
        big[::2, :, ::2] = x
        return big[::2, :, ::2]
    if kind == "expanded":  # one image broadcast over the batch: stride 0 along B
        return x[:1].expand(B, S, C)
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["channels_first", "sliced", "expanded"])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("op", ["token", "channel"])
def test_strided_input(request, backend, op, kind):
    use_backend(request, backend)
    device = _device(backend)
    args = {k: v.to(device) for k, v in (token_args() if op == "token" else channel_args()).items()}
    x = _strided(args.pop("x"), kind)
    assert not x.is_contiguous()
    x_leaf, x_ref = x.detach().requires_grad_(), x.detach().contiguous().requires_grad_()
    got = _fn(op)(x_leaf, *args.values(), backend=backend)
    want = _fn(op)(x_ref, *args.values(), backend="reference")
    assert got.shape == want.shape and _close(got, want)
    dout = torch.randn_like(want)
    got.backward(dout)
    want.backward(dout)
    assert _close(x_leaf.grad, x_ref.grad)


@pytest.mark.parametrize("batch", [0, 1])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("op", ["token", "channel"])
def test_batch_0_and_1(request, backend, op, batch):
    use_backend(request, backend)
    device = _device(backend)
    args = _leaves(op, device, x=torch.randn(batch, S, C))
    ss = torch.full((batch,), 2.0, device=device)
    out = _fn(op)(*args.values(), sample_scale=ss, backend=backend)
    ref = _leaves(op, "cpu", **{k: v.detach().cpu() for k, v in args.items()})
    want = _fn(op)(*ref.values(), sample_scale=ss.cpu(), backend="reference")
    assert out.shape == (batch, S, C) and _close(out, want)
    out.square().sum().backward()
    want.square().sum().backward()
    for name in args:  # with B = 0 every gradient exists and is zero
        g, g_ref = args[name].grad, ref[name].grad
        assert g is not None and g.shape == args[name].shape, name
        assert _close(g, g_ref), name


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("backend", TORCH_BACKENDS)
@pytest.mark.parametrize("op", ["token", "channel"])
def test_non_finite_stays_in_its_sample(request, backend, op, bad):
    """A non-finite input in sample 0 poisons sample 0 only: sample 1's output and input gradient are
    finite and equal to those of a batch without sample 0 (weight gradients, sums over the batch, may not
    be finite)."""
    use_backend(request, backend)
    device = _device(backend)
    args = _leaves(op, device)
    with torch.no_grad():
        args["x"][0, 3, 5] = bad
    out = _fn(op)(*args.values(), backend=backend)
    out.backward(torch.ones_like(out))
    alone = _leaves(op, device, **{k: v.detach().cpu() for k, v in args.items()})
    with torch.no_grad():
        alone["x"] = alone["x"][1:].clone().requires_grad_()
    out1 = _fn(op)(*alone.values(), backend=backend)
    out1.backward(torch.ones_like(out1))
    assert not out[0].isfinite().all()
    assert out[1].isfinite().all() and args["x"].grad[1].isfinite().all()
    assert _close(out[1], out1[0]) and _close(args["x"].grad[1], alone["x"].grad[0])


def _forward_ad_tangent(f, x, t):
    from torch.autograd import forward_ad

    with forward_ad.dual_level():
        return forward_ad.unpack_dual(f(forward_ad.make_dual(x, t))).tangent


TRANSFORMS = {
    "jvp": lambda f, x, t: torch.func.jvp(f, (x,), (t,))[1],
    "forward_ad": _forward_ad_tangent,
    "grad": lambda f, x, t: torch.func.grad(lambda x: (f(x) * t).sum())(x),
    "vjp": lambda f, x, t: torch.func.vjp(f, x)[1](t)[0],
    "vmap": lambda f, x, t: torch.func.vmap(f)(x[:, None])[:, 0],
}


@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("backend", [None, *TORCH_BACKENDS])
@pytest.mark.parametrize("op", ["token", "channel"])
def test_torch_func_transforms_and_forward_ad(request, backend, op, transform):
    """The fused kernels see raw data only (a tangent would be dropped: triton's jvp once returned wrong
    tangents, forward_ad none): under a transform the automatic choice and cpu run the reference ops,
    and an explicit triton says it cannot."""
    if backend is not None:
        use_backend(request, backend)
    device = _device(backend or "reference")
    args = {k: v.to(device) for k, v in (token_args() if op == "token" else channel_args()).items()}
    x, t = args.pop("x"), torch.randn(B, S, C, device=device)
    run = lambda be: TRANSFORMS[transform](lambda x: _fn(op)(x, *args.values(), backend=be), x, t)  # noqa: E731
    if backend == "triton":
        with pytest.raises(NotImplementedError, match="backend 'triton' does not support torch.func transforms "
                                                      "and forward-mode AD; use backend='reference'"):
            run(backend)
        return
    got, want = run(backend), run("reference")
    assert got is not None and _close(got, want)
