"""The ``cpu`` backend: the fused dense pass of ``optden._C`` (csrc/dense_pass.h: the overview; dense_cpu.cpp, dense_limbs.cpp, dense_float.cpp, cpu_dispatch.cpp).

One pass over blocks of rows computes, per query, the coarse logits, an online softmax,
the weighted sum (float64) and the top-K logits, in OpenMP threads with the GIL released;
kernels are picked at run time (AVX-512 VNNI, AVX2 + FMA, or portable C++).

Logits ``l_i = -coef ((||v||^2 - 2 v.q_i) + ||q_i||^2)`` (v centered query, q_i centered
row, ||q_i||^2 the dataset's exact float64 norms). The bound ``delta`` (per query):

* uint8 rows (integral center): v is split into fixed-point limbs,
  ``v = sum_l 2^(-k-15l) Q_l + e`` (Q_0 int8, 7 bits; Q_1.. int16, 15 bits each) with the
  residual e known exactly; every ``Q_l . q_i`` is an exact integer (int32 SIMD lanes
  flushed to int64 before they can overflow). So ``|fl(v.q_i) - v.q_i| <= ||e|| qmax
  + gamma_{L-1} ||a|| qmax`` (a_j = sum_l |Q_lj| 2^(...) ~ |v_j|; the second term is the
  float64 combination of the L exact sums). The number of limbs (1..4) is chosen per query
  so that delta stays below ``target_delta`` when float64 rounding allows it.
  Limb 0 alone is the coarse pass (u8 x s8 vpdpbusd on AVX-512, 64 products per
  instruction): every row gets a coarse logit within delta_1 of the truth, and only rows
  whose coarse bound is within 40 of the best logit seen, or that could enter the top K,
  get the other limbs (a top-K candidate gets limb 1 first and the rest only if its bound
  from limbs 0 and 1, delta_2, still lets it in). The rows left out weigh at most
  ``xs = sum exp(ub - max)`` with ub their best upper bound, and ``xs / s`` is added to delta: a relative perturbation eps of the weights
  (here: the rows left out) is covered by ``delta + eps`` (every kept weight is off by a
  factor within ``exp(+-2 (delta + eps))`` after normalisation). ``DensePass.refined`` is
  the fraction of (query, row) pairs that got every limb (1 at large sigma, a few percent
  at small sigma). A lone query whose sub-blocks keep needing every limb (large sigma)
  gets them all from one read of each row; the integers, and so the result, are the same.
* other rows: float64 dot products of v with rows centered in float64, error
  ``<= gamma_{d+1} ||v|| qmax``, plus ``gamma_{d+2} qmax^2`` for the rounding of the
  float64 norms ||q_i||^2 of float rows (those of uint8 rows are exact integers).
* both: ``||v||^2`` by a compensated sum (error <= 2u ||v||^2), then the two float64 additions
  ``(vsq - 2 dot) + ||q||^2`` (<= 2u (vsq + 2 |dot| + qmax^2)), and the product with coef
  (u |l|, bounded by 4u |top logit| as in ``optden.engine.bounds.gemm_delta``).

``delta = coef (2 dot_err + compensated/sum terms) + 4u |top|``, with qmax = max ||q_i||;
u = 2^-53. With 2 limbs and d = 3072 the dot error is ~1e-9 ||v|| qmax, against 1.8e-4 for
an fp32 GEMM and 3.4e-13 for a float64 one; 4 limbs (52 bits) come within ~3x of the float64
rounding floor.
"""
from __future__ import annotations

import numpy as np
import torch

from ... import _ext
from ...data.storage import STORAGE_DTYPES, to_numpy
from .. import dispatch
from ..dispatch import Backend
from ..partial import STATS, Partial

# Rows per call into the extension: up to 256 MB of raw rows. Each call is one OpenMP
# parallel region; few, long ones keep threads from spin-waiting at barriers (costly when
# the cores are shared). In-memory rows are passed in place; streamed ones come in the
# prefetcher's blocks of 32 MB, which the memory budget may make smaller.
_CALL_BYTES = 1 << 28
_STREAM_CALL_BYTES = 1 << 25  # streamed sources: the prefetcher holds a few blocks of this size


