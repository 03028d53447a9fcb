"""Every GEMM-pass kernel configuration compiles for H100 (sm_90) within its registers and shared memory.

No GPU is needed: ``bench/gemm_compile_report.py`` lowers each configuration of
``optden.kernels.dense_gemm`` to a cubin (in a child process: TRITON_INTERPRET must not
be set there) and reads registers and spills with ``cuobjdump -res-usage``. The aligned
specialization (d and strides divisible by 16, as at d = 3072 and 12288) must not
spill; odd widths are reported (they compile, and run without vectorized loads).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gemm_compile_report.py"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("gemm_compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90", "--json", str(out)], capture_output=True,
                       text=True, timeout=600, env=env, cwd=ROOT)
    if "GPUTarget" in r.stderr and "ImportError" in r.stderr:
        pytest.skip("this Triton cannot compile for a CUDA target without a GPU")
    return r, (json.loads(out.read_text()) if out.exists() else [])


def test_every_configuration_compiles_for_sm90_without_spills(report):
    r, rows = report
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-3000:]
    from optden.kernels import dense_gemm as K  # noqa: F401 (no kernel runs: only the tables)

    logits = {(x["config"], x["pieces"]) for x in rows if x["kernel"] == "logits" and x["align"] == "aligned"}
    want = {(name, p) for name, cfg in K.LOGITS_CONFIGS.items() for p in range(2, cfg[5] + 1)}
    assert logits == want
    assert {x["config"] for x in rows if x["kernel"] == "wsum"} == set(K.WSUM_CONFIGS)
    assert {x["pieces"] for x in rows if x["kernel"] == "split"} == {2, 3}
    for x in rows:
        assert "error" not in x, x
        assert x["smem"] <= 227 * 1024, x
        if x["align"] == "aligned":
            assert x["regs"] <= 255 and x["stack"] == 0 and x["local"] == 0, x


def test_tensor_cores_are_used(report):
    """Every logits configuration issues int8 wgmma (Hopper tensor cores); the weighted sum
    issues tensor-core MMAs (wgmma, or mma.sync for 16 queries)."""
    _, rows = report
    for x in rows:
        if x["kernel"] == "logits":
            assert x["wgmma"] > 0, x
        elif x["kernel"] == "wsum":
            assert x["wgmma"] + x["mma_sync"] > 0, x
