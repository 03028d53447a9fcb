"""Compile-check of the CUDA kernels (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90.

No GPU is needed: nvcc compiles device code for A100 (sm_80) and H100 (sm_90) plus the
pybind11 binding layer (no torch headers), the way setup.py does. The objects must exist,
embed code for both architectures, and resolve each other's optden symbols (what the
link into optden._C needs). The nvcc tests are skipped only where nvcc is absent; the
setup.py switch test runs everywhere.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
NVCC = shutil.which("nvcc") or next(
    (p for p in (os.path.join(os.environ.get("CUDA_HOME", "/nonexistent"), "bin", "nvcc"), "/usr/local/cuda/bin/nvcc")
     if os.path.isfile(p)), None)

needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not installed (CUDA compile check needs it)")


def _nm(path: Path) -> tuple[set, set]:
    """(defined, undefined) demangled optden:: symbols of an object file."""
    out = subprocess.run(["nm", "-C", str(path)], capture_output=True, text=True, check=True).stdout
    defined, undefined = set(), set()
    for line in out.splitlines():
        parts = line.split(maxsplit=2)
        if len(parts) == 3 and parts[1] == "T" and parts[2].startswith("optden::"):
            defined.add(parts[2])
        elif len(parts) == 2 and parts[0] == "U" and parts[1].startswith("optden::"):
            undefined.add(parts[1])
    return defined, undefined


@pytest.fixture(scope="module")
def objects(tmp_path_factory):
    import pybind11  # a build requirement (pyproject.toml)

    out = tmp_path_factory.mktemp("cuda")
    cmds = []
    for src in SOURCES:
        cmds.append([
            NVCC, "-c", str(src), "-o", str(out / (src.stem + ".o")), "-std=c++17", "-O3", "-Xcompiler", "-fPIC",
            "-DOPTDEN_WITH_CUDA", "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
            f"-I{ROOT / 'csrc'}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
        ])
    with ThreadPoolExecutor(max_workers=len(cmds)) as pool:
        results = list(pool.map(lambda c: subprocess.run(c, capture_output=True, text=True, timeout=600), cmds))
    return {Path(c[2]).stem: (Path(c[4]), r) for c, r in zip(cmds, results)}


def test_sources_exist():
    names = {s.name for s in SOURCES}
    assert {"dense.cu", "binding.cu"} <= names, names


@needs_nvcc
@pytest.mark.parametrize("name", [s.stem for s in SOURCES])
def test_compiles_for_sm80_and_sm90(objects, name):
    obj, r = objects[name]
    assert r.returncode == 0, r.stderr[-6000:]
    assert obj.is_file() and obj.stat().st_size > 0


@needs_nvcc
def test_device_code_for_both_architectures(objects):
    obj, r = objects["dense"]
    assert r.returncode == 0, r.stderr[-6000:]
    data = obj.read_bytes()
    assert b"sm_80" in data and b"sm_90" in data  # the fatbinary's cubins name their targets


@needs_nvcc
def test_objects_link_together(objects):
    """Every optden:: symbol one object uses is defined by another, and register_cuda exists."""
    defined, undefined = set(), set()
    for obj, r in objects.values():
        assert r.returncode == 0, r.stderr[-6000:]
        dfn, und = _nm(obj)
        defined |= dfn
        undefined |= und
    assert any(s.startswith("optden::register_cuda(") for s in defined), sorted(defined)
    assert undefined <= defined, sorted(undefined - defined)


def _setup_name(**env_over):
    env = {**os.environ, **env_over}
    return subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def test_setup_cuda_switches():
    """setup.py: OPTDEN_CUDA=0 skips CUDA quietly, a bad value is a clear error, and "auto"
    says why it builds no CUDA kernels where nvcc or a CUDA torch is missing."""
    import torch

    off = _setup_name(OPTDEN_CUDA="0")
    assert off.returncode == 0 and "optden" in off.stdout and "CUDA kernels" not in off.stderr, off.stderr
    bad = _setup_name(OPTDEN_CUDA="sometimes")
    assert bad.returncode != 0 and "OPTDEN_CUDA must be auto, 1 or 0" in bad.stderr + bad.stdout
    auto = _setup_name(OPTDEN_CUDA="auto")
    assert auto.returncode == 0, auto.stderr
    if torch.version.cuda is None:
        assert "building without CUDA kernels (torch has no CUDA" in auto.stderr, auto.stderr
