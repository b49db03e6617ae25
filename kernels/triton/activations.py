"""GELU and its derivative inside Triton kernels, exact (erf) and tanh; all maths in fp32.

The tanh form uses 0.5·(1 + tanh(u)) = sigmoid(2u), which needs only exp (no tanh in tl core).
"""
import triton
import triton.language as tl

SQRT_1_2 = 0.7071067811865476  # 1/√2
INV_SQRT_2PI = 0.3989422804014327  # 1/√(2π)
SQRT_2_PI = 0.7978845608028654  # √(2/π)
COEF = 0.044715


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
