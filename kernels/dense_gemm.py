"""Dense pass as two tensor-core GEMMs over row tiles (Triton): exact int8 logits, bf16 weighted sum.

kernels (``_logits_kernel``, ``_wsum_kernel``) -> launchers (``launch_logits``,
``launch_wsum``) -> public functions (``gemm_logits``, ``gemm_wsum``) -> float64
references (``gemm_logits_ref``, ``gemm_wsum_ref``), as in mamba's ops. The host side
(query pieces, chunks, merges, top-k, the bound) is ``optden.engine.backends.gpu_gemm_pass``.

**Logits** (uint8 rows only). For queries ``v`` (N, d) and rows ``raw_i`` (B, d) uint8,
``r_i = raw_i - 128`` is exact in int8, and the host splits each query into ``P`` int8
pieces with fp32 scales, ``v ~ sum_p s_p q_p`` (``|q_p| <= 127``). Every product
``q_p . r_i`` is then an int8 x int8 tensor-core GEMM accumulated in **int32, exactly**
(``|q_p . r_i| <= 127 * 128 * d < 2^31`` for d <= 131072): the only roundings are the
query's residual (measured on the host in float64) and a few fp32 operations of the
epilogue. The kernel writes, per query n and row i, the row-dependent logit

    l_ni = coef_n * (2 sum_p s_pn (q_pn . r_i) - csq_i),   csq_i = ||raw_i - center||^2

(fp32; the host adds the part common to all rows, ``-coef (||v||^2 - 2 v.(128 - center))``),
and per row tile t of BLOCK_M rows its max ``tmax_tn`` and ``tsum_tn = sum exp(l - tmax)``.
One program computes one (row tile, query tile) output tile; the d loop streams the
rows through shared memory once per query tile (for N <= BLOCK_N: one read of the data).
Programs are ordered in groups of GROUP_M row tiles so that the query tiles of a group
share row tiles in L2 at large N.

**Weighted sum** (only for queries whose bound can make them DENSE, see the host). With
the max ``mref_n`` of the logits known, ``p_ni = exp(l_ni - mref_n) <= 1`` needs no
online rescaling: ``acc_n = sum_i p_ni raw_i`` is a plain GEMM over rows (split-K: each
program sums ``rows_per_split`` rows for one (query tile, d tile) and writes its fp32
partial; the host adds the splits in float64). ``p`` is split into two bf16 pieces
(hi + lo, residual <= 2^-16 p) and the uint8 rows are exact in bf16, so every product is
exact; each step of BLOCK_K rows accumulates in a fresh fp32 tensor-core accumulator
that is then added to the program's sum (the bound grows with BLOCK_K and the steps,
not with the rows of the split).

The interpreter (TRITON_INTERPRET=1) mishandles bf16 arithmetic: there the weighted sum
casts its bf16 pieces back to fp32 before ``tl.dot`` (``BF16_DOT=False``; same values,
fp32 products). Importing this module imports Triton.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .dense import INTERPRETED

#: Largest d for which the int32 accumulation of an int8 piece is exact (127 * 128 * d < 2^31).
MAX_D = 131072
#: Row tiles per program group (L2 reuse of row tiles across query tiles).
GROUP_M = 8

#: Logits kernel configurations on GPUs: name -> (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages, max pieces).
#: Registers and shared memory of each are checked for sm_90 by tests/test_triton_gemm_compile.py.
LOGITS_CONFIGS = {
    "n16": (64, 16, 256, 4, 4, 3),
    "n32": (128, 32, 128, 8, 4, 3),
    "n64": (128, 64, 128, 8, 3, 3),
    "n128": (128, 128, 128, 8, 3, 2),
}
#: Weighted-sum kernel configurations on GPUs: name -> (BLOCK_N, BLOCK_K, BLOCK_D, warps, stages).
WSUM_CONFIGS = {
    "n16": (16, 64, 64, 4, 3),
    "n64": (64, 64, 64, 4, 3),
}
#: Columns per step and warps of the query split on GPUs (one program per query: at N = 1 its
#: two sweeps over d are serial, so wide steps keep them short).
SPLIT_BLOCK_D = 1024
SPLIT_WARPS = 8
#: Configurations in the interpreter (small tiles: it runs numpy per tile).
INTERP_LOGITS = (32, 16, 32, 1, 1, 3)
INTERP_WSUM = (16, 16, 32, 1, 1)
#: Largest BLOCK_M and BLOCK_K of any configuration (the bound depends on them).
BLOCK_M_MAX = max(c[0] for c in (*LOGITS_CONFIGS.values(), INTERP_LOGITS))
BLOCK_K_MAX = max(c[1] for c in (*WSUM_CONFIGS.values(), INTERP_WSUM))


def logits_config_name(n: int, pieces: int) -> str:
    """The logits configuration for N queries of ``pieces`` pieces (OPTDEN_GEMM_LOGITS_CONFIG overrides)."""
    forced = os.environ.get("OPTDEN_GEMM_LOGITS_CONFIG", "").strip()
    if forced:
        if forced not in LOGITS_CONFIGS:
            raise ValueError(f"OPTDEN_GEMM_LOGITS_CONFIG: expected one of {sorted(LOGITS_CONFIGS)}, got {forced!r}")
        if LOGITS_CONFIGS[forced][5] < pieces:
            raise ValueError(f"OPTDEN_GEMM_LOGITS_CONFIG={forced} holds at most {LOGITS_CONFIGS[forced][5]} pieces, "
                             f"this pass needs {pieces}")
        return forced
    if n <= 16:
        return "n16"
    if n <= 32:
        return "n32"
    if n <= 64 or pieces > LOGITS_CONFIGS["n128"][5]:
        return "n64"
    return "n128"


def wsum_config_name(n: int) -> str:
    return "n16" if n <= 16 else "n64"


# ----------------------------------------------------------------------------- query pieces
@triton.jit(do_not_specialize=["N"])
def _split_kernel(
    V, stride_v,  # (N, d) float64 centered queries, unit stride along d
    C128,  # (d,) float64: 128 - center
    QP, stride_qp, stride_qn,  # out (P, N, d) int8 pieces
    SC,  # out (P, N) fp32 scales (contiguous)
    STATS,  # out (N, 5) float64: ||v||^2, v.(128 - c), ||residual||, sum_p ||s_p q_p||, valid (1.0 / 0.0)
    N, D,
    PIECES: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per query, two sweeps over it: the pieces of ``gpu_gemm_bounds.split_query_int8``."""
    n = tl.program_id(0)
    vrow = V + n.to(tl.int64) * stride_v
    amax_v = tl.zeros([BLOCK_D], tl.float64)
    vsq_v = tl.zeros([BLOCK_D], tl.float64)
    vc_v = tl.zeros([BLOCK_D], tl.float64)
    for k in range(0, D, BLOCK_D):
        offs = k + tl.arange(0, BLOCK_D)
        m = offs < D
        v = tl.load(vrow + offs, mask=m, other=0.0)
        c = tl.load(C128 + offs, mask=m, other=0.0)
        amax_v = tl.maximum(amax_v, tl.abs(v))
        vsq_v += v * v
        vc_v += v * c
    amax = tl.max(amax_v, 0)
    # scales s_p = s_1 2^(-7 (p - 1)), s_1 = fl32(amax / 127 (1 + 2^-20)) >= amax / 127: every |q_p| <= 127
    s1 = tl.where(amax > 0, ((amax / 127.0) * (1.0 + 2.0**-20)).to(tl.float32), 1.0).to(tl.float64)
    valid = (s1 <= 2.0**90) & (s1 * 2.0 ** (-7 * (PIECES - 1)) >= 2.0**-100)
    s1 = tl.where(valid, s1, 1.0)
    q0_v = tl.zeros([BLOCK_D], tl.float64)
    q1_v = tl.zeros([BLOCK_D], tl.float64)
    q2_v = tl.zeros([BLOCK_D], tl.float64)
    r_v = tl.zeros([BLOCK_D], tl.float64)
    for k in range(0, D, BLOCK_D):
        offs = k + tl.arange(0, BLOCK_D)
        m = offs < D
        r = tl.load(vrow + offs, mask=m, other=0.0)
        qrow = QP + n.to(tl.int64) * stride_qn + offs
        for p in tl.static_range(PIECES):
            sp = s1 * 2.0 ** (-7 * p)  # exact: a power of two
            q = tl.minimum(tl.maximum(tl.floor(r / sp + 0.5), -127.0), 127.0)
            r = r - sp * q  # exact (Sterbenz): sp q has 31 bits and |r - sp q| <= sp / 2
            tl.store(qrow + p * stride_qp.to(tl.int64), q.to(tl.int8), mask=m)
            if p == 0:
                q0_v += q * q
            elif p == 1:
                q1_v += q * q
            else:
                q2_v += q * q
        r_v += r * r
    absum = s1 * tl.sqrt(tl.sum(q0_v, 0)) + s1 * 2.0**-7 * tl.sqrt(tl.sum(q1_v, 0))
    if PIECES >= 3:
        absum += s1 * 2.0**-14 * tl.sqrt(tl.sum(q2_v, 0))
    for p in tl.static_range(PIECES):
        tl.store(SC + p * N + n, (s1 * 2.0 ** (-7 * p)).to(tl.float32))
    tl.store(STATS + n * 5 + 0, tl.sum(vsq_v, 0))
    tl.store(STATS + n * 5 + 1, tl.sum(vc_v, 0))
    tl.store(STATS + n * 5 + 2, tl.sqrt(tl.sum(r_v, 0)))
    tl.store(STATS + n * 5 + 3, absum)
    tl.store(STATS + n * 5 + 4, tl.where(valid, 1.0, 0.0).to(tl.float64))


