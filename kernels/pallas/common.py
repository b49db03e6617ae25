"""Pieces shared by the Pallas kernels: GELU with an erf that Mosaic TPU can lower, tile choice."""
from __future__ import annotations

import contextlib
import contextvars
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp

# The default scoped VMEM limit of the smallest current TPU generation (v5e: 16 MiB); every launch's
# estimate must stay inside it, double-buffered inputs and outputs included.
VMEM_LIMIT = 16 * 1024 * 1024

# Abramowitz & Stegun 7.1.26: |error| ≤ 1.5e-7 over the reals. Mosaic TPU has no erf/erfc lowering
# (seen: the TPU export rejects jax.lax.erf), and exp/reciprocal are native.
_P = 0.3275911
_A = (0.254829592, -0.284496736, 1.421413741, -1.453152027, 1.061405429)


_INTERPRETING = contextvars.ContextVar("mixer_fast_pallas_interpreting", default=False)


@contextlib.contextmanager
def interpreting(interpret):
    """Set while a pallas_call's kernel is traced for interpret mode (``interpret`` truthy), so that
    :func:`dot` knows its operands will meet XLA:CPU rather than the MXU."""
    token = _INTERPRETING.set(bool(interpret))
    try:
        yield
    finally:
        _INTERPRETING.reset(token)


def dot(a: jax.Array, b: jax.Array, dims=(((1,), (0,)), ((), ()))) -> jax.Array:
    """lax.dot_general accumulating in fp32. In interpret mode 16-bit operands are widened first: XLA:CPU
    has no bf16 x bf16 -> f32 dot for some shapes under jit ("Unsupported element type for
    DotThunk::Execute", found by tests/test_properties.py); the widening is exact (a product of two
    16-bit floats is exact in fp32) and the sum is fp32 either way. On TPU the MXU takes them as they are."""
    if _INTERPRETING.get() and jnp.dtype(a.dtype).itemsize == 2:
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def erf(x: jax.Array) -> jax.Array:
    """erf in fp32 from exp and a rational polynomial (A&S 7.1.26)."""
    a = jnp.abs(x)
    t = 1.0 / (1.0 + _P * a)
    poly = t * (_A[0] + t * (_A[1] + t * (_A[2] + t * (_A[3] + t * _A[4]))))
    y = 1.0 - poly * jnp.exp(-a * a)
    # jnp.where, not jnp.sign: sign's TPU lowering asks for the chip's kind, so it cannot be exported
    # for TPU from a machine without one (seen: "Unsupported TPU device kind: cpu").
    return jnp.where(x < 0, -y, y)


def gelu(z: jax.Array, approximate: str) -> jax.Array:
    """GELU of fp32 ``z``: tanh form (native on TPU) or exact via :func:`erf`."""
    if approximate == "tanh":
        return 0.5 * z * (1.0 + jnp.tanh(math.sqrt(2.0 / math.pi) * (z + 0.044715 * z * z * z)))
    return 0.5 * z * (1.0 + erf(z * (1.0 / math.sqrt(2.0))))


def gelu_grad(z: jax.Array, approximate: str) -> jax.Array:
    """d GELU(z) / dz in fp32, tanh form or exact (via :func:`erf`)."""
    if approximate == "tanh":
        k = math.sqrt(2.0 / math.pi)
        t = jnp.tanh(k * (z + 0.044715 * z * z * z))
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * k * (1.0 + 3 * 0.044715 * z * z)
    return 0.5 * (1.0 + erf(z * (1.0 / math.sqrt(2.0)))) + z * jnp.exp(-0.5 * z * z) * (1.0 / math.sqrt(2 * math.pi))


def norm_inputs(x: jax.Array, norm_weight, norm_bias, norm: str, eps: float):
    """The kernels' norm inputs, computed by XLA: per-row mean and 1/std in fp32 shaped x.shape[:-1] + (1,)
    (zeros, unused, for the affine norm), and the weight and bias as (1, C), ones / zeros when absent."""
    f32 = jnp.float32
    C = x.shape[-1]
    if norm == "layernorm":
        xf = x.astype(f32)
        mean = xf.mean(-1, keepdims=True)
        rstd = jax.lax.rsqrt(jnp.square(xf - mean).mean(-1, keepdims=True) + eps)
    else:
        mean = rstd = jnp.zeros(x.shape[:-1] + (1,), f32)
    nw = jnp.ones((1, C), f32) if norm_weight is None else norm_weight.reshape(1, C)
    nb = jnp.zeros((1, C), f32) if norm_bias is None else norm_bias.reshape(1, C)
    return mean, rstd, nw, nb


