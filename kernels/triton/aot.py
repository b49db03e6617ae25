"""Ahead-of-time compilation of every kernel and GPU config, with no GPU: the static report.

``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` yields PTX and a cubin on any
machine, assembled by the ptxas the triton backend would use on that GPU (toolchain.py: never Triton's
bundled one where it is known to miscompile these kernels); that ptxas reports registers and spills, the
PTX shows whether Hopper's wgmma is used, and the compile metadata the shared memory. A clean compile is
not proof (ptxas 12.8.93 compiled the token kernels without complaint into code that crashed an H200), so
each cubin's SASS is also checked for wgmma descriptors not built from the shared-memory base (sass.py).
Needs triton imported in compiled mode (TRITON_INTERPRET unset or 0): the CLI runs it in a process of its own.
"""
from __future__ import annotations

import concurrent.futures
import functools
import multiprocessing
import os
import re
import subprocess
import tempfile
from dataclasses import asdict, dataclass, replace
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from . import sass, toolchain
from .token_mixing import Features

ARCHS = {"sm_90a": 90, "sm_80": 80}
_FP32_PTRS = {"mean_ptr", "rstd_ptr", "a_mean_ptr", "a_rstd_ptr", "b_mean_ptr", "b_rstd_ptr", "g_ptr", "dw1_ptr",
              "dw2_ptr", "db1_ptr", "dw_part_ptr", "db_part_ptr", "col_sum_ptr", "scale_part_ptr",
              "bias_part_ptr", "db1_part_ptr", "dbp_part_ptr"}
_DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass
class Row:
    """One compiled kernel variant: the JSON row of ``mixer-fast report``."""

    kernel: str
    config: str
    arch: str
    dtype: str
    registers: int
    spills: int
    shared_bytes: int
    wgmma: bool
    has_dot: bool
    ptxas: str  # the assembler's version, e.g. "13.0.88"
    wgmma_descriptor_hazards: int  # HGMMAs whose descriptor is not built from the shared-memory base

    def as_dict(self) -> dict:
        return asdict(self)


def _signature(fn, dtype: str, ptr_dtypes: Dict[str, str]) -> Dict[str, str]:
    sig = {}
    for p in fn.params:
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif p.name.endswith("_ptr"):
            ty = ptr_dtypes.get(p.name, "fp32" if p.name in _FP32_PTRS else dtype)
            sig[p.name] = ty if ty.startswith("tensordesc") else "*" + ty
        elif p.name == "eps":
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32"
    return sig


class JaxTritonInts(dict):
    """Integer arguments as jax-triton (0.3.1 and newer) specialises them: values equal to 1 made
    constants, no divisibility hints (:func:`specialised`)."""


