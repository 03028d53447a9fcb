"""Fused dense pass over one block of rows (Triton): dots, online softmax, weighted sum.

kernel (``_dense_partial_kernel``) -> launcher (``launch``) -> public function
(``dense_partial``) -> float64 reference (``dense_partial_ref``), as in mamba's ops.

For queries ``v`` (N, d) and rows ``x_i`` (B, d) the kernel computes, per query n and
row i, the *row-dependent part* of the logit

    l_ni = coef_n * (2 v_n . x_i - csq_i)

(``csq_i = ||raw_i - center||^2``; ``x_i = raw_i - center`` when ``centered`` (uint8
data, exact in fp32), else ``x_i = raw_i``; the host adds the part common to all rows),
writes every l_ni (so the host can take an exact top-k), and keeps per *split* of rows
(flash-decoding) an online softmax: ``m`` (max), ``s = sum exp(l - m)`` and
``acc = sum exp(l - m) raw_i`` in raw space. The host merges splits by log-sum-exp.

d is 3072..16384, so neither a query tile nor its accumulator fits on chip: the dot is
tiled over d, and the weighted sum of each row tile is added to the split's accumulator
in global memory, d-chunk by d-chunk (a second pass over the tile, which sits in L2).

Precision: loads are cast to fp32 right after ``tl.load`` (the interpreter mishandles
bf16 arithmetic). With ``tf32=True`` every product runs on TF32 tensor cores *exactly*:
the data (uint8 centered, fp16, bf16) is exactly representable in TF32, the query comes
as two TF32 pieces (hi + lo, split on the host) and the softmax weights are split into
two TF32 pieces in the kernel (``_tf32_split``). fp32 data uses ``tf32=False``
(IEEE fp32 FMA). Every rounding is bounded in ``optden.engine.bounds`` (``fp32_pass_delta``).

Importing this module imports Triton; whether kernels run in the interpreter is fixed
at import by ``TRITON_INTERPRET`` (``INTERPRETED`` records it).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: True when this module's kernels were created by Triton's interpreter (TRITON_INTERPRET=1).
try:
    INTERPRETED = bool(triton.knobs.runtime.interpret)  # Triton >= 3.4
except AttributeError:  # older Triton read the variable directly
    INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")

#: Fixed configuration of the interpreter.
DEFAULT_CONFIG = {"BLOCK_N": 16, "BLOCK_M": 32, "BLOCK_D": 64}
#: Configuration on GPUs when autotuning is off (OPTDEN_TRITON_AUTOTUNE=0).
GPU_CONFIG = {"BLOCK_N": 32, "BLOCK_M": 64, "BLOCK_D": 64}
#: Smallest and largest BLOCK_M any configuration uses (the error bound depends on them).
BLOCK_M_MIN = 16
BLOCK_M_MAX = 128


def _gpu_configs():
    """Autotuning space on GPUs (BLOCK_N, BLOCK_M, BLOCK_D, warps); BLOCK_M within [16, 128]."""
    shapes = [(16, 32, 64, 4), (16, 64, 64, 4), (16, 64, 128, 8), (32, 32, 128, 4), (32, 64, 64, 4),
              (32, 128, 64, 8), (64, 64, 64, 4), (64, 128, 64, 8)]
    return [triton.Config({"BLOCK_N": bn, "BLOCK_M": bm, "BLOCK_D": bd}, num_warps=w, num_stages=3)
            for bn, bm, bd, w in shapes]


@triton.jit
def _tf32_split(x):
    """x (fp32) -> (hi, lo), both exact in TF32, with |x - hi - lo| < 2^-20 |x|."""
    hi = (x.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    lo = x - hi  # exact: the 13 bits that hi dropped
    lo = (lo.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def _dense_partial_kernel(
    X, stride_x,  # rows (B, d), any storage dtype, unit stride along d
    CENTER,  # (d,) fp32 center (used when CENTERED)
    CSQ,  # (B,) fp32 centered squared norms
    VH, VL, stride_v,  # query pieces (N, d) fp32 (VL used when TWO_PIECES)
    COEF,  # (N,) fp32
    LOGITS, stride_l,  # out (N, B) fp32 row-dependent logits
    MOUT, SOUT,  # out (S, N) fp32 per-split max and sum of exp
    ACC, stride_acc_s, stride_acc_n,  # out (S, N, d) fp32 per-split raw-space weighted sums
    N, B, D, rows_per_split,
    n_bucket,  # next power of two of N, capped at 256: the autotuning key (unused in the body)
    CENTERED: tl.constexpr,
    TWO_PIECES: tl.constexpr,
    TF32: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    coef = tl.load(COEF + offs_n, mask=nmask, other=0.0)
    row0 = pid_s * rows_per_split
    row1 = tl.minimum(row0 + rows_per_split, B)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s_i = tl.zeros([BLOCK_N], tl.float32)
    for r in range(row0, row1, BLOCK_M):
        offs_m = r + tl.arange(0, BLOCK_M)
        mmask = offs_m < row1
        xrow = X + offs_m.to(tl.int64)[:, None] * stride_x  # 64-bit: B * stride_x may pass 2^31
        # 1. dots v . x_i, tiled over d
        dot = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
        for k in range(0, D, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            xmask = mmask[:, None] & dmask[None, :]
            x = tl.load(xrow + offs_d[None, :], mask=xmask, other=0).to(tl.float32)
            if CENTERED:
                c = tl.load(CENTER + offs_d, mask=dmask, other=0.0)
                x = tl.where(xmask, x - c[None, :], 0.0)
            xt = tl.trans(x)
            vmask = nmask[:, None] & dmask[None, :]
            vh = tl.load(VH + offs_n[:, None] * stride_v + offs_d[None, :], mask=vmask, other=0.0)
            if TF32:
                dot = tl.dot(vh, xt, dot, input_precision="tf32")
            else:
                dot = tl.dot(vh, xt, dot, input_precision="ieee")
            if TWO_PIECES:
                vl = tl.load(VL + offs_n[:, None] * stride_v + offs_d[None, :], mask=vmask, other=0.0)
                if TF32:
                    dot = tl.dot(vl, xt, dot, input_precision="tf32")
                else:
                    dot = tl.dot(vl, xt, dot, input_precision="ieee")
        # 2. logits and the online softmax
        csq = tl.load(CSQ + offs_m, mask=mmask, other=0.0)
        logit = coef[:, None] * (2.0 * dot - csq[None, :])
        logit = tl.where(mmask[None, :], logit, float("-inf"))
        tl.store(LOGITS + offs_n.to(tl.int64)[:, None] * stride_l + offs_m[None, :], logit, mask=nmask[:, None] & mmask[None, :])
        m_new = tl.maximum(m_i, tl.max(logit, 1))
        alpha = tl.exp(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        p = tl.exp(logit - m_new[:, None])
        s_i = s_i * alpha + tl.sum(p, 1)
        # 3. weighted sum of the raw rows, added to the split's accumulator chunk by chunk
        for k in range(0, D, BLOCK_D):
            offs_d = k + tl.arange(0, BLOCK_D)
            dmask = offs_d < D
            xr = tl.load(xrow + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0).to(tl.float32)
            a_ptr = ACC + pid_s * stride_acc_s + offs_n[:, None] * stride_acc_n + offs_d[None, :]
            amask = nmask[:, None] & dmask[None, :]
            a = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
            if r > row0:  # the first tile never reads the (poisoned) accumulator
                a = tl.load(a_ptr, mask=amask, other=0.0) * alpha[:, None]
            if TF32:
                p_hi, p_lo = _tf32_split(p)
                a = tl.dot(p_hi, xr, a, input_precision="tf32")
                a = tl.dot(p_lo, xr, a, input_precision="tf32")
            else:
                a = tl.dot(p, xr, a, input_precision="ieee")
            tl.store(a_ptr, a, mask=amask)
        m_i = m_new
    tl.store(MOUT + pid_s * N + offs_n, m_i, mask=nmask)
    tl.store(SOUT + pid_s * N + offs_n, s_i, mask=nmask)


_tuned = None


def _autotuned():
    global _tuned
    if _tuned is None:
        _tuned = triton.autotune(configs=_gpu_configs(), key=["n_bucket", "D", "CENTERED", "TF32"])(_dense_partial_kernel)
    return _tuned


def split_query_tf32(v: torch.Tensor):
    """v (N, d) float64 -> (hi, lo) fp32 pieces, each exact in TF32, and ``||v - hi - lo||`` (N,).

    hi keeps the top 11 significant bits of fl32(v), lo the next 11: the residual is
    below 2^-21 |v| (plus fp32 underflow), and is returned exactly enough (float64).
    """
    mask = torch.tensor(-8192, dtype=torch.int32, device=v.device)
    hi = (v.to(torch.float32).view(torch.int32) & mask).view(torch.float32)
    lo = ((v - hi.double()).to(torch.float32).view(torch.int32) & mask).view(torch.float32)
    resid = (v - hi.double() - lo.double()).norm(dim=1)
    return hi.contiguous(), lo.contiguous(), resid


def split_query_fp32(v: torch.Tensor):
    """v (N, d) float64 -> (fl32(v), None, ||v - fl32(v)||) for the IEEE fp32 path."""
    v32 = v.to(torch.float32).contiguous()
    return v32, None, (v - v32.double()).norm(dim=1)


def launch(x, center32, csq32, vh, vl, coef32, rows_per_split, out, *, centered, tf32, config=None):
    """Run the kernel into preallocated outputs ``out = (logits, m, s, acc)``.

    x: (B, d) rows (uint8/fp16/bf16/fp32, unit stride along d); center32: (d,) fp32;
    csq32: (B,) fp32; vh, vl: (N, d) fp32 (vl None for one piece); coef32: (N,) fp32.
    out: logits (N, B) fp32, m (S, N) fp32, s (S, N) fp32, acc (S, N, d) fp32 with
    S = cdiv(B, rows_per_split). ``config``: dict of BLOCK_N/BLOCK_M/BLOCK_D to force
    one; None autotunes on a GPU (``GPU_CONFIG`` when OPTDEN_TRITON_AUTOTUNE=0; the
    interpreter uses ``DEFAULT_CONFIG``). Launches on torch's current CUDA stream.
    """
    logits, m, s, acc = out
    B, D = x.shape
    N = vh.shape[0]
    S = triton.cdiv(B, rows_per_split)
    if x.stride(1) != 1:
        x = x.contiguous()
    assert m.shape == (S, N) and s.shape == (S, N) and acc.shape == (S, N, D) and logits.shape == (N, B)
    assert acc.stride(2) == 1 and logits.stride(1) == 1 and m.is_contiguous() and s.is_contiguous()
    args = (
        x, x.stride(0), center32, csq32, vh, vl if vl is not None else vh, vh.stride(0), coef32,
        logits, logits.stride(0), m, s, acc, acc.stride(0), acc.stride(1), N, B, D, rows_per_split,
        min(triton.next_power_of_2(N), 256),
    )
    flags = {"CENTERED": bool(centered), "TWO_PIECES": vl is not None, "TF32": bool(tf32)}
    on_gpu = x.is_cuda and not INTERPRETED
    if config is None and on_gpu and os.environ.get("OPTDEN_TRITON_AUTOTUNE", "1") != "0":
        grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S)  # noqa: E731
        _autotuned()[grid](*args, **flags)
    else:
        cfg = dict(config if config is not None else (GPU_CONFIG if on_gpu else DEFAULT_CONFIG))
        if on_gpu:
            _dense_partial_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), S)](*args, **flags, **cfg, num_warps=4, num_stages=3)
        else:
            _dense_partial_kernel[(triton.cdiv(N, cfg["BLOCK_N"]), S)](*args, **flags, **cfg)
    return out


def dense_partial(x, center32, csq32, vh, vl, coef32, rows_per_split, *, centered, tf32, config=None):
    """Allocate the outputs and run the kernel; returns ``(logits, m, s, acc)`` (see ``launch``)."""
    B, D = x.shape
    N = vh.shape[0]
    S = triton.cdiv(B, rows_per_split)
    dev = x.device
    out = (
        torch.empty(N, B, dtype=torch.float32, device=dev),
        torch.empty(S, N, dtype=torch.float32, device=dev),
        torch.empty(S, N, dtype=torch.float32, device=dev),
        torch.empty(S, N, D, dtype=torch.float32, device=dev),
    )
    return launch(x, center32, csq32, vh, vl, coef32, rows_per_split, out, centered=centered, tf32=tf32, config=config)


def dense_partial_ref(x, center, csq, v, coef, rows_per_split, *, centered):
    """float64 reference of ``dense_partial`` (same outputs, exact arithmetic up to float64).

    x: (B, d); center: (d,) float64; csq: (B,) float64; v: (N, d) float64 (the query the
    pieces approximate); coef: (N,) float64. Returns float64 ``(logits, m, s, acc)``.
    """
    raw = x.to(torch.float64)
    xx = raw - center if centered else raw
    logits = coef[:, None] * (2.0 * v @ xx.T - csq[None, :])
    ms, ss, accs = [], [], []
    for a in range(0, x.shape[0], rows_per_split):
        lg = logits[:, a : a + rows_per_split]
        mm = lg.max(1).values
        p = torch.exp(lg - mm[:, None])
        ms.append(mm)
        ss.append(p.sum(1))
        accs.append(p @ raw[a : a + rows_per_split])
    return logits, torch.stack(ms), torch.stack(ss), torch.stack(accs)
