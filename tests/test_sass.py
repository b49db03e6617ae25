"""kernels/triton/sass.py: the static check for wgmma descriptors not built from the shared-memory base
(the ptxas 12.8.93 miscompile that crashed the token kernels on an H200). Real SASS from
tests/fixtures/sass/ (README.txt there says how it was made), small synthetic snippets for each rule, and
an ahead-of-time compile with the installed triton (no GPU needed)."""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import IN_CI, require
from mixer_fast.kernels.triton import sass

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "sass")


def fixture(name: str) -> str:
    with gzip.open(os.path.join(FIXTURES, name), "rt") as f:
        return f.read()


# ---------------------------------------------------------------------------------------------- real SASS

@pytest.mark.parametrize("name, function, offsets, first_word, chain", [
    # The H200 sanitizer: "Invalid __shared__ read of size 512 bytes at token_mlp_fwd_kernel+0x9340".
    ("token_mlp_fwd.bf16.ptxas-12.8.93.sass.gz", "token_mlp_fwd_kernel",
     [0x9340, 0x9380, 0x93A0, 0x93F0, 0x9410, 0x9440], "UR46", ["IADD3 R5 @0x1040", "SEL R5 @0xf80", "F2FP"]),
    ("token_mlp_dx.bf16.ptxas-12.8.93.sass.gz", "token_mlp_dx_kernel",
     [0xD230, 0xD270, 0xD290, 0xD2E0, 0xD300, 0xD330], "UR46", ["IADD3 R3 @0x1a30", "SEL R3 @0x1800", "F2FP"]),
])
def test_flags_the_ptxas_12_8_miscompile(name, function, offsets, first_word, chain):
    hazards = sass.wgmma_descriptor_hazards(fixture(name))
    assert [h.offset for h in hazards] == offsets
    first = hazards[0]
    assert first.function == function
    assert first.instruction.startswith("HGMMA.") and "gdesc[UR44]" in first.instruction
    assert first.descriptor == ("UR44", "UR45", "UR46", "UR47")
    assert f"B descriptor address word {first_word} is built from data" in first.reason
    for step in chain:
        assert step in first.reason
    assert all("B descriptor address word" in h.reason for h in hazards)


@pytest.mark.parametrize("name", ["token_mlp_fwd.bf16.ptxas-13.0.88.sass.gz",
                                  "token_mlp_fwd.bf16.ptxas-13.5.37.sass.gz",
                                  "token_mlp_dx.bf16.ptxas-13.0.88.sass.gz"])
def test_passes_the_same_kernel_from_a_good_ptxas(name):
    text = fixture(name)
    assert text.count("HGMMA.") >= 40  # the check has descriptors to trace
    assert sass.wgmma_descriptor_hazards(text) == []


# ---------------------------------------------------------------------------------------------- synthetic SASS

def listing(body: str, function: str = "k") -> str:
    """cuobjdump-style SASS of ``body`` (one instruction a line, ';' optional), offsets 0x10 apart."""
    lines = [f"\t\tFunction : {function}"]
    for n, ins in enumerate(line.strip().rstrip(";") for line in body.splitlines() if line.strip()):
        lines.append(f"        /*{16 * n:04x}*/                   {ins} ;   /* 0x000000000000000000 */")
    return "\n".join(lines) + "\n"


# The shared-memory base as ptxas builds it: SGXT(((CgaCtaId << 24) | 0x400) >> 4, 14) in UR6, B's address
# word; A's address word UR4 the same; high words constants.
BASE = """
S2UR UR4, SR_CgaCtaId
UMOV UR5, 0x400
ULEA UR4, UR4, UR5, 0x18
USHF.R.U32.HI UR4, URZ, 0x4, UR4
USGXT.U32 UR6, UR4, 0xe
UMOV UR4, UR6
UMOV UR5, 0x40000040
UMOV UR7, 0x40000040
"""
GMMA = "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4].tnspB, R24, gsb0"


def hazards(body: str):
    return sass.wgmma_descriptor_hazards(listing(body))


def test_a_descriptor_from_the_shared_base_and_constants_passes():
    assert hazards(BASE + GMMA + "\nEXIT") == []
    # through vector registers and back (R2UR), with thread-id arithmetic and a spill to the stack
    assert hazards(BASE + """
        S2R R2, SR_TID.X
        LOP3.LUT R2, R2, 0x60, RZ, 0xc0, !PT
        IADD3 R3, R2, UR6, RZ
        STL [R1+0x10], R3
        LDG.E R3, desc[UR8][R10.64]
        LDL R5, [R1+0x10]
        R2UR UR6, R5
    """ + GMMA + "\nEXIT") == []


