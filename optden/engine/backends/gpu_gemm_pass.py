"""Host side of the GEMM pass (``optden.kernels.dense_gemm``): query pieces, chunks, merges, top-k, bound.

The ``triton`` backend runs this pass for uint8 rows (``OPTDEN_TRITON_PASS``, see
``optden.engine.backends.triton``). Per call:

1. the centered queries ``v`` (N, d) are split into P int8 pieces in one launch
   (``gemm_split``, the values of ````split_query_int8````): P = 3 for N <= 16
   (the pass is bandwidth bound there: a third piece costs nothing), else P = 2 unless
   the bound of 2 pieces exceeds ``PIECES2_DELTA_MAX`` (small sigma; one device sync);
2. per chunk of rows, the logits kernel writes the row-dependent fp32 logits and per
   row tile their max and sum of exp; the host merges the tile statistics in float64
   (``m``, ``s``) and keeps the exact top k of the coarse logits, read from the k row
   tiles with the largest maxima only (``tile_topk``);
3. the weighted sum runs only for the queries whose bound (logits and weighted sum) is
   at most ``ACC_DELTA_MAX``: only those can be certified DENSE at the tolerances this
   pass serves (``optden.engine.precision.certify`` uses ``acc`` of a query only when its
   ``delta <= tol / 4``). For every other query ``acc`` is NaN and its ``delta`` is
   raised to at least ``NO_ACC_DELTA`` = 0.25, more than ``tol / 4`` for any tol < 1: it is
   never DENSE, and certify re-scores its top k in float64 or hands it to the fallback.
   At tol = 1e-6 no fp32 weighted sum is ever DENSE (its own bound is ~1e-5), so the
   default path reads the rows once and does no weighted sum at all.

Returns an ``optden.engine.partial.Partial`` in float64 with the bound of
````optden.engine.bounds`` (gemm_logits_delta, wsum_delta)``.
"""
from __future__ import annotations

import importlib
import math

import torch

from ..bounds import EPS64, gemm_logits_delta, wsum_delta
from ..partial import Partial, merge_topk
from .gpu_pass import LOGIT_BYTES, SPLIT_ALIGN, chunks

_KERNEL_MODULE = "optden.kernels.dense_gemm"

#: Queries whose bound with the weighted sum is at most this get a weighted sum (DENSE at tol >= 1e-3).
ACC_DELTA_MAX = 2.5e-4
#: The bound reported for a query without a weighted sum: never DENSE (tol / 4 < 0.25 for tol < 1).
NO_ACC_DELTA = 0.25
#: Up to this many queries the pass is bandwidth bound: 3 pieces cost nothing there.
SMALL_N = 16
#: With more queries, 2 pieces are used unless their bound exceeds this (logit units): the
#: RESCORED test (a gap of log(M / tol_mass) + 2 delta, ~27-30 at CIFAR to ImageNet size)
#: loses at most 4 of its margin, and ImageNet-64 at sigma 0.5 (delta 1.4-1.6) stays at 2 pieces.
PIECES2_DELTA_MAX = 2.0
#: Steps of BLOCK_K rows per weighted-sum split (its bound grows with the steps).
WSUM_STEPS = 64
#: Bytes of the per-split fp32 weighted sums (S x N x d) of one chunk.
WSUM_BYTES = 1 << 28



#: Range of the pieces' scales: s |I_p| stays a normal fp32 number for every 1 <= |I_p| < 2^31.
_SCALE_MIN = 2.0**-100
_SCALE_MAX = 2.0**90  # times |I_p| < 2^31 stays below fp32's 2^128


