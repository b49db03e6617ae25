"""Element-wise device functions shared by the kernels: GELU, its derivative, and dtype rounding.

GELU maths is in fp32, exact (erf) or tanh; the tanh form uses 0.5·(1 + tanh(u)) = sigmoid(2u), which
needs only exp (no tanh in tl core).
"""
import triton
import triton.language as tl

SQRT_1_2 = tl.constexpr(0.7071067811865476)  # 1/√2
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1/√(2π)
SQRT_2_PI = tl.constexpr(0.7978845608028654)  # √(2/π)
COEF = tl.constexpr(0.044715)


@triton.jit
def gelu(z, APPROX_TANH: tl.constexpr):
    if APPROX_TANH:
        u = SQRT_2_PI * (z + COEF * z * z * z)
        return z * tl.sigmoid(2.0 * u)
    else:
        return 0.5 * z * (1.0 + tl.math.erf(z * SQRT_1_2))


@triton.jit
def gelu_grad(z, APPROX_TANH: tl.constexpr):
    """d GELU(z) / dz."""
    if APPROX_TANH:
        u = SQRT_2_PI * (z + COEF * z * z * z)
        s = tl.sigmoid(2.0 * u)
        return s + z * s * (1.0 - s) * 2.0 * SQRT_2_PI * (1.0 + 3.0 * COEF * z * z)
    else:
        return 0.5 * (1.0 + tl.math.erf(z * SQRT_1_2)) + z * INV_SQRT_2PI * tl.exp(-0.5 * z * z)


@triton.jit
def round_to(x, dtype: tl.constexpr, INTERPRETER: tl.constexpr):
    """x converted to ``dtype`` with round-to-nearest-even, as the GPU does. Triton's interpreter
    truncates fp32 → bf16 (measured: about half the values off by one ulp), which would make every
    bf16 result look twice as inexact as on hardware, so there the rounding is done on the bits."""
    if INTERPRETER and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.int32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