def test_a_descriptor_from_loaded_data_is_flagged():
    found = hazards(BASE + """
        LDG.E R2, desc[UR8][R10.64]
        SEL R3, R2, RZ, P0
        IADD3 R3, P1, R3, 0x20, RZ
        R2UR UR6, R3
    """ + GMMA + "\nEXIT")
    assert len(found) == 1
    h = found[0]
    assert (h.function, h.offset, h.descriptor) == ("k", 0xC0, ("UR4", "UR5", "UR6", "UR7"))
    assert h.reason == ("B descriptor address word UR6 is built from data: R2UR UR6 @0xb0 <- IADD3 R3 @0xa0 "
                        "<- SEL R3 @0x90 <- LDG.E R2 @0x80")


@pytest.mark.parametrize("source, why", [
    ("F2FP.BF16.F32.PACK_AB R3, R8, R9", "built from data"),  # packed bf16 of float arithmetic
    ("IADD3 R3, P0, R1, 0x40, RZ", "built from the stack pointer"),  # R1 = c[0x0][0x28]
    ("S2R R3, SR_CTAID.X", "not derived from the shared-memory base; it comes from S2R R3, SR_CTAID.X"),
    ("IADD3 R3, R20, 0x20, RZ", "not derived from the shared-memory base; it comes from R20 read before any"),
])
def test_other_clobbered_descriptors_are_flagged(source, why):
    found = hazards("LDC R1, c[0x0][0x28]\n" + BASE + source + "\nR2UR UR6, R3\n" + GMMA + "\nEXIT")
    assert len(found) == 1 and why in found[0].reason, found


def test_the_a_descriptor_and_high_words_are_checked_too():
    found = hazards(BASE + "LDS R2, [R4]\nR2UR UR4, R2\n" + GMMA + "\nEXIT")
    assert len(found) == 1 and found[0].reason.startswith("A descriptor address word UR4 is built from data")
    found = hazards(BASE + "MUFU.EX2 R2, R4\nR2UR UR7, R2\n" + GMMA + "\nEXIT")
    assert len(found) == 1 and found[0].reason.startswith("B descriptor stride/swizzle word UR7 is built from data")


def test_a_register_a_operand_has_no_a_descriptor():
    # HGMMA R24, R56, gdesc[UR4]: A comes from R56..R59; UR4:UR5 are not read (ptxas leaves other values there).
    body = BASE + "LDG.E R2, desc[UR8][R10.64]\nR2UR UR4, R2\nHGMMA.64x64x16.F32.BF16 R24, R56, gdesc[UR4], R24\nEXIT"
    assert hazards(body) == []


def test_definitions_are_followed_along_control_flow():
    # Straight line: data written to the descriptor's register after the HGMMA does not reach it.
    assert hazards(BASE + GMMA + "\nLDG.E R2, desc[UR8][R10.64]\nR2UR UR6, R2\nEXIT") == []
    # In a loop it does, through the back edge: the HGMMA of the second iteration reads it.
    loop = BASE + """
        ISETP.GE.AND P0, PT, R9, 0x1, PT
        @!P0 BRA 0x{exit:x}
        {gmma}
        LDG.E R2, desc[UR8][R10.64]
        R2UR UR6, R2
        IADD3 R9, R9, -0x1, RZ
        ISETP.GE.AND P0, PT, R9, 0x1, PT
        @P0 BRA 0x{head:x}
        EXIT
    """
    n = len(BASE.strip().splitlines())
    found = hazards(loop.format(exit=16 * (n + 8), head=16 * (n + 2), gmma=GMMA))
    assert [h.offset for h in found] == [16 * (n + 2)] and "LDG.E R2" in found[0].reason
    # A definition under a predicate does not kill the one before it.
    found = hazards(BASE + "LDG.E R2, desc[UR8][R10.64]\nR2UR UR8, R2\n@P0 UMOV UR6, UR8\n" + GMMA + "\nEXIT")
    assert len(found) == 1 and "UMOV UR6" in found[0].reason and "LDG.E R2" in found[0].reason


