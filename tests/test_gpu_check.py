"""bench/gpu_check.sh --dry-run: the GPU run's plumbing (steps, budget, logs, output files) on CPU.

GPU time comes by the quarter hour with no second chance, so the script that spends it is
exercised here on every CI run: every step must run and pass on CPU tensors, write its
files under the output folder (at most 8: only 8 come back from the GPU machine), and a
step the budget cannot hold must be skipped, not started.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _run(out: Path, **env) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHON": sys.executable, **env}
    e.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=600)


def test_dry_run_passes_every_step(tmp_path):
    r = _run(tmp_path)
    summary = (tmp_path / "summary.txt").read_text()
    assert r.returncode == 0, summary + (tmp_path / "check.log").read_text()[-6000:]
    for step in ("env", "build", "smoke", "bench-pass", "tests-gemm", "tests-a", "bench-in", "bench-c", "nccl", "bench-cu", "local"):
        assert f"OK    {step}" in summary, summary
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) <= 8, files
    assert "SMOKE backend cpu" in (tmp_path / "check.log").read_text()
    rows = (tmp_path / "bench-cifar.csv").read_text().splitlines()
    assert rows[0].startswith("size,M,d,N,method") and len(rows) > 2
    gemm = list(csv.DictReader((tmp_path / "bench-pass.csv").open()))
    methods = {r["method"] for r in gemm}
    assert {"gemm-pass", "gemm-certified", "fused-pass", "check"} <= methods, methods
    assert all(r["note"].startswith("ok D* rel") for r in gemm if r["method"] == "check"), gemm


def test_a_step_the_budget_cannot_hold_is_skipped(tmp_path):
    r = _run(tmp_path, GPU_CHECK_BUDGET="5", GPU_CHECK_STEPS="smoke,bench-c")
    summary = (tmp_path / "summary.txt").read_text()
    assert "SKIP  smoke" in summary and "SKIP  bench-c" in summary, summary
    assert "OK" not in summary and not (tmp_path / "bench-cifar.csv").exists(), summary
    assert r.returncode == 0, summary
