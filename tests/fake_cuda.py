"""A stand-in CUDA device for compiled-mode Triton on a machine without a GPU (tests only).

``install(arch)`` makes Triton's active driver one that reports an ``arch`` GPU, so that a real launch of a
@triton.jit kernel is specialised and compiled for that GPU (the ptxas the triton backend would use, as the
static report does) and then launches nothing: ``LAUNCHES`` records each launch's kernel name. Tensors stay
on the CPU; torch's CUDA queries answer as one ``arch`` device and ``_launch.check_device`` accepts CPU
tensors. Results are never computed, so only what happens before a kernel runs can be tested: which kernels
compile, in which thread, and which configs a launcher offers. Run it in a process of its own, with
TRITON_INTERPRET unset before triton is imported (the suite's processes interpret)."""
from __future__ import annotations

import os
from typing import List

LAUNCHES: List[str] = []
SHARED_BYTES = 232448  # an H100's opt-in shared memory per block
SMS = 132


class _Utils:
    def get_device_properties(self, device) -> dict:
        return {"max_shared_mem": SHARED_BYTES, "multiprocessor_count": SMS, "max_num_regs": 65536,
                "warpSize": 32}

    def load_binary(self, name, kernel, shared, device):
        return None, None, 128, 0, 1024  # module, function, registers, spills, max threads

    def unload_module(self, module) -> None:
        pass


class FakeDriver:
    utils = _Utils()

    def __init__(self, arch: int) -> None:
        self.arch = arch

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
    _launch.check_device = lambda t: None
    toolchain.apply(arch)
    return driver
