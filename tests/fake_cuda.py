"""A stand-in CUDA device for compiled-mode Triton on a machine without a GPU (tests only).

``install(arch)`` makes Triton's active driver one that reports a GPU of compute capability ``arch`` (90 for
9.0), so that a real launch of a @triton.jit kernel is specialised and compiled for that GPU (the ptxas the
triton backend would use, as the static report does) and then launches nothing: ``LAUNCHES`` records each
launch's kernel name. Tensors stay on the CPU; torch's CUDA queries, and the launchers' own
(``_launch.capability``, ``sm_count``, ``max_shared_memory``: they answer for CPU tensors too), answer as one such
device: its capability, the SMs of a representative GPU (``SMS``) and its shared memory per block
(``_launch.SHARED_MEMORY_PER_BLOCK``, so a plan too big for it fails as it would there). The launchers'
device check accepts CPU tensors (its dtype check is skipped: the ops check dtypes before it).

Results are never computed, so only what happens before a kernel runs can be tested: which kernels compile,
at which specialisation, in which thread, and which configs a launcher offers. Not exercised: the launch
itself (argument packing, TMA descriptors' encoding), numerics, timing. Run it in a process of its own, with
TRITON_INTERPRET unset before triton is imported (the suite's processes interpret)."""
from __future__ import annotations

import os
from typing import List

LAUNCHES: List[str] = []
# SMs by compute capability: A100, A40, L40S, H100 SXM, B200, RTX 5090 (others: the H100's)
SMS = {80: 108, 86: 84, 89: 142, 90: 132, 100: 148, 120: 170}


class _Utils:
    def __init__(self, arch: int) -> None:
        self.arch = arch

    def get_device_properties(self, device) -> dict:
        from mixer_fast.kernels.triton import _launch

        return {"max_shared_mem": _launch.shared_memory_per_block(self.arch), "multiprocessor_count": sms(self.arch),
                "max_num_regs": 65536, "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 128, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module) -> None:
        pass


def sms(arch: int) -> int:
    return SMS.get(arch, SMS[90])


class FakeDriver:
    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.utils = _Utils(arch)

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_current_target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.arch, 32)

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def launcher_cls(self, src, metadata):
        name = getattr(getattr(src, "fn", None), "__name__", "?")
        return lambda *args: LAUNCHES.append(name)


def install(arch: int = 90) -> FakeDriver:
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        raise RuntimeError("fake_cuda needs compiled-mode Triton: unset TRITON_INTERPRET before importing triton")
    import torch
    import triton.runtime.driver

    from mixer_fast.kernels.triton import _launch, toolchain

    driver = FakeDriver(arch)
    triton.runtime.driver.set_active(driver)
    major, minor = divmod(arch, 10)
    torch.cuda.is_available = lambda: True
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.cuda.get_device_capability = lambda *a: (major, minor)
    torch.cuda.get_device_name = lambda *a: f"stand-in sm_{arch}"
    torch.cuda.synchronize = lambda *a: None
    _launch.capability = lambda device: arch
    _launch.sm_count = lambda device: sms(arch)
    _launch.max_shared_memory = lambda device: _launch.shared_memory_per_block(arch)
    _launch.check_device = lambda t: None
    toolchain.apply(arch)
    return driver
