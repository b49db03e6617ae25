"""The Triton kernels in jax-triton's calling convention: input pointers, scalars, output pointers, constexprs.

``jax_triton.triton_call(*args, out_shape=...)`` passes a kernel its arguments in order (arrays and
Python scalars), appends one pointer per output, and gives the constexprs by keyword. Each entry point
here takes its parameters in that order and calls the kernel the torch launchers use, so JAX and
PyTorch run the very same kernel code.

The token kernels' shapes and strides are constexprs here (static under ``jax.jit``): jax-triton 0.3.1
(the newest that accepts triton 3.6) marks array pointers 16-byte aligned but gives integer arguments no
hints (torch's launcher marks multiples of 16 and makes 1 a constant), and without them the token kernels
load element by element, never pipeline and spill 268-1 208 B (``mixer-fast report``, bench/NOTES.md).
The fused GEMM's stay runtime scalars: it runs with the configs pruned for
that (matmul.JAX_CONFIGS).
"""
import triton
import triton.language as tl

from .layer_norm import ln_backward_kernel, ln_stats_kernel
from .matmul import fused_matmul_kernel
from .token_mixing import token_mlp_dw_kernel, token_mlp_dx_kernel, token_mlp_fwd_kernel


@triton.jit
def ln_stats(x_ptr, R, S, C, eps, sxb, sxs, sxc, mean_ptr, rstd_ptr,
             BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    ln_stats_kernel(x_ptr, mean_ptr, rstd_ptr, R, S, C, eps, sxb, sxs, sxc, BLOCK_R, BLOCK_C)


@triton.jit
def ln_backward(g_ptr, x_ptr, dy_ptr, mean_ptr, rstd_ptr, w_ptr,
                R, S, C, sgr, sgc, sxb, sxs, sxc, syb, sys, syc, sdb, sds, sdc,
                dx_ptr, dw_part_ptr, db_part_ptr,
                HAS_W: tl.constexpr, INTERPRETER: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    ln_backward_kernel(g_ptr, x_ptr, dy_ptr, dx_ptr, mean_ptr, rstd_ptr, w_ptr, dw_part_ptr, db_part_ptr,
                       R, S, C, sgr, sgc, sxb, sxs, sxc, syb, sys, syc, sdb, sds, sdc,
                       HAS_W, True, False, False, INTERPRETER, BLOCK_R, BLOCK_C)


@triton.jit
def token_mlp_fwd(x_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale_ptr, ss_ptr,
                  out_ptr, branch_ptr,
                  S: tl.constexpr, C: tl.constexpr, D: tl.constexpr, sxb: tl.constexpr, sxs: tl.constexpr,
                  sxc: tl.constexpr, sob: tl.constexpr, sos: tl.constexpr, soc: tl.constexpr,
                  sw1d: tl.constexpr, sw1s: tl.constexpr, sw2s: tl.constexpr, sw2d: tl.constexpr,
                  NORM: tl.constexpr, HAS_B1: tl.constexpr, HAS_B2: tl.constexpr, HAS_SCALE: tl.constexpr,
                  HAS_SS: tl.constexpr, STORE_BRANCH: tl.constexpr, APPROX_TANH: tl.constexpr,
                  PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr,
                  S_PIECE0: tl.constexpr, S_PIECE1: tl.constexpr, S_PIECE2: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    token_mlp_fwd_kernel(x_ptr, out_ptr, branch_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr,
                         w1_ptr, b1_ptr, w2_ptr, b2_ptr, scale_ptr, ss_ptr, S, C, D,
                         sxb, sxs, sxc, sob, sos, soc, sw1d, sw1s, sw2s, sw2d,
                         NORM, HAS_B1, HAS_B2, HAS_SCALE, HAS_SS, STORE_BRANCH, APPROX_TANH,
                         PRECISION, INTERPRETER, IDX64, S_PIECE0, S_PIECE1, S_PIECE2, BLOCK_C, BLOCK_D)


@triton.jit
def token_mlp_dx(x_ptr, do_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr,
                 g_ptr,
                 S: tl.constexpr, C: tl.constexpr, D: tl.constexpr, sxb: tl.constexpr, sxs: tl.constexpr,
                 sxc: tl.constexpr, sdb: tl.constexpr, sds: tl.constexpr, sdc: tl.constexpr,
                 sw1d: tl.constexpr, sw1s: tl.constexpr, sw2s: tl.constexpr, sw2d: tl.constexpr,
                 NORM: tl.constexpr, HAS_B1: tl.constexpr, APPROX_TANH: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr,
                 S_PIECE0: tl.constexpr, S_PIECE1: tl.constexpr, S_PIECE2: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    token_mlp_dx_kernel(x_ptr, do_ptr, g_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr,
                        S, C, D, sxb, sxs, sxc, sdb, sds, sdc, sw1d, sw1s, sw2s, sw2d,
                        NORM, HAS_B1, APPROX_TANH, PRECISION, INTERPRETER, IDX64, S_PIECE0, S_PIECE1, S_PIECE2,
                        BLOCK_C, BLOCK_D)


@triton.jit
def token_mlp_dw(x_ptr, do_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr,
                 dw1_ptr, dw2_ptr, db1_ptr,
                 B: tl.constexpr, S: tl.constexpr, C: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                 sxb: tl.constexpr, sxs: tl.constexpr, sxc: tl.constexpr, sdb: tl.constexpr, sds: tl.constexpr,
                 sdc: tl.constexpr, sw1d: tl.constexpr, sw1s: tl.constexpr, sw2s: tl.constexpr,
                 sw2d: tl.constexpr,
                 NORM: tl.constexpr, HAS_B1: tl.constexpr, APPROX_TANH: tl.constexpr,
                 PRECISION: tl.constexpr, INTERPRETER: tl.constexpr, IDX64: tl.constexpr, PART: tl.constexpr,
                 S_PIECE0: tl.constexpr, S_PIECE1: tl.constexpr, S_PIECE2: tl.constexpr,
                 BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr):
    token_mlp_dw_kernel(x_ptr, do_ptr, mean_ptr, rstd_ptr, nw_ptr, nb_ptr, w1_ptr, b1_ptr, w2_ptr,
                        dw1_ptr, dw2_ptr, db1_ptr, B, S, C, D, SPLITS, sxb, sxs, sxc, sdb, sds, sdc,
                        sw1d, sw1s, sw2s, sw2d, NORM, HAS_B1, APPROX_TANH, PRECISION, INTERPRETER, IDX64, PART,
                        S_PIECE0, S_PIECE1, S_PIECE2, BLOCK_C, BLOCK_D)


@triton.jit
def fused_matmul(a_ptr, b_ptr, aux_in_ptr, res_ptr, a_mean_ptr, a_rstd_ptr, a_w_ptr, a_b_ptr,
                 b_mean_ptr, b_rstd_ptr, b_w_ptr, b_b_ptr, bias_ptr, scale_ptr, ss_ptr,
                 M, N, K,
                 a_mi, a_smo, a_smi, a_ki, a_sko, a_ski,
                 b_ki, b_sko, b_ski, b_ni, b_sno, b_sni,
                 o_mi, o_smo, o_smi, o_ni, o_sno, o_sni,
                 x_smo, x_smi, x_sno, x_sni,
                 r_smo, r_smi, r_sno, r_sni, k_len, o_split,
                 out_ptr, aux_out_ptr,
                 A_PRO: tl.constexpr, B_PRO: tl.constexpr,
                 HAS_BIAS: tl.constexpr, BIAS_ON_M: tl.constexpr,
                 EPI_GELU: tl.constexpr, EPI_GELU_GRAD: tl.constexpr, STORE_BRANCH: tl.constexpr,
                 HAS_SCALE: tl.constexpr, HAS_SS: tl.constexpr, SS_ON_N: tl.constexpr, HAS_RES: tl.constexpr,
                 RES_MUL: tl.constexpr, APPROX_TANH: tl.constexpr, PRECISION: tl.constexpr, INTERPRETER: tl.constexpr,
                 A_M_SPLIT: tl.constexpr, A_K_SPLIT: tl.constexpr, B_K_SPLIT: tl.constexpr,
                 B_N_SPLIT: tl.constexpr, O_M_SPLIT: tl.constexpr, O_N_SPLIT: tl.constexpr,
                 X_M_SPLIT: tl.constexpr, X_N_SPLIT: tl.constexpr, R_M_SPLIT: tl.constexpr,
                 R_N_SPLIT: tl.constexpr, IDX64: tl.constexpr, K_SPLIT: tl.constexpr, EPI_SUBTILE: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # The kernel's one aux pointer is an output when it stores the pre-activation / branch
    # (STORE_BRANCH) and an input when its epilogue reads GELU'(aux) (EPI_GELU_GRAD); jax-triton needs
    # the two apart. The launcher never sets both.
    if STORE_BRANCH:
        aux_ptr = aux_out_ptr
    else:
        aux_ptr = aux_in_ptr
    fused_matmul_kernel(a_ptr, b_ptr, out_ptr, aux_ptr, res_ptr, a_mean_ptr, a_rstd_ptr, a_w_ptr, a_b_ptr,
                        b_mean_ptr, b_rstd_ptr, b_w_ptr, b_b_ptr, bias_ptr, scale_ptr, ss_ptr,
                        M, N, K, a_mi, a_smo, a_smi, a_ki, a_sko, a_ski, b_ki, b_sko, b_ski, b_ni, b_sno, b_sni,
                        o_mi, o_smo, o_smi, o_ni, o_sno, o_sni, x_smo, x_smi, x_sno, x_sni,
                        r_smo, r_smi, r_sno, r_sni, k_len, o_split, A_PRO, B_PRO, HAS_BIAS, BIAS_ON_M,
                        EPI_GELU, EPI_GELU_GRAD, STORE_BRANCH, HAS_SCALE, HAS_SS, SS_ON_N, HAS_RES, RES_MUL,
                        APPROX_TANH, PRECISION, INTERPRETER, A_M_SPLIT, A_K_SPLIT, B_K_SPLIT, B_N_SPLIT,
                        O_M_SPLIT, O_N_SPLIT, X_M_SPLIT, X_N_SPLIT, R_M_SPLIT, R_N_SPLIT, IDX64, K_SPLIT,
                        EPI_SUBTILE, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M)
