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
    assert isinstance(info["cpu_avx2_fma"], bool) and isinstance(info["cpu_avx512_vnni"], bool)
    f = C.cpu_features()
    assert f["dense_default_path"] in f["dense_paths"] and f["dense_paths"][-1] == "portable"
    # dense_paths: exactly the kernel paths a DensePass accepts on this CPU
    for path in ("avx512", "avx2", "portable"):
        args = (np.zeros((1, 3)), np.ones(1), np.zeros(3), 1.0, 1, "uint8", path, 1e-8, 0)
        if path in f["dense_paths"]:
            assert C.DensePass(*args).path == path
        else:
            with pytest.raises(ValueError, match="path"):
                C.DensePass(*args)
