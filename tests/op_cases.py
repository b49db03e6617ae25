"""Shared cases for the op tests (test_token_mixing.py, test_channel_mixing.py): random arguments,
and the check of a backend's forward and every gradient against eager and float64 (DESIGN.md rule)."""
from __future__ import annotations

from typing import Dict, Optional

import pytest
import torch

from mixer_fast import ops
from tolerances import assert_numerics, max_err

NAMES = ("x", "norm_weight", "norm_bias", "fc1_weight", "fc1_bias", "fc2_weight", "fc2_bias", "scale")


def make_args(op: str, B: int, S: int, C: int, D: int, *, variant: str, seed: int = 0) -> Dict[str, Optional[torch.Tensor]]:
    """float64 arguments. variant: "mixer" (LayerNorm MLP), "droppath" (+ per-sample scale), "resmlp"
    (affine, layer scale, drop path; token mixing as ResMLP's single S×S linear)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, std=1.0, mean=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std + mean

    n_in = S if op == "token" else C
    args = dict(x=r(B, S, C), norm_weight=r(C, std=0.2, mean=1.0), norm_bias=r(C, std=0.2))
    if op == "token" and variant == "resmlp":
        args.update(fc1_weight=r(S, S, std=S ** -0.5), fc1_bias=r(S, std=0.2), fc2_weight=None, fc2_bias=None)
    else:
        args.update(fc1_weight=r(D, n_in, std=n_in ** -0.5), fc1_bias=r(D, std=0.2),
                    fc2_weight=r(n_in, D, std=D ** -0.5), fc2_bias=r(n_in, std=0.2))
    args["scale"] = r(C, std=0.5) if variant == "resmlp" else None
    args["sample_scale"] = (torch.tensor([0.0, 1.25, 2.5, 1.0][:B] + [1.0] * max(0, B - 4), dtype=torch.float64)
                            if variant in ("droppath", "resmlp") else None)
    return args


def run(op: str, args, dtype: torch.dtype, backend: str, dout: torch.Tensor, *, approximate: str, device: str = "cpu"):
    """Output and gradients (name → tensor) of the op on ``backend`` with inputs cast to ``dtype``."""
    fn = ops.token_mixing if op == "token" else ops.channel_mixing
    leaves = {}
    for name in NAMES:
        t = args[name]
        leaves[name] = None if t is None else t.detach().to(device=device, dtype=dtype).requires_grad_()
    ss = args["sample_scale"]
    ss = None if ss is None else ss.to(device=device, dtype=dtype)
    norm = "affine" if args["scale"] is not None else "layernorm"
    out = fn(*(leaves[n] for n in NAMES[:7]), eps=1e-6, approximate=approximate, norm=norm, scale=leaves["scale"],
             sample_scale=ss, backend=backend)
    out.backward(dout.to(device=device, dtype=dtype))
    return out.detach(), {n: t.grad for n, t in leaves.items() if t is not None}


def check_backend(op: str, args, dtype: torch.dtype, backend: str, *, approximate: str = "none",
                  device: str = "cpu") -> None:
    """Forward and every gradient of ``backend`` against eager (same dtype) and float64."""
    B, S, C = args["x"].shape
    dout = torch.randn(B, S, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out64, g64 = run(op, args, torch.float64, "reference", dout, approximate=approximate)
    eager, g_eager = run(op, args, dtype, "reference", dout, approximate=approximate)
    fused, g_fused = run(op, args, dtype, backend, dout, approximate=approximate, device=device)
    assert fused.dtype == dtype
    assert_numerics(fused.cpu(), eager, out64, f"{op} mixing output")
    assert g_fused.keys() == g64.keys()
    for name in g64:
        assert g_fused[name].dtype == dtype, name
        assert_numerics(g_fused[name].cpu(), g_eager[name], g64[name], f"{op} mixing grad {name}")


DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def triton_op_tests(op: str, shapes, hidden: int):
    """The triton backend's tests of one op (``op``: "token" or "channel"), shared by test_token_mixing.py
    and test_channel_mixing.py: every dtype × shape × variant, both GELUs, strided and empty input.
    ``shapes`` are (B, S, C, D); ``hidden`` is D for the single-shape tests."""
    from conftest import DEVICE

    fn = ops.token_mixing if op == "token" else ops.channel_mixing

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("shape", shapes, ids=lambda s: "x".join(map(str, s)))
    @pytest.mark.parametrize("variant", ["mixer", "droppath", "resmlp"])
    def test_against_reference(triton_backend, dtype, shape, variant):
        B, S, C, D = shape
        approximate = "tanh" if (S + C) % 2 else "none"  # both GELUs over the shape list, without doubling it
        check_backend(op, make_args(op, B, S, C, D, variant=variant), dtype, "triton", approximate=approximate,
                      device=DEVICE)

    @pytest.mark.parametrize("approximate", ["none", "tanh"])
    def test_both_gelus(triton_backend, approximate):
        check_backend(op, make_args(op, 2, 16, 64, hidden, variant="mixer", seed=3), torch.float32, "triton",
                      approximate=approximate, device=DEVICE)

    def test_non_contiguous_and_empty(triton_backend):
        args = make_args(op, 3, 16, 64, hidden, variant="mixer")
        x = torch.randn(3, 64, 16, dtype=torch.float32, device=DEVICE).transpose(1, 2)  # stride 1 along S
        p = [args[k].float().to(DEVICE) for k in NAMES[1:7]]
        got = fn(x, *p, backend="triton")
        want = fn(x.contiguous(), *p, backend="reference")
        assert max_err(got, want) < 1e-5
        assert fn(torch.randn(0, 16, 64, device=DEVICE), *p, backend="triton").shape == (0, 16, 64)

    return test_against_reference, test_both_gelus, test_non_contiguous_and_empty