def specialised(fn, sig: Dict[str, str], constexprs: Dict[str, object],
                ints: Dict[str, int]) -> Tuple[Dict[str, str], Dict[str, object], Dict[tuple, list]]:
    """(signature, constexprs, attrs) of ``fn`` as Triton's launcher specialises a launch whose integer
    arguments have the example values ``ints``: pointers 16-byte aligned (as torch and XLA allocate),
    integers equal to 1 made constants and multiples of 16 marked so (``ints`` a JaxTritonInts: no
    divisibility hints, as jax-triton launches); a constexpr parameter named in ``ints`` takes its value
    (the token kernels' shapes). Unspecialised, Triton cannot
    prove a 16-byte cp.async legal and does not pipeline the loads, which leaves a different register
    picture from the one that runs."""
    sig, constexprs, attrs = dict(sig), dict(constexprs), {}
    for i, p in enumerate(fn.params):
        if p.is_constexpr:
            if p.name in ints and p.name not in constexprs:
                constexprs[p.name] = ints[p.name]
            continue
        if p.name.endswith("_ptr") and not sig[p.name].startswith("tensordesc"):
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif p.name in ints:
            if ints[p.name] == 1:
                sig[p.name], constexprs[p.name] = "constexpr", 1
            elif ints[p.name] % 16 == 0 and not isinstance(ints, JaxTritonInts):
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def compile_row(fn, name: str, config: str, constexprs: Dict[str, object], *, arch: str, dtype: str,
                num_warps: int, num_stages: int, ptr_dtypes: Optional[Dict[str, str]] = None,
                ints: Optional[Dict[str, int]] = None) -> Row:
    """Compile one kernel variant for ``arch`` and measure it, with the ptxas the backend would use
    (:func:`toolchain.apply`; ToolchainProblem if there is no safe one); specialised as a launch with
    the integer arguments ``ints`` (:func:`specialised`), or with no argument specialised."""
    ptxas = toolchain.apply(ARCHS[arch])
    sig = _signature(fn, _DTYPES[dtype], ptr_dtypes or {})
    attrs: Dict[tuple, list] = {}
    if ints is not None:
        sig, constexprs, attrs = specialised(fn, sig, constexprs, ints)
    src = ASTSource(fn, sig, constexprs, attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", ARCHS[arch], 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    ptx = compiled.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        log = subprocess.run([ptxas.path, "-v", "--regAllocOptLevel=2", f"--gpu-name={arch}", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True, check=True).stderr
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", log))
    return Row(name, config, arch, dtype, regs, spills, int(compiled.metadata.shared), "wgmma.mma_async" in ptx,
               "mma" in ptx, ptxas.version_text, len(sass.hazards_in_cubin(compiled.asm["cubin"])))


def launch_shared_bytes(fn, operands: Sequence[Union[str, int, float]], constexprs: Dict[str, object], *,
                        capability: int, num_warps: int, num_stages: int) -> int:
    """The shared memory (bytes) a launch of ``fn`` needs on a GPU of compute capability ``capability``
    (90 for 9.0), compiled as jax-triton compiles it: ``operands`` are the non-constexpr parameters in
    order, a pointer's element type ("bf16", "fp16", "fp32", "i32") or a scalar's value (jax-triton's
    specialisation: pointers aligned, integers equal to 1 made constants, no divisibility hints), and
    ``constexprs`` the rest by name. Assembled by the ptxas the backend uses (toolchain.apply)."""
    runtime = [p for p in fn.params if not p.is_constexpr]
    if len(operands) != len(runtime):
        raise ValueError(f"operands: {fn.__name__} takes {len(runtime)} non-constexpr parameters, got "
                         f"{len(operands)}")
    toolchain.apply(capability)
    given = dict(zip((p.name for p in runtime), operands))
    sig: Dict[str, str] = {}
    ints = JaxTritonInts()
    for p in fn.params:
        v = given.get(p.name)
        if p.is_constexpr:
            sig[p.name] = "constexpr"
        elif isinstance(v, str):
            sig[p.name] = "*" + v
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            ints[p.name] = v
    sig, constexprs, attrs = specialised(fn, sig, constexprs, ints)
    compiled = triton.compile(ASTSource(fn, sig, constexprs, attrs), target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return int(compiled.metadata.shared)


# The token kernels' features in the report: Mixer's LayerNorm, both biases, exact GELU and drop path (the
# heaviest forward epilogue a named model trains with), flagged as the launchers flag them.
_TOKEN_FEATURES = Features(has_ss=True)


def _token_flags(kernel: str, **changes) -> Dict[str, object]:
    return replace(_TOKEN_FEATURES, **changes).constexprs(kernel, interpreter=False)


def token_ints(S: int, C: int, D: int, B: int = 256) -> Dict[str, int]:
    """The token kernels' integers at a contiguous (B, S, C) input and the launchers' aligned weight copies
    (token_mixing.token_weights), for :func:`specialised`: the shapes and strides are constexprs
    (token_mixing.shape_constexprs), the dW kernel's B and SPLITS arguments."""
    from .token_mixing import aligned

    return dict(B=B, S=S, C=C, D=D, SPLITS=44, sxb=S * C, sxs=C, sxc=1, sob=S * C, sos=C, soc=1, sdb=S * C,
                sds=C, sdc=1, sw1d=aligned(S), sw1s=1, sw2s=aligned(D), sw2d=1)


_FP32_OUT = {"out_ptr": "fp32"}  # split-K launches write fp32 partial products


def _token_ptrs(kernel: str, dtype: str) -> Optional[Dict[str, str]]:
    # token_mlp_dx writes dL/dN(x) in the weights' dtype (token_mixing.token_mixing_backward).
    return {"g_ptr": dtype} if kernel == "token_mlp_dx" else None


def gemm_site(site: str, split: bool = False, channel: bool = False) -> Optional[Tuple]:
    """(M, N, K, a_axes, b_axes, out_axes, aux_axes, res_axes) of launch site ``site`` for contiguous tensors
    at batch 256 (channel sites at Mixer-B/16, the token linear at ResMLP-24; split-K at ResMLP-24's
    token-linear weight gradient, or with ``channel`` its channel-mixing weight gradients and gMLP-S/16's
    dW2, whose operands TMA can load; the gate sites at gMLP-S/16)."""
    from .matmul import flat, split as two

    B, S, C, D = 256, 196, 768, 3072
    M = B * S
    tok, ch, h = two(S, S * C, C), flat(C, 1), (flat(M, D), flat(D, 1))
    sites = {  # (M, N, K, a_axes, b_axes, out_axes, aux_axes, res_axes)
        "ln_gelu": (M, D, C, (tok, ch), (flat(C, 1), flat(D, C)), h, h, None),
        "residual": (M, C, D, h, (flat(D, 1), flat(C, D)), (tok, ch), (tok, ch), (tok, ch)),
        "gelu_grad": (M, D, C, (tok, ch), (flat(C, D), flat(D, 1)), h, h, None),
        "plain": (M, C, D, h, (flat(D, C), flat(C, 1)), (flat(M, C), flat(C, 1)), None, None),
        "ln_b": (D, C, M, (flat(D, 1), flat(M, D)), (tok, ch), (flat(D, C), flat(C, 1)), None, None),
        "gelu_b": (C, D, M, (ch, tok), h, (flat(C, D), flat(D, 1)), None, None),
    }
    Cr = 384  # ResMLP-24
    tok_r = (flat(S, Cr), two(Cr, S * Cr, 1))
    sites["token_linear"] = (S, B * Cr, S, (flat(S, S), flat(S, 1)), tok_r, tok_r, tok_r, tok_r)
    # gMLP-S/16's gate (H = 6 · 256, the gate on H/2): per image, Q = u ⊙ (W_p · LN_g(v) + b_p) reading v, u
    # as strided halves of the hidden (B, S, H); its weight gradient dW_p = dP · LN_g(GELU(z_v))ᵀ over K = B·H/2.
    G, Hg = 1536, 768
    half = (flat(S, G), two(Hg, S * G, 1))  # v or u: tokens, (image, channel)
    q = (flat(S, Hg), two(Hg, S * Hg, 1))
    sites["gate_proj"] = (S, B * Hg, S, (flat(S, S), flat(S, 1)), half, q, q, half)
    sites["gate_b"] = (S, S, B * Hg, q, (half[1], half[0]), (flat(S, S), flat(S, 1)), None, None)  # split or not
    if split and channel:  # few tiles, flat operands: ResMLP-24's dW1 (1536 × 384), dW2 and gMLP-S/16's dW2
        Dr = 4 * Cr
        tok_c, ch_r, h_r = two(S, S * Cr, Cr), flat(Cr, 1), (flat(M, Dr), flat(Dr, 1))
        return {"ln_b": (Dr, Cr, M, (flat(Dr, 1), flat(M, Dr)), (tok_c, ch_r), (flat(Dr, Cr), flat(Cr, 1)), None, None),
                "gelu_b": (Cr, Dr, M, (ch_r, tok_c), h_r, (flat(Cr, Dr), flat(Dr, 1)), None, None),
                "plain": (256, Hg, M, (flat(256, 1), two(S, S * 256, 256)), (flat(M, Hg), flat(Hg, 1)),
                          (flat(256, Hg), flat(Hg, 1)), None, None)}.get(site)
    if split:  # ResMLP-24's token-linear weight gradient dW = dO · N(x)ᵀ: 4 tiles over K = B·C; gMLP's dW_p
        resmlp = (S, S, B * Cr, (flat(S, Cr), two(Cr, S * Cr, 1)), (two(Cr, S * Cr, 1), flat(S, Cr)),
                  (flat(S, S), flat(S, 1)), None, None)
        sites = {"ln_b": resmlp, "gelu_b": resmlp, "plain": resmlp, "gate_b": sites["gate_b"]}
    return sites.get(site)


def gemm_ints(site: str, split: bool = False, channel: bool = False) -> Optional[Dict[str, int]]:
    """The fused GEMM's integer arguments as launch site ``site`` passes them (:func:`gemm_site`), for
    :func:`specialised`; None for a site it does not describe."""
    from . import matmul

    described = gemm_site(site, split, channel)
    if described is None:
        return None
    Mx, Nx, Kx, a, b, o, x, r = described
    flags = dict(a_pro=matmul.A_NONE, b_pro=matmul.B_NONE, has_bias=False, bias_on_m=False, epi_gelu=False,
                 epi_gelu_grad=False, store_branch=False, has_scale=False, has_ss=False, ss_on_n=False,
                 has_res=False, approximate="none", precision="ieee", idx64=False)
    p = matmul.plan(Mx, Nx, Kx, a, b, o, x, r, allow_split=split, out_numel=o[0].inner * o[1].inner, **flags)
    if split != (p.split_k > 1):
        raise AssertionError(f"{site}: the example's split ({p.split_k}) is not the one asked for")
    names = [q.name for q in matmul.fused_matmul_kernel.params if not q.is_constexpr and not q.name.endswith("_ptr")]
    return dict(zip(names, p.scalars))


def _tma_layouts(site: Tuple, dtype: str) -> Optional[Tuple[int, int]]:
    """(A_TMA, B_TMA) the torch launcher would pass at ``site`` (gemm_site), or None where neither operand
    takes a descriptor."""
    from . import matmul

    M, N, K, a, b = site[:5]
    size = 4 if dtype == "fp32" else 2
    layouts = (matmul.axes_tma_layout(a[0], a[1], K, size), matmul.axes_tma_layout(b[1], b[0], K, size))
    return None if layouts == (matmul.TMA_NONE, matmul.TMA_NONE) else layouts


def _descriptor_types(layouts: Tuple[int, int], dtype: str, bm: int, bn: int, bk: int) -> Dict[str, str]:
    """The signature types of the operands loaded by descriptors (block in the stored layout)."""
    from .matmul import TMA_K_INNER, TMA_NONE

    types = {}
    for name, layout, rows in (("a_ptr", layouts[0], bm), ("b_ptr", layouts[1], bn)):
        if layout != TMA_NONE:
            block = (rows, bk) if layout == TMA_K_INNER else (bk, rows)
            types[name] = f"tensordesc<{dtype}[{block[0]}, {block[1]}]>"
    return types


def _tma_rows(label: str, flags: Dict[str, object], dtype: str, split: bool) -> Iterator[Tuple]:
    """The report rows (as :func:`variants`) of launch site ``label`` with TMA operand loads, where the torch
    launcher offers them: split-K ones at the channel weight gradients with few tiles (gemm_site)."""
    from . import matmul

    site = gemm_site(label, split=split, channel=split)
    layouts = _tma_layouts(site, dtype) if site is not None else None
    if layouts is None:
        return
    configs = matmul.site_configs(label, split)
    for bm, bn, bk, warps, stages, _ in matmul.tma_configs(label, configs)[len(configs):]:
        cfg = dict(flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, A_TMA=layouts[0], B_TMA=layouts[1],
                   **({"K_SPLIT": True} if split else {"EPI_SUBTILE": matmul.epi_subtile(bn)}))
        types = _descriptor_types(layouts, dtype, bm, bn, bk)
        yield (matmul.fused_matmul_kernel, f"fused_matmul[{label}{',split' if split else ''},tma]",
               f"{bm}x{bn}x{bk} w{warps} s{stages}", cfg, warps, stages, dict(_FP32_OUT, **types) if split else types,
               gemm_ints(label, split=split, channel=split))


def _site_flags(label: str, dtype: str) -> Dict[str, object]:
    """The fused GEMM's constexprs besides the tiles at launch site ``label`` (matmul.VARIANTS: the heaviest
    combination the site uses), with the rows per column-sum partial a GPU launch of ``dtype`` passes."""
    from . import matmul

    flags = dict(A_PRO=matmul.A_NONE, B_PRO=matmul.B_NONE, HAS_BIAS=False, BIAS_ON_M=False, EPI_GELU=False,
                 EPI_GELU_GRAD=False, STORE_BRANCH=False, HAS_SCALE=False, HAS_SS=False, SS_ON_N=False,
                 HAS_RES=False, RES_MUL=False, APPROX_TANH=False, PRECISION="ieee", INTERPRETER=False,
                 A_M_SPLIT=False, A_K_SPLIT=False, B_K_SPLIT=False, B_N_SPLIT=False, O_M_SPLIT=False,
                 O_N_SPLIT=False, X_M_SPLIT=False, X_N_SPLIT=False, R_M_SPLIT=False, R_N_SPLIT=False, IDX64=False,
                 K_SPLIT=False, EPI_SUBTILE=False, A_TMA=matmul.TMA_NONE, B_TMA=matmul.TMA_NONE, SCALED16=0,
                 COL_SUM=False, COL_SUM_ROWS=1)
    flags.update(matmul.VARIANTS[label][0])
    if flags["COL_SUM"]:
        flags["COL_SUM_ROWS"] = matmul.col_sum_rows(label, fp32=dtype == "fp32")
    return flags


def variants(dtype: str, arch: str = "sm_90a") -> Iterator[Tuple]:
    """(fn, kernel name, config label, constexprs, num_warps, num_stages, ptr dtypes, ints) for every
    kernel variant and GPU config the launchers use on an ``arch`` GPU (the token kernels' plans depend on
    it), at the named models' shapes; ``ints``: the
    integer arguments to specialise on as a launch does (the token kernels), or None."""
    from . import channel_mixing, cublas_engine as cublas, layer_norm, matmul, residual, spatial_gating, token_mixing

    for label in matmul.VARIANTS:
        flags = _site_flags(label, dtype)
        for bm, bn, bk, warps, stages in matmul.site_configs(label, False, fp32=dtype == "fp32"):
            cfg = dict(flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EPI_SUBTILE=matmul.epi_subtile(bn))
            yield (matmul.fused_matmul_kernel, f"fused_matmul[{label}]", f"{bm}x{bn}x{bk} w{warps} s{stages}",
                   cfg, warps, stages, None, gemm_ints(label))
        # the same sites with TMA operand loads, where the torch launcher offers them (matmul.tma_configs)
        if dtype != "fp32":
            yield from _tma_rows(label, flags, _DTYPES[dtype], split=False)
        # the weight gradients, split over K where their tiles are few (matmul.split_k)
        split = label in matmul.SPLIT_CONFIGS
        for bm, bn, bk, warps, stages in (matmul.site_configs(label, True, fp32=dtype == "fp32") if split else ()):
            cfg = dict(flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, K_SPLIT=True)
            yield (matmul.fused_matmul_kernel, f"fused_matmul[{label},split]", f"{bm}x{bn}x{bk} w{warps} s{stages}",
                   cfg, warps, stages, _FP32_OUT, gemm_ints(label, split=True))
        # split-K with TMA loads: the channel weight gradients with few tiles (ResMLP-24, gMLP-S/16's dW2)
        if split and dtype != "fp32":
            yield from _tma_rows(label, flags, _DTYPES[dtype], split=True)
    # ln_gelu with the LayerNorm folded into the weight and the epilogue (matmul.LN_FOLDED), TMA or not
    folded = dict(_site_flags("ln_gelu", dtype), A_PRO=matmul.A_LAYERNORM_FOLDED)
    for bm, bn, bk, warps, stages in matmul.site_configs("ln_gelu", False, fp32=dtype == "fp32"):
        cfg = dict(folded, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, EPI_SUBTILE=matmul.epi_subtile(bn))
        yield (matmul.fused_matmul_kernel, "fused_matmul[ln_gelu,folded]", f"{bm}x{bn}x{bk} w{warps} s{stages}",
               cfg, warps, stages, None, gemm_ints("ln_gelu"))
    if dtype != "fp32":
        for fn, name, config, cfg, warps, stages, ptrs, ints in _tma_rows("ln_gelu", folded, _DTYPES[dtype], False):
            yield fn, name.replace("]", ",folded]"), config, cfg, warps, stages, ptrs, ints
    # and the pass that makes its weight (launched with Triton's defaults, 4 warps and 3 stages; fc1's N rows
    # set only the grid)
    yield (channel_mixing.fold_weight_kernel, "fold_weight", f"{channel_mixing.FOLD_BLOCK_N}x"
           f"{channel_mixing.FOLD_BLOCK_K} w4 s3", channel_mixing.fold_launch(3072, True, interpreter=False)[1], 4, 3,
           {"u_ptr": "fp32", "v_ptr": "fp32"}, None)
    # torch.autocast: fp32 activations meet bf16 weights in the same kernels.
    if dtype != "fp32":
        mixed = {"x_ptr": "fp32", "out_ptr": "fp32", "res_ptr": "fp32", "branch_ptr": "fp32"}
        for label in ("ln_gelu", "token_linear"):
            bm, bn, bk, warps, stages = matmul.VARIANTS[label][1][0]
            side = "a_ptr" if label == "ln_gelu" else "b_ptr"
            yield (matmul.fused_matmul_kernel, f"fused_matmul[{label},autocast]", f"{bm}x{bn}x{bk} w{warps} s{stages}",
                   dict(_site_flags(label, dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
                        EPI_SUBTILE=matmul.epi_subtile(bn)), warps, stages, dict(mixed, **{side: "fp32"}),
                   gemm_ints(label))
        plan = token_mixing.gpu_config("token_mlp_fwd", 196, 512, 2, ARCHS[arch])
        yield (token_mixing.token_mlp_fwd_kernel, "token_mlp_fwd[S=196,autocast]", plan.label(),
               dict(_token_flags("token_mlp_fwd"), **plan.constexprs()), plan.num_warps, plan.num_stages, mixed,
               token_ints(196, 1024, 512))
    for S, C, D in ((49, 768, 384), (196, 768, 384), (196, 1024, 512)):  # S/32, Mixer-B/16, Mixer-L/16
        for kname, fn in (("token_mlp_fwd", token_mixing.token_mlp_fwd_kernel),
                          ("token_mlp_dx", token_mixing.token_mlp_dx_kernel),
                          ("token_mlp_dw", token_mixing.token_mlp_dw_kernel)):
            plan = token_mixing.gpu_config(kname, S, D, 4 if dtype == "fp32" else 2, ARCHS[arch])
            cfg = dict(_token_flags(kname), **plan.constexprs())
            parts = plan.parts if kname == "token_mlp_dw" else (None,)
            for part in parts:
                label = plan.label()
                if part is not None:
                    cfg = dict(cfg, PART=part)
                    label += f" part{part}"
                name = f"{kname}[S={S}]" if D == 384 else f"{kname}[S={S},D={D}]"
                yield (fn, name, label, cfg, plan.num_warps, plan.num_stages, _token_ptrs(kname, dtype),
                       token_ints(S, C, D))
    # JAX launches the same kernels through jax-triton, which marks pointers aligned, makes integers equal
    # to 1 constants and gives the others no hints (JaxTritonInts). The GEMM gets its multiples of 16
    # divided by 16 (matmul.scaled16); of the token kernels' integers (the rest are constexprs, as in a
    # torch launch) only dW's B and SPLITS go unhinted.
    for label in (site for site in matmul.VARIANTS if not site.startswith("gate_")):  # no gMLP in JAX
        torch_ints = gemm_ints(label)
        scalars, mask = matmul.scaled16(list(torch_ints.values()))
        ints = JaxTritonInts(zip(torch_ints, scalars))
        configs = matmul.site_configs(label, False, fp32=dtype == "fp32")
        bm, bn, bk, warps, stages = configs[0]
        yield (matmul.fused_matmul_kernel, f"fused_matmul[{label},jax]", f"{bm}x{bn}x{bk} w{warps} s{stages}",
               dict(_site_flags(label, dtype), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, SCALED16=mask,
                    EPI_SUBTILE=matmul.epi_subtile(bn)), warps, stages, None, ints)
    plan = token_mixing.gpu_config("token_mlp_dw", 196, 384, 4 if dtype == "fp32" else 2, ARCHS[arch])
    shapes = {q.name: v for q in token_mixing.token_mlp_dw_kernel.params if q.is_constexpr
              for k, v in token_ints(196, 768, 384).items() if k == q.name}
    yield (token_mixing.token_mlp_dw_kernel, "token_mlp_dw[S=196,jax]", plan.label() + f" part{plan.parts[0]}",
           dict(_token_flags("token_mlp_dw", approximate="tanh"), PART=plan.parts[0], **plan.constexprs(), **shapes),
           plan.num_warps, plan.num_stages, _token_ptrs("token_mlp_dw", dtype),
           JaxTritonInts(B=256, SPLITS=44))
    for C in (384, 768, 1024):
        block_c = layer_norm.gpu_block_c(C)
        # Launched with Triton's defaults (4 warps, 3 stages).
        yield (layer_norm.ln_stats_kernel, f"ln_stats[C={C}]", f"R{layer_norm.ROWS} C{block_c} w4 s3",
               dict(BLOCK_R=layer_norm.ROWS, BLOCK_C=block_c), 4, 3, None, None)
        # dL/dN(x) (g) arrives in the weights' dtype from every launcher
        for split in (False, True):  # g by rows, or token-major (the cuBLAS engine's token mixing)
            yield (layer_norm.ln_backward_kernel, f"ln_backward[C={C}{',token_major' if split else ''}]",
                   f"R{layer_norm.ROWS} C{block_c} w4 s3",
                   dict(layer_norm.ln_backward_flags(has_w=True, has_dy=True, gelu_in=None, g_split=split,
                                                     interpreter=False),
                        BLOCK_R=layer_norm.ROWS, BLOCK_C=block_c), 4, 3, {"g_ptr": _DTYPES[dtype]}, None)
    # Every op's backward starts with the residual's (the heaviest forms: layer scale, drop path and a bias,
    # per channel in channel mixing, per token in token mixing); ResMLP's ends with its affine's.
    tiles = f"R{residual.BLOCK_R}x{residual.ROW_GROUP // residual.BLOCK_R} C{residual.BLOCK_C} w4 s3"
    # (token mixing's dO also token-major, for the cuBLAS engine's token GEMMs)
    for bias, where, split in ((residual.BIAS_PER_CHANNEL, "per_channel", False),
                               (residual.BIAS_PER_TOKEN, "per_token", False),
                               (residual.BIAS_PER_TOKEN, "per_token,token_major", True)):
        yield (residual.residual_grad_kernel, f"residual_grad[{where}]", tiles,
               dict(HAS_SCALE=True, HAS_SS=True, SCALE_GRAD=True, STORE_DO=True, DO_SPLIT=split, BIAS=bias,
                    INTERPRETER=False, ROW_GROUP=residual.ROW_GROUP, BLOCK_R=residual.BLOCK_R,
                    BLOCK_C=residual.BLOCK_C), 4, 3, None, None)
    yield (layer_norm.affine_backward_kernel, "affine_backward",
           f"R{layer_norm.AFFINE_BLOCK_R}x{layer_norm.AFFINE_ROW_GROUP // layer_norm.AFFINE_BLOCK_R} "
           f"C{layer_norm.AFFINE_BLOCK_C} w4 s3",
           dict(HAS_W=True, INTERPRETER=False, ROW_GROUP=layer_norm.AFFINE_ROW_GROUP, BLOCK_R=layer_norm.AFFINE_BLOCK_R,
                BLOCK_C=layer_norm.AFFINE_BLOCK_C), 4, 3, None, None)
    # The cuBLAS engine's passes (cublas_engine.py; Triton's defaults, 4 warps, 3 stages): the norm with its
    # statistics and the residual stream (the heaviest form), GELU with a per-row bias (token mixing's) and
    # its backward with fc1's bias sums per column (channel) and per row with the row bias (token), and the
    # residual add of a token-major branch.
    for C in (384, 768, 1024):
        block_c = layer_norm.gpu_block_c(C)
        yield (layer_norm.norm_apply_kernel, f"norm_apply[C={C}]", f"R{layer_norm.ROWS} C{block_c} w4 s3",
               dict(LAYERNORM=True, STATS_GIVEN=False, STORE_R=True, HAS_RS=True, INTERPRETER=False,
                    BLOCK_R=layer_norm.ROWS, BLOCK_C=block_c), 4, 3, {"mean_ptr": "fp32", "rstd_ptr": "fp32"}, None)
    yield (cublas.gelu_kernel, "gelu", f"{cublas.GELU_BLOCK} w4 s3",
           dict(APPROX_TANH=False, ROW_BIAS=True, INTERPRETER=False, BLOCK=cublas.GELU_BLOCK), 4, 3, None, None)
    tiles = f"R{cublas.GELU_BLOCK_R}x{cublas.GELU_ROW_GROUP // cublas.GELU_BLOCK_R} D{cublas.GELU_BLOCK_D} w4 s3"
    for db, row_bias, where in ((cublas.DB_COLUMNS, False, "columns"), (cublas.DB_ROWS, True, "rows")):
        yield (cublas.gelu_backward_kernel, f"gelu_backward[{where}]", tiles,
               dict(APPROX_TANH=False, ROW_BIAS=row_bias, DB=db, INTERPRETER=False, ROW_GROUP=cublas.GELU_ROW_GROUP,
                    BLOCK_R=cublas.GELU_BLOCK_R, BLOCK_D=cublas.GELU_BLOCK_D), 4, 3, {"db_part_ptr": "fp32"}, None)
    yield (residual.residual_add_kernel, "residual_add", f"R{residual.ADD_BLOCK_R} C{residual.ADD_BLOCK_C} w4 s3",
           dict(HAS_BIAS=True, HAS_SCALE=True, HAS_SS=True, STORE_BRANCH=True, INTERPRETER=False,
                BLOCK_R=residual.ADD_BLOCK_R, BLOCK_C=residual.ADD_BLOCK_C), 4, 3, None, None)
    # gMLP (gmlp_s16: H/2 = 768): the gate's LayerNorm backward through GELU, and dZ_u / dP.
    block_c = layer_norm.gpu_block_c(768)
    yield (layer_norm.ln_backward_kernel, "ln_backward[gate,C=768]", f"R{layer_norm.ROWS} C{block_c} w4 s3",
           dict(layer_norm.ln_backward_flags(has_w=True, has_dy=False, gelu_in="none", g_split=False,
                                             interpreter=False),
                BLOCK_R=layer_norm.ROWS, BLOCK_C=block_c), 4, 3, {"g_ptr": _DTYPES[dtype]}, None)
    bm, bh = spatial_gating.GATE_BLOCK
    yield (spatial_gating.gate_grad_kernel, "gate_grad", f"{bm}x{bh} w4 s3",
           dict(APPROX_TANH=False, INTERPRETER=False, IDX64=False, BIAS_SUMS=True, BLOCK_M=bm, BLOCK_H=bh), 4, 3,
           None, None)


def _compile(variant: Tuple, arch: str, dtype: str) -> Row:
    fn, name, config, cfg, w, s, p, ints = variant
    return compile_row(fn, name, config, cfg, arch=arch, dtype=dtype, num_warps=w, num_stages=s, ptr_dtypes=p,
                       ints=ints)


@functools.lru_cache(maxsize=None)
def _variant_list(dtype: str, arch: str) -> Tuple[Tuple, ...]:
    return tuple(variants(dtype, arch))


def _compile_variant(arch: str, dtype: str, index: int) -> Row:
    """Row ``index`` of :func:`variants`, in a worker process: Triton's JIT functions do not pickle, so each
    worker builds the list of variants itself, once."""
    return _compile(_variant_list(dtype, arch)[index], arch, dtype)


def report(arch: str, dtype: str = "bf16", jobs: int = 1) -> List[Row]:
    """Compile every variant for ``arch`` ("sm_90a" or "sm_80"), ``jobs`` processes at once, rows in
    :func:`variants`' order either way. Each compile runs on one core: on two cores with a cold Triton
    cache the 113 bf16 rows took 190-214 s in one process and 92 s in two (2026-11-28)."""
    if arch not in ARCHS:
        raise ValueError(f"arch: expected one of {sorted(ARCHS)}, got {arch!r}")
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: expected one of {sorted(_DTYPES)}, got {dtype!r}")
    if not isinstance(jobs, int) or isinstance(jobs, bool) or jobs < 1:
        raise ValueError(f"jobs: expected a positive integer, got {jobs!r}")
    from . import matmul

    if not hasattr(matmul.fused_matmul_kernel, "params"):
        raise RuntimeError("the static report needs triton in compiled mode, but this process imported it "
                           "with TRITON_INTERPRET=1; run `mixer-fast report` (it starts a clean process) or "
                           "set TRITON_INTERPRET=0 before importing triton")
    rows = list(variants(dtype, arch))
    if jobs == 1:
        return [_compile(v, arch, dtype) for v in rows]
    # spawn, not fork: the parent may hold Triton's and the ptxas subprocesses' state from other threads
    context = multiprocessing.get_context("spawn")
    count = len(rows)
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(jobs, count), mp_context=context) as pool:
        return list(pool.map(_compile_variant, [arch] * count, [dtype] * count, range(count)))
