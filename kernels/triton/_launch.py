"""Launch helpers shared by the Triton ops: compile-or-interpret mode, dot precision, block sizes.

The mode is per process and fixed when triton is first imported: Triton's interpreter
(TRITON_INTERPRET=1) turns every @triton.jit function, Triton's own included, into Python, so it cannot
be switched per call. mixer_fast.torch.triton_backend sets it on machines without a CUDA device.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import os
import re
import threading
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, List, Optional, Sequence

if TYPE_CHECKING:  # torch loads when a launcher runs; the JAX path (jax_launch.py) never needs it
    import torch


INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

_LAUNCH_LOCK = threading.RLock()


def serialized(autotuned: bool = False) -> ContextManager:
    """Hold around a kernel launch. Triton's interpreter keeps the grid position in one global builder and
    patches triton.language for the length of a launch, so two threads interpreting at once corrupt each
    other (tests/test_concurrency.py saw "y >= grid_dim[1]"); the interpreter runs Python under the GIL, so
    nothing is lost. Compiled, only autotuned launches: Triton's Autotuner keeps the call's arguments on
    the shared kernel object while it benchmarks, and two threads tuning one kernel crash
    (triton-lang/triton#11494, open); a warm launch holds the lock for microseconds."""
    return _LAUNCH_LOCK if (INTERPRET or autotuned) else contextlib.nullcontext()


def compile_workers() -> int:
    """Threads for :func:`compile_concurrently`: the CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compile_concurrently(warmups: Sequence[Callable[[], object]], workers: Optional[int] = None) -> int:
    """Call ``warmups`` (each a Triton launch with ``warmup=True``: specialised and compiled, not run) with
    their compiles in a pool of up to ``workers`` threads (default :func:`compile_workers`), through
    Triton's AsyncCompileMode: the compiled kernels land in each JIT function's cache under the keys their
    real launches look up. A tuner's candidates otherwise compile one by one at their first timed launch,
    ~1 s each for the fused GEMM on sm_90a here, which made compiling, not timing, the cost of a tuning run;
    Triton's passes and ptxas drop the GIL, so threads overlap them (6 fused-GEMM configs: 12.4 s serially,
    6.8 s in two threads on two cores, 2026-11-29). Errors are not raised here: a compile's, nor one a
    warm-up raises itself before its compile is submitted (binding its arguments, say), which would otherwise
    stop the warm-ups after it; the launch meets its error when it runs (triton 3.8 keeps a failed compile in
    the kernel cache and raises its error again at each launch of that config; 3.6 compiles again). Returns
    the threads used, or 0 where nothing is gained and no warm-up runs (Triton's interpreter, one warm-up or one CPU, a Triton before
    AsyncCompileMode), or where one is already active: the warm-ups then go to its pool."""
    try:
        from triton.runtime._async_compile import AsyncCompileMode, active_mode
    except ImportError:  # Triton before 3.4: each config compiles at its first launch
        return 0
    if INTERPRET:
        return 0
    if active_mode.get() is not None:
        for warm in warmups:
            _passing_over_errors(warm)
        return 0
    workers = min(len(warmups), workers or compile_workers())
    if workers < 2:
        return 0
    try:
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="triton-compile") as pool, \
                AsyncCompileMode(pool, ignore_errors=True):
            for warm in warmups:
                _passing_over_errors(warm)
    finally:
        # triton 3.6 clears the mode only after its last compile: an interrupt there would leave it set,
        # with its pool shut down, and every later compile in this thread failing
        active_mode.set(None)
    return workers


def _passing_over_errors(warm: Callable[[], object]) -> None:
    try:
        warm()
    except Exception:  # noqa: BLE001 - its launch meets it again (compile_concurrently)
        pass


_RECORDED: Optional[List[Callable[[], object]]] = None  # record_launches' list while one is active
_LAUNCHING = threading.local()  # .on: this thread's launches run whatever else is active (launching())


@contextlib.contextmanager
def record_launches() -> Iterator[List[Callable[[], object]]]:
    """Inside the block, in every thread of the process, a launch made through :func:`on_grid` does not run:
    its warm-up (Triton's ``warmup`` with the launch's arguments and grid: compiled under the key the launch
    looks up, and not run) is appended to the list the block yields, for :func:`compile_concurrently` to
    compile them all at once afterwards (bench/gpu_check.py's timing groups and token tiles: a process's
    first forward and training step otherwise compile their kernels one by one). The launcher's other work
    still runs (its torch operations, a tuner's choice: matmul.Tuner.config), on the outputs the recorded
    launches left unwritten. Process-wide rather than a context variable because on CUDA autograd runs a
    backward in a thread of its own, which sees no context variable of the caller's; so it is for a process
    of its own, such as the GPU check's workers, and refuses to nest. The warm-ups hold their launches'
    tensors until the list is dropped. A no-op in Triton's interpreter."""
    global _RECORDED
    if _RECORDED is not None:
        raise RuntimeError("record_launches: launches are already being recorded in this process")
    recorded: List[Callable[[], object]] = []
    _RECORDED = recorded
    try:
        yield recorded
    finally:
        _RECORDED = None


def recording() -> bool:
    """Whether this thread's launches are being recorded (:func:`record_launches`, not under :func:`launching`)."""
    return _RECORDED is not None and not getattr(_LAUNCHING, "on", False)


def record(warmup: Callable[[], object]) -> None:
    """Adds ``warmup`` (a compile, not a launch) to what :func:`record_launches` compiles afterwards: a tuner's
    candidates, recorded with the launches."""
    recorded = _RECORDED
    if recorded is None:
        raise RuntimeError("record: no launches are being recorded (record_launches)")
    recorded.append(warmup)


@contextlib.contextmanager
def launching() -> Iterator[None]:
    """Inside the block, in this thread, launches run even under :func:`record_launches`: a tuner timing its
    candidates must run them, if its choice is to be kept."""
    before = getattr(_LAUNCHING, "on", False)
    _LAUNCHING.on = True
    try:
        yield
    finally:
        _LAUNCHING.on = before


def on_grid(kernel: Any, grid: Any) -> Callable[..., Any]:
    """``kernel[grid]``; inside :func:`record_launches` the same launch's warm-up (Triton's ``warmup``: compiled,
    not run), recorded for later (nothing compiled, nothing run)."""
    if recording() and not INTERPRET:
        return lambda *args, **kwargs: record(functools.partial(kernel.warmup, *args, grid=grid, **kwargs))
    return kernel[grid]


def _version(text: str) -> tuple:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:2])