class CpuBackend(Backend):
    """Fused single-pass dense denoiser in C++ (OpenMP, SIMD), CPU tensors only.

    path: kernel set, "auto" (best this CPU has; env OPTDEN_CPU_PATH overrides),
    "avx512", "avx2" or "portable". target_delta: logit error the uint8 limb split aims
    for (default 1e-8: the log density inherits the logit error, and 1e-6 relative of a log
    density near 0 is a small absolute error; with the weights' quantization error, <= 5e-8
    per sub-block, and the rows left out, <= M e^-40, the pass stays under the tol/4 =
    2.5e-7 that DENSE needs at the default tol 1e-6). limbs: 0 (automatic)
    or a fixed 1..4 (tests and benchmarks).
    """

    name = "cpu"
    priority = 10
    devices = ("cpu",)
    description = "optden._C fused pass: exact int8/int16-limb dots for uint8 (AVX-512 VNNI / AVX2 / portable), float64 otherwise"
    statistics = STATS

    def __init__(self, path: str = "auto", target_delta: float = 1e-8, limbs: int = 0):
        self.path = path
        self.target_delta = float(target_delta)
        self.limbs = int(limbs)
        self.last_info: dict = {}

    def delta_target(self) -> float | None:
        return self.target_delta

    def availability(self) -> list[str]:
        if _ext.C is None:
            return [_ext.error or "optden._C is not built"]
        if not hasattr(_ext.C, "DensePass"):
            return ["optden._C was built without the dense pass (rebuild: pip install --no-build-isolation -e .)"]
        return []

    def _blocks(self, source):
        """(offset, raw numpy (B, d), csq numpy (B,)) over the source, up to 256 MB per block.

        Streamed sources yield views of the prefetcher's buffers, valid until the next
        block: each one is consumed (``DensePass.update``) before the next is asked for.
        """
        nbytes = _STREAM_CALL_BYTES if getattr(source, "streams", False) else _CALL_BYTES
        rows = max(1, nbytes // max(1, source.d * STORAGE_DTYPES[source.dtype].itemsize))
        for off, raw, csq in source.blocks(rows=rows):
            yield off, to_numpy(raw), csq.detach().cpu().numpy()

    def partial(self, v: torch.Tensor, coef: torch.Tensor, source, k: int, stats: bool = False) -> Partial:
        """See ``Backend.partial``. v: (N, d) float64 CPU, coef: (N,) float64; k <= source.M;
        stats: accumulate ``STATS`` over the rows the pass keeps (the ones it leaves out,
        far below the max, are ``left_out``)."""
        C = _ext.C
        if C is None:
            raise RuntimeError(self.availability()[0])
        vn = np.ascontiguousarray(v.detach().cpu().numpy(), dtype=np.float64)
        cn = np.ascontiguousarray(coef.detach().cpu().numpy(), dtype=np.float64)
        center = np.ascontiguousarray(source.center.cpu().numpy(), dtype=np.float64)
        dp = C.DensePass(vn, cn, center, float(source.max_cnorm), int(k), source.dtype, self.path,
                         self.target_delta, self.limbs, bool(stats))
        for off, raw, csq in self._blocks(source):
            dp.update(raw, np.ascontiguousarray(csq, dtype=np.float64), int(off))
        m, s, acc, tv, ti, delta = dp.finish()
        self.last_info = {"path": dp.path, "arith": dp.arith, "limbs": list(dp.limbs), "refined": dp.refined}
        t = torch.from_numpy  # CPU tensors, as v (this backend runs on nothing else)
        part = Partial(m=t(m), s=t(s), acc=t(acc), top_val=t(tv), top_idx=t(ti), delta=t(delta))
        if stats:
            s2, e1, left_out = dp.stats()
            part.s2, part.e1, part.left_out = t(s2), t(e1), t(left_out)
        return part


dispatch.register("cpu", CpuBackend)