def gemm_split(v, c128, pieces: int):
    """Query pieces in one launch: v (N, d) float64, c128 = 128 - center (d,) float64.

    Returns ``(qp (P, N, d) int8, scales (P, N) fp32, stats (N, 5) float64)`` with stats
    columns ``||v||^2``, ``v.(128 - center)``, ``||v - sum_p s_p q_p||``, ``sum_p ||s_p q_p||``
    and valid (1.0 / 0.0): the values of ``split_query_int8`` (same roundings).
    """
    N, D = v.shape
    if pieces not in (2, 3):
        raise ValueError(f"pieces: expected 2 or 3, got {pieces}")
    if v.dtype != torch.float64 or c128.dtype != torch.float64:
        raise TypeError("gemm_split: v and c128 must be float64")
    if v.stride(1) != 1:
        v = v.contiguous()
    dev = v.device
    qp = torch.empty(pieces, N, D, dtype=torch.int8, device=dev)
    sc = torch.empty(pieces, N, dtype=torch.float32, device=dev)
    stats = torch.empty(N, 5, dtype=torch.float64, device=dev)
    on_gpu = v.is_cuda and not INTERPRETED
    meta = dict(PIECES=pieces, BLOCK_D=SPLIT_BLOCK_D if on_gpu else 32)
    if on_gpu:
        meta.update(num_warps=SPLIT_WARPS, num_stages=2)
    _split_kernel[(N,)](v, v.stride(0), c128.contiguous(), qp, qp.stride(0), qp.stride(1), sc, stats, N, D, **meta)
    return qp, sc, stats