def interpreter_problem() -> Optional[str]:
    """Why Triton's interpreter cannot run here, or None. Triton before 3.8 calls int() on 1-element
    arrays for every scalar kernel argument, an error since numpy 2.4 (seen with triton 3.6.0 and numpy
    2.4.6 / 2.5.5: every launch fails; triton 3.8 squeezes them)."""
    if not INTERPRET:
        return None
    import numpy
    import triton

    if _version(triton.__version__) < (3, 8) and _version(numpy.__version__) >= (2, 4):
        return (f"Triton's interpreter in triton {triton.__version__} fails with numpy {numpy.__version__} (it "
                "converts 1-element arrays with int(), an error since numpy 2.4); install numpy<2.4 or triton>=3.8")
    return None


def env_choice(name: str, default: str, choices: tuple) -> str:
    """The environment variable ``name``, else ``default``: one of ``choices``; any other value is refused by
    name (the per-process choices a GPU measurement makes: MIXER_FAST_LN, MIXER_FAST_GEMM, MIXER_FAST_TOKEN)."""
    value = os.environ.get(name, default)
    if value not in choices:
        raise ValueError(f"{name}: expected {' or '.join(choices)}, got {value!r}")
    return value


def precision(dtype: torch.dtype, allow_tf32: bool) -> str:
    """tl.dot input precision: exact fp32 ("ieee") unless TF32 is opted into; irrelevant for 16-bit."""
    import torch

    return "tf32" if (dtype == torch.float32 and allow_tf32) else "ieee"


