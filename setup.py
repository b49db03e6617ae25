"""Build script: package list (kernels/ installs as mixer_fast.kernels) and, later, the C++ extension.

The CPU kernels in csrc/ are compiled into ``mixer_fast._C`` with pybind11 once they exist (issue 6);
until then no extension is built and ``mixer-fast info`` reports the ``cpu`` backend as not built.
"""
from setuptools import find_packages, setup

packages = ["mixer_fast", *find_packages(include=["mixer_fast.*"])]
packages += ["mixer_fast.kernels", *("mixer_fast.kernels." + p for p in find_packages("kernels"))]

setup(packages=packages, ext_modules=[])
