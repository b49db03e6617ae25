"""Channel mixing on the triton backend (interpreter on CPU; compiled on a GPU) against the reference,
forward and every gradient, with outputs poisoned before launch (tests shared with token mixing)."""
from op_cases import triton_op_tests

# (B, S, C, D_C): awkward S (196, 49, 16), C (100, 64), D_C not a power of two, B = 1 and 3.
SHAPES = [(1, 49, 100, 72), (3, 16, 64, 200), (2, 196, 64, 96)]

(test_triton_channel_mixing, test_triton_channel_mixing_both_gelus,
 test_triton_channel_mixing_non_contiguous_and_empty) = triton_op_tests("channel", SHAPES, hidden=48)


# ---------------------------------------------------------------------------------------------------------
# fc1's LayerNorm folded into its weight and epilogue (MIXER_FAST_LN=fold; matmul.ln_placement)

import pytest  # noqa: E402
import torch  # noqa: E402

from op_cases import DTYPES, check_backend, make_args  # noqa: E402
from tolerances import max_err  # noqa: E402


@pytest.fixture
def a_pros(monkeypatch):
    """The A prologue of every ln_gelu GEMM launched (the fused_matmul the launchers call, spied on)."""
    from conftest import spy_ln_gelu_prologues
    from mixer_fast.kernels.triton import channel_mixing

    return spy_ln_gelu_prologues(monkeypatch, channel_mixing)


# every dtype and variant on one shape, and the awkward one (S 49, C 100, D 72, B 1) in bf16
FOLDED_CASES = [(d, (3, 16, 64, 200), v) for d in DTYPES for v in ("mixer", "droppath", "resmlp")] + [
    (torch.bfloat16, (1, 49, 100, 72), v) for v in ("mixer", "resmlp")]


@pytest.mark.parametrize("dtype,shape,variant", FOLDED_CASES,
                         ids=[f"{v}-{'x'.join(map(str, s))}-{d}" for d, s, v in FOLDED_CASES])
def test_triton_channel_mixing_ln_folded(triton_backend, monkeypatch, a_pros, dtype, shape, variant):
    from mixer_fast.kernels.triton.matmul import A_LAYERNORM_FOLDED, A_NONE

    monkeypatch.setenv("MIXER_FAST_LN", "fold")
    B, S, C, D = shape
    check_backend("channel", make_args("channel", B, S, C, D, variant=variant, seed=5), dtype, "triton",
                  approximate="tanh" if C % 3 else "none")
    # LayerNorm folds into the weight and the epilogue; ResMLP's affine into the weight and bias alone
    assert a_pros == [A_NONE if variant == "resmlp" else A_LAYERNORM_FOLDED]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_triton_channel_mixing_ln_folded_far_from_zero_mean(triton_backend, monkeypatch, dtype):
    # The fold subtracts mean · Σ_k W'[n, k] from x · W'ᵀ after the GEMM: tokens whose mean is 50 standard
    # deviations from zero must still come out within the numerics rule.
    monkeypatch.setenv("MIXER_FAST_LN", "fold")
    args = make_args("channel", 2, 16, 64, 96, variant="mixer", seed=6)
    args["x"] = args["x"] + 50.0
    check_backend("channel", args, dtype, "triton")


def test_triton_channel_mixing_ln_folded_not_under_autocast(triton_backend, monkeypatch, a_pros):
    # fp32 activations with 16-bit weights: folded, the GEMM would round x, mean and all, to 16 bits;
    # the norm stays on load there.
    from conftest import DEVICE
    from mixer_fast import ops
    from mixer_fast.kernels.triton.matmul import A_LAYERNORM

    monkeypatch.setenv("MIXER_FAST_LN", "fold")
    args = make_args("channel", 2, 16, 64, 48, variant="mixer")
    x = args["x"].float().to(DEVICE)
    p = [args[k].float().to(DEVICE) for k in ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight",
                                              "fc2_bias")]
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        ops.channel_mixing(x, *p, backend="triton")
    assert a_pros == [A_LAYERNORM]


# The per-process choices a GPU measurement makes (_launch.env_choice): (variable, a wrong value, its message,
# module, reader, default constant)
CHOICES = [("MIXER_FAST_LN", "folded", "expected load or fold, got 'folded'", "matmul", "ln_placement",
            "LN_PLACEMENT"),
           ("MIXER_FAST_GEMM", "cuBLAS", "expected fused or cublas, got 'cuBLAS'", "matmul", "gemm_engine",
            "GEMM_ENGINE"),
           ("MIXER_FAST_TOKEN", "fused", "expected flash or cublas, got 'fused'", "token_mixing", "token_engine",
            "TOKEN_ENGINE")]


