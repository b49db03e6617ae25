"""A static SASS check for Hopper wgmma descriptor hazards (stdlib only: imports neither torch nor triton).

Why: ptxas 12.8.93 (bundled with triton 3.6) miscompiles the token-mixing kernels: it builds the shared-
memory descriptor of an ``HGMMA`` from a register that it has meanwhile reused for other values (packed bf16
data, the stack pointer, the block id, or nothing at all), and the kernel dies with an illegal shared-memory
read (shared/gpu/2026-11-27-H200/README.md: ``token_mlp_fwd_kernel+0x9340``). This module finds that in a
cubin's SASS, so the output of any ptxas can be checked without a GPU.

What an HGMMA reads: ``gdesc[URn]`` names four uniform registers: URn:URn+1 is the A operand's 64-bit
descriptor, URn+2:URn+3 the B operand's (with A in registers, ``HGMMA R24, R56, gdesc[UR4]``, only UR6:UR7
are set). The low word of each (URn, URn+2) holds the start address (bits 0-13: shared address >> 4),
the high word strides and swizzle. In correct SASS the address word is ``SGXT((smem + offset) >> 4, 14)``
with smem from ``S2R/S2UR SR_CgaCtaId`` and ``MOV 0x400``, plus constants and thread-id arithmetic.

How it decides, per HGMMA and per descriptor word it reads: walk the word's backward slice (every
definition that may reach it, through UMOV, UIADD3, ULOP3, USHF, USGXT, ULEA, R2UR into vector registers,
MOV/IADD3/SEL/PRMT/..., and a spill reload ``LDL`` to every ``STL`` of the same stack slot), and flag it if
- a value in it is data: a memory load (LDG/LDS/LDSM/LD/ATOM*, an LDL with no matching STL), an MMA
  result, or floating-point / packing arithmetic (F2FP, FFMA, FMUL, MUFU, HADD2, ...), or the stack pointer
  (``LDC R1, c[0x0][0x28]``): the reason names the shortest chain to it; or
- (address words) nothing in it comes from the shared-memory base (SR_CgaCtaId, SR_SWINHI/LO, 0x400): the
  reason lists where it does come from, e.g. ``S2R SR_CTAID.X`` or a register read before any definition.
Thread and block ids, kernel parameters (LDC) and constants are not data: they pass when the base is there.

Control flow: reaching definitions over the function's basic blocks (BRA targets and fall-through, EXIT,
CALL into the callee and RET back to every call site), iterated to a fix point, so a definition from the
previous loop iteration reaches the loop header across the back edge like any other, and one that a later
definition kills on every path does not reach. A predicated definition does not kill the earlier ones.
Limits: predicate values are ignored, so definitions reach along every CFG path, infeasible ones included
(an over-approximation: false positives are possible, none seen on this project's kernels under ptxas
12.9/13.0/13.5); stack slots are matched by address text, flow-insensitively; register widths are modelled
for .64/.128 operations, IMAD.WIDE, CS2R, LDSM, HMMA and HGMMA only; an indirect branch (BRX/JMX) is taken
to fall through; a descriptor built from the base but at a wrong offset is not detected.
"""
from __future__ import annotations

import bisect
import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from collections import deque
from dataclasses import dataclass
from typing import Dict, FrozenSet, List, Optional, Tuple

__all__ = ["Hazard", "disassemble", "wgmma_descriptor_hazards", "hazards_in_cubin", "default_tool"]

