"""Host side of the fp32 GPU passes: chunking, log-sum-exp merge of splits, exact top-k.

Pure torch (no Triton), shared by the Triton and CUDA backends (a new GPU pass reuses it
too). A *chunk kernel* is a callable ``kernel(x (B, d) raw rows, csq32 (B,) fp32,
rows_per_split) -> (logits (N, B), m (S, N), s (S, N), acc (S, N, d))`` (fp32,
row-dependent logits and raw-space sums, see ``optden.kernels.dense``). ``run_pass``
streams a ``RowSource`` through it and returns a float64 ``Partial`` (its splits merged
by ``Partial.absorb_splits``) with the rigorous ``delta`` of
``optden.engine.bounds.fp32_pass_delta``.
"""
from __future__ import annotations

import math

import torch

from ..bounds import fp32_pass_delta
from ..partial import Partial

#: Bytes of fp32 logits (N x rows) one chunk may write; bounds the rows per kernel call.
LOGIT_BYTES = 1 << 28
#: Bytes of the per-split fp32 accumulators (S x N x d) of one chunk.
ACC_BYTES = 1 << 28
#: Bytes of float64 temporaries when merging split accumulators on the host.
MERGE_BYTES = 1 << 26
#: The row count every split is a multiple of (the largest BLOCK_M of any configuration).
SPLIT_ALIGN = 128


def plan_splits(rows: int, n: int, d: int, n_programs_q: int, target_programs: int) -> int:
    """Rows per split for a chunk of ``rows`` rows: enough splits to fill the device.

    n_programs_q: programs along the query axis; target_programs: programs wanted in
    all (a few per SM). The per-split accumulators stay under ``ACC_BYTES``.
    """
    want = max(1, math.ceil(target_programs / max(1, n_programs_q)))
    cap = max(1, ACC_BYTES // max(1, n * d * 4))
    splits = max(1, min(want, cap, math.ceil(rows / SPLIT_ALIGN)))
    per = math.ceil(rows / splits)
    return math.ceil(per / SPLIT_ALIGN) * SPLIT_ALIGN


def chunks(source, n: int):
    """Yield ``(offset, raw (B, d), csq (B,) float64)`` in chunks suited to a GPU pass.

    Resident sources are cut into large chunks (bounded by ``LOGIT_BYTES`` of logits);
    streamed sources use their own blocks (the prefetching reader sizes them).
    """
    resident = source.resident_rows()
    if resident is None:
        yield from source.blocks()
        return
    raw_all, csq_all = resident
    rows = max(SPLIT_ALIGN, LOGIT_BYTES // max(1, 4 * n))
    for a in range(0, source.M, rows):
        b = min(source.M, a + rows)
        yield a, raw_all[a:b], csq_all[a:b]


def run_pass(kernel, source, v, coef, k, *, pieces, centered, tiles_per_split, block_m_max,
             resid, rows_per_split_fn):
    """One coarse pass over ``source`` through ``kernel``; returns a float64 ``Partial``.

    v: (N, d) float64 centered queries; coef: (N,) float64; k: top logits to keep;
    pieces: query pieces the kernel sums (for the bound); centered: the kernel dots with
    ``raw - center`` (uint8) rather than ``raw``; tiles_per_split(rows_per_split): the
    most row tiles one program handles; resid: (N,) ``||v - sum of pieces||``;
    rows_per_split_fn(rows): the split size for a chunk of ``rows`` rows.
    """
    n, d = v.shape
    dev = v.device
    center = source.center.to(dev, torch.float64)
    # the part of every logit common to all rows, added here in float64
    # -coef ||v - (raw - c)||^2 = coef (2 v.x - csq) - coef ||v||^2 [- 2 coef v.c when x = raw]
    common = -coef * (v * v).sum(1)
    if not centered:
        common = common - 2.0 * coef * (v @ center)
    part = Partial.empty(n, d, k, dev)
    worst_tiles = 1
    for off, raw, csq in chunks(source, n):
        rows = raw.shape[0]
        rps = rows_per_split_fn(rows)
        worst_tiles = max(worst_tiles, tiles_per_split(rps))
        logits, ms, ss, accs = kernel(raw, csq.to(dev, torch.float32).contiguous(), rps)
        part.absorb_splits(ms, ss, accs, MERGE_BYTES)
        part.absorb_top(logits, off)
    # raw-space sums -> centered space; row-dependent logits -> full logits
    part.acc -= part.s[:, None] * center[None, :]
    part.m = part.m + common
    part.top_val = part.top_val + common[:, None]
    q_norm = float(source.max_cnorm)
    c_norm = float(center.norm())
    x_norm = q_norm if centered else q_norm + c_norm
    part.delta = fp32_pass_delta(
        v, resid, coef, d=d, pieces=pieces, x_norm=x_norm, q_norm=q_norm,
        tiles_per_split=worst_tiles, block_m_max=block_m_max, top=part.top_val[:, 0],
    )
    return part