def normalise(x: jax.Array, mean, rstd, nw, nb, norm: str, dtype) -> jax.Array:
    """N(x) of a loaded block inside a kernel, in fp32, rounded to the weights' ``dtype`` as eager's
    LayerNorm output is (mean/rstd broadcast along the last dim, nw/nb along the rows)."""
    x = x.astype(jnp.float32)
    if norm == "layernorm":
        x = (x - mean) * rstd
    return (x * nw.astype(jnp.float32) + nb.astype(jnp.float32)).astype(dtype)


def channel_tile(C: int) -> int:
    """A lane-dim tile of C legal for Mosaic TPU: a multiple of 128 dividing C, else the whole of C."""
    for t in (256, 128):
        if C % t == 0:
            return t
    return C


def hidden_tile(D: int) -> int:
    """A tile of the hidden width D (lane dim of W1's block): a multiple of 128 dividing D, else D."""
    for t in (512, 256, 128):
        if D % t == 0:
            return t
    return D


def row_tile(M: int) -> int:
    """Rows (tokens) per channel-mixing block: a multiple of 8 dividing M, else M."""
    for t in (256, 128, 64, 32, 16, 8):
        if M % t == 0:
            return t
    return M


def result_dtype(*arrays) -> jnp.dtype:
    """The dtype the jax.numpy reference returns: x and the parameters promoted together (a bf16 x with
    fp32 parameters gives fp32, as in Flax without a ``dtype``)."""
    return jnp.result_type(*(a for a in arrays if a is not None))


@dataclass(frozen=True)
class Tiles:
    """The block sizes of one Pallas launch, checked on construction against Mosaic TPU's rules: a block's
    last dim (lanes) is a multiple of 128 or the whole dim, the one before it (sublanes) a multiple of 8
    or the whole dim, and each tile divides its dim (the grids have no ragged edge)."""

    rows: int  # tokens per channel-mixing block (sublanes), of ``total_rows``
    channels: int  # channels per token-mixing block (lanes), of ``total_channels``
    hidden: int  # hidden units per channel-mixing step (lanes of W1's block), of ``total_hidden``
    total_rows: int
    total_channels: int
    total_hidden: int

    def __post_init__(self) -> None:
        for name, tile, total, unit in (("rows", self.rows, self.total_rows, 8),
                                        ("channels", self.channels, self.total_channels, 128),
                                        ("hidden", self.hidden, self.total_hidden, 128)):
            if tile <= 0 or total % tile:
                raise ValueError(f"{name}: expected a tile dividing {total}, got {tile}")
            if tile != total and tile % unit:
                raise ValueError(f"{name}: expected a multiple of {unit} or all {total}, got {tile}")

    @classmethod
    def choose(cls, rows: int, channels: int, hidden: int) -> "Tiles":
        return cls(row_tile(rows), channel_tile(channels), hidden_tile(hidden), rows, channels, hidden)

    def token_vmem_bytes(self, S: int, D: int, itemsize: int) -> int:
        """Token mixing per grid step: x and out slabs and both transposed weights (double-buffered),
        the fp32 hidden and accumulator."""
        slab = S * self.channels
        return 2 * (2 * slab + 2 * S * D) * itemsize + (D * self.channels + slab) * 4

    def channel_vmem_bytes(self, C: int, itemsize: int) -> int:
        """Channel mixing per grid step: x and out row blocks, the W1/W2 tiles (double-buffered), the fp32
        hidden tile and accumulator."""
        return 2 * (2 * self.rows * C + 2 * C * self.hidden) * itemsize + (self.rows * self.hidden +
                                                                            self.rows * C) * 4


def check_vmem(nbytes: int, what: str) -> None:
    if nbytes > VMEM_LIMIT:
        raise ValueError(f"{what}: the blocks need about {nbytes / 2**20:.1f} MiB of VMEM, more than the "
                         f"{VMEM_LIMIT / 2**20:.0f} MiB scoped default")
