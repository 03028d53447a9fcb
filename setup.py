"""Build optden: the Python package, optden.kernels (from kernels/), and optden._C.

optden._C is one pybind11 module compiled from csrc/*.cpp (C++ CPU kernels, OpenMP) and,
when CUDA is built, csrc/cuda/*.cu (CUDA kernels, compiled by nvcc for the architectures
below, linked with the static CUDA runtime, and enabled in module.cpp by
-DOPTDEN_WITH_CUDA). A missing GPU never fails the install.
Environment switches:
  OPTDEN_SKIP_EXT=1     build no extension (pure Python install; the torch backend works).
  OPTDEN_CXX_FLAGS=...  extra compiler flags for the C++ sources.
  OPTDEN_CUDA=auto|1|0  CUDA kernels: "auto" (default) builds them when nvcc is found AND
                        torch.version.cuda is set, and falls back to a CPU-only build
                        (with a warning) if nvcc fails; "1" forces them (no nvcc or a
                        failing nvcc is an error); "0" skips them.
  OPTDEN_CUDA_ARCHS=... semicolon-separated SM versions (default "80;90": A100, H100;
                        PTX of the last one is embedded so newer GPUs JIT it).
  OPTDEN_NVCC_FLAGS=... extra nvcc flags.
  CUDA_HOME             where to look for bin/nvcc first (then PATH, /usr/local/cuda).
  OPTDEN_BUILD_JOBS=N   C++ sources compiled in parallel (default 0: one per CPU).
Always build with --no-build-isolation so the build sees the installed torch/pybind11.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

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
        # the kernels live in headers: without this, editing one rebuilds nothing
        depends=sorted(glob.glob(os.path.join("csrc", "*.h"))),
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        cxx_std=17,
    )


# ----------------------------------------------------------------------------- CUDA
def find_nvcc() -> str | None:
    """nvcc from CUDA_HOME, PATH, or /usr/local/cuda (None when there is none)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.path.isfile(os.path.join(home, "bin", "nvcc")):
        return os.path.join(home, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.path.isfile(default) else None


def cuda_mode() -> str:
    mode = os.environ.get("OPTDEN_CUDA", "auto").strip().lower() or "auto"
    if mode not in ("auto", "1", "0"):
        raise SystemExit(f"optden: OPTDEN_CUDA must be auto, 1 or 0, got {mode!r}")
    return mode


def torch_has_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.version.cuda is not None


def cuda_archs() -> list[str]:
    archs = [a.strip() for a in os.environ.get("OPTDEN_CUDA_ARCHS", "80;90").split(";") if a.strip()]
    if not archs or not all(a.isdigit() for a in archs):
        raise SystemExit(f"optden: OPTDEN_CUDA_ARCHS must be like '80;90', got {os.environ.get('OPTDEN_CUDA_ARCHS')!r}")
    return archs


def nvcc_command(nvcc: str, source: str, obj: str) -> list[str]:
    """The nvcc command that compiles one csrc/cuda/*.cu into a position-independent object."""
    import pybind11

    cmd = [nvcc, "-c", source, "-o", obj, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-DOPTDEN_WITH_CUDA"]
    archs = cuda_archs()
    for a in archs:
        cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    cmd += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]
    cmd += ["-I" + os.path.join(HERE, "csrc"), "-I" + pybind11.get_include(), "-I" + sysconfig.get_paths()["include"]]
    cmd += os.environ.get("OPTDEN_NVCC_FLAGS", "").split()
    return cmd


def cuda_root(nvcc: str) -> str:
    """The CUDA toolkit directory of ``nvcc`` (nvcc reports it as TOP; wrappers are followed)."""
    r = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True)
    for line in (r.stdout + r.stderr).splitlines():
        if "TOP=" in line:
            return os.path.normpath(line.split("TOP=", 1)[1].strip())
    return os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))


