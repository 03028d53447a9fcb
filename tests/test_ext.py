"""optden._C directly: build facts and the kernel paths this CPU runs."""
from __future__ import annotations

import numpy as np
import pytest

from optden import _ext

C = _ext.C


def test_extension_loaded():
    assert C is not None, _ext.error
    info = C.build_info()
    assert info["openmp"] is True
    f = info["cpu"]
    for flag in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni"):
        assert isinstance(f[flag], bool), flag
    assert f["dense_default_path"] in f["dense_paths"] and f["dense_paths"][-1] == "portable"
    assert ("avx512" in f["dense_paths"]) == all(f[k] for k in ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni"))
    assert ("avx2" in f["dense_paths"]) == all(f[k] for k in ("avx2", "fma", "f16c"))
    assert _ext.features() == info  # what optden.info() reports
    # dense_paths: exactly the kernel paths a DensePass accepts on this CPU
    for path in ("avx512", "avx2", "portable"):
        args = (np.zeros((1, 3)), np.ones(1), np.zeros(3), 1.0, 1, "uint8", path, 1e-8, 0)
        if path in f["dense_paths"]:
            assert C.DensePass(*args).path == path
        else:
            with pytest.raises(ValueError, match="path"):
                C.DensePass(*args)


def test_cpu_path_from_the_environment(monkeypatch):
    """OPTDEN_CPU_PATH picks the kernel path of 'auto' (read at each call); one this CPU lacks
    is reported by build_info (a report never raises) and refused by the dense pass."""
    args = (np.zeros((1, 3)), np.ones(1), np.zeros(3), 1.0, 1, "uint8")
    for env_path in ("portable", "avx2", "avx512", "sse9"):
        monkeypatch.setenv("OPTDEN_CPU_PATH", env_path)
        f = C.build_info()["cpu"]
        if env_path in f["dense_paths"]:
            assert f["dense_default_path"] == C.DensePass(*args).path == env_path and "dense_path_error" not in f
        else:
            assert f["dense_default_path"] is None and f["dense_path_error"].startswith("path: ")
            with pytest.raises(ValueError, match="path: "):
                C.DensePass(*args)
