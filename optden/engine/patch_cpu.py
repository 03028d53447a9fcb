"""The local denoisers' passes in optden._C (csrc/patch_pass.cpp): the same results as
``optden.engine.patch_pass`` (float64 direct differences, box sums, one online softmax per
position), in OpenMP threads with AVX-512 where the CPU has it.

``local_partial`` and ``composite_pass`` have the signatures of their torch versions; the
shift plan (``patch_pass.shifts``) is handed to C++ as arrays: per shift (ty, tx, first
output row, end row) with the allowed positions (ELS under zero padding) and the row
position q of every output position.
"""
from __future__ import annotations

import numpy as np
import torch

from .. import _ext
from .bounds import SKIP_LOGITS, direct_pass_delta
from .partial import Partial
from .patch_pass import competitors, shifts
from .patches import PatchGeometry

__all__ = ["local_partial", "composite_pass", "available", "CALL_BYTES", "LAST"]

#: What the last pass reported: {"path": kernel set, "pruned": fraction of the pairs skipped
#: by the block bound (csrc/patch_prune.h)} (benchmarks read it).
LAST: dict = {}

#: Training images per call into the extension: up to 256 MB of raw rows (each call is
#: one OpenMP region that converts its rows tile by tile).
CALL_BYTES = 1 << 28


def available() -> bool:
    """Whether optden._C has the patch passes."""
    return _ext.C is not None and hasattr(_ext.C, "PatchPass")


def _plan(geom: PatchGeometry, kind: str):
    """(shifts (S, 4) int64, allowed (S, HW) uint8 or (0,), qpos (S, HW) int64) for C++."""
    rows, allowed, qpos = [], [], []
    for (ty, tx), q, ok in shifts(geom, kind, "cpu"):
        if ok is None:
            oa, ob = 0, geom.H
        else:
            ys = np.flatnonzero(ok.numpy().reshape(geom.H, geom.W).any(1))
            oa, ob = int(ys[0]), int(ys[-1]) + 1
            allowed.append(ok.numpy().astype(np.uint8))
        rows.append((ty, tx, oa, ob))
        qpos.append(q.numpy())
    al = np.stack(allowed) if allowed else np.zeros(0, dtype=np.uint8)
    return np.array(rows, dtype=np.int64), al, np.stack(qpos).astype(np.int64)


def _blocks(rows):
    """(global indices (B,) int64 numpy, raw images (B, d) uint8 or float64 numpy) over a RowSource."""
    itemsize = 1 if rows.dataset.dtype == "uint8" else 8
    step = max(1, CALL_BYTES // max(1, rows.d * itemsize))
    for off, raw, _ in rows.blocks(rows=step):
        gi = rows.global_index(torch.arange(off, off + raw.shape[0])).numpy().astype(np.int64)
        if raw.dtype == torch.uint8:
            yield gi, np.ascontiguousarray(raw.numpy())
        else:
            yield gi, np.ascontiguousarray(raw.to(torch.float64).numpy())


def local_partial(v: torch.Tensor, coef: torch.Tensor, rows, geom: PatchGeometry, c0: float, kind: str,
                  values: bool = True) -> Partial:
    """See ``optden.engine.patch_pass.local_partial`` (CPU tensors)."""
    sh, al, qp = _plan(geom, kind)
    vn = np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float64)
    cn = np.ascontiguousarray(coef.detach().cpu().numpy(), dtype=np.float64)
    pp = _ext.C.PatchPass(vn, cn, float(c0), geom.k, geom.padding == "circular", bool(values), sh, al, qp)
    for gi, raw in _blocks(rows):
        pp.update(raw, gi)
    m, s, acc, top = (torch.from_numpy(a) for a in pp.finish())
    LAST.update(path=pp.path, pruned=pp.pruned)
    part = Partial(m=m, s=s, acc=acc, top_val=m[:, None].clone(), top_idx=top[:, None].clone(),
                   delta=torch.zeros_like(m))
    part.delta = direct_pass_delta(geom.d, part.m, rows.M * competitors(geom, kind))
    return part


def composite_pass(v: torch.Tensor, coef: torch.Tensor, rows, geom: PatchGeometry, c0: float,
                   lse: torch.Tensor) -> torch.Tensor:
    """See ``optden.engine.patch_pass.composite_pass`` (CPU tensors). Pairs whose weights
    all lie below exp(-SKIP_LOGITS - log M) of their position's total are skipped: each such
    weight is below e^-SKIP_LOGITS of its position's largest, which delta counts as left out."""
    vn = np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float64)
    cn = np.ascontiguousarray(coef.detach().cpu().numpy(), dtype=np.float64)
    ln = np.ascontiguousarray(lse.detach().cpu().numpy(), dtype=np.float64)
    cut = SKIP_LOGITS + float(np.log(max(rows.M, 1)))
    cp = _ext.C.CompositePass(vn, cn, float(c0), geom.k, geom.padding == "circular", ln, cut)
    for _, raw in _blocks(rows):
        cp.update(raw)
    LAST.update(pruned_second=cp.pruned)
    return torch.from_numpy(cp.finish())