# ----------------------------------------------------------------------------- logits
@triton.jit(do_not_specialize=["N", "B"])  # one compile for every N and M (not per value class)
def _logits_kernel(
    X, stride_x,  # (B, d) uint8 rows, unit stride along d
    QP, stride_qp, stride_qn,  # (P, N, d) int8 query pieces, unit stride along d
    SC,  # (P, N) fp32 piece scales (contiguous)
    CSQ,  # (B,) fp32 centered squared norms
    COEF,  # (N,) fp32
    LOGITS, stride_l,  # out (N, B) fp32 row-dependent logits
    TMAX, TSUM,  # out (T, N) fp32 per row tile: max and sum of exp(l - max), T = cdiv(B, BLOCK_M)
    N, B, D,
    PIECES: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid = tl.program_id(0)
    n_qt = tl.cdiv(N, BLOCK_N)
    n_rt = tl.cdiv(B, BLOCK_M)
    # grouped order: consecutive programs take GROUP row tiles of one query tile, then the next
    per_group = GROUP * n_qt
    first = (pid // per_group) * GROUP
    size = tl.minimum(n_rt - first, GROUP)
    pid_r = first + (pid % per_group) % size
    pid_q = (pid % per_group) // size

    offs_m = pid_r * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_q * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < B
    nmask = offs_n < N
    xrow = X + offs_m.to(tl.int64)[:, None] * stride_x  # 64-bit: B * stride_x may pass 2^31
    q0 = QP + offs_n.to(tl.int64)[:, None] * stride_qn
    q1 = q0 + stride_qp.to(tl.int64)
    q2 = q1 + stride_qp.to(tl.int64)
    a0 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    a1 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    a2 = tl.zeros([BLOCK_M, BLOCK_N], tl.int32)
    for k in range(0, D, BLOCK_D):
        offs_d = k + tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        # masked entries load 128, i.e. r = 0: they add nothing to any dot
        x = tl.load(xrow + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=128)
        r = (x ^ 128).to(tl.int8, bitcast=True)  # raw - 128, exact in int8
        qmask = nmask[:, None] & dmask[None, :]
        a0 = tl.dot(r, tl.trans(tl.load(q0 + offs_d[None, :], mask=qmask, other=0)), a0, out_dtype=tl.int32)
        a1 = tl.dot(r, tl.trans(tl.load(q1 + offs_d[None, :], mask=qmask, other=0)), a1, out_dtype=tl.int32)
        if PIECES >= 3:
            a2 = tl.dot(r, tl.trans(tl.load(q2 + offs_d[None, :], mask=qmask, other=0)), a2, out_dtype=tl.int32)
    # epilogue (fp32): dot = sum_p s_p I_p, logit = coef (2 dot - csq)
    s0 = tl.load(SC + offs_n, mask=nmask, other=0.0)
    s1 = tl.load(SC + N + offs_n, mask=nmask, other=0.0)
    dot = a0.to(tl.float32) * s0[None, :] + a1.to(tl.float32) * s1[None, :]
    if PIECES >= 3:
        s2 = tl.load(SC + 2 * N + offs_n, mask=nmask, other=0.0)
        dot += a2.to(tl.float32) * s2[None, :]
    csq = tl.load(CSQ + offs_m, mask=mmask, other=0.0)
    coef = tl.load(COEF + offs_n, mask=nmask, other=0.0)
    logit = coef[None, :] * (2.0 * dot - csq[:, None])  # (BLOCK_M, BLOCK_N)
    logit = tl.where(mmask[:, None], logit, float("-inf"))
    lptr = LOGITS + offs_n.to(tl.int64)[None, :] * stride_l + offs_m[:, None]
    tl.store(lptr, logit, mask=mmask[:, None] & nmask[None, :])
    tmax = tl.max(logit, 0)  # every row tile holds at least one row: finite unless the logits overflow
    tsum = tl.sum(tl.exp(logit - tmax[None, :]), 0)
    tl.store(TMAX + pid_r * N + offs_n, tmax, mask=nmask)
    tl.store(TSUM + pid_r * N + offs_n, tsum, mask=nmask)


def _logits_cfg(config, on_gpu):
    if config is None:
        return None
    if isinstance(config, str):
        return LOGITS_CONFIGS[config]
    return tuple(config)


def launch_logits(x, qp, scales, csq32, coef32, out, *, config=None):
    """Run the logits kernel into preallocated outputs ``out = (logits, tmax, tsum)``.

    x: (B, d) uint8 rows (unit stride along d); qp: (P, N, d) int8 pieces (P = 2 or 3,
    unit stride along d); scales: (P, N) fp32 contiguous; csq32: (B,) fp32; coef32: (N,)
    fp32. out: logits (N, B) fp32 (unit stride along B), tmax and tsum (T, N) fp32
    contiguous, T = cdiv(B, BLOCK_M). config: a name of ``LOGITS_CONFIGS`` or a tuple
    (BLOCK_M, BLOCK_N, BLOCK_D, warps, stages, max pieces); None: by N and P on a GPU,
    ``INTERP_LOGITS`` in the interpreter. Launches on torch's current CUDA stream.
    """
    logits, tmax, tsum = out
    B, D = x.shape
    P, N, _ = qp.shape
    if x.dtype != torch.uint8:
        raise TypeError(f"x: expected uint8 rows, got {x.dtype}")
    if not 2 <= P <= 3 or qp.dtype != torch.int8 or qp.shape[2] != D:
        raise ValueError(f"qp: expected (2 or 3, N, {D}) int8 pieces, got {tuple(qp.shape)} {qp.dtype}")
    if D > MAX_D:
        raise ValueError(f"d = {D} exceeds {MAX_D}: the int32 accumulation of a piece could overflow")
    if x.stride(1) != 1:
        x = x.contiguous()
    if qp.stride(2) != 1:
        qp = qp.contiguous()
    on_gpu = x.is_cuda and not INTERPRETED
    cfg = _logits_cfg(config, on_gpu) or (LOGITS_CONFIGS[logits_config_name(N, P)] if on_gpu else INTERP_LOGITS)
    bm, bn, bd, warps, stages, max_p = cfg
    if P > max_p:
        raise ValueError(f"config {cfg} holds at most {max_p} pieces, got {P}")
    T = triton.cdiv(B, bm)
    assert logits.shape == (N, B) and logits.stride(1) == 1 and logits.dtype == torch.float32
    assert tmax.shape == (T, N) and tsum.shape == (T, N) and tmax.is_contiguous() and tsum.is_contiguous()
    assert scales.shape == (P, N) and scales.is_contiguous() and scales.dtype == torch.float32
    grid = (triton.cdiv(N, bn) * T,)
    meta = dict(PIECES=P, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, GROUP=GROUP_M)
    if on_gpu:
        meta.update(num_warps=warps, num_stages=stages)
    _logits_kernel[grid](x, x.stride(0), qp, qp.stride(0), qp.stride(1), scales, csq32, coef32,
                         logits, logits.stride(0), tmax, tsum, N, B, D, **meta)
    return out


def logits_tiles(rows: int, n: int, pieces: int, on_gpu: bool, config=None) -> tuple[int, int]:
    """(BLOCK_M, T) of a logits launch over ``rows`` rows: the row tile and the tile count."""
    cfg = _logits_cfg(config, on_gpu) or (LOGITS_CONFIGS[logits_config_name(n, pieces)] if on_gpu else INTERP_LOGITS)
    return cfg[0], triton.cdiv(rows, cfg[0])


def gemm_logits(x, qp, scales, csq32, coef32, *, config=None):
    """Allocate the outputs and run the logits kernel; returns ``(logits, tmax, tsum)`` (see ``launch_logits``)."""
    B = x.shape[0]
    N = qp.shape[1]
    _, T = logits_tiles(B, N, qp.shape[0], x.is_cuda and not INTERPRETED, config)
    dev = x.device
    out = (torch.empty(N, B, dtype=torch.float32, device=dev),
           torch.empty(T, N, dtype=torch.float32, device=dev),
           torch.empty(T, N, dtype=torch.float32, device=dev))
    return launch_logits(x, qp, scales, csq32, coef32, out, config=config)


def gemm_logits_ref(x, center, csq, v, coef, block_m):
    """float64 reference of ``gemm_logits`` for the query ``v`` the pieces approximate.

    x: (B, d) uint8; center: (d,) float64; csq: (B,) float64; v: (N, d) float64 centered
    queries; coef: (N,) float64. Returns float64 ``(logits (N, B), tmax (T, N), tsum (T, N))``
    with logits ``coef (2 v.(raw - 128) - csq)``.
    """
    r = x.to(torch.float64) - 128.0
    logits = coef[:, None] * (2.0 * v @ r.T - csq[None, :])
    tm, ts = [], []
    for a in range(0, x.shape[0], block_m):
        lg = logits[:, a:a + block_m]
        m = lg.max(1).values
        tm.append(m)
        ts.append(torch.exp(lg - m[:, None]).sum(1))
    return logits, torch.stack(tm), torch.stack(ts)


# ----------------------------------------------------------------------------- weighted sum
@triton.jit(do_not_specialize=["N", "B", "rows_per_split"])
def _wsum_kernel(
    X, stride_x,  # (B, d) uint8 rows, unit stride along d
    LOGITS, stride_l,  # (N, B) fp32 row-dependent logits, unit stride along B
    MREF,  # (N,) fp32: weights are exp(l - mref) (mref >= every logit of the query)
    ACC, stride_as, stride_an,  # out (S, N, d) fp32 per-split raw-space sums
    SOUT,  # out (S, N) fp32 per-split sums of the weights
    N, B, D, rows_per_split,
    BF16_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    nmask = offs_n < N
    dmask = offs_d < D
    mref = tl.load(MREF + offs_n, mask=nmask, other=0.0)
    row0 = pid_s * rows_per_split
    row1 = tl.minimum(row0 + rows_per_split, B)
    lrow = LOGITS + offs_n.to(tl.int64)[:, None] * stride_l
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    ssum = tl.zeros([BLOCK_N], tl.float32)
    for r in range(row0, row1, BLOCK_K):
        offs_k = r + tl.arange(0, BLOCK_K)
        kmask = offs_k < row1
        lg = tl.load(lrow + offs_k[None, :], mask=nmask[:, None] & kmask[None, :], other=float("-inf"))
        p = tl.exp(lg - mref[:, None])  # masked entries: exp(-inf) = 0
        hi = p.to(tl.bfloat16)  # round to nearest: |p - hi| <= 2^-8 p
        lo = (p - hi.to(tl.float32)).to(tl.bfloat16)  # p - hi exact in fp32; |p - hi - lo| <= 2^-16 p
        x = tl.load(X + offs_k.to(tl.int64)[:, None] * stride_x + offs_d[None, :],
                    mask=kmask[:, None] & dmask[None, :], other=0)
        if BF16_DOT:
            xb = x.to(tl.bfloat16)  # 0..255: exact in bf16
            part = tl.dot(hi, xb)  # a fresh fp32 accumulator per step of BLOCK_K rows
            part = tl.dot(lo, xb, part)
        else:  # interpreter: the same values as fp32 operands
            xf = x.to(tl.float32)
            part = tl.dot(hi.to(tl.float32), xf)
            part = tl.dot(lo.to(tl.float32), xf, part)
        acc += part
        ssum += tl.sum(p, 1)
    aptr = ACC + pid_s * stride_as + offs_n.to(tl.int64)[:, None] * stride_an + offs_d[None, :]
    tl.store(aptr, acc, mask=nmask[:, None] & dmask[None, :])
    if pid_d == 0:
        tl.store(SOUT + pid_s * N + offs_n, ssum, mask=nmask)


def _wsum_cfg(config, on_gpu, n):
    if config is None:
        return WSUM_CONFIGS[wsum_config_name(n)] if on_gpu else INTERP_WSUM
    if isinstance(config, str):
        return WSUM_CONFIGS[config]
    return tuple(config)


def wsum_block_k(n: int, on_gpu: bool, config=None) -> int:
    """BLOCK_K (rows per fp32 accumulation step) of a weighted-sum launch for n queries."""
    return _wsum_cfg(config, on_gpu, n)[1]


def launch_wsum(x, logits, mref32, rows_per_split, out, *, config=None):
    """Run the weighted-sum kernel into preallocated outputs ``out = (acc, s)``.

    x: (B, d) uint8 rows; logits: (N, B) fp32 row-dependent logits (unit stride along B);
    mref32: (N,) fp32, at least every logit of its query (the weights are
    ``exp(l - mref) <= 1``). out: acc (S, N, d) fp32 (unit stride along d) and s (S, N)
    fp32 contiguous, S = cdiv(B, rows_per_split). config: a name of ``WSUM_CONFIGS`` or
    a tuple (BLOCK_N, BLOCK_K, BLOCK_D, warps, stages); None: by N on a GPU,
    ``INTERP_WSUM`` in the interpreter.
    """
    acc, s = out
    B, D = x.shape
    N = logits.shape[0]
    if x.dtype != torch.uint8:
        raise TypeError(f"x: expected uint8 rows, got {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    S = triton.cdiv(B, rows_per_split)
    assert acc.shape == (S, N, D) and acc.stride(2) == 1 and s.shape == (S, N) and s.is_contiguous()
    on_gpu = x.is_cuda and not INTERPRETED
    bn, bk, bd, warps, stages = _wsum_cfg(config, on_gpu, N)
    grid = (triton.cdiv(N, bn), triton.cdiv(D, bd), S)
    meta = dict(BF16_DOT=on_gpu, BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd)
    if on_gpu:
        meta.update(num_warps=warps, num_stages=stages)
    _wsum_kernel[grid](x, x.stride(0), logits, logits.stride(0), mref32, acc, acc.stride(0), acc.stride(1), s,
                       N, B, D, rows_per_split, **meta)
    return out


def gemm_wsum(x, logits, mref32, rows_per_split, *, config=None):
    """Allocate the outputs and run the weighted-sum kernel; returns ``(acc, s)`` (see ``launch_wsum``)."""
    B, D = x.shape
    N = logits.shape[0]
    S = triton.cdiv(B, rows_per_split)
    out = (torch.empty(S, N, D, dtype=torch.float32, device=x.device),
           torch.empty(S, N, dtype=torch.float32, device=x.device))
    return launch_wsum(x, logits, mref32, rows_per_split, out, config=config)


def gemm_wsum_ref(x, logits, mref, rows_per_split):
    """float64 reference of ``gemm_wsum``: per split ``sum exp(l - mref) raw`` and ``sum exp(l - mref)``.

    x: (B, d) uint8; logits: (N, B) float64; mref: (N,) float64. Returns (S, N, d), (S, N).
    """
    raw = x.to(torch.float64)
    accs, ss = [], []
    for a in range(0, x.shape[0], rows_per_split):
        p = torch.exp(logits[:, a:a + rows_per_split] - mref[:, None])
        accs.append(p @ raw[a:a + rows_per_split])
        ss.append(p.sum(1))
    return torch.stack(accs), torch.stack(ss)
