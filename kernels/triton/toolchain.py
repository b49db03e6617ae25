"""Which ptxas the Triton kernels are assembled with, and why (torch-free: the static report uses it too).

Triton turns a kernel into PTX and hands it to ptxas for the cubin. The ptxas that triton 3.6 bundles
(12.8.93) miscompiles mixer_fast's token kernels on Hopper: it builds wgmma shared-memory descriptors from
data registers, and the kernel dies with an illegal shared-memory read (shared/gpu/2026-11-27-H200/README.md;
the same PTX assembled by CUDA 13.0's ptxas runs correctly there). So on a GPU whose kernels would go
through a known-bad ptxas, the backend assembles with a CUDA 13.x ptxas instead: from the ``gpu`` extra
(``pip install "mixer_fast[gpu]"``: the ``nvidia-cuda-nvcc`` wheel ships one), ``$CUDA_HOME``,
/usr/local/cuda or ``PATH``, the newest first, and hands it to Triton through ``TRITON_PTXAS_PATH``. A
path the user set is never overridden; if it is itself known bad, the backend refuses to load rather than
crash. With no good ptxas at all the backend does not load, and says how to get one.

Triton keys its on-disk kernel cache on the ptxas version (``backend.hash()``), so cubins assembled by the
bad ptxas are not reused once another one is chosen; its in-process memo of that version is cleared here.

The JAX triton backend's kernels are assembled elsewhere: jax-triton hands jaxlib PTX, and XLA assembles it
with the first ptxas it finds (:func:`xla_ptxas`), ignoring ``TRITON_PTXAS_PATH``. :func:`apply_for_jax`
refuses a known-bad one there, and has Triton write PTX that it can read (:func:`choose_for_jax`).
"""
from __future__ import annotations

import functools
import glob
import importlib.util
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

ENV_VAR = "TRITON_PTXAS_PATH"
BLACKWELL_ENV_VAR = "TRITON_PTXAS_BLACKWELL_PATH"  # Triton assembles sm_100+ with a ptxas of its own
Version = Tuple[int, int, int]

# (major, minor) of ptxas releases known to miscompile these kernels, per GPU architecture range, and why.
KNOWN_BAD = {
    (12, 8): ((90, 100), "builds wgmma shared-memory descriptors from data registers in the token-mixing "
                         "kernels (an illegal shared-memory read on Hopper; seen with 12.8.93 on an H200)"),
}
# The oldest ptxas taken as a replacement: CUDA 13.0's assembled the token kernels correctly on an H200.
# ptxas 12.9-13.2 have a separate hazard with register-operand wgmma (triton PR 11781, fixed in 13.3) that
# has not been seen in these kernels, so they are not listed as known bad; the newest ptxas found is taken,
# and the gpu extra brings >= 13.3.
MIN_REPLACEMENT: Version = (13, 0, 0)
INSTALL_HINT = ('pip install "mixer_fast[gpu]" (brings a CUDA 13 ptxas in the nvidia-cuda-nvcc wheel), or set '
                f"{ENV_VAR} to a CUDA >= 13.0 ptxas")


# What apply() set, by arch: a TRITON_PTXAS_PATH equal to one of these is ours, not the user's.
_applied: Dict[int, "Ptxas"] = {}


class ToolchainProblem(RuntimeError):
    """No ptxas that is safe for these kernels on this GPU; the message names the fix."""


@dataclass(frozen=True)
class Ptxas:
    """The assembler chosen for a GPU architecture. ``source``: where it came from; ``why``: one line
    for ``mixer-fast info``."""

    path: str
    version: Version
    source: str
    why: str

    @property
    def version_text(self) -> str:
        return version_text(self.version)


def version_text(version: Version) -> str:
    """"12.8.93" for (12, 8, 93)."""
    return ".".join(map(str, version))


@functools.lru_cache(maxsize=None)
def version_of(path: str) -> Optional[Version]:
    """ptxas's release (major, minor, build) from ``--version`` ("release 12.8, V12.8.93"), or None if
    ``path`` does not run as a ptxas."""
    try:
        text = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"V(\d+)\.(\d+)\.(\d+)", text) or re.search(r"release (\d+)\.(\d+)", text)
    if not m:
        return None
    parts = [int(g) for g in m.groups()]
    return tuple(parts + [0] * (3 - len(parts)))  # type: ignore[return-value]


def env_var_for(arch: int) -> str:
    """The variable through which Triton takes the ptxas for ``arch``."""
    return BLACKWELL_ENV_VAR if arch >= 100 else ENV_VAR


