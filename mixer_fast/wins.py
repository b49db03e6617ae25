"""The table of measured wins that the automatic backend choice follows.

A fused backend is chosen automatically for an (op, mode, dtype, device class) only where a committed
measurement shows it faster than the reference there; everywhere else the reference runs. The table
ships in the package (``measured_wins.json``) and is generated from the raw results under bench/results/
by ``python bench/wins_table.py --write`` (tests/test_wins.py checks the two agree), so no win is typed
by hand and none is claimed without a file that holds it.

Keys:
- op: ``token_mixing``, ``channel_mixing``, ``spatial_gating`` (a measured block counts for each op it
  is made of);
- mode: ``forward`` (no gradient wanted) or ``training`` (forward and backward);
- dtype: ``bf16``, ``fp16``, ``fp32``;
- device class: a GPU's compute capability (``sm_90`` for H100 and H200), or a CPU's instruction-set
  class (:func:`cpu_class`: ``avx2``, ``avx512``, ``avx512_bf16``, ``avx512_amx``, ``portable``).

An explicit ``backend=`` (or ``MIXER_FAST_BACKEND``) is always honoured, whatever the table says.
"""
from __future__ import annotations

import functools
import importlib.resources
import json
from typing import Dict, FrozenSet, List, Optional, Tuple

TABLE_FILE = "measured_wins.json"
OPS = ("token_mixing", "channel_mixing", "spatial_gating")
MODES = ("forward", "training")
DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}

Key = Tuple[str, str, str, str, str, str]  # framework, backend, device class, op, mode, dtype


@functools.lru_cache(maxsize=None)
def table() -> dict:
    """The shipped table: {"rule": ..., "chosen": [key rows], "evidence": [measurement rows]}."""
    text = importlib.resources.files("mixer_fast").joinpath(TABLE_FILE).read_text()
    return json.loads(text)


@functools.lru_cache(maxsize=None)
def _chosen() -> FrozenSet[Key]:
    return frozenset((r["framework"], r["backend"], r["device_class"], r["op"], r["mode"], r["dtype"])
                     for r in table()["chosen"])


def dtype_name(dtype: str) -> str:
    """``bf16`` / ``fp16`` / ``fp32`` for a torch or JAX dtype name; other dtypes keep their name."""
    return DTYPES.get(dtype, dtype)


def is_win(framework: str, backend: str, device_class: str, op: str, mode: str, dtype: str) -> bool:
    """Whether a committed measurement shows ``backend`` faster than the reference for this key."""
    return (framework, backend, device_class, op, mode, dtype_name(dtype)) in _chosen()


def wins_for(framework: str, backend: str) -> List[dict]:
    """The table's chosen rows of one backend (for ``mixer-fast info``)."""
    return [r for r in table()["chosen"] if r["framework"] == framework and r["backend"] == backend]


def cuda_class(capability: Tuple[int, int]) -> str:
    """``sm_90`` for compute capability (9, 0)."""
    return f"sm_{capability[0]}{capability[1]}"


@functools.lru_cache(maxsize=None)
def cpu_class(isa: Optional[str] = None, native_bf16: Optional[bool] = None) -> str:
    """The CPU's instruction-set class: the C++ kernels' micro-kernel family (``isa``: avx512 or
    avx512_bf16 → avx512, avx2, portable; read from /proc/cpuinfo when not given), then what eager's bf16 GEMMs run on, which decides
    whether the fused kernels can win: ``_amx`` (AMX tiles), ``_bf16`` (AVX512-BF16 dot products).
    Without /proc/cpuinfo (not Linux) ``native_bf16`` (the C++ extension's own CPUID check) says ``_bf16``;
    AMX is then not told apart."""
    flags = _cpu_flags()
    # The avx512_bf16 family (bf16 dot products) is AVX-512 too; the class's suffix comes from the flags below.
    isa = "avx512" if isa == "avx512_bf16" else isa
    if isa is None:
        isa = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else "portable"
    if "amx_bf16" in flags:
        return f"{isa}_amx"
    if "avx512_bf16" in flags or (not flags and native_bf16):
        return f"{isa}_bf16"
    return isa


def _cpu_flags() -> FrozenSet[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def describe(rows: List[dict]) -> Dict[str, List[str]]:
    """Chosen rows grouped by device class: {"sm_90": ["token_mixing forward bf16", ...]}."""
    out: Dict[str, List[str]] = {}
    for r in rows:
        out.setdefault(r["device_class"], []).append(f"{r['op']} {r['mode']} {r['dtype']}")
    return out
