"""optden._C directly: norms, exact re-score, top-k, build facts, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

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


@pytest.mark.parametrize("M,d", [(1, 1), (7, 37), (300, 105)])
def test_centered_sqnorms_u8(M, d, rng):
    x = rng.integers(0, 256, (M, d), dtype=np.uint8)
    c_int = np.round(x.mean(0))
    ref = ((x.astype(np.float64) - c_int) ** 2).sum(1)
    np.testing.assert_array_equal(C.centered_sqnorms_u8(x, c_int), ref)  # exact in int64
    c = x.mean(0) + 0.25
    np.testing.assert_allclose(C.centered_sqnorms_u8(x, c), ((x - c) ** 2).sum(1), rtol=1e-13)


def test_centered_sqnorms_u8_errors():
    with pytest.raises(ValueError, match="rows"):
        C.centered_sqnorms_u8(np.zeros(5, np.uint8), np.zeros(5))
    with pytest.raises(ValueError, match="center"):
        C.centered_sqnorms_u8(np.zeros((2, 5), np.uint8), np.zeros(4))


def _raw(dtype, shape, rng):
    """Random rows in dtype -> (numpy raw as the extension takes it, float64 values)."""
    if dtype == "uint8":
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        return x, x.astype(np.float64)
    t = torch.from_numpy(rng.standard_normal(shape).astype(np.float32)).to(getattr(torch, dtype))
    vals = t.double().numpy()
    if dtype == "bfloat16":
        t = t.view(torch.int16)
    return np.ascontiguousarray(t.numpy()), vals


@pytest.mark.parametrize("dtype", ["uint8", "float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [1, 37, 105])
def test_rescore_matches_direct_differences(dtype, d, rng):
    raw, vals = _raw(dtype, (50, d), rng)
    center = vals.mean(0)
    n, k = 3, 7
    v = rng.standard_normal((n, d)) * vals.std()
    coef = rng.uniform(0.1, 10.0, n)
    idx = rng.integers(0, 50, (n, k))
    out = C.rescore(v, coef, raw, idx, center, dtype)
    q = vals[idx] - center
    ref = -coef[:, None] * ((v[:, None, :] - q) ** 2).sum(-1)
    np.testing.assert_allclose(out, ref, rtol=1e-13, atol=0)


def test_rescore_errors(rng):
    raw = np.zeros((4, 3), np.uint8)
    v, coef, c = np.zeros((1, 3)), np.ones(1), np.zeros(3)
    with pytest.raises(ValueError, match="idx"):
        C.rescore(v, coef, raw, np.array([[4]]), c, "uint8")
    with pytest.raises(ValueError, match="dtype"):
        C.rescore(v, coef, raw, np.array([[0]]), c, "int8")
    with pytest.raises(ValueError, match="rows"):
        C.rescore(v, coef, raw, np.array([[0]]), c, "float32")  # item size 1 is not float32


@pytest.mark.parametrize("M,k", [(1, 1), (10, 10), (1000, 17)])
def test_topk(M, k, rng):
    vals = rng.standard_normal((4, M))
    vals[0, : M // 2] = 0.5  # ties: smaller index first
    tv, ti = C.topk(vals, k)
    order = np.lexsort((np.broadcast_to(np.arange(M), vals.shape), -vals), axis=1)[:, :k]
    np.testing.assert_array_equal(ti, order)
    np.testing.assert_array_equal(tv, np.take_along_axis(vals, order, 1))


def test_topk_nan_last_and_errors():
    tv, ti = C.topk(np.array([[np.nan, 1.0, 2.0]]), 2)
    np.testing.assert_array_equal(ti, [[2, 1]])
    with pytest.raises(ValueError, match="k"):
        C.topk(np.zeros((1, 3)), 4)
