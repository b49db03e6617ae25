"""Token mixing on the triton backend (interpreter on CPU; compiled on a GPU) against the reference,
forward and every gradient, with outputs poisoned before launch (tests shared with channel mixing)."""
from op_cases import triton_op_tests

# (B, S, C, D_S): awkward S (196, 49, 16), C (100, 64), D_S not a power of two, B = 1 and 3.
SHAPES = [(1, 49, 100, 24), (3, 16, 64, 30), (2, 196, 64, 98)]

(test_triton_token_mixing, test_triton_token_mixing_both_gelus,
 test_triton_token_mixing_non_contiguous_and_empty) = triton_op_tests("token", SHAPES, hidden=24)