def known_bad(version: Version, arch: int) -> Optional[str]:
    """Why ptxas ``version`` must not assemble these kernels for ``arch`` (90 for sm_90a), or None."""
    entry = KNOWN_BAD.get(version[:2])
    if entry and entry[0][0] <= arch < entry[0][1]:
        return entry[1]
    return None


def bundled_path(arch: int) -> str:
    """The ptxas Triton ships and uses by default for ``arch`` (Blackwell has a ptxas of its own)."""
    import triton

    name = "ptxas-blackwell" if arch >= 100 else "ptxas"
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return path if os.path.exists(path) or arch < 100 else os.path.join(os.path.dirname(path), "ptxas")


def wheel_paths() -> List[str]:
    """ptxas binaries of the ``nvidia-cuda-nvcc`` wheels installed in this environment (the ``gpu`` extra):
    CUDA 13 wheels put it in nvidia/cu13/bin, CUDA 12 ones in nvidia/cuda_nvcc/bin."""
    try:
        spec = importlib.util.find_spec("nvidia")
    except (ImportError, ValueError):
        return []
    roots = list(spec.submodule_search_locations or []) if spec else []
    found = []
    for root in roots:
        for pattern in ("cu*/bin/ptxas", "cuda_nvcc/bin/ptxas"):
            found += sorted(glob.glob(os.path.join(root, pattern)))
    return found


def candidates() -> List[Tuple[str, str]]:
    """(path, source) of every other ptxas this machine has, in the order they are named in messages."""
    out = [(p, "the nvidia-cuda-nvcc wheel (mixer_fast[gpu])") for p in wheel_paths()]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            out.append((os.path.join(os.environ[var], "bin", "ptxas"), f"${var}"))
    out.append(("/usr/local/cuda/bin/ptxas", "the CUDA toolkit in /usr/local/cuda"))
    on_path = shutil.which("ptxas")
    if on_path:
        out.append((on_path, "PATH"))
    seen, unique = set(), []
    for path, source in out:
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(path) and os.access(path, os.X_OK):
            seen.add(real)
            unique.append((path, source))
    return unique


def choose(arch: int) -> Ptxas:
    """The ptxas to assemble for ``arch`` (compute capability as an integer, 90 for Hopper), or
    :class:`ToolchainProblem` saying why there is none that is safe."""
    env_var = env_var_for(arch)
    user = os.environ.get(env_var)
    ours = _ours(arch)
    if ours:  # set by apply() in this process: report it as chosen, not as the user's
        return ours
    if user:
        version = version_of(user)
        if version is None:
            raise ToolchainProblem(f"{env_var}={user!r} does not run as a ptxas (`{user} --version` failed); "
                                   f"unset it or point it to a CUDA >= 13.0 ptxas")
        bad = known_bad(version, arch)
        if bad:
            raise ToolchainProblem(f"{env_var} points to ptxas {version_text(version)}, which {bad}; "
                                   f"unset it (mixer_fast then finds a good one) or point it to a CUDA >= 13.0 "
                                   f"ptxas")
        return Ptxas(user, version, f"{env_var} (set by the user)", "set by the user; never overridden")
    bundled = bundled_path(arch)
    version = version_of(bundled)
    bad = f"does not run ({bundled})" if version is None else known_bad(version, arch)
    if not bad:
        return Ptxas(bundled, version, "bundled with triton", "Triton's own (not known to miscompile these kernels)")
    bundled_text = "missing" if version is None else version_text(version)
    good = [(v, p, s) for p, s in candidates() if (v := version_of(p)) and v >= MIN_REPLACEMENT
            and not known_bad(v, arch)]
    if not good:
        raise ToolchainProblem(f"the ptxas bundled with this triton ({bundled_text}) {bad}, and no "
                               f"CUDA >= 13.0 ptxas was found to replace it; {INSTALL_HINT}")
    v, path, source = max(good, key=lambda t: t[0])
    return Ptxas(path, v, source, f"replaces Triton's bundled ptxas ({bundled_text}), which {bad}")


def others(chosen: Ptxas, arch: int) -> List[Tuple[str, Optional[Version], str]]:
    """(path, version or None, source) of every ptxas on this machine other than ``chosen``: Triton's bundled
    one, then :func:`candidates` (``mixer-fast info`` lists them; the one XLA assembles jax-triton's kernels
    with is :func:`xla_ptxas`)."""
    seen = {os.path.realpath(chosen.path)}
    out = []
    for path, source in [(bundled_path(arch), "bundled with triton")] + candidates():
        real = os.path.realpath(path)
        if real not in seen and os.path.isfile(path):
            seen.add(real)
            out.append((path, version_of(path), source))
    return out


