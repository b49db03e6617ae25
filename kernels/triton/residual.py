"""The residual branch's backward, shared by the mixing ops: out = x + ss_b · scale ⊙ branch (and its
forward, where the branch comes from a cuBLAS GEMM: residual_add).

Every op's backward starts from dout = dL/dout (B, S, C) and needs, before its GEMMs:
  dO = dout · scale · ss_b, the branch's gradient, in the GEMM operands' dtype;
  scale's gradient Σ_(b, s) ss_b · dout · branch (layer scale: ResMLP);
  the branch bias's gradient, Σ dO over the tokens (channel mixing's fc2 bias, per channel) or over the
  images and channels (token mixing's bias, per token).
``residual_grad_kernel`` makes them in one pass over dout (and branch). In torch they were up to four
passes and a whole-activation temporary (dout · branch) before the sum; on a CPU ``sum(dtype=float32)``
of a 16-bit tensor also copied it to fp32. The product and the sums are in fp32, dO rounded once.

Each program owns ROW_GROUP tokens × BLOCK_C channels and writes one row of per-channel partial sums;
the launcher sums the rows in a fixed order (deterministic: no atomics).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional, Tuple

import triton
import triton.language as tl

from . import _launch
from .elementwise import round_to
from .layer_norm import channel_vector, token_tile

if TYPE_CHECKING:  # torch loads when a launcher runs
    import torch

    Tensor = torch.Tensor

# Which sums of dO the launch makes (the kernel's BIAS; PER_CHANNEL / PER_TOKEN name them to callers).
BIAS_NONE, BIAS_PER_CHANNEL, BIAS_PER_TOKEN = 0, 1, 2
_BIAS_PER_CHANNEL = tl.constexpr(BIAS_PER_CHANNEL)
_BIAS_PER_TOKEN = tl.constexpr(BIAS_PER_TOKEN)
PER_CHANNEL, PER_TOKEN = "per_channel", "per_token"
_BIAS_MODES = {None: BIAS_NONE, PER_CHANNEL: BIAS_PER_CHANNEL, PER_TOKEN: BIAS_PER_TOKEN}


@triton.jit
def residual_grad_kernel(
    dout_ptr, branch_ptr, scale_ptr, ss_ptr,
    R, S, C, sdb, sds, sdc, sbb, sbs, sbc, sob, sos,
    do_ptr, scale_part_ptr, bias_part_ptr,
    HAS_SCALE: tl.constexpr, HAS_SS: tl.constexpr, SCALE_GRAD: tl.constexpr, STORE_DO: tl.constexpr,
    DO_SPLIT: tl.constexpr, BIAS: tl.constexpr, INTERPRETER: tl.constexpr, ROW_GROUP: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """For tokens pid_r · ROW_GROUP … (rows r → (r // S, r % S)) and channels pid_c · BLOCK_C …: dO into
    ``do`` (STORE_DO; token (b, s) at b · sob + s · sos under DO_SPLIT, e.g. token-major, else row r at
    r · C: contiguous, and 12 registers fewer, report triton 3.8), and partial sums: Σ ss · dout · branch (SCALE_GRAD) into row pid_r
    of ``scale_part`` (·, C); Σ_tokens dO (BIAS_PER_CHANNEL) into row pid_r of ``bias_part`` (·, C), or
    Σ_channels dO (BIAS_PER_TOKEN) into row pid_c of ``bias_part`` (·, R)."""
    pid_r = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = cols < C
    c64 = cols.to(tl.int64)
    f = channel_vector(scale_ptr, cols, mask_c, HAS_SCALE, BLOCK_C)
    scale_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    bias_acc = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for r0 in range(pid_r * ROW_GROUP, pid_r * ROW_GROUP + ROW_GROUP, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        mask_r = rows < R
        r64 = rows.to(tl.int64)
        m = mask_r[:, None] & mask_c[None, :]
        d = token_tile(dout_ptr, r64, c64, m, S, sdb, sds, sdc)
        if HAS_SS:
            d = d * tl.load(ss_ptr + r64 // S, mask=mask_r, other=0.0).to(tl.float32)[:, None]
        if SCALE_GRAD:
            scale_acc += tl.sum(d * token_tile(branch_ptr, r64, c64, m, S, sbb, sbs, sbc), axis=0)
        do = d * f[None, :]
        if STORE_DO:
            if DO_SPLIT:
                out = ((r64 // S) * sob + (r64 % S) * sos)[:, None] + c64[None, :]
            else:
                out = r64[:, None] * C + c64[None, :]
            tl.store(do_ptr + out, round_to(do, do_ptr.dtype.element_ty, INTERPRETER), mask=m)
        if BIAS == _BIAS_PER_CHANNEL:
            bias_acc += tl.sum(do, axis=0)
        if BIAS == _BIAS_PER_TOKEN:
            tl.store(bias_part_ptr + pid_c.to(tl.int64) * R + r64, tl.sum(do, axis=1), mask=mask_r)
    if SCALE_GRAD:
        tl.store(scale_part_ptr + pid_r.to(tl.int64) * C + c64, scale_acc, mask=mask_c)
    if BIAS == _BIAS_PER_CHANNEL:
        tl.store(bias_part_ptr + pid_r.to(tl.int64) * C + c64, bias_acc, mask=mask_c)


@triton.jit
def residual_add_kernel(
    x_ptr, y_ptr, bias_ptr, scale_ptr, ss_ptr,
    R, S, C, sxb, sxs, sxc, syb, sys, syc,
    out_ptr, branch_ptr,
    HAS_BIAS: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SS: tl.constexpr, STORE_BRANCH: tl.constexpr,
    INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """The forward, for a branch y computed elsewhere (a cuBLAS GEMM): out = x + ss_b · scale ⊙ (y + bias_s)
    ((R, C) contiguous, out's dtype), the bias per token; under STORE_BRANCH also branch = y + bias_s
    ((R, C) contiguous). x and y by (image, token, channel) strides: y may be token-major (S, B, C)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_r = rows < R
    mask_c = cols < C
    r64 = rows.to(tl.int64)
    c64 = cols.to(tl.int64)
    m = mask_r[:, None] & mask_c[None, :]
    y = token_tile(y_ptr, r64, c64, m, S, syb, sys, syc)
    if HAS_BIAS:
        y += tl.load(bias_ptr + r64 % S, mask=mask_r, other=0.0).to(tl.float32)[:, None]
    out = r64[:, None] * C + c64[None, :]
    if STORE_BRANCH:
        tl.store(branch_ptr + out, round_to(y, branch_ptr.dtype.element_ty, INTERPRETER), mask=m)
    y = y * channel_vector(scale_ptr, cols, mask_c, HAS_SCALE, BLOCK_C)[None, :]
    if HAS_SS:
        y = y * tl.load(ss_ptr + r64 // S, mask=mask_r, other=0.0).to(tl.float32)[:, None]
    x = token_tile(x_ptr, r64, c64, m, S, sxb, sxs, sxc)
    tl.store(out_ptr + out, round_to(x + y, out_ptr.dtype.element_ty, INTERPRETER), mask=m)


# ---------------------------------------------------------------------------------------------------------
# Launcher

# 8 × 128 tiles on 4 warps, 16 of them a program: at Mixer-B/16, batch 256, 392 × 6 programs, and partial
# rows of R / 128 × C fp32 (1.2 MB against dout's 77 MB). The tile loop is unrolled, its loads issued
# together: 94-96 registers (report, sm_90a), where 16-row tiles took 206-212 (2 programs an SM, not 5).
ROW_GROUP, BLOCK_R, BLOCK_C = 128, 8, 128


class ResidualGrads(NamedTuple):
    """What :func:`residual_grad` returns: ``do`` (B, S, C) in the asked dtype; ``scale`` (C,) fp32 or
    None; ``bias`` (C,) (per channel) or (S,) (per token) fp32, or None."""

    do: Tensor
    scale: Optional[Tensor]
    bias: Optional[Tensor]


def residual_grad(dout: Tensor, *, scale: Optional[Tensor], sample_scale: Optional[Tensor],
                  branch: Optional[Tensor], dtype: torch.dtype, bias: Optional[str],
                  token_major: bool = False) -> ResidualGrads:
    """The backward of out = x + ss_b · scale ⊙ branch (+ the branch's bias) for dout (B, S, C).

    ``scale`` (C,) and ``sample_scale`` (B,): the factors, or None. ``branch`` (B, S, C): the stored branch,
    given when scale's gradient is wanted (else None). ``dtype``: dO's (the weights', which the GEMMs
    consume; dout itself is returned as dO when nothing scales it and the dtype is its own). ``bias``:
    None, PER_CHANNEL (Σ over images and tokens: channel mixing's fc2) or PER_TOKEN (Σ over images and
    channels: token mixing's). ``token_major``: dO is always written, into (S, B, C) storage (returned as
    its (B, S, C) view, strides (C, B·C, 1)): the token GEMMs' (S, B·C) operand."""
    import torch

    if bias not in _BIAS_MODES:
        raise ValueError(f"bias: expected one of {sorted(k for k in _BIAS_MODES if k)} or None, got {bias!r}")
    if branch is not None and scale is None:
        raise ValueError("branch: scale's gradient needs scale, got scale=None")
    B, S, C = dout.shape
    R = B * S
    store_do = token_major or scale is not None or sample_scale is not None or dout.dtype != dtype
    if token_major:
        do = _launch.new_output((S, B, C), dout, dtype).permute(1, 0, 2)
    else:
        do = _launch.new_output((B, S, C), dout, dtype) if store_do else dout
    groups, c_blocks = triton.cdiv(R, ROW_GROUP), triton.cdiv(C, BLOCK_C)
    scale_part = _launch.new_output((groups, C), dout, torch.float32) if branch is not None else None
    bias_part = None
    if bias == PER_CHANNEL:
        bias_part = _launch.new_output((groups, C), dout, torch.float32)
    elif bias == PER_TOKEN:
        bias_part = _launch.new_output((c_blocks, R), dout, torch.float32)
    if R and C and (store_do or scale_part is not None or bias_part is not None):
        br = branch if branch is not None else dout
        with _launch.serialized():
            _launch.on_grid(residual_grad_kernel, (groups, c_blocks))(
                dout, br, scale if scale is not None else dout, sample_scale if sample_scale is not None else dout,
                R, S, C, *dout.stride(), *br.stride(), do.stride(0), do.stride(1), do,
                scale_part if scale_part is not None else do,
                bias_part if bias_part is not None else do, HAS_SCALE=scale is not None,
                HAS_SS=sample_scale is not None, SCALE_GRAD=branch is not None, STORE_DO=store_do,
                DO_SPLIT=token_major,
                BIAS=_BIAS_MODES[bias], INTERPRETER=_launch.INTERPRET, ROW_GROUP=ROW_GROUP, BLOCK_R=BLOCK_R,
                BLOCK_C=BLOCK_C)
    # With no tokens or no channels the partials are empty, and their sums the zeros they should be.
    scale_grad = scale_part.sum(0) if scale_part is not None else None
    bias_grad = None
    if bias == PER_CHANNEL:
        bias_grad = bias_part.sum(0)
    elif bias == PER_TOKEN:
        bias_grad = bias_part.view(c_blocks, B, S).sum((0, 1))
    return ResidualGrads(do, scale_grad, bias_grad)


# A single 8 × 128 tile a program (4 warps): a memory-bound pass with no partial sums to keep (16 × 128
# held 184 registers, report sm_90a).
ADD_BLOCK_R, ADD_BLOCK_C = 8, 128


def residual_add(x: Tensor, y: Tensor, *, bias: Optional[Tensor], scale: Optional[Tensor],
                 sample_scale: Optional[Tensor], store_branch: bool) -> Tuple[Tensor, Optional[Tensor]]:
    """out = x + ss_b · scale ⊙ (y + bias_s) for x and y (B, S, C) (any strides; y in any float dtype), bias
    (S,) per token, scale (C,), sample_scale (B,), each or None: (out (B, S, C) contiguous in x's dtype, the
    branch y + bias (B, S, C) contiguous in x's dtype when ``store_branch``, else None), in one pass."""
    B, S, C = x.shape
    R = B * S
    out = _launch.new_output((B, S, C), x, x.dtype)
    branch = _launch.new_output((B, S, C), x, x.dtype) if store_branch else None
    if R and C:
        dummy = out
        with _launch.serialized():
            _launch.on_grid(residual_add_kernel, (triton.cdiv(R, ADD_BLOCK_R), triton.cdiv(C, ADD_BLOCK_C)))(
                x, y, bias if bias is not None else dummy, scale if scale is not None else dummy,
                sample_scale if sample_scale is not None else dummy, R, S, C, *x.stride(), *y.stride(), out,
                branch if branch is not None else dummy, HAS_BIAS=bias is not None, HAS_SCALE=scale is not None,
                HAS_SS=sample_scale is not None, STORE_BRANCH=store_branch, INTERPRETER=_launch.INTERPRET,
                BLOCK_R=ADD_BLOCK_R, BLOCK_C=ADD_BLOCK_C)
    return out, branch
