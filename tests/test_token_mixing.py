"""Token mixing on the triton backend (interpreter on CPU; compiled on a GPU) against the reference,
forward and every gradient, with outputs poisoned before launch (tests shared with channel mixing)."""
import pytest
from op_cases import triton_op_tests

# (B, S, C, D_S): awkward S (196, 49, 16, 144), C (100, 64, 40), D_S not a power of two, B = 1 and 3; the
# token pieces (s_pieces) one (49, 16), two (144: 128 + 16) and three (196: 128 + 64 + 16).
SHAPES = [(1, 49, 100, 24), (3, 16, 64, 30), (2, 196, 64, 98), (3, 144, 40, 20)]

(test_triton_token_mixing, test_triton_token_mixing_both_gelus,
 test_triton_token_mixing_non_contiguous_and_empty) = triton_op_tests("token", SHAPES, hidden=24)


def test_token_weights_are_aligned_zero_padded_copies(triton_backend):
    # The kernels read W1 (D, S) and W2 (S, D) with a row stride and width that are multiples of 16 elements
    # (16-byte vector loads): the launchers' copies must hold the weights exactly and zeros beyond them.
    import torch

    from mixer_fast.kernels.triton.token_mixing import GRANULE, _pad_columns, aligned, token_weights

    for S, D in ((49, 24), (196, 98), (196, 384), (16, 32)):
        w1, w2 = torch.randn(D, S, dtype=torch.bfloat16), torch.randn(S, D, dtype=torch.bfloat16)
        p1, p2 = token_weights(w1, w2, _pad_columns)
        for w, p in ((w1, p1), (w2, p2)):
            width = aligned(w.shape[1])
            assert p.shape == (w.shape[0], width) and p.stride(1) == 1 and p.stride(0) % GRANULE == 0
            assert torch.equal(p[:, :w.shape[1]], w) and not p[:, w.shape[1]:].any()
        # already aligned and contiguous: passed as it is, no copy
        assert (p2 is w2) == (D % GRANULE == 0) and (p1 is w1) == (S % GRANULE == 0)
    # a transposed (non-contiguous) weight gets a contiguous, aligned copy
    w1t = torch.randn(196, 384).t()
    p1, _ = token_weights(w1t, torch.randn(196, 384), _pad_columns)
    assert p1 is not w1t and p1.stride() == (208, 1) and torch.equal(p1[:, :196], w1t)