def apply(arch: int) -> Ptxas:
    """Choose the ptxas for ``arch`` and make Triton use it in this process (``TRITON_PTXAS_PATH``).

    Call before the first kernel compiles. Triton memoises the ptxas version that keys its kernel cache;
    that memo is cleared so the cache key follows the new assembler."""
    return _use(choose(arch), arch)


def _use(chosen: Ptxas, arch: int) -> Ptxas:
    """Make Triton assemble ``arch``'s kernels with ``chosen`` in this process."""
    # Already in force: the user's path or an earlier apply() (the variable names it), or Triton's default.
    if (os.environ.get(env_var_for(arch)) == chosen.path
            or (env_var_for(arch) not in os.environ
                and os.path.realpath(chosen.path) == os.path.realpath(bundled_path(arch)))):
        return chosen
    os.environ[env_var_for(arch)] = chosen.path
    _applied[arch] = chosen
    try:
        from triton.backends.nvidia import compiler as nvidia_compiler

        # get_ptxas_version keys the cache; _path_to_binary memoises the path in triton <= 3.3.
        for name in ("get_ptxas_version", "get_ptxas", "_path_to_binary"):
            fn = getattr(nvidia_compiler, name, None)
            if hasattr(fn, "cache_clear"):
                fn.cache_clear()
    except ImportError:  # a triton without the NVIDIA backend: nothing compiles for CUDA anyway
        pass
    return chosen


# How XLA picks the ptxas that assembles jax-triton's PTX: jaxlib's triton_kernels.cc calls stream_executor's
# CompileGpuAsm with no preferred CUDA directory, and jaxlib's CUDA plugins are built without libnvptxcompiler
# (jax-cuda13-plugin 0.11.2's _triton.so says "XLA was built without libnvptxcompiler support"), so
# FindCudaExecutable runs: "bin/ptxas" under the working directory, then PATH, then the CUDA roots, taking
# the first that answers --version with a release of at least 11.8 and not 12.3.103 (XLA's own exclusion).
XLA_MIN_VERSION: Version = (11, 8, 0)
XLA_EXCLUDED_VERSIONS: Tuple[Version, ...] = ((12, 3, 103),)
XLA_CUDA_ROOTS: Tuple[str, ...] = ("/usr/local/cuda", "/opt/cuda")
# The CUDA roots XLA derives from the plugin library it lives in: the nvidia-cuda-nvcc wheel beside it
# (CUDA 13 wheels install into nvidia/cu13, CUDA 12 ones into nvidia/cuda_nvcc), in the order jax tries them.
XLA_PLUGINS: Tuple[Tuple[str, str], ...] = (("jax_cuda13_plugin", "cu13"), ("jax_cuda12_plugin", "cuda_nvcc"))


