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


def test_ln_placement_is_validated(monkeypatch):
    from mixer_fast.kernels.triton import matmul

    monkeypatch.setenv("MIXER_FAST_LN", "folded")
    with pytest.raises(ValueError, match="MIXER_FAST_LN: expected load or fold, got 'folded'"):
        matmul.ln_placement()
    monkeypatch.delenv("MIXER_FAST_LN")
    assert matmul.ln_placement() == matmul.LN_PLACEMENT


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
