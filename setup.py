"""Build optden: the Python package, optden.kernels (from kernels/), and optden._C.

optden._C is one pybind11 module compiled from csrc/*.cpp (C++ CPU kernels, OpenMP).
Environment switches:
  OPTDEN_SKIP_EXT=1     build no extension (pure Python install; the torch backend works).
  OPTDEN_CXX_FLAGS=...  extra compiler flags for the C++ sources.
Always build with --no-build-isolation so the build sees the installed torch/pybind11.
"""
from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cpu_extension():
    from pybind11.setup_helpers import Pybind11Extension

    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    extra = ["-O3", "-fopenmp", "-std=c++17", "-fno-math-errno"]
    extra += os.environ.get("OPTDEN_CXX_FLAGS", "").split()
    return Pybind11Extension(
        "optden._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )


def extensions():
    if os.environ.get("OPTDEN_SKIP_EXT") == "1":
        return []
    try:
        return [cpu_extension()]
    except ImportError as exc:  # pybind11 missing: install without the extension, loudly
        print(f"optden: building without optden._C ({exc}); install pybind11 to build it", file=sys.stderr)
        return []


setup(
    packages=["optden", "optden.backends", "optden.commands", "optden.kernels"],
    package_dir={"optden": "optden", "optden.kernels": "kernels"},
    ext_modules=extensions(),
    zip_safe=False,
)