def split_query_int8(v: torch.Tensor, pieces: int):
    """v (N, d) float64 -> int8 pieces ``q`` (P, N, d), fp32 scales ``s`` (P, N) and their errors.

    The reference of ``optden.kernels.dense_gemm.gemm_split`` (one launch on the device).
    ``v ~ sum_p s_p q_p`` with ``s_1 = fl32(max|v| / 127 (1 + 2^-20)) >= max|v| / 127`` and
    ``s_p = s_1 2^(-7 (p - 1))``: each piece rounds the residual of the previous ones
    (``|r_p| <= s_p / 2``), so ``|q_p| <= 64`` for p > 1 and every piece gains 7 bits; the
    subtractions are exact (Sterbenz), the scales powers-of-two apart (two sweeps over the
    query on the device instead of one per piece). Returns ``(q, s, resid, absum, valid)``:
    resid (N,) = ``||v - sum_p s_p q_p||`` (float64, the exact residual's norm), absum (N,) =
    ``sum_p ||s_p q_p||``, valid (N,) bool: False where a scale falls outside
    [2^-100, 2^90] (the kernel's fp32 products could under- or overflow; those queries get
    an infinite bound).
    """
    if pieces < 1:
        raise ValueError(f"pieces: expected >= 1, got {pieces}")
    amax = v.abs().amax(1)
    s1 = torch.where(amax > 0, (amax / 127.0 * (1.0 + 2.0**-20)).to(torch.float32).double(), torch.ones_like(amax))
    valid = (s1 <= _SCALE_MAX) & (s1 * 2.0 ** (-7 * (pieces - 1)) >= _SCALE_MIN)
    s1 = torch.where(valid, s1, torch.ones_like(s1))
    r = v.clone()
    qs, ss = [], []
    absum = torch.zeros(v.shape[0], dtype=torch.float64, device=v.device)
    for p in range(pieces):
        s = s1 * 2.0 ** (-7 * p)
        q = torch.floor(r / s[:, None] + 0.5).clamp_(-127, 127)  # as the kernel rounds
        r = r - q * s[:, None]  # exact (Sterbenz): s q has 31 bits and |r - s q| <= s / 2
        absum += s * q.norm(dim=1)
        qs.append(q.to(torch.int8))
        ss.append(s.to(torch.float32))
    return torch.stack(qs).contiguous(), torch.stack(ss).contiguous(), r.norm(dim=1), absum, valid


def kernels():
    """The Triton kernel module (imported on first use: importing it imports Triton)."""
    return importlib.import_module(_KERNEL_MODULE)


