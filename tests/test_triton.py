"""The Triton kernels and the ``triton`` backend, checked on CPU in Triton's interpreter.

Triton reads TRITON_INTERPRET when ``triton`` is imported, so the kernel cases
(tests/triton_cases.py: the fused pass and the backend; tests/triton_gemm_cases.py: the
GEMM pass) run once, in a child pytest with TRITON_INTERPRET=1: the variable
never enters this process, and GPU tests in the same session still compile for the GPU.
Each case of the child run is reported here as its own test. Tests below that need no
interpreter run in this process.
"""
from __future__ import annotations

import ast
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import torch

import optden
from optden.engine import dispatch
from optden.errors import BackendUnavailableError

HERE = Path(__file__).resolve().parent
CASES_FILES = [HERE / "triton_cases.py", HERE / "triton_gemm_cases.py"]


def _session_seed() -> int:
    """The session seed of tests/conftest.py (so a failing child run is reproducible)."""
    for mod in list(sys.modules.values()):
        f = getattr(mod, "__file__", None)
        if f and Path(f).resolve() == HERE / "conftest.py" and hasattr(mod, "SESSION_SEED"):
            return int(mod.SESSION_SEED)
    return int(np.random.SeedSequence().entropy % 2**32)


CASES = [n.name for f in CASES_FILES for n in ast.parse(f.read_text()).body
         if isinstance(n, ast.FunctionDef) and n.name.startswith("test_")]


def interpreter_incompatibility() -> str | None:
    """Why Triton's interpreter cannot run here, or None. Triton <= 3.6's interpreter fails
    with numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars", seen
    on the GPU machine: Triton 3.6.0, numpy 2.5.2); Triton 3.9 with numpy 2.4 works."""
    import triton

    tv = tuple(int(t) for t in triton.__version__.split(".")[:2])
    nv = tuple(int(t) for t in np.__version__.split(".")[:2])
    if tv <= (3, 6) and nv >= (2, 4):
        return f"Triton {triton.__version__}'s interpreter does not work with numpy {np.__version__} (needs numpy < 2.4 or Triton >= 3.7)"
    return None


@pytest.fixture(scope="module")
def interpreter_run(tmp_path_factory):
    """Run the case files under TRITON_INTERPRET=1; returns {test id: outcome, "_output": text}."""
    why = interpreter_incompatibility()
    if why:
        pytest.skip(why)
    xml = tmp_path_factory.mktemp("triton") / "cases.xml"
    seed = _session_seed()
    env = {**os.environ, "TRITON_INTERPRET": "1", "OPTDEN_TEST_SEED": str(seed)}
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *map(str, CASES_FILES), f"--junitxml={xml}"],
        cwd=HERE.parent, env=env, capture_output=True, text=True, timeout=900,
    )
    out = {"_output": f"child run (OPTDEN_TEST_SEED={seed}):\n" + r.stdout[-12000:] + r.stderr[-4000:]}
    if xml.exists():
        for case in ET.parse(xml).getroot().iter("testcase"):
            kids = {c.tag for c in case}
            out[case.get("name")] = "failed" if kids & {"failure", "error"} else ("skipped" if "skipped" in kids else "passed")
    return out


@pytest.mark.parametrize("case", CASES)
def test_interpreter_case(interpreter_run, case):
    runs = {k: v for k, v in interpreter_run.items() if k == case or k.startswith(case + "[")}
    assert runs, f"{case} did not run in the interpreter:\n{interpreter_run['_output']}"
    bad = {k: v for k, v in runs.items() if v != "passed"}
    assert not bad, f"{bad}\n{interpreter_run['_output']}"


def test_without_interpreter_triton_refuses_cpu(digits_u8, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delitem(sys.modules, "optden.kernels.dense", raising=False)
    ds = optden.Dataset.from_array(digits_u8[:50])
    with pytest.raises(BackendUnavailableError, match="triton"):
        optden.OptimalDenoiser(ds, device="cpu", backend="triton")
    assert dispatch.get("triton").priority == 20
    assert optden.OptimalDenoiser(ds).backend.name != "triton"


def test_triton_backend_reasons(monkeypatch):
    b = dispatch.get("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delitem(sys.modules, "optden.kernels.dense", raising=False)
    assert b.priority < dispatch.get("torch").priority  # the interpreter is never "auto"
    assert any("CPU tensors only" in r for r in b.not_supported_reasons(torch.device("cuda"), "uint8", 64))
    assert any("int16" in r for r in b.not_supported_reasons(torch.device("cpu"), "int16", 64))
    assert b.not_supported_reasons(torch.device("cpu"), "bfloat16", 3072) == []


def test_import_is_light():
    """Importing optden, optden.kernels and the host helpers imports no Triton and no CUDA."""
    code = (
        "import sys, torch, optden, optden.kernels, optden.engine.backends.gpu_pass, optden.engine.bounds;"
        "optden.info();"
        "assert 'triton' not in sys.modules, 'triton imported';"
        "assert not torch.cuda.is_initialized(), 'cuda initialised'"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr


_COMPILE_SCRIPT = r'''
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from optden.kernels import dense as K

fn = K._dense_partial_kernel
names = fn.arg_names
consts = ("CENTERED", "TWO_PIECES", "TF32", "BLOCK_N", "BLOCK_M", "BLOCK_D")
ptrs = ("X", "CENTER", "CSQ", "VH", "VL", "COEF", "LOGITS", "MOUT", "SOUT", "ACC")
for cap, xdt, tf32 in [(80, "*u8", True), (90, "*bf16", True), (90, "*fp32", False)]:
    sig = {n: (xdt if n == "X" else "*fp32") if n in ptrs else ("constexpr" if n in consts else "i32") for n in names}
    const = {"CENTERED": xdt == "*u8", "TWO_PIECES": tf32, "TF32": tf32, **K.DEFAULT_CONFIG}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in const.items()})
    k = triton.compile(src, target=GPUTarget("cuda", cap, 32), options={"num_warps": 4, "num_stages": 3})
    assert k.asm["cubin"], (cap, xdt)
    assert (".tf32" in k.asm["ptx"]) == tf32, (cap, xdt)
    print("compiled", cap, xdt, "tf32" if tf32 else "ieee")
'''


def test_triton_kernel_compiles_for_sm80_and_sm90():
    """The kernel lowers to cubins for A100 (sm_80) and H100 (sm_90) without a GPU, using
    TF32 tensor-core instructions exactly where the data allows (and IEEE fp32 for fp32 data)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-6000:]
    assert r.stdout.count("compiled") == 3, r.stdout