def xla_search_paths() -> List[Tuple[str, str]]:
    """(path, source) of every place XLA looks for the ptxas that assembles jax-triton's kernels, in its order
    (paths relative to the working directory are XLA's: it resolves them there when it compiles)."""
    out = [(os.path.join("bin", "ptxas"), "bin/ptxas under the working directory")]
    # An empty PATH entry is skipped: there XLA runs a bare "ptxas", which exec resolves through PATH anyway.
    out += [(os.path.join(d, "ptxas"), "PATH") for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    out += [(os.path.join(root, "bin", "ptxas"), root) for root in XLA_CUDA_ROOTS]
    for plugin, nvcc_dir in XLA_PLUGINS:
        try:
            spec = importlib.util.find_spec(plugin)
        except (ImportError, ValueError):
            spec = None
        if spec is None or not spec.submodule_search_locations:
            continue
        here = list(spec.submodule_search_locations)[0]
        for rel in (os.path.join("..", "nvidia", nvcc_dir), os.path.join("..", "..", "nvidia", nvcc_dir), "cuda",
                    os.path.join("..", "..", "..", ".."), os.path.join("..", "..", "..", "..", "..")):
            root = os.path.normpath(os.path.join(here, rel))
            out.append((os.path.join(root, "bin", "ptxas"), f"{root}, beside {plugin}"))
        break
    return out


def xla_ptxas() -> Optional[Ptxas]:
    """The ptxas XLA would assemble jax-triton's kernels with, found as XLA finds it; None if XLA finds none."""
    for path, source in xla_search_paths():
        version = version_of(path)
        if version is None or version < XLA_MIN_VERSION or version in XLA_EXCLUDED_VERSIONS:
            continue
        return Ptxas(path, version, source, "XLA's first ptxas (it assembles jax-triton's kernels)")
    return None


def choose_for_jax(arch: int) -> Tuple[Ptxas, Ptxas]:
    """(Triton's ptxas, XLA's ptxas) for the JAX triton backend on ``arch``, or :class:`ToolchainProblem`.

    XLA's ptxas assembles the kernels, so it must not be known bad for ``arch``. Triton writes the PTX for
    the release of its own ptxas (13.5 writes PTX ISA 9.5), which an older ptxas rejects ("Unsupported
    .version"): where :func:`choose` would take a newer release than XLA's, Triton takes XLA's instead.
    A ``TRITON_PTXAS_PATH`` the user set is never overridden: if it is newer than XLA's, this refuses."""
    xla = xla_ptxas()
    if xla is None:
        raise ToolchainProblem("XLA finds no ptxas to assemble jax-triton's kernels (it looks in ./bin, PATH, "
                               f"{', '.join(XLA_CUDA_ROOTS)} and the nvidia-cuda-nvcc wheel beside jaxlib's CUDA "
                               f"plugin); pip install \"mixer_fast[gpu]\" (its nvidia-cuda-nvcc wheel installs "
                               f"there), or put a CUDA >= 13.0 ptxas on PATH")
    bad = known_bad(xla.version, arch)
    if bad:
        raise ToolchainProblem(f"XLA assembles jax-triton's kernels with the first ptxas it finds, "
                               f"{xla.version_text} at {xla.path} ({xla.source}), which {bad}; put the folder of "
                               f"a CUDA >= 13.0 ptxas first on PATH")
    try:
        triton_ptxas = choose(arch)
    except ToolchainProblem:
        if _set_by_user(arch):  # the user's ptxas is known bad, or does not run
            raise
        # No replacement found for a known-bad bundled ptxas, but XLA's passed the check above, and here it
        # is the assembler that matters: Triton's only sets the PTX version (and sizes kernels).
        return _xla_for_triton(xla, "no other ptxas safe for these kernels was found"), xla
    if triton_ptxas.version[:2] <= xla.version[:2]:
        return triton_ptxas, xla
    if _set_by_user(arch):
        raise ToolchainProblem(f"{env_var_for(arch)} points to ptxas {triton_ptxas.version_text}, so Triton "
                               f"writes PTX for that release, which XLA's ptxas ({xla.version_text} at {xla.path}, "
                               f"{xla.source}) cannot read, and XLA assembles jax-triton's kernels; unset it "
                               f"(mixer_fast then has Triton write PTX for XLA's ptxas) or put a ptxas >= "
                               f"{triton_ptxas.version_text} first on PATH")
    return _xla_for_triton(xla, f"ptxas {triton_ptxas.version_text}, {triton_ptxas.source}, would write PTX "
                                f"XLA's cannot read"), xla


def _xla_for_triton(xla: Ptxas, reason: str) -> Ptxas:
    """XLA's ptxas as the one Triton uses (absolute: XLA's own search may have found it relative)."""
    why = f"XLA's own, which assembles jax-triton's kernels: Triton writes their PTX for its release ({reason})"
    return Ptxas(os.path.abspath(xla.path), xla.version, f"XLA's ptxas ({xla.source})", why)


def _ours(arch: int) -> Optional[Ptxas]:
    """What an apply() of this process set the variable through which Triton takes ``arch``'s ptxas to, if
    the variable still names it."""
    value = os.environ.get(env_var_for(arch))
    return next((p for p in _applied.values() if value and p.path == value), None)


def _set_by_user(arch: int) -> bool:
    """Whether the variable through which Triton takes ``arch``'s ptxas was set by the user, not by us."""
    return bool(os.environ.get(env_var_for(arch))) and _ours(arch) is None


def apply_for_jax(arch: int) -> Tuple[Ptxas, Ptxas]:
    """:func:`choose_for_jax`, and make Triton use its choice in this process (as :func:`apply` does).
    The torch triton backend, if also used in the process, then assembles with that ptxas too: it is XLA's,
    which passed the known-bad check."""
    triton_ptxas, xla = choose_for_jax(arch)
    return _use(triton_ptxas, arch), xla
