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
    from mixer_fast.kernels.triton.token_mixing import DW1, DW2, DW_BOTH, KERNELS, gpu_config, launch_plan

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
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
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