def test_nvdisasm_listing_with_labels():
    body = [("S2UR UR4, SR_CgaCtaId", ""), ("UMOV UR5, 0x400", ""), ("ULEA UR6, UR4, UR5, 0x18", ""),
            ("UMOV UR7, 0x40000040", ""), ("UMOV UR4, UR6", ""), ("UMOV UR5, 0x40000040", ""),
            (GMMA, ".L_x_1"), ("LDG.E R2, desc[UR8][R10.64]", ""), ("R2UR UR6, R2", ""),
            ("@P0 BRA `(.L_x_1)", ""), ("EXIT", ""), ("BRA `(.L_x_2)", ".L_x_2")]
    text = ['\t.section\t.text.k,"ax",@progbits', "k:", ".text.k:"]
    for n, (ins, label) in enumerate(body):
        text += [f"{label}:"] if label else []
        text.append(f"        /*{16 * n:04x}*/                   {ins} ;")
    found = sass.wgmma_descriptor_hazards("\n".join(text + [".L_x_3:"]))
    assert [(h.function, h.offset) for h in found] == [("k", 0x60)]


def test_default_tool_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(sass, "_triton_bin", lambda: None)
    monkeypatch.setattr(sass.shutil, "which", lambda name, path=None: None)
    with pytest.raises(FileNotFoundError, match="no cuobjdump or nvdisasm.*triton is not installed"):
        sass.default_tool()


def test_importable_without_torch_and_triton():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['triton'] = None\n"
            "from mixer_fast.kernels.triton import sass\nprint(len(sass.wgmma_descriptor_hazards('')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "0", out.stderr[-2000:]


# ---------------------------------------------------------------------------------------------- compiled

_COMPILE = textwrap.dedent('''
    import json, os, sys
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from mixer_fast.kernels.triton import aot, toolchain

    @triton.jit
    def dot_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for k0 in range(0, K, BLOCK):
            a = tl.load(a_ptr + offs[:, None] * K + (k0 + offs)[None, :])
            b = tl.load(b_ptr + (k0 + offs)[:, None] * BLOCK + offs[None, :])
            acc = tl.dot(a, b, acc)
        tl.store(c_ptr + offs[:, None] * BLOCK + offs[None, :], acc)

    out = sys.argv[1]
    try:
        ptxas = toolchain.apply(90)  # the ptxas the triton backend assembles with on Hopper
    except toolchain.ToolchainProblem as e:
        print(json.dumps({"problem": str(e)}))
        sys.exit(0)
    jobs = [(dot_kernel, "dot", {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*fp32", "K": "i32",
                                 "BLOCK": "constexpr"}, {"BLOCK": 64}, 4, 3)]
    for fn, name, config, cfg, warps, stages, ptrs, ints in aot.variants("bf16"):
        if name in ("token_mlp_fwd[S=196]", "token_mlp_dx[S=196]"):  # the kernels 12.8.93 miscompiled
            sig, cfg, attrs = aot.specialised(fn, aot._signature(fn, "bf16", ptrs or {}), cfg, ints)
            jobs.append((fn, name, sig, cfg, warps, stages, attrs))
    for fn, name, sig, cfg, warps, stages, *attrs in jobs:
        compiled = triton.compile(ASTSource(fn, sig, cfg, *attrs), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps, "num_stages": stages})
        with open(os.path.join(out, name + ".cubin"), "wb") as f:
            f.write(compiled.asm["cubin"])
    print(json.dumps({"ptxas": ptxas.version_text, "kernels": [job[1] for job in jobs]}))
''')


def test_kernels_compiled_ahead_of_time_have_no_hazards(tmp_path):
    """A small dot kernel and the token kernels, compiled for sm_90a with the installed triton and the ptxas
    the backend would use (toolchain.py), disassembled with the cuobjdump/nvdisasm next to Triton's ptxas."""
    require("triton")
    try:
        tool = sass.default_tool()
    except FileNotFoundError as e:
        if IN_CI:
            pytest.fail(f"a disassembler is required in CI: {e}")
        pytest.skip(str(e))
    script = tmp_path / "compile.py"
    script.write_text(_COMPILE)
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(r.stdout.strip().splitlines()[-1])
    if "problem" in result:
        if IN_CI:
            pytest.fail(f"no safe ptxas in CI: {result['problem']}")
        pytest.skip(result["problem"])
    assert result["kernels"] == ["dot", "token_mlp_fwd[S=196]", "token_mlp_dx[S=196]"]
    for name in result["kernels"]:
        text = sass.disassemble((tmp_path / f"{name}.cubin").read_bytes(), tool)
        assert "HGMMA." in text, name  # wgmma: there are descriptors to check
        assert sass.wgmma_descriptor_hazards(text) == [], (name, result["ptxas"])