def wsum_rows_per_split(rows: int, n: int, d: int, block_k: int) -> int:
    """Rows per weighted-sum split for a chunk of ``rows`` rows: WSUM_STEPS steps, more if the partials exceed WSUM_BYTES."""
    per = block_k * WSUM_STEPS
    most_splits = max(1, WSUM_BYTES // max(1, n * d * 4))
    if math.ceil(rows / per) > most_splits:
        per = math.ceil(math.ceil(rows / most_splits) / block_k) * block_k
    return per


def _largest_chunk(source, n: int) -> int:
    """The most rows one chunk of ``gpu_pass.chunks`` can hold for n queries."""
    if source.resident_rows() is not None:
        return min(source.M, max(SPLIT_ALIGN, LOGIT_BYTES // max(1, 4 * n)))
    return min(source.M, max(1, int(getattr(source, "block_rows", source.M))))


def tile_topk(logits: torch.Tensor, tmax: torch.Tensor, k: int, block_m: int):
    """Exact top k of each row of ``logits`` (n, B), reading only k row tiles per query.

    tmax: (T, n) the max of each tile of ``block_m`` rows (the logits kernel's). At least k
    rows reach the k-th largest tile max t_k, so every row of the top k (logit >= the k-th
    largest >= t_k) lies in a tile whose max is >= t_k: the k tiles with the largest maxima
    hold the top k values (ties may pick other rows of the same value). Returns (values
    (n, k), positions (n, k) int64); a plain ``topk`` when the tiles are few.
    """
    n, B = logits.shape
    T = tmax.shape[0]
    if T <= 4 * k:
        v, i = logits.topk(min(k, B), dim=1)
        return v, i.to(torch.int64)
    tiles = tmax.T.topk(k, dim=1).indices  # (n, k)
    rows = (tiles[:, :, None] * block_m + torch.arange(block_m, device=logits.device)).reshape(n, k * block_m)
    vals = logits.gather(1, rows.clamp(max=B - 1)).masked_fill_(rows >= B, -math.inf)
    v, j = vals.topk(k, dim=1)
    return v, rows.gather(1, j)


def _x_norm(source, center: torch.Tensor) -> float:
    """X = Q + ||center - 128||, a bound on ||raw_i - 128|| (cached per source: no device sync per call)."""
    key = id(source)
    hit = _X_NORMS.get(key)
    if hit is not None and hit[0] is source.center:
        return hit[1]
    x = (float(source.max_cnorm) + float((center - 128.0).norm())) * (1.0 + 1e-12)
    if len(_X_NORMS) > 256:
        _X_NORMS.clear()
    _X_NORMS[key] = (source.center, x)
    return x


_X_NORMS: dict = {}


def gemm_partial(v: torch.Tensor, coef: torch.Tensor, source, k: int, *, pieces: int | None = None,
                 logits_config=None, wsum_config=None, info: dict | None = None) -> Partial:
    """One GEMM pass over ``source`` (uint8 rows); returns a float64 ``Partial`` (see the module docstring).

    v: (N, d) float64 centered queries on the source's device; coef: (N,) float64; k: top
    logits to keep (1 <= k <= M). pieces: force 2 or 3 query pieces (None: the rule of
    the module docstring); logits_config / wsum_config: force a kernel configuration
    (names of ``LOGITS_CONFIGS`` / ``WSUM_CONFIGS``); info: a dict that receives what
    the pass chose (pieces, configurations, how many queries got a weighted sum) and the
    bound of the logits alone (``logits_delta`` (N,), before the raise to NO_ACC_DELTA).
    Few host operations (a call at small N is bound by them): one launch splits the
    queries, one device sync decides the weighted sums.
    """

    K = kernels()
    n, d = v.shape
    if source.dtype != "uint8":
        raise ValueError(f"the GEMM pass runs uint8 rows only (got {source.dtype})")
    if d > K.MAX_D:
        raise ValueError(f"the GEMM pass runs d <= {K.MAX_D} (got {d})")
    dev = v.device
    on_gpu = v.is_cuda and not K.INTERPRETED
    center = source.center.to(dev, torch.float64)
    q_norm = float(source.max_cnorm)
    x_norm = _x_norm(source, center)
    c128 = 128.0 - center

    def split(p):
        qp, sc, st = K.gemm_split(v, c128, p)
        bm = K.logits_tiles(1, n, p, on_gpu, logits_config)[0]
        # the bound without its top-logit term (added when the top logit is known)
        bound = gemm_logits_delta(v, st[:, 2], st[:, 3], st[:, 4] > 0, coef, pieces=p, x_norm=x_norm, q_norm=q_norm,
                                  block_m_max=bm, top=torch.zeros_like(coef))
        return qp, sc, st, bound

    # the weighted sum's bound (it does not depend on the pieces)
    bk = K.wsum_block_k(n, on_gpu, wsum_config)
    largest = _largest_chunk(source, n)
    steps = math.ceil(min(largest, wsum_rows_per_split(largest, n, d, bk)) / bk)
    d_ws = wsum_delta(bk, steps)

    # 1. query pieces, and which queries get a weighted sum (decided before the pass: it
    # needs no top logit); one device sync for both decisions, a second only when a
    # third piece is needed (small sigma)
    if pieces is None:
        pieces = 3 if n <= SMALL_N else 2
        parts = split(pieces)
        if pieces == 2:
            flags = torch.cat([(parts[3].max() > PIECES2_DELTA_MAX)[None], parts[3] + d_ws <= ACC_DELTA_MAX]).cpu()
            if bool(flags[0]):
                pieces, parts = 3, split(3)
                acc_idx = (parts[3] + d_ws <= ACC_DELTA_MAX).nonzero().flatten()
            else:
                acc_idx = flags[1:].nonzero().flatten().to(dev)
        else:
            acc_idx = (parts[3] + d_ws <= ACC_DELTA_MAX).nonzero().flatten()
    elif pieces in (2, 3):
        parts = split(pieces)
        acc_idx = (parts[3] + d_ws <= ACC_DELTA_MAX).nonzero().flatten()
    else:
        raise ValueError(f"pieces: expected 2 or 3, got {pieces}")
    qp, scales, st, bound = parts
    block_m = K.logits_tiles(1, n, pieces, on_gpu, logits_config)[0]
    coef32 = coef.to(torch.float32).contiguous()
    n_a = int(acc_idx.numel())

    # 2., 3. the chunks
    m_rd = s = top_val = top_idx = None
    for off, raw, csq in chunks(source, n):
        rows = raw.shape[0]
        logits, tmax, tsum = K.gemm_logits(raw, qp, scales, csq.to(dev, torch.float32).contiguous(), coef32,
                                           config=logits_config)
        tm = tmax.double()
        cm = tm.max(0).values  # the exact max of this chunk's fp32 logits, per query
        bv, bi = tile_topk(logits, tmax, k, block_m)
        if m_rd is None:  # the first chunk (the only one for resident rows at small N)
            m_rd, s = cm, (torch.exp(tm - cm) * tsum).sum(0)
            if rows >= k:
                top_val, top_idx = bv.double(), bi + off
            else:
                top_val = torch.full((n, k), -math.inf, dtype=torch.float64, device=dev)
                top_idx = torch.zeros(n, k, dtype=torch.int64, device=dev)
                top_val, top_idx = merge_topk(top_val, top_idx, bv.double(), bi + off, k)
            if n_a:
                m_a = torch.full((n_a,), -math.inf, dtype=torch.float64, device=dev)
                s_a = torch.zeros(n_a, dtype=torch.float64, device=dev)
                acc_a = torch.zeros(n_a, d, dtype=torch.float64, device=dev)
        else:
            new_m = torch.maximum(m_rd, cm)
            s = s * torch.exp(m_rd - new_m) + (torch.exp(tm - new_m) * tsum).sum(0)
            m_rd = new_m
            top_val, top_idx = merge_topk(top_val, top_idx, bv.double(), bi + off, k)
        if n_a:
            mc = cm[acc_idx]
            rps = wsum_rows_per_split(rows, n_a, d, bk)
            accs, ss = K.gemm_wsum(raw, logits.index_select(0, acc_idx), mc.to(torch.float32), rps,
                                   config=wsum_config)
            new_ma = torch.maximum(m_a, mc)
            alpha, w = torch.exp(m_a - new_ma), torch.exp(mc - new_ma)
            acc_a = acc_a * alpha[:, None] + accs.sum(0, dtype=torch.float64) * w[:, None]
            s_a = s_a * alpha + ss.sum(0, dtype=torch.float64) * w
            m_a = new_ma

    # the part of every logit common to all rows, in float64:
    # -coef ||v - (raw - c)||^2 = coef (2 v.(raw - 128) - csq) - coef (||v||^2 - 2 v.(128 - c))
    common = coef * (2.0 * st[:, 1] - st[:, 0])
    m = m_rd + common
    top_val = top_val + common[:, None]
    delta = bound + 4.0 * EPS64 * top_val[:, 0].abs()  # the top-logit term of fp32_pass_delta
    delta = torch.where(torch.isfinite(delta), delta, math.inf)
    acc = torch.full((n, d), math.nan, dtype=torch.float64, device=dev)
    raised = torch.clamp(delta, min=NO_ACC_DELTA)
    if n_a:
        acc[acc_idx] = acc_a - s_a[:, None] * center[None, :]  # raw-space sums -> centered space
        s[acc_idx] = s_a
        raised[acc_idx] = delta[acc_idx] + d_ws
    if info is not None:
        info.update(pieces=pieces, weighted_sums=n_a, wsum_steps=steps, logits_delta=delta,
                    logits_config=logits_config or (K.logits_config_name(n, pieces) if on_gpu else "interpreter"),
                    wsum_config=wsum_config or (K.wsum_config_name(n) if on_gpu else "interpreter"))
    return Partial(m=m, s=s, acc=acc, top_val=top_val, top_idx=top_idx, delta=raised)