def needs_int64(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether some element of these tensors lies 2³¹ or more elements from its base pointer, so that
    kernel offsets must be int64 (they are int32 otherwise: half the registers)."""
    for t in tensors:
        if t is not None and t.numel():
            if t.storage_offset() + sum((n - 1) * abs(s) for n, s in zip(t.shape, t.stride())) >= 2**31 - 1:
                return True
    return False


def pow2(n: int, minimum: int = 16) -> int:
    return max(minimum, 1 << max(0, (int(n) - 1).bit_length()))


def check_device(t: torch.Tensor) -> None:
    import torch

    _TL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
    if INTERPRET and t.device.type != "cpu":
        raise ValueError(f"x: the Triton interpreter runs on CPU tensors, got one on {t.device}")
    if not INTERPRET and t.device.type != "cuda":
        raise ValueError(f"x: compiled Triton kernels need CUDA tensors, got one on {t.device}")
    if t.dtype not in _TL_DTYPES:
        raise TypeError(f"x: the triton backend supports {', '.join(map(str, _TL_DTYPES))}, got {t.dtype}")


def vec_or(v: Optional[torch.Tensor], n: int, fill: float, like: torch.Tensor) -> torch.Tensor:
    """v itself, or a length-n vector of ``fill`` (for a missing LayerNorm/Affine weight or bias)."""
    import torch

    return v if v is not None else torch.full((n,), fill, dtype=like.dtype, device=like.device)


# Tests set this to fill every output with NaN before a kernel writes it, so an element a kernel
# forgets to write cannot pass for a right answer.
POISON = os.environ.get("MIXER_FAST_POISON", "0") == "1"


def new_output(shape, like: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An uninitialised output tensor on ``like``'s device (NaN-filled when POISON is on)."""
    import torch

    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if POISON else t


# The most shared memory a block may use (the opt-in maximum) by compute capability, for when the driver
# cannot be asked (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability"). Any other
# capability is assumed to have the least of these.
SHARED_MEMORY_PER_BLOCK = {70: 98304, 75: 65536, 80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448,
                           100: 232448, 103: 232448, 120: 101376, 121: 101376}


def shared_memory_per_block(capability: int) -> int:
    """SHARED_MEMORY_PER_BLOCK's bytes for ``capability`` (an integer, 90 for 9.0), else the least of them."""
    return SHARED_MEMORY_PER_BLOCK.get(capability, min(SHARED_MEMORY_PER_BLOCK.values()))


DEFAULT_SMS = 132  # H100 SXM and H200: the SMs planned for where the device cannot be asked
DEFAULT_CAPABILITY = 90  # and their compute capability (9.0)
_PROPERTIES: dict = {}


def _properties(device: torch.device):
    """torch's properties of CUDA ``device``, asked once per device."""
    if device not in _PROPERTIES:
        import torch

        _PROPERTIES[device] = torch.cuda.get_device_properties(device)
    return _PROPERTIES[device]


def max_shared_memory(device: torch.device) -> int:
    """The most shared memory (bytes) a block may use on CUDA ``device`` (the opt-in maximum), or Hopper's
    off CUDA (the interpreter)."""
    if device.type != "cuda":
        return shared_memory_per_block(DEFAULT_CAPABILITY)
    props = _properties(device)
    return getattr(props, "shared_memory_per_block_optin", props.shared_memory_per_block)


def capability(device: torch.device) -> int:
    """CUDA ``device``'s compute capability as an integer (90 for 9.0), or DEFAULT_CAPABILITY off CUDA
    (the interpreter, which plans with no GPU's tiles)."""
    if device.type != "cuda":
        return DEFAULT_CAPABILITY
    props = _properties(device)
    return props.major * 10 + props.minor


def sm_count(device: torch.device) -> int:
    """The streaming multiprocessors of CUDA ``device`` (the waves a launch's programs run in: matmul.split_k,
    token_mixing.dw_splits), or DEFAULT_SMS off CUDA (the interpreter, which plans no waves)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return _properties(device).multi_processor_count