@pytest.mark.parametrize("env,bad,message,module,reader,default", CHOICES, ids=[c[0] for c in CHOICES])
def test_per_process_choices_are_validated(monkeypatch, env, bad, message, module, reader, default):
    import importlib

    mod = importlib.import_module(f"mixer_fast.kernels.triton.{module}")
    monkeypatch.setenv(env, bad)
    with pytest.raises(ValueError, match=f"{env}: {message}"):
        getattr(mod, reader)()
    monkeypatch.delenv(env)
    assert getattr(mod, reader)() == getattr(mod, default)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("has_b1", [True, False], ids=["b1", "no_b1"])
def test_fold_weight_against_float64(triton_backend, dtype, has_b1):
    from conftest import DEVICE
    from mixer_fast.kernels.triton.channel_mixing import fold_weight

    g = torch.Generator().manual_seed(7)
    N, K = 37, 300  # neither a multiple of the kernel's blocks
    w = torch.randn(K, N, generator=g).to(dtype).to(DEVICE).t()  # strided: (N, K) with unit stride along N
    nw, nb = (torch.randn(K, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    b1 = torch.randn(N, generator=g).to(dtype).to(DEVICE) if has_b1 else None
    folded, u, v = fold_weight(w, nw, nb, b1)
    want = w.double() * nw.double()
    assert folded.dtype == dtype and folded.is_contiguous()
    torch.testing.assert_close(folded, want.to(dtype), rtol=0, atol=0)  # an exact product, rounded once
    torch.testing.assert_close(u.double(), folded.double().sum(1), rtol=1e-6, atol=1e-5)
    want_v = w.double() @ nb.double() + (b1.double() if b1 is not None else 0.0)
    torch.testing.assert_close(v.double(), want_v, rtol=1e-6, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The GEMMs in torch (cuBLAS on a GPU) with the Triton passes around them (MIXER_FAST_GEMM=cublas;
# matmul.gemm_engine, cublas_engine.py)


# every dtype and variant: LayerNorm with the residual folded into fc2's GEMM (mixer), drop path and the
# affine with a learned layer scale (the separate residual pass, the branch stored); awkward shapes
CUBLAS_CASES = [(d, s, v) for d in DTYPES for s in SHAPES[:2] for v in ("mixer", "droppath", "resmlp")]


@pytest.mark.parametrize("dtype,shape,variant", CUBLAS_CASES,
                         ids=[f"{v}-{'x'.join(map(str, s))}-{d}" for d, s, v in CUBLAS_CASES])
def test_triton_channel_mixing_cublas(triton_backend, cublas_engine, dtype, shape, variant):
    from conftest import DEVICE

    B, S, C, D = shape
    check_backend("channel", make_args("channel", B, S, C, D, variant=variant, seed=8), dtype, "triton",
                  approximate="tanh" if C % 3 else "none", device=DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
def test_triton_channel_mixing_cublas_inference(triton_backend, cublas_engine, dtype, variant):
    # No gradient: GELU in place over Z, and ResMLP's layer scale folded into W2 (nothing stores the branch)
    from conftest import DEVICE
    from mixer_fast import ops
    from tolerances import assert_numerics

    args = make_args("channel", 2, 49, 100, 72, variant=variant, seed=9)
    args["sample_scale"] = None
    norm = "affine" if variant == "resmlp" else "layernorm"

    def forward(dt, backend, device="cpu"):
        t = {k: None if v is None else v.to(device=device, dtype=dt) for k, v in args.items()}
        with torch.no_grad():
            return ops.channel_mixing(t["x"], t["norm_weight"], t["norm_bias"], t["fc1_weight"], t["fc1_bias"],
                                      t["fc2_weight"], t["fc2_bias"], norm=norm, scale=t["scale"],
                                      backend=backend).cpu()

    got = forward(dtype, "triton", DEVICE)
    assert got.dtype == dtype
    assert_numerics(got, forward(dtype, "reference"), forward(torch.float64, "reference"), "channel mixing output")


def test_triton_channel_mixing_cublas_strided_no_biases_and_empty(triton_backend, cublas_engine):
    # x with stride 1 along S and no fc2 bias: the residual GEMM accumulates into x itself (reshaped)
    from conftest import DEVICE
    from mixer_fast import ops

    args = make_args("channel", 3, 16, 64, 48, variant="mixer")
    x = torch.randn(3, 64, 16, dtype=torch.float32, device=DEVICE).transpose(1, 2)
    p = [None if k in ("fc1_bias", "fc2_bias") else args[k].float().to(DEVICE)
         for k in ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
    got = ops.channel_mixing(x, *p, backend="triton")
    want = ops.channel_mixing(x.contiguous(), *p, backend="reference")
    assert max_err(got, want) < 1e-5
    empty = torch.randn(0, 16, 64, device=DEVICE, requires_grad=True)
    out = ops.channel_mixing(empty, *p, backend="triton")
    out.sum().backward()
    assert out.shape == (0, 16, 64) and empty.grad.shape == (0, 16, 64)


def test_triton_channel_mixing_cublas_under_autocast(triton_backend, cublas_engine):
    # fp32 activations with bf16 weights: nothing folds (the GEMM cannot accumulate into fp32 x); the
    # residual runs in fp32, as eager autocast's; gradients come back in the parameters' fp32
    from conftest import DEVICE
    from mixer_fast import ops

    args = make_args("channel", 2, 16, 64, 48, variant="mixer", seed=10)
    names = ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")
    results = []
    for backend, dt, dev, autocast in (("reference", torch.float64, "cpu", False),
                                       ("reference", torch.float32, "cpu", True),
                                       ("triton", torch.float32, DEVICE, True)):
        leaves = [args[k].detach().to(device=dev, dtype=dt).requires_grad_() for k in ("x", *names)]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            out = ops.channel_mixing(*leaves, backend=backend)
        out.backward(torch.ones_like(out))
        results.append([out.detach().cpu(), *(t.grad.cpu() for t in leaves)])
    ref64, eager, got = results
    assert got[0].dtype == torch.float32
    for name, g, e, r in zip(("out", "x", *names), got, eager, ref64):
        assert g.dtype == torch.float32, name
        assert max_err(g, r) <= 2 * max_err(e, r) + 1.6e-2, name  # bf16 results: the rule with bf16's floor


def test_channel_mixing_engines_share_saved_tensors(triton_backend, monkeypatch):
    # Either engine's backward follows either engine's forward: the same saved tensors mean the same thing.
    from conftest import DEVICE

    args = make_args("channel", 2, 16, 64, 96, variant="resmlp", seed=11)
    dout = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    from op_cases import run

    grads = {}
    for fwd, bwd in (("fused", "cublas"), ("cublas", "fused")):
        from mixer_fast import ops

        leaves = {k: None if v is None else v.to(DEVICE, torch.float32).requires_grad_() for k, v in args.items()
                  if k != "sample_scale"}
        monkeypatch.setenv("MIXER_FAST_GEMM", fwd)
        out = ops.channel_mixing(*(leaves[k] for k in ("x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias",
                                                         "fc2_weight", "fc2_bias")), norm="affine",
                                 scale=leaves["scale"], sample_scale=args["sample_scale"].to(DEVICE, torch.float32),
                                 backend="triton")
        monkeypatch.setenv("MIXER_FAST_GEMM", bwd)
        out.backward(dout.to(DEVICE, torch.float32))
        grads[fwd] = {k: t.grad.cpu() for k, t in leaves.items() if t is not None}
    monkeypatch.delenv("MIXER_FAST_GEMM")
    _, want = run("channel", args, torch.float64, "reference", dout, approximate="none")
    for engines, got in grads.items():
        for name in want:
            assert max_err(got[name], want[name]) < 1e-4, (engines, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_backward_against_float64(triton_backend, dtype, approximate):
    from conftest import DEVICE
    from mixer_fast.kernels.triton.cublas_engine import GELU_BLOCK_D, GELU_ROW_GROUP, gelu_backward

    g = torch.Generator().manual_seed(12)
    M, D = GELU_ROW_GROUP + 37, GELU_BLOCK_D + 5  # a partial row group and a partial column block
    z = (torch.randn(M, D, generator=g) * 2).to(dtype)
    dh = torch.randn(M, D, generator=g).to(dtype)
    z64, dh64 = z.double().requires_grad_(), dh.double()
    h64 = torch.nn.functional.gelu(z64, approximate=approximate)
    (dz64,) = torch.autograd.grad(h64, z64, dh64)
    dh_dev = dh.to(DEVICE)
    dz, h, db = gelu_backward(dh_dev, z.to(DEVICE), approximate=approximate, bias_grad=True)
    assert dz.data_ptr() == dh_dev.data_ptr()  # in place over dH
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(h.cpu().double(), h64.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(dz.cpu().double(), dz64, rtol=tol, atol=tol)
    torch.testing.assert_close(db.cpu().double(), dz64.sum(0), rtol=1e-4, atol=1e-3 * M ** 0.5)
    assert gelu_backward(dh_dev, z.to(DEVICE), approximate=approximate, bias_grad=False)[2] is None
    # the forward's GELU is the one the backward recomputes, bit for bit (gMLP's one-value gate LayerNorm
    # needs it), out of place or over Z
    from mixer_fast.kernels.triton.cublas_engine import gelu_forward

    z_dev = z.to(DEVICE)
    assert torch.equal(gelu_forward(z_dev, approximate, inplace=False), h)
    assert gelu_forward(z_dev, approximate, inplace=True).data_ptr() == z_dev.data_ptr() and torch.equal(z_dev, h)


@pytest.mark.parametrize("norm", ["layernorm", "affine"])
def test_norm_apply_against_float64(triton_backend, norm):
    from conftest import DEVICE
    from mixer_fast.kernels.triton.layer_norm import norm_apply

    g = torch.Generator().manual_seed(13)
    B, S, C = 3, 7, 300  # C over two channel blocks
    x = (torch.randn(B, C, S, generator=g) * 3 + 5).transpose(1, 2)  # strided, far from zero mean
    w, b, rb, rs = (torch.randn(C, generator=g) for _ in range(4))
    x64 = x.double().reshape(B * S, C)
    if norm == "layernorm":
        mean64, var64 = x64.mean(1), x64.var(1, unbiased=False)
        xhat = (x64 - mean64[:, None]) / torch.sqrt(var64[:, None] + 1e-6)
    else:
        xhat = x64
    want = xhat * w.double() + b.double()
    xn, mean, rstd, r = norm_apply(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), norm=norm, eps=1e-6,
                                   dtype=torch.bfloat16, res_bias=rb.to(DEVICE), res_scale=rs.to(DEVICE))
    assert xn.dtype == torch.bfloat16 and xn.shape == (B * S, C) and r.dtype == torch.float32
    torch.testing.assert_close(xn.cpu().double(), want, rtol=8e-3, atol=8e-3)
    torch.testing.assert_close(r.cpu().double(), x64 + rs.double() * rb.double(), rtol=1e-6, atol=1e-5)
    if norm == "layernorm":
        torch.testing.assert_close(mean.cpu().double(), mean64, rtol=1e-6, atol=1e-5)
        # the backward's recompute from given statistics: the same bits, no residual
        again, m2, r2, none = norm_apply(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), norm=norm, eps=1e-6,
                                         dtype=torch.bfloat16, stats=(mean, rstd))
        assert torch.equal(again, xn) and m2 is mean and r2 is rstd and none is None
    else:
        assert mean is None and rstd is None
    with pytest.raises(ValueError, match="norm: expected 'layernorm' or 'affine', got 'rms'"):
        norm_apply(x, w, b, norm="rms", eps=1e-6, dtype=torch.float32)


@pytest.mark.parametrize("engine", ["fused", "cublas"])
def test_triton_strided_vector_parameters(triton_backend, monkeypatch, engine):
    # 1-D arguments that are views with a stride (bias[::2]): every kernel reads vectors at unit stride, so
    # the backend makes them contiguous (they gave wrong values silently before); gradients reach the base.
    from conftest import DEVICE
    from mixer_fast import ops

    monkeypatch.setenv("MIXER_FAST_GEMM", engine)
    monkeypatch.setenv("MIXER_FAST_TOKEN", "flash" if engine == "fused" else engine)
    g = torch.Generator().manual_seed(30)
    B, S, C, D = 2, 16, 32, 24

    def strided(n, mean=0.0):
        return (torch.randn(2 * n, generator=g) * 0.2 + mean).requires_grad_()

    bases = {"nw": strided(C, 1.0), "nb": strided(C), "b1t": strided(D), "b2t": strided(S), "b1c": strided(D),
             "b2c": strided(C), "scale": strided(C, 1.0)}
    w = {"w1t": torch.randn(D, S, generator=g) * S ** -0.5, "w2t": torch.randn(S, D, generator=g) * D ** -0.5,
         "w1c": torch.randn(D, C, generator=g) * C ** -0.5, "w2c": torch.randn(C, D, generator=g) * D ** -0.5}
    x = torch.randn(B, S, C, generator=g)
    ss = torch.tensor([1.5, 0.0, 2.0, 0.0])[::2]  # (B,) with stride 2

    def run(backend, device):
        v = {k: t[::2].to(device) for k, t in bases.items()}
        y = ops.token_mixing(x.to(device), v["nw"], v["nb"], w["w1t"].to(device), v["b1t"], w["w2t"].to(device),
                             v["b2t"], scale=v["scale"], sample_scale=ss.to(device), backend=backend)
        out = ops.channel_mixing(y, v["nw"], v["nb"], w["w1c"].to(device), v["b1c"], w["w2c"].to(device), v["b2c"],
                                 scale=v["scale"], backend=backend)
        for t in bases.values():
            t.grad = None
        out.square().sum().backward()
        return out.detach().cpu(), {k: t.grad.clone() for k, t in bases.items()}

    got, got_grads = run("triton", DEVICE)
    want, want_grads = run("reference", "cpu")
    assert max_err(got, want) < 1e-4
    for name in bases:
        assert max_err(got_grads[name], want_grads[name]) < 1e-3, name
        assert not got_grads[name][1::2].any()  # only the viewed elements have gradients
