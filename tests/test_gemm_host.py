"""Host helpers of the GEMM pass (``optden.engine.backends.gpu_gemm_pass``), without Triton."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from optden.engine.backends.gpu_gemm_pass import WSUM_BYTES, WSUM_STEPS, tile_topk, wsum_rows_per_split


def _tile_max(logits: torch.Tensor, bm: int) -> torch.Tensor:
    n, B = logits.shape
    pad = torch.full((n, math.ceil(B / bm) * bm), -math.inf, dtype=logits.dtype)
    pad[:, :B] = logits
    return pad.reshape(n, -1, bm).amax(2).T.contiguous()  # (T, n)


@pytest.mark.parametrize("kind", ["random", "ties", "one-tile", "integers"])
def test_tile_topk_equals_topk(kind):
    """The top k read from the k tiles with the largest maxima has the values of a full topk
    (a partial last tile, ties across and inside tiles, all the best rows in one tile)."""
    rng = np.random.default_rng(7)
    for draw in range(40):
        n, B, bm, k = int(rng.integers(1, 5)), int(rng.integers(100, 3000)), int(rng.choice([16, 32, 64])), int(rng.integers(1, 20))
        x = torch.from_numpy(rng.standard_normal((n, B))).float()
        if kind == "ties":
            x = torch.round(x * 2) / 2
        elif kind == "one-tile":
            x[:, 5:5 + bm] += 100.0
        elif kind == "integers":
            x = torch.from_numpy(rng.integers(-3, 3, (n, B))).float()
        tmax = _tile_max(x, bm)
        v, i = tile_topk(x, tmax, k, bm)
        ref = x.topk(k, dim=1).values
        assert torch.equal(v, ref), draw
        assert i.dtype == torch.int64 and bool((i < B).all())
        assert torch.equal(x.gather(1, i), v)  # the positions hold those values
        assert all(len(set(r)) == k for r in i.tolist())  # k distinct rows


def test_wsum_rows_per_split():
    # WSUM_STEPS steps of BLOCK_K rows while the partials fit WSUM_BYTES
    assert wsum_rows_per_split(50_000, 64, 3072, 64) == 64 * WSUM_STEPS
    # more rows per split (more steps) when S x N x d x 4 bytes would exceed WSUM_BYTES
    per = wsum_rows_per_split(1_281_167, 512, 12288, 64)
    assert per % 64 == 0 and math.ceil(1_281_167 / per) * 512 * 12288 * 4 <= WSUM_BYTES