_LINE = re.compile(r"^\s*/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_FUNC = re.compile(r"^\s*Function\s*:\s*(\S+)|^\s*\.section\s+\.text\.([^,\s]+)")
_LABEL = re.compile(r"^\s*([\w.$]+):\s*$")  # nvdisasm: .L_x_1:, and subroutines
_REG = re.compile(r"\b(UR|R)(\d+)\b")
_PRED_OPERAND = re.compile(r"^!?U?P(T|\d+)$")
# Data sources: a descriptor's value never legitimately passes through any of these.
_LOADS = {"LDG", "LD", "LDS", "LDSM", "LDL", "ATOM", "ATOMG", "ATOMS", "TLD", "TEX", "SULD"}
_ARITH = {"F2FP", "FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSET", "MUFU", "F2F", "F2I", "I2F", "FRND", "HADD2",
          "HMUL2", "HFMA2", "HMNMX2", "HSET2", "DADD", "DMUL", "DFMA", "HMMA", "HGMMA", "IMMA", "DMMA"}
_STACK = "c[0x0][0x28]"  # the local-memory stack pointer ptxas loads into R1: never a shared address
_SHARED_BASE = ("SR_CgaCtaId", "SR_SWINHI", "SR_SWINLO")
_NO_DEST = {"PLOP3", "UPLOP3", "FCHK", "R2P", "R2UP"}  # besides *SETP*: they write predicates only


@dataclass(frozen=True)
class Hazard:
    """An HGMMA whose shared-memory descriptor is not built from the shared-memory base (``reason``)."""

    function: str
    offset: int  # byte offset of the HGMMA in the function
    instruction: str  # the HGMMA's text
    descriptor: Tuple[str, ...]  # the uniform registers gdesc[URn] names, URn..URn+3
    reason: str

    def __str__(self) -> str:
        return f"{self.function}+{self.offset:#x}: {self.instruction}: {self.reason}"


@dataclass
class _Instr:
    offset: int
    predicated: bool
    opcode: str
    operands: List[str]
    text: str
    defs: Tuple[str, ...] = ()
    uses: Tuple[str, ...] = ()

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


# ---------------------------------------------------------------------------------------------- disassembly

def _triton_bin() -> Optional[str]:
    """The installed triton's backends/nvidia/bin (its ptxas, cuobjdump, nvdisasm), found without importing it."""
    try:
        spec = importlib.util.find_spec("triton")
    except (ImportError, ValueError):  # a broken or blocked triton: look elsewhere
        return None
    return os.path.join(os.path.dirname(spec.origin), "backends", "nvidia", "bin") if spec and spec.origin else None


def default_tool() -> str:
    """The disassembler used when none is named: cuobjdump (else nvdisasm) next to Triton's bundled ptxas,
    else on PATH or in /usr/local/cuda/bin."""
    bundled = _triton_bin()
    for path in ([bundled] if bundled else []) + [None, "/usr/local/cuda/bin"]:  # None: PATH
        for name in ("cuobjdump", "nvdisasm"):
            found = shutil.which(name, path=path)
            if found:
                return found
    where = bundled or "triton's backends/nvidia/bin (triton is not installed)"
    raise FileNotFoundError(f"no cuobjdump or nvdisasm: looked in {where}, on PATH and in /usr/local/cuda/bin; "
                            f"install triton or the CUDA toolkit, or pass tool=")


def disassemble(cubin: bytes, tool: Optional[str] = None) -> str:
    """The SASS text of ``cubin`` from ``cuobjdump -sass`` or ``nvdisasm -c`` (by the tool's name)."""
    tool = tool or default_tool()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        args = [tool, "-c", path] if "nvdisasm" in os.path.basename(tool) else [tool, "-sass", path]
        r = subprocess.run(args, capture_output=True, text=True)
    if r.returncode != 0 or "/*0000*/" not in r.stdout:
        raise RuntimeError(f"{' '.join(args[:-1])} failed ({r.returncode}): {r.stderr.strip()[-500:]}")
    return r.stdout


def hazards_in_cubin(cubin: bytes, tool: Optional[str] = None) -> List[Hazard]:
    """:func:`wgmma_descriptor_hazards` of a cubin (disassembled with ``tool``, default :func:`default_tool`)."""
    return wgmma_descriptor_hazards(disassemble(cubin, tool))


# ---------------------------------------------------------------------------------------------- parsing

def _regs(operand: str, width: int) -> List[str]:
    """Registers an operand names. In brackets, ``R2.64`` and ``desc[URn]`` are pairs and ``gdesc[URn]``
    a quad; outside, a register is ``width`` wide (the instruction's data width)."""
    out = []
    for m in _REG.finditer(operand):
        n = 1 if "[" in operand else width
        if operand[m.end():m.end() + 3] == ".64" or operand[:m.start()].endswith("desc["):
            n = 2
        if operand[:m.start()].endswith("gdesc["):
            n = 4
        out += [f"{m.group(1)}{int(m.group(2)) + k}" for k in range(n)]
    return out


def _widths(opcode: str, operands: List[str]) -> List[int]:
    """Register width of each operand, where it is not 1 (the cases that occur in Triton's SASS)."""
    tokens = opcode.split(".")
    base, w = tokens[0], 4 if "128" in tokens else 2 if "64" in tokens else 1
    widths = [w] * len(operands)
    if base in ("IMAD", "UIMAD") and "WIDE" in tokens:
        widths = [2, 1, 1, 2] + [1] * (len(operands) - 4)
    elif base == "CS2R" and "32" not in tokens:
        widths[0] = 2
    elif base == "LDSM" and tokens[-1] in ("1", "2", "4"):
        widths[0] = int(tokens[-1])
    elif base == "HMMA":
        acc = 4 if "F32" in tokens[2:3] else 2
        widths = [acc, 4, 2, acc] + [1] * (len(operands) - 4)
    elif base == "HGMMA":
        n = int(tokens[1].split("x")[1])
        acc = n // 2 if tokens[2] == "F32" else n // 4
        widths = [acc] + [4] * (len(operands) - 1)  # an A register operand is 4 wide
        widths[-1 if "gsb0" not in operands[-1] else -2] = acc
    return widths


def _parse_instr(offset: int, body: str) -> _Instr:
    pred = re.match(r"@!?U?P(T|\d+)\s+", body)
    if pred:
        body = body[pred.end():]
    opcode, _, rest = body.partition(" ")
    operands = [o.strip() for o in rest.split(",")] if rest.strip() else []
    ins = _Instr(offset, bool(pred), opcode, operands, body)
    widths = _widths(opcode, operands)
    # The destination: the first operand after any predicate outputs (IADD3 R7, P0, ...; SHFL PT, R11,
    # ...), if it is a bare register. SETP-like instructions and stores (a [address] first) have none.
    i = 0
    while i < len(operands) and _PRED_OPERAND.match(operands[i]):
        i += 1
    defs: List[str] = []
    if not ("SETP" in ins.base or ins.base in _NO_DEST) and i < len(operands) and "[" not in operands[i]:
        defs = _regs(operands[i], widths[i])
    uses = [r for j, o in enumerate(operands) if j != i or not defs for r in _regs(o, widths[j])]
    ins.defs, ins.uses = tuple(defs), tuple(uses)
    return ins


def _functions(sass: str) -> Dict[str, Tuple[List[_Instr], Dict[str, int]]]:
    """name -> (instructions, label -> offset) for each function in cuobjdump or nvdisasm output."""
    funcs: Dict[str, Tuple[List[_Instr], Dict[str, int]]] = {}
    instrs: List[_Instr] = []
    labels: Dict[str, int] = {}
    pending: List[str] = []
    for line in sass.splitlines():
        f = _FUNC.match(line)
        if f:
            instrs, labels, pending = [], {}, []
            funcs[f.group(1) or f.group(2)] = (instrs, labels)
            continue
        lab = _LABEL.match(line)
        if lab:
            pending.append(lab.group(1))
            continue
        m = _LINE.match(line)
        if m and funcs:
            offset = int(m.group(1), 16)
            for name in pending:
                labels[name] = offset
            pending = []
            instrs.append(_parse_instr(offset, m.group(2)))
    for name in pending:  # a label after the last instruction (nvdisasm's end-of-function marker)
        labels[name] = instrs[-1].offset + 16 if instrs else 0
    return funcs


# ---------------------------------------------------------------------------------------------- data flow

def _target(ins: _Instr, labels: Dict[str, int]) -> Optional[int]:
    """A branch's or call's target offset: ``0x1f90`` (cuobjdump) or ```(.L_x_1)`` (nvdisasm)."""
    for o in ins.operands:
        m = re.search(r"`\(([^)]+)\)", o)
        if m:
            return labels.get(m.group(1))
        if re.fullmatch(r"0x[0-9a-fA-F]+", o):
            return int(o, 16)
    return None


class _Flow:
    """Reaching definitions over a function's control-flow graph of basic blocks (BRA targets and
    fall-through, EXIT; CALL into the callee and RET back to every call site), iterated to a fix point, so
    definitions from a previous loop iteration reach the loop header. A predicated definition does not
    kill the ones before it."""

    def __init__(self, instrs: List[_Instr], labels: Dict[str, int]):
        self.instrs = instrs
        at = {ins.offset: i for i, ins in enumerate(instrs)}
        n = len(instrs)
        jumps = {i: at.get(_target(ins, labels)) for i, ins in enumerate(instrs) if ins.base in ("BRA", "CALL")}
        ends = {i for i, ins in enumerate(instrs) if ins.base in ("BRA", "CALL", "EXIT", "RET")}
        leaders = sorted({0} | {t for t in jumps.values() if t is not None} | {i + 1 for i in ends if i + 1 < n})
        self.block = [0] * n
        for b, start in enumerate(leaders):
            for i in range(start, leaders[b + 1] if b + 1 < len(leaders) else n):
                self.block[i] = b
        returns = [self.block[i + 1] for i in ends if instrs[i].base == "CALL" and i + 1 < n]
        succ: List[List[int]] = []
        for b, start in enumerate(leaders):
            last = (leaders[b + 1] if b + 1 < len(leaders) else n) - 1
            ins, nxt = instrs[last], [b + 1] if last + 1 < n else []
            if jumps.get(last) is not None:
                succ.append([self.block[jumps[last]]] + (nxt if ins.predicated else []))
            elif ins.base in ("EXIT", "RET"):
                succ.append((nxt if ins.predicated else []) + (returns if ins.base == "RET" else []))
            else:  # fall through (also an indirect branch: a limit)
                succ.append(nxt)
        # Per block: register -> its definitions there, in order; and what the block lets out.
        self.local: List[Dict[str, List[int]]] = [{} for _ in leaders]
        for i, ins in enumerate(instrs):
            for r in ins.defs:
                self.local[self.block[i]].setdefault(r, []).append(i)
        self.into: List[Dict[str, FrozenSet[int]]] = [{} for _ in leaders]
        work, queued = deque(range(len(leaders))), set(range(len(leaders)))
        while work:
            b = work.popleft()
            queued.discard(b)
            out = dict(self.into[b])
            for r, ds in self.local[b].items():
                out[r] = self._last(ds, len(instrs), out.get(r, frozenset()))
            for s in succ[b]:
                merged, changed = self.into[s], False
                for r, ds in out.items():
                    if not ds <= merged.get(r, frozenset()):
                        merged[r] = merged.get(r, frozenset()) | ds
                        changed = True
                if changed and s not in queued:
                    work.append(s)
                    queued.add(s)

    def _last(self, defs: List[int], before: int, incoming: FrozenSet[int]) -> FrozenSet[int]:
        """The definitions among ``defs`` (one block's, in order) still live just before ``before``:
        back to the last unpredicated one, else together with ``incoming``."""
        live = set()
        for d in reversed(defs[:bisect.bisect_left(defs, before)]):
            live.add(d)
            if not self.instrs[d].predicated:
                return frozenset(live)
        return incoming | live

    def reaching(self, i: int, reg: str) -> FrozenSet[int]:
        """Indices of the instructions whose definition of ``reg`` may be the value read at ``i``."""
        b = self.block[i]
        return self._last(self.local[b].get(reg, []), i, self.into[b].get(reg, frozenset()))


def _slot(operand: str) -> Optional[Tuple[str, int]]:
    m = re.fullmatch(r"\[(R\d+)(?:\+(0x[0-9a-fA-F]+))?\]", operand.replace(" ", ""))
    return (m.group(1), int(m.group(2) or "0", 16)) if m else None


def _spill_stores(instrs: List[_Instr]) -> Dict[Tuple[str, int], List[Tuple[int, str]]]:
    """Stack slot -> (STL index, register stored there), 4 bytes a slot."""
    slots: Dict[Tuple[str, int], List[Tuple[int, str]]] = {}
    for i, ins in enumerate(instrs):
        if ins.base == "STL" and len(ins.operands) == 2 and _slot(ins.operands[0]):
            base, off = _slot(ins.operands[0])
            for k, r in enumerate(_regs(ins.operands[1], _widths(ins.opcode, ins.operands)[1])):
                slots.setdefault((base, off + 4 * k), []).append((i, r))
    return slots


def _is_data(ins: _Instr) -> bool:
    return ins.base in _ARITH or ins.base in _LOADS or _STACK in ins.text


def _is_shared_base(ins: _Instr) -> bool:
    return any(s in ins.text for s in _SHARED_BASE) or bool(re.fullmatch(r"U?MOV U?R\d+, 0x400", ins.text))


def _trace(flow: _Flow, slots, start: int, reg: str):
    """Walk backwards from the value of ``reg`` read at instruction ``start``, breadth first, through every
    reaching definition. Returns (chain, origins, shared_base): the shortest chain [(instruction index,
    register it defines)] from ``reg`` to a data source, or None; the slice's origins (definitions that read
    no register, and registers read with no definition reaching them), as text; and whether any origin is
    the shared-memory base."""
    instrs = flow.instrs
    parent: Dict[Tuple[int, str], Optional[Tuple[int, str]]] = {}
    queue = deque()
    origins: List[str] = []
    shared_base = False

    def visit(at: int, r: str, node: Optional[Tuple[int, str]]) -> None:
        defs = flow.reaching(at, r)
        if not defs:
            origins.append(f"{r} read before any definition @{instrs[at].offset:#x}")
        for dd in defs:
            if (dd, r) not in parent:
                parent[(dd, r)] = node
                queue.append((dd, r))

    visit(start, reg, None)
    while queue:
        node = queue.popleft()
        d, r = node
        ins = instrs[d]
        deps = [(d, u) for u in ins.uses]
        if ins.base == "LDL" and _slot(ins.operands[1]):
            base, off = _slot(ins.operands[1])
            deps = slots.get((base, off + 4 * ins.defs.index(r)), [])  # a spill: follow its stores
        if _is_data(ins) and not (ins.base == "LDL" and deps):
            chain = [node]
            while parent[chain[-1]] is not None:
                chain.append(parent[chain[-1]])
            return chain[::-1], origins, shared_base
        if not deps:
            origins.append(f"{ins.text} @{ins.offset:#x}")
            shared_base = shared_base or _is_shared_base(ins)
        for at, u in deps:
            visit(at, u, node)
    return None, origins, shared_base


def wgmma_descriptor_hazards(sass: str) -> List[Hazard]:
    """Every HGMMA in ``sass`` (cuobjdump -sass or nvdisasm text) whose A or B shared-memory descriptor
    depends on data, or does not come from the shared-memory base at all (see the module docstring); one
    Hazard per HGMMA, for its first bad word."""
    hazards = []
    for name, (instrs, labels) in _functions(sass).items():
        gmmas = [i for i, ins in enumerate(instrs) if ins.base == "HGMMA"]
        if not gmmas:
            continue
        flow = _Flow(instrs, labels)
        slots = _spill_stores(instrs)
        for i in gmmas:
            ins = instrs[i]
            k = next(j for j, o in enumerate(ins.operands) if o.startswith("gdesc["))
            quad = tuple(_regs(ins.operands[k], 4))
            # gdesc right after the accumulator: A and B from shared memory; after an A register: B only.
            words = [("A", quad[0]), ("A", quad[1])] if k == 1 else []
            words += [("B", quad[2]), ("B", quad[3])]
            for operand, reg in words:
                address = reg in (quad[0], quad[2])
                chain, origins, shared_base = _trace(flow, slots, i, reg)
                what = f"{operand} descriptor {'address' if address else 'stride/swizzle'} word {reg}"
                if chain:
                    steps = " <- ".join(f"{instrs[d].opcode} {r} @{instrs[d].offset:#x}" for d, r in chain)
                    source = "the stack pointer" if _STACK in instrs[chain[-1][0]].text else "data"
                    reason = f"{what} is built from {source}: {steps}"
                elif address and not shared_base:
                    # Not data, but no shared address either (seen under ptxas 12.8: the block id, and a
                    # uniform register never written).
                    found = ", ".join(origins[:4])
                    reason = f"{what} is not derived from the shared-memory base; it comes from {found}"
                else:
                    continue
                hazards.append(Hazard(name, ins.offset, ins.text, quad, reason))
                break
    return hazards
