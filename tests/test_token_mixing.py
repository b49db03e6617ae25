"""Token mixing on the triton backend (interpreter on CPU; compiled on a GPU) against the reference,
forward and every gradient, with outputs poisoned before launch (tests shared with channel mixing)."""
from op_cases import triton_op_tests

# (B, S, C, D_S): awkward S (196, 49, 16), C (100, 64), D_S not a power of two, B = 1 and 3.
SHAPES = [(1, 49, 100, 24), (3, 16, 64, 30), (2, 196, 64, 98)]

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
