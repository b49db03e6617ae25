"""Build script: package list (kernels/ installs as mixer_fast.kernels) and the C++ extension mixer_fast._C.

The CPU kernels in csrc/ compile with pybind11 (a build requirement; no torch at build time). The
extension is optional: when it cannot be built (no C++ compiler, no pybind11) the package still installs,
the reason is kept in mixer_fast/_C_build_error.txt, and ``mixer-fast info`` shows it for the ``cpu``
backend. Sources are compiled at -O3 for the baseline ISA; the AVX2 / AVX-512 micro-kernels carry their
own target attributes and are chosen at run time.
"""
import glob
import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

packages = ["mixer_fast", *find_packages(include=["mixer_fast.*"])]
packages += ["mixer_fast.kernels", *("mixer_fast.kernels." + p for p in find_packages("kernels"))]
ERROR_FILE = "_C_build_error.txt"


class OptionalBuildExt(build_ext):
    """Builds mixer_fast._C if it can; otherwise records why and lets the install go on."""

    def _error_path(self) -> str:
        root = os.path.dirname(os.path.abspath(__file__)) if self.inplace else self.build_lib
        return os.path.join(root, "mixer_fast", ERROR_FILE)

    def run(self):
        try:
            import pybind11

            for ext in self.extensions:
                ext.include_dirs.append(pybind11.get_include())
            super().run()
        except Exception as e:  # compiler or pybind11 missing, or a compile error: the cpu backend says so
            path = self._error_path()
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"{type(e).__name__}: {e}\n")
            print(f"warning: mixer_fast._C not built ({e}); the cpu backend will be unavailable")
            return
        if os.path.exists(self._error_path()):
            os.remove(self._error_path())


ext = Extension(
    "mixer_fast._C",
    sources=sorted(glob.glob("csrc/*.cpp")),
    depends=sorted(glob.glob("csrc/*.h")),
    include_dirs=["csrc"],
    language="c++",
    # No FP traps or errno are relied on: without these GCC will not if-convert the GELU's selects, and the
    # epilogue loops stay scalar (measured: GELU at half the cost of the GEMM before it).
    extra_compile_args=["-O3", "-std=c++17", "-pthread", "-fvisibility=hidden", "-fno-trapping-math",
                        "-fno-math-errno"],
    extra_link_args=["-pthread"],
)

setup(packages=packages, ext_modules=[ext], cmdclass={"build_ext": OptionalBuildExt})