def cudart_static(nvcc: str) -> str:
    root = cuda_root(nvcc)
    candidates = [os.path.join(root, "lib64", "libcudart_static.a")]
    candidates += sorted(glob.glob(os.path.join(root, "targets", "*", "lib", "libcudart_static.a")))
    for c in candidates:
        if os.path.isfile(c):
            return c
    raise RuntimeError(f"libcudart_static.a not found under {root} (the toolkit of {nvcc})")


class BuildExt(build_ext):
    """build_ext that first compiles csrc/cuda/*.cu with nvcc when CUDA is wanted."""

    def build_extension(self, ext):
        if getattr(ext, "optden_cuda", None):
            nvcc, forced = ext.optden_cuda
            try:
                self._add_cuda(ext, nvcc)
            except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:
                if forced:
                    raise SystemExit(f"optden: OPTDEN_CUDA=1 but the CUDA build failed: {exc}") from exc
                print(f"optden: WARNING: CUDA kernels not built ({exc}); building the CPU extension only",
                      file=sys.stderr)
        super().build_extension(ext)

    def _add_cuda(self, ext, nvcc):
        sources = sorted(glob.glob(os.path.join(HERE, "csrc", "cuda", "*.cu")))
        if not sources:
            raise RuntimeError("no csrc/cuda/*.cu sources")
        out_dir = os.path.join(os.path.abspath(self.build_temp), "cuda")
        os.makedirs(out_dir, exist_ok=True)
        objs = [os.path.join(out_dir, os.path.basename(s)[:-3] + ".o") for s in sources]
        cmds = [nvcc_command(nvcc, s, o) for s, o in zip(sources, objs)]
        for c in cmds:
            print("optden: " + " ".join(c), file=sys.stderr)
        with ThreadPoolExecutor(max_workers=max(1, min(len(cmds), os.cpu_count() or 1))) as pool:
            for r in pool.map(lambda c: subprocess.run(c, capture_output=True, text=True), cmds):
                if r.returncode != 0:
                    raise RuntimeError(f"nvcc failed ({' '.join(r.args)}):\n{r.stderr[-4000:]}")
        ext.extra_objects = list(ext.extra_objects or []) + objs
        ext.define_macros = list(ext.define_macros or []) + [("OPTDEN_WITH_CUDA", "1")]
        ext.extra_link_args = list(ext.extra_link_args or []) + [cudart_static(nvcc), "-lrt", "-ldl", "-lpthread"]


def extensions():
    if os.environ.get("OPTDEN_SKIP_EXT") == "1":
        return []
    try:  # the C++ sources in parallel (setuptools compiles them one by one)
        from pybind11.setup_helpers import ParallelCompile

        ParallelCompile("OPTDEN_BUILD_JOBS", default=0).install()
    except ImportError:
        pass
    try:
        ext = cpu_extension()
    except ImportError as exc:  # pybind11 missing: install without the extension, loudly
        print(f"optden: building without optden._C ({exc}); install pybind11 to build it", file=sys.stderr)
        return []
    mode = cuda_mode()
    if mode != "0":
        nvcc = find_nvcc()
        if mode == "1":
            if nvcc is None:
                raise SystemExit("optden: OPTDEN_CUDA=1 but no nvcc was found (set CUDA_HOME or PATH)")
            ext.optden_cuda = (nvcc, True)
        elif nvcc is not None and torch_has_cuda():
            ext.optden_cuda = (nvcc, False)
        else:
            why = "no nvcc" if nvcc is None else "torch has no CUDA (torch.version.cuda is None)"
            print(f"optden: building without CUDA kernels ({why}; OPTDEN_CUDA=1 forces them)", file=sys.stderr)
    return [ext]


setup(
    # every package under optden/ (its wings: engine/, data/, prune/, ...) and kernels/ as optden.kernels
    packages=find_packages(where=HERE, include=["optden", "optden.*"]) + ["optden.kernels"],
    package_dir={"optden": "optden", "optden.kernels": "kernels"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
    zip_safe=False,
)