def test_token_pieces_cover_the_aligned_width():
    from mixer_fast.kernels.triton.token_mixing import GRANULE, aligned, s_pieces

    assert s_pieces(196) == (128, 64, 16) and s_pieces(49) == (64, 0, 0) and s_pieces(256) == (256, 0, 0)
    assert s_pieces(144) == (128, 16, 0) and s_pieces(240) == (128, 64, 64) and s_pieces(784) == (512, 256, 16)
    for S in range(1, 1100):
        pieces = s_pieces(S)
        present = [p for p in pieces if p]
        assert pieces == tuple(present + [0] * (3 - len(present))), (S, pieces)
        assert all(p >= GRANULE and p & (p - 1) == 0 for p in present), (S, pieces)
        assert present == sorted(present, reverse=True), (S, pieces)
        width = aligned(S)
        assert width <= sum(present) < 2 * width, (S, pieces)
        if bin(width // GRANULE).count("1") <= 3:  # exactly the MMA granule whenever three pieces can
            assert sum(present) == width, (S, pieces)


@pytest.mark.parametrize("S", [16, 49, 144, 196, 240, 784])
def test_launch_plans(S):
    from mixer_fast.kernels.triton import _launch
    from mixer_fast.kernels.triton.token_mixing import DW1, DW2, DW_BOTH, KERNELS, aligned, gpu_config, launch_plan

    for kernel in KERNELS:
        for mma_bytes in (2, 4):
            gpu = gpu_config(kernel, S, 384, mma_bytes)
            assert sum(gpu.pieces) >= S and gpu.num_warps in (4, 8) and gpu.num_stages >= 1
            assert gpu.parts in ((DW_BOTH,), (DW1, DW2)) and (kernel == "token_mlp_dw" or gpu.parts == (DW_BOTH,))
            # a program's channels fill at least wgmma's M (64) where the MMA is 16-bit
            if mma_bytes == 2 and S <= 256 and kernel != "token_mlp_dw":
                assert gpu.block_c >= 64
            plan = launch_plan(kernel, S, 384, mma_bytes)
            if _launch.INTERPRET:  # the interpreter runs the GPU's token pieces, so CI tests them
                assert plan.pieces == gpu.pieces and plan.parts == (DW_BOTH,)
            else:
                assert plan == gpu
        # Ampere / Ada (mma.sync) have plans of their own for 16-bit weights at 64 < aligned(S) ≤ 256
        ampere = gpu_config(kernel, S, 384, 2, 80)
        assert sum(ampere.pieces) >= S
        if 64 < aligned(S) <= 256:
            assert ampere != gpu_config(kernel, S, 384, 2) and ampere.num_warps == 8
            assert ampere.block_d == (32 if kernel == "token_mlp_dw" else 16)
        else:
            assert ampere == gpu_config(kernel, S, 384, 2)
        assert gpu_config(kernel, S, 384, 4, 80) == gpu_config(kernel, S, 384, 4)
        # consumer Blackwell (sm_120) has mma.sync and 99 KB a block too; datacenter Blackwell keeps Hopper's
        assert gpu_config(kernel, S, 384, 2, 120) == ampere and gpu_config(kernel, S, 384, 2, 100) == gpu_config(
            kernel, S, 384, 2)
        if not _launch.INTERPRET:
            assert launch_plan(kernel, S, 384, 2, 80) == ampere
    with pytest.raises(ValueError, match="kernel: expected one of"):
        gpu_config("token_mlp", S, 384)


def test_dw_splits_fill_the_gpu_in_two_waves(monkeypatch):
    from mixer_fast.kernels.triton import _launch
    from mixer_fast.kernels.triton.token_mixing import DW_WAVES, dw_splits

    monkeypatch.setattr(_launch, "INTERPRET", False)
    # Mixer-B/16 at batch 256: 6 slices of D_S 384, 256 × 48 work items; 264 programs on 132 SMs
    assert dw_splits(6, 256 * 48) == 44 and dw_splits(6, 256 * 48, sms=114) == 38  # an H100 PCIe
    assert 6 * dw_splits(6, 256 * 48, sms=114) <= DW_WAVES * 114
    assert dw_splits(6, 5) == 5 and dw_splits(6, 0) == 1  # never more shares than work items, never 0
    monkeypatch.setattr(_launch, "INTERPRET", True)
    assert dw_splits(6, 256 * 48) == 2  # the interpreter's: CI runs the partial sums


def test_other_piece_plans_give_the_same_answer(triton_backend):
    # override_plan (bench/gpu_check.py's tile timing) may launch any pieces that cover S: one 256-wide piece,
    # or 128 + 128, must give what the planned 128 + 64 + 16 gives, forward and backward.
    import torch

    from mixer_fast import ops
    from mixer_fast.kernels.triton.token_mixing import DW_BOTH, Launch, override_plan
    from op_cases import make_args, NAMES
    from tolerances import floor

    args = make_args("token", 2, 196, 40, 20, variant="mixer")

    def run():
        leaves = {n: args[n].float().requires_grad_() for n in NAMES[:7]}
        out = ops.token_mixing(*(leaves[n] for n in NAMES[:7]), backend="triton")
        out.backward(torch.ones_like(out))
        return [out.detach()] + [leaves[n].grad for n in NAMES[:7]]

    planned = run()
    for pieces in ((256, 0, 0), (128, 128, 0)):
        with override_plan("token_mlp_fwd", Launch(pieces, 32, 16, 4, 1)), \
                override_plan("token_mlp_dx", Launch(pieces, 16, 32, 4, 1)), \
                override_plan("token_mlp_dw", Launch(pieces, 32, 16, 4, 1, (DW_BOTH,))):
            other = run()
        for a, b in zip(planned, other):
            # fp32 sums in another order: within the numerics rule's floor at the result's magnitude (a
            # fixed 1e-5 failed on one dW2 element of magnitude ~0.01 summed from terms near 1, off by
            # 1.2e-5, on a Zen 3 CPU whose BLAS orders the interpreter's dots differently); a dropped or
            # doubled piece misses by O(1)
            torch.testing.assert_close(a, b, rtol=1e-5, atol=floor(a, torch.float32))
    with pytest.raises(ValueError, match="do not cover S = 196"):
        with override_plan("token_mlp_fwd", Launch((128, 64, 0), 32, 16, 4, 1)):
            run()
    with pytest.raises(ValueError, match="kernel: expected one of"):
        with override_plan("token_mlp", Launch((256, 0, 0), 32, 16, 4, 1)):
            pass


def test_forward_saves_only_x_and_the_statistics(triton_backend):
    # Issue 16: the hidden is recomputed in the backward, so the activations autograd keeps for it are x and
    # the LayerNorm statistics (fp32 mean and 1/std per token); the rest is the parameters themselves.
    import torch

    from mixer_fast import ops
    from op_cases import NAMES, make_args

    B, S, C, D = 3, 49, 40, 24
    args = make_args("token", B, S, C, D, variant="mixer")
    leaves = {n: args[n].to(torch.bfloat16).requires_grad_() for n in NAMES[:7]}
    params = {id(t) for n, t in leaves.items() if n != "x"} | {t.untyped_storage().data_ptr() for t in leaves.values()}
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = ops.token_mixing(*(leaves[n] for n in NAMES[:7]), backend="triton")
    activations = [t for t in saved if t.numel() and id(t) not in params
                   and t.untyped_storage().data_ptr() not in params]
    assert sorted((tuple(t.shape), t.dtype) for t in activations) == [
        ((B * S,), torch.float32), ((B * S,), torch.float32)], [(t.shape, t.dtype) for t in activations]
    assert any(t.untyped_storage().data_ptr() == leaves["x"].untyped_storage().data_ptr() for t in saved)
    out.sum().backward()


# ---------------------------------------------------------------------------------------------------------
# The token GEMMs in torch (cuBLAS on a GPU) on token-major operands, with the Triton passes around them
# (MIXER_FAST_TOKEN=cublas for the MLP, MIXER_FAST_GEMM=cublas for ResMLP's token linear; cublas_engine.py)

import torch  # noqa: E402

from op_cases import DTYPES, NAMES, check_backend, make_args, run  # noqa: E402
from tolerances import assert_numerics, max_err  # noqa: E402


# every dtype × {LayerNorm MLP, + drop path, ResMLP's affine token linear with layer scale and drop path} on
# the awkward shapes (S 49 / 16 / 196, C 100, D_S 24 / 30 / 98, B 1 and 3)
TOKEN_CUBLAS_CASES = [(d, s, v) for d in DTYPES for s in SHAPES[:3] for v in ("mixer", "droppath", "resmlp")]


@pytest.mark.parametrize("dtype,shape,variant", TOKEN_CUBLAS_CASES,
                         ids=[f"{v}-{'x'.join(map(str, s))}-{d}" for d, s, v in TOKEN_CUBLAS_CASES])
def test_triton_token_mixing_cublas(triton_backend, cublas_engine, dtype, shape, variant):
    from conftest import DEVICE

    B, S, C, D = shape
    check_backend("token", make_args("token", B, S, C, D, variant=variant, seed=21), dtype, "triton",
                  approximate="tanh" if C % 3 else "none", device=DEVICE)


@pytest.mark.parametrize("kernel", ["token_mlp_fwd", "token_mlp_dx", "token_mlp_dw"])
def test_flash_plan_without_room_falls_to_the_cublas_engine(triton_backend, monkeypatch, kernel):
    # Past the flash plans' shared memory (S > 1024 in 16-bit, > 512 in fp32 on an H100 / H200) Triton
    # raises OutOfResources when it loads the kernel, which the interpreter never does: a stand-in raises
    # it here. The op finishes on the cuBLAS engine, and later calls of that shape go there at once.
    from triton.runtime.errors import OutOfResources

    from conftest import DEVICE
    from mixer_fast.kernels.triton import token_mixing as tm

    loads = []

    class NoRoom:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                loads.append(grid)
                raise OutOfResources(344128, 232448, "shared memory")
            return launch

    monkeypatch.setattr(tm, f"{kernel}_kernel", NoRoom())
    monkeypatch.setattr(tm, "_NO_ROOM", set())
    args = make_args("token", 3, 49, 40, 24, variant="mixer", seed=24)
    check_backend("token", args, torch.bfloat16, "triton", approximate="tanh", device=DEVICE)
    assert len(loads) == 1 and len(tm._NO_ROOM) == 1
    check_backend("token", args, torch.bfloat16, "triton", approximate="tanh", device=DEVICE)
    assert len(loads) == 1  # known not to fit: not tried again


@pytest.mark.parametrize("kernel", ["token_mlp_fwd", "token_mlp_dx", "token_mlp_dw"])
def test_overridden_plan_without_room_raises(triton_backend, monkeypatch, kernel):
    # An override_plan is a tile candidate being timed (bench/gpu_check.py --parts tiles): a launch that does
    # not fit, the candidate's or another kernel's planned one, must fail as itself, not be timed as the
    # cuBLAS engine under the candidate's name, nor mark the shape as not fitting for the candidates after
    # it; and a shape already marked runs on the flash kernels under an override all the same.
    import torch
    from triton.runtime.errors import OutOfResources

    from conftest import DEVICE
    from mixer_fast import ops
    from mixer_fast.kernels.triton import token_mixing as tm
    from op_cases import NAMES

    class NoRoom:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise OutOfResources(344128, 232448, "shared memory")
            return launch

    monkeypatch.setattr(tm, f"{kernel}_kernel", NoRoom())
    monkeypatch.setattr(tm, "_NO_ROOM", set())
    args = make_args("token", 3, 49, 40, 24, variant="mixer", seed=24)
    leaves = {n: args[n].to(device=DEVICE, dtype=torch.float32).requires_grad_() for n in NAMES[:7]}

    def run(overridden):
        with tm.override_plan(overridden, tm.launch_plan(overridden, 49, 24, 4)), pytest.raises(OutOfResources):
            out = ops.token_mixing(*(leaves[n] for n in NAMES[:7]), backend="triton")
            out.backward(torch.ones_like(out))

    run(kernel)
    run(tm.KERNELS[(tm.KERNELS.index(kernel) + 1) % len(tm.KERNELS)])  # another kernel's candidate
    assert not tm._NO_ROOM
    tm._NO_ROOM.add(tm.room_key(leaves["x"], leaves["fc1_weight"]))  # found not to fit outside the tiles part
    run(kernel)


@pytest.mark.parametrize("setting", [None, "flash"], ids=["default", "flash_forced"])
def test_token_mlp_past_flash_max_tokens(triton_backend, monkeypatch, setting):
    # Past FLASH_MAX_TOKENS (S = 260: 272 aligned) no flash plan is clean in the static report, so the
    # token MLP runs on the cuBLAS engine; MIXER_FAST_TOKEN=flash runs it on the flash kernels (pieces
    # 256 + 16) anyway, and both meet the numerics rule, forward and backward.
    from conftest import DEVICE
    from mixer_fast.kernels.triton import cublas_engine, token_mixing as tm

    if setting is None:
        monkeypatch.delenv(tm.TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(tm.TOKEN_ENV, setting)
    engine_calls = []
    for name in ("token_mixing_forward", "token_mixing_backward"):
        real = getattr(cublas_engine, name)
        monkeypatch.setattr(cublas_engine, name,
                            lambda *a, _real=real, _name=name, **k: engine_calls.append(_name) or _real(*a, **k))
    assert tm.flash_planned(256) and tm.flash_planned(tm.FLASH_MAX_TOKENS)
    assert tm.flash_planned(260) == (setting == "flash")
    args = make_args("token", 2, 260, 24, 20, variant="mixer", seed=25)
    check_backend("token", args, torch.float32, "triton", approximate="tanh", device=DEVICE)
    if setting is None:
        assert {"token_mixing_forward", "token_mixing_backward"} <= set(engine_calls)
    else:
        assert not engine_calls


def test_triton_token_mixing_cublas_token_linear_with_layernorm(triton_backend, cublas_engine):
    # ResMLP's single token linear with a LayerNorm instead of the affine (no named model; the fused path
    # normalises in torch there): one norm pass on this engine
    from conftest import DEVICE

    args = make_args("token", 2, 49, 40, 49, variant="resmlp", seed=22)
    B, S, C = args["x"].shape
    dout = torch.randn(B, S, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    results = []
    for dt, backend, dev in ((torch.float64, "reference", "cpu"), (torch.bfloat16, "reference", "cpu"),
                             (torch.bfloat16, "triton", DEVICE)):
        leaves = {n: None if args[n] is None else args[n].detach().to(dev, dt).requires_grad_() for n in NAMES}
        from mixer_fast import ops

        out = ops.token_mixing(*(leaves[n] for n in NAMES[:7]), norm="layernorm", scale=leaves["scale"],
                               sample_scale=args["sample_scale"].to(dev, dt), backend=backend)
        out.backward(dout.to(dev, dt))
        results.append((out.detach().cpu(), {n: t.grad.cpu() for n, t in leaves.items() if t is not None}))
    (o64, g64), (oe, ge), (of, gf) = results
    assert_numerics(of, oe, o64, "token linear output")
    for name in g64:
        assert_numerics(gf[name], ge[name], g64[name], f"token linear grad {name}")


@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
def test_triton_token_mixing_cublas_inference_strided_and_empty(triton_backend, cublas_engine, variant):
    from conftest import DEVICE
    from mixer_fast import ops

    args = make_args("token", 3, 16, 64, 24, variant=variant, seed=23)
    p = [None if args[k] is None else args[k].float().to(DEVICE) for k in NAMES[1:7]]
    kw = dict(norm="affine", scale=args["scale"].float().to(DEVICE)) if variant == "resmlp" else {}
    x = torch.randn(3, 64, 16, dtype=torch.float32, device=DEVICE).transpose(1, 2)  # stride 1 along S
    with torch.no_grad():
        got = ops.token_mixing(x, *p, backend="triton", **kw)
        want = ops.token_mixing(x.contiguous().cpu(), *(None if t is None else t.cpu() for t in p),
                                backend="reference", **{k: v.cpu() if torch.is_tensor(v) else v for k, v in kw.items()})
    assert max_err(got.cpu(), want) < 1e-5
    empty = torch.randn(0, 16, 64, device=DEVICE, requires_grad=True)
    out = ops.token_mixing(empty, *p, backend="triton", **kw)
    out.sum().backward()
    assert out.shape == (0, 16, 64) and empty.grad.shape == (0, 16, 64)


def test_triton_token_mixing_cublas_under_autocast(triton_backend, cublas_engine):
    # fp32 activations and parameters, bf16 autocast: the GEMMs in bf16, the norm, GELU's input, the residual
    # in fp32 passes; gradients in the parameters' fp32
    from conftest import DEVICE
    from mixer_fast import ops

    args = make_args("token", 2, 49, 40, 24, variant="mixer", seed=24)
    results = []
    for backend, dt, dev, autocast in (("reference", torch.float64, "cpu", False),
                                       ("reference", torch.float32, "cpu", True),
                                       ("triton", torch.float32, DEVICE, True)):
        leaves = [args[k].detach().to(device=dev, dtype=dt).requires_grad_() for k in NAMES[:7]]
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=autocast):
            out = ops.token_mixing(*leaves, backend=backend)
        out.backward(torch.ones_like(out))
        results.append([out.detach().cpu(), *(t.grad.cpu() for t in leaves)])
    ref64, eager, got = results
    for name, g, e, r in zip(("out", *NAMES[:7]), got, eager, ref64):
        assert g.dtype == torch.float32, name
        assert max_err(g, r) <= 2 * max_err(e, r) + 1.6e-2, name  # bf16 results: the rule with bf16's floor


@pytest.mark.parametrize("variant", ["mixer", "resmlp"])
def test_token_engines_share_saved_tensors(triton_backend, monkeypatch, variant):
    # Either engine's backward follows either engine's forward: both save x and the statistics (and the
    # branch), nothing of the hidden.
    from conftest import DEVICE
    from mixer_fast import ops

    args = make_args("token", 2, 49, 40, 24, variant=variant, seed=25)
    dout = torch.randn(2, 49, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    _, want = run("token", args, torch.float64, "reference", dout, approximate="none")
    env = "MIXER_FAST_GEMM" if variant == "resmlp" else "MIXER_FAST_TOKEN"
    fused = "fused" if variant == "resmlp" else "flash"
    norm = "affine" if variant == "resmlp" else "layernorm"
    for fwd, bwd in ((fused, "cublas"), ("cublas", fused)):
        leaves = {n: None if args[n] is None else args[n].detach().to(DEVICE, torch.float32).requires_grad_()
                  for n in NAMES}
        ss = None if args["sample_scale"] is None else args["sample_scale"].to(DEVICE, torch.float32)
        monkeypatch.setenv(env, fwd)
        out = ops.token_mixing(*(leaves[n] for n in NAMES[:7]), norm=norm, scale=leaves["scale"], sample_scale=ss,
                               backend="triton")
        monkeypatch.setenv(env, bwd)
        out.backward(dout.to(DEVICE, torch.float32))
        for name in want:
            assert max_err(leaves[name].grad.cpu(), want[name]) < 1e-4, (fwd, bwd, name)


def test_token_major_passes_against_float64(triton_backend):
    # The passes that lay the token GEMMs' operands out token-major, (S, B·C): the norm, dO, and the residual
    # add of a token-major branch with a per-token bias
    from conftest import DEVICE
    from mixer_fast.kernels.triton.layer_norm import norm_apply
    from mixer_fast.kernels.triton.residual import residual_add, residual_grad

    g = torch.Generator().manual_seed(26)
    B, S, C = 3, 7, 130
    x = torch.randn(B, C, S, generator=g).transpose(1, 2)
    w, b, scale, bias = (torch.randn(n, generator=g) for n in (C, C, C, S))
    ss = torch.tensor([1.0, 0.0, 2.0])
    xn, mean, rstd, _ = norm_apply(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), norm="layernorm", eps=1e-6,
                                   dtype=torch.float32, token_major=True)
    want = torch.nn.functional.layer_norm(x.double(), (C,), w.double(), b.double(), 1e-6)
    assert xn.shape == (S, B * C) and xn.is_contiguous()
    torch.testing.assert_close(xn.cpu().double().view(S, B, C).permute(1, 0, 2), want, rtol=1e-5, atol=1e-5)
    dout = torch.randn(B, S, C, generator=g)
    res = residual_grad(dout.to(DEVICE), scale=scale.to(DEVICE), sample_scale=ss.to(DEVICE), branch=None,
                        dtype=torch.float32, bias=None, token_major=True)
    assert res.do.stride() == (C, B * C, 1)
    torch.testing.assert_close(res.do.cpu(), dout * scale * ss[:, None, None])
    # with nothing to scale, dO is still written token-major
    plain = residual_grad(dout.to(DEVICE), scale=None, sample_scale=None, branch=None, dtype=torch.float32,
                          bias=None, token_major=True)
    assert plain.do.stride() == (C, B * C, 1) and torch.equal(plain.do.cpu(), dout)
    y = torch.randn(S, B, C, generator=g)
    out, branch = residual_add(x.to(DEVICE), y.to(DEVICE).permute(1, 0, 2), bias=bias.to(DEVICE),
                               scale=scale.to(DEVICE), sample_scale=ss.to(DEVICE), store_branch=True)
    y_b = y.permute(1, 0, 2).double() + bias.double()[:, None]
    torch.testing.assert_close(branch.cpu().double(), y_b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.cpu().double(), x.double() + ss.double()[:, None, None] * scale.double() * y_b,
                               rtol=1e-6, atol=1e-5)
    assert residual_add(x.to(DEVICE), y.to(DEVICE).permute(1, 0, 2), bias=None, scale=None, sample_scale=None,
                        store_branch=False)[1] is None


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_passes_with_a_row_bias(triton_backend, approximate):
    from conftest import DEVICE
    from mixer_fast.kernels.triton.cublas_engine import gelu_backward, gelu_forward

    g = torch.Generator().manual_seed(27)
    M, N = 37, 300  # rows: the token hidden; columns: image × channel
    z, dh = torch.randn(M, N, generator=g), torch.randn(M, N, generator=g)
    bias = torch.randn(M, generator=g)
    z64 = (z.double() + bias.double()[:, None]).requires_grad_()
    h64 = torch.nn.functional.gelu(z64, approximate=approximate)
    (dz64,) = torch.autograd.grad(h64, z64, dh.double())
    h = gelu_forward(z.to(DEVICE), approximate, inplace=False, row_bias=bias.to(DEVICE))
    torch.testing.assert_close(h.cpu().double(), h64.detach(), rtol=1e-5, atol=1e-6)
    dz, h2, db = gelu_backward(dh.to(DEVICE), z.to(DEVICE), approximate=approximate, bias_grad=True,
                               row_bias=bias.to(DEVICE))
    assert torch.equal(h2, h)  # the backward's H is the forward's, bit for bit
    torch.testing.assert_close(dz.cpu().double(), dz64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db.cpu().double(), dz64.sum(1), rtol=1e-5, atol=1e-4)


def test_one_launch_description_sets_every_constexpr_of_each_token_kernel():
    # The torch and JAX launchers and the static report all build a token launch's constexprs with
    # launch_constexprs: it must name exactly the kernel's constexpr parameters (dW's PART aside, set per
    # launch), so that a flag added to a kernel cannot be left out of one front-end.
    import inspect

    from mixer_fast.kernels.triton import token_mixing as tm

    kernels = {"token_mlp_fwd": tm.token_mlp_fwd_kernel, "token_mlp_dx": tm.token_mlp_dx_kernel,
               "token_mlp_dw": tm.token_mlp_dw_kernel}
    strides = ((196 * 768, 768, 1), (196 * 768, 768, 1), (208, 1), (384, 1))
    for name, kernel in kernels.items():
        params = inspect.signature(getattr(kernel, "fn", kernel)).parameters.values()  # interpreted or jitted
        constexpr = {p.name for p in params if "constexpr" in str(p.annotation)}
        plan = tm.gpu_config(name, 196, 384)
        meta = tm.launch_constexprs(name, plan, tm.Features(), 196, 768, 384, *strides, interpreter=False)
        assert set(meta) == constexpr - ({"PART"} if name == "token_mlp_dw" else set()), name
        runtime = [p.name for p in params if p.name not in constexpr]
        inputs = (tm.fwd_inputs(*range(11)) if name == "token_mlp_fwd" else tm.bwd_inputs(*range(9)))
        assert len(inputs) == runtime.index({"token_mlp_fwd": "out_ptr", "token_mlp_dx": "g_ptr",
                                             "token_mlp_dw": "B"}[name]), name
    # absent operands are passed as the norm weight (never read: their flags are off)
    assert tm.fwd_inputs("x", None, None, "nw", "nb", "w1", None, "w2", None, None, None) == \
        ["x", "nw", "nw", "nw", "nb", "w1", "nw", "w2", "nw", "nw", "nw"]
    flags = tm.Features(norm="affine", has_b1=False, approximate="tanh", precision="tf32", idx64=True, has_b2=False,
                        has_scale=True, has_ss=True, store_branch=True).constexprs("token_mlp_fwd", interpreter=True)
    assert flags == dict(NORM=tm.AFFINE, HAS_B1=False, APPROX_TANH=True, PRECISION="tf32", INTERPRETER=True,
                         IDX64=True, HAS_B2=False, HAS_SCALE=True, HAS_SS=True, STORE_BRANCH=True)
    assert "HAS_B2" not in tm.Features().constexprs("token_mlp_dx", interpreter=False)
    with pytest.raises(ValueError, match="kernel: expected one of"):
        tm.Features().constexprs("token_mlp", interpreter=False)
    # dW's grid: every hidden slice times the splits, never more splits than work items
    plan = tm.Launch((256, 0, 0), 16, 64, 8, 3)
    assert plan.dw_grid(256, 768, 384, 132) == (6, tm.dw_splits(6, 256 * 48, 132))  # 44 on a GPU, 2 interpreted
    assert plan.dw_grid(1, 16, 384, 132) == (6, 1)


def test_flash_token_grid_fits_cuda_at_any_batch():
    # token_mlp_fwd / token_mlp_dx put the images on grid axis 0: on axis 1 (as before), batch 65 536 of
    # small images would not launch on a GPU (CUDA stops axes 1 and 2 at 65 535; Triton's launcher does
    # not check and the interpreter has no limit, so the plan is what can be tested here).
    from mixer_fast.kernels.triton.token_mixing import gpu_config

    for kernel in ("token_mlp_fwd", "token_mlp_dx"):
        plan = gpu_config(kernel, 16, 64)
        for B, C in ((65_536, 128), (1_000_000, 768), (1, 100), (0, 768)):
            images, tiles = plan.grid(B, C)
            assert images == B < 2 ** 31 and tiles * plan.block_c >= C and tiles <= 65_535


def test_gelu_backward_grid_fits_cuda_at_any_batch():
    # Token mixing hands gelu_backward Z as (D_S, B·C): at Mixer-B/16 and batch 16 384, 98 304 column blocks,
    # past CUDA's 65 535 on grid axes 1 and 2 (Triton's launcher does not check; the interpreter has no such
    # limit, so only the plan can be tested here). One axis, which allows 2³¹ − 1.
    from mixer_fast.kernels.triton.cublas_engine import GELU_BLOCK_D, GELU_ROW_GROUP, gelu_backward_grid

    for M, D in ((384, 16384 * 768), (50176 * 64, 3072), (1, 1)):
        grid, groups, d_blocks = gelu_backward_grid(M, D)
        assert len(grid) == 1 and grid[0] == groups * d_blocks < 2 ** 31
        assert groups * GELU_ROW_GROUP >= M and d_blocks * GELU_BLOCK_D >= D
