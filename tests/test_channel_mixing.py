"""Channel mixing on the triton backend (interpreter on CPU; compiled on a GPU) against the reference."""
from __future__ import annotations

import pytest
import torch

from conftest import DEVICE
from op_cases import check_backend, make_args

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (B, S, C, D_C): awkward S (196, 49, 16), C (100, 64), D_C not a power of two, B = 1 and 3.
SHAPES = [(1, 49, 100, 72), (3, 16, 64, 200), (2, 196, 64, 96)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["mixer", "droppath", "resmlp"])
def test_triton_channel_mixing(triton_backend, dtype, shape, variant):
    B, S, C, D = shape
    approximate = "tanh" if (S + C) % 2 else "none"  # both GELUs over the shape list, without doubling it
    check_backend("channel", make_args("channel", B, S, C, D, variant=variant), dtype, "triton",
                  approximate=approximate, device=DEVICE)


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_triton_channel_mixing_both_gelus(triton_backend, approximate):
    check_backend("channel", make_args("channel", 2, 16, 64, 40, variant="mixer", seed=3), torch.float32, "triton",
                  approximate=approximate, device=DEVICE)


def test_triton_channel_mixing_non_contiguous_and_empty(triton_backend):
    from mixer_fast import ops
    from tolerances import max_err

    args = make_args("channel", 3, 16, 64, 48, variant="mixer")
    base = torch.randn(3, 64, 16, dtype=torch.float32, device=DEVICE)
    x = base.transpose(1, 2)  # (B, S, C) with stride 1 along S
    p = [args[k].float().to(DEVICE) for k in ("norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias")]
    got = ops.channel_mixing(x, *p, backend="triton")
    want = ops.channel_mixing(x.contiguous(), *p, backend="reference")
    assert max_err(got, want) < 1e-5
    empty = ops.channel_mixing(torch.randn(0, 16, 64, device=DEVICE), *p, backend="triton")
    assert empty.shape == (0, 16, 64)
