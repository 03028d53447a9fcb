// The per-pair kernels of the local denoisers' passes (csrc/patch_pass.cpp), compiled once
// per instruction set: patch_pass.cpp includes this file inside each `#pragma GCC target`
// region with OPTDEN_PKNS (namespace) and OPTDEN_PISA (2: AVX-512 F + DQ + BW + VL, 0:
// portable) defined. No include guard on purpose.
//
// One pair is a query image v and a training image y (both (C, H, W) float64, centered by
// one scalar), y possibly shifted (the equivariant denoiser). For every output position p:
//
//   dist[p] = ||v[Omega_p] - y[Omega_p]||^2
//           = box sum over the k x k window of e = sum_c (v - y)^2         (sqdiff_rows, box_sum)
//
// computed as sums of nonnegative terms only (no running sums), so each dist[p] is within a
// relative gamma_{C k^2 + 2} of the truth (optden.engine.bounds.direct_pass_delta). Then:
//
//   fold:     the online softmax of one position's state (m, s, acc, top) takes the logit
//             l = -coef dist[p] with one exp: with d = -|l - m|, e = exp(d), the old terms
//             scale by alpha = (l > m ? e : 1) and the new one weighs w = (l > m ? 1 : e).
//             Positions whose logit is below m - kSkip (every lane of a vector) are skipped.
//   weights:  the composite's second pass: w[p] = exp(l - lse[p]) (lse +inf: w = 0).
//
// exp_neg (AVX-512): x <= 0 -> e^x, by n = round(x / ln2), r = x - n ln2 (Cody-Waite:
// ln2 = LN2_HI + LN2_LO, n LN2_HI exact), e^r by its Taylor polynomial of degree 13
// (|r| <= ln2 / 2: truncation < 5e-18; Horner's rounding <= gamma_26 e^{2|r|} < 6e-15) and
// the scaling by 2^n with vscalefpd (exact for normal results): relative error < 1e-14
// (bounds.EXP_REL_ERR). Results below e^-745 flush to 0; they weigh below e^-45 of the
// largest anyway, which delta counts as left out. The portable version uses std::exp.

#if !defined(OPTDEN_PKNS) || !defined(OPTDEN_PISA)
#error "define OPTDEN_PKNS and OPTDEN_PISA (2: AVX-512, 0: portable) first"
#endif

namespace optden {
namespace OPTDEN_PKNS {

// e[py][x] = sum_c (v[c][py][x] - y[c][py][x])^2 for rows [ya, yb).
inline void sqdiff_rows(const PatchGeo& g, const double* v, const double* y, int ya, int yb, double* e) {
  for (int py = ya; py < yb; ++py) {
    const size_t o = (size_t)py * g.W;
    double* er = e + o;
#pragma omp simd
    for (int x = 0; x < g.W; ++x) {
      const double d = v[o + x] - y[o + x];
      er[x] = d * d;
    }
    for (int c = 1; c < g.C; ++c) {
      const size_t oc = (size_t)c * g.HW + o;
#pragma omp simd
      for (int x = 0; x < g.W; ++x) {
        const double d = v[oc + x] - y[oc + x];
        er[x] += d * d;
      }
    }
  }
}

// Horizontal window sums of one row e (W) into h (W); pad: scratch of W + 2 rh doubles.
inline void hsum_row(const PatchGeo& g, const double* e, double* pad, double* h) {
  const int W = g.W, rh = g.rh;
  for (int x = 0; x < W; ++x) pad[rh + x] = e[x];
  for (int j = 0; j < rh; ++j) {
    pad[j] = g.circular ? e[W - rh + j] : 0.0;
    pad[rh + W + j] = g.circular ? e[j] : 0.0;
  }
#pragma omp simd
  for (int x = 0; x < W; ++x) h[x] = pad[x];
  for (int j = 1; j <= 2 * rh; ++j) {
    const double* pj = pad + j;
#pragma omp simd
    for (int x = 0; x < W; ++x) h[x] += pj[x];
  }
}

// out[py][x] = k x k window sum of e at (py, x) for output rows [oa, ob); e must hold the
// rows those windows read (input_rows). hs: H * W scratch, pad: W + 2 rh scratch.
inline void box_sum(const PatchGeo& g, const double* e, int oa, int ob, double* hs, double* pad, double* out) {
  const int H = g.H, W = g.W;
  int ia, ib;
  input_rows(g, oa, ob, &ia, &ib);
  for (int j = ia; j < ib; ++j) hsum_row(g, e + (size_t)j * W, pad, hs + (size_t)j * W);
  for (int py = oa; py < ob; ++py) {
    double* o = out + (size_t)py * W;
    bool first = true;
    for (int j = -g.rv; j <= g.rv; ++j) {
      int row = py + j;
      if (g.circular) {
        row = ((row % H) + H) % H;
      } else if (row < 0 || row >= H) {
        continue;
      }
      const double* h = hs + (size_t)row * W;
      if (first) {
#pragma omp simd
        for (int x = 0; x < W; ++x) o[x] = h[x];
        first = false;
      } else {
#pragma omp simd
        for (int x = 0; x < W; ++x) o[x] += h[x];
      }
    }
  }
}

#if OPTDEN_PISA == 2
inline __m512d exp_neg(__m512d x) {
  x = _mm512_max_pd(x, _mm512_set1_pd(-746.0));  // -inf and below: 0 after the scaling
  const __m512d n = _mm512_roundscale_pd(_mm512_mul_pd(x, _mm512_set1_pd(1.4426950408889634)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512d r = _mm512_fnmadd_pd(n, _mm512_set1_pd(6.93147180369123816490e-01), x);  // LN2_HI
  r = _mm512_fnmadd_pd(n, _mm512_set1_pd(1.90821492927058770002e-10), r);         // LN2_LO
  static const double c[14] = {1.0,
                               1.0,
                               1.0 / 2,
                               1.0 / 6,
                               1.0 / 24,
                               1.0 / 120,
                               1.0 / 720,
                               1.0 / 5040,
                               1.0 / 40320,
                               1.0 / 362880,
                               1.0 / 3628800,
                               1.0 / 39916800,
                               1.0 / 479001600,
                               1.0 / 6227020800.0};
  __m512d p = _mm512_set1_pd(c[13]);
  for (int j = 12; j >= 0; --j) p = _mm512_fmadd_pd(p, r, _mm512_set1_pd(c[j]));
  return _mm512_scalef_pd(p, n);
}
#endif

// The state of one query's online softmaxes, one per position (arrays of HW; acc C * HW).
struct FoldState {
  double* m;
  double* s;
  double* acc;  // nullptr: no values (the composite's first pass)
  int64_t* top;
};

// Fold one pair's logits l = -coef dist[p], positions [pa, pb) where allowed (nullptr: all),
// into the state; y: the (shifted) row, values y[c][p]; its patch index idx_base + qpos[p].
inline void fold(const PatchGeo& g, const double* dist, double coef, const double* y, const uint8_t* allowed,
                 int pa, int pb, int64_t idx_base, const int64_t* qpos, const FoldState& st) {
#if OPTDEN_PISA == 2
  const __m512d nc = _mm512_set1_pd(-coef), one = _mm512_set1_pd(1.0), skip = _mm512_set1_pd(kSkip);
  const __m512i base = _mm512_set1_epi64(idx_base);
  for (int p = pa; p < pb; p += 8) {
    __mmask8 valid = pb - p >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (pb - p)) - 1u);
    if (allowed)
      valid = (__mmask8)_mm_mask_cmpneq_epi8_mask((__mmask16)valid, _mm_maskz_loadu_epi8((__mmask16)valid, allowed + p),
                                                   _mm_setzero_si128());
    const __m512d l = _mm512_mul_pd(nc, _mm512_maskz_loadu_pd(valid, dist + p));
    const __m512d mo = _mm512_mask_loadu_pd(_mm512_set1_pd(-INFINITY), valid, st.m + p);
    const __mmask8 keep = _mm512_mask_cmp_pd_mask(valid, l, _mm512_sub_pd(mo, skip), _CMP_GE_OQ);
    if (!keep) continue;
    const __mmask8 up = _mm512_mask_cmp_pd_mask(keep, l, mo, _CMP_GT_OQ);
    const __m512d e = exp_neg(_mm512_sub_pd(_mm512_setzero_pd(), _mm512_abs_pd(_mm512_sub_pd(l, mo))));
    // blend(k, a, b): b where k is set
    const __m512d alpha = _mm512_mask_blend_pd(up, one, e), w = _mm512_mask_blend_pd(up, e, one);
    __m512d s = _mm512_maskz_loadu_pd(keep, st.s + p);
    _mm512_mask_storeu_pd(st.s + p, keep, _mm512_fmadd_pd(s, alpha, w));
    if (st.acc) {
      for (int c = 0; c < g.C; ++c) {
        double* a = st.acc + (size_t)c * g.HW + p;
        const __m512d yc = _mm512_maskz_loadu_pd(keep, y + (size_t)c * g.HW + p);
        _mm512_mask_storeu_pd(a, keep, _mm512_fmadd_pd(_mm512_maskz_loadu_pd(keep, a), alpha, _mm512_mul_pd(w, yc)));
      }
    }
    _mm512_mask_storeu_pd(st.m + p, up, l);
    _mm512_mask_storeu_epi64(st.top + p, up, _mm512_add_epi64(base, _mm512_maskz_loadu_epi64(up, qpos + p)));
  }
#else
  for (int p = pa; p < pb; ++p) {
    if (allowed && !allowed[p]) continue;
    const double l = -coef * dist[p], mo = st.m[p];
    if (!(l >= mo - kSkip)) continue;
    const bool up = l > mo;
    const double e = std::exp(-std::fabs(l - mo));
    const double alpha = up ? e : 1.0, w = up ? 1.0 : e;
    st.s[p] = st.s[p] * alpha + w;
    if (st.acc)
      for (int c = 0; c < g.C; ++c) {
        double& a = st.acc[(size_t)c * g.HW + p];
        a = a * alpha + w * y[(size_t)c * g.HW + p];
      }
    if (up) {
      st.m[p] = l;
      st.top[p] = idx_base + qpos[p];
    }
  }
#endif
}

// The composite's normalised weights w[p] = exp(-coef dist[p] - lse[p]), all HW positions;
// returns whether any exceeds exp(-cut) (else the pair adds nothing worth counting).
inline bool weights(const PatchGeo& g, const double* dist, double coef, const double* lse, double cut, double* w) {
#if OPTDEN_PISA == 2
  const __m512d nc = _mm512_set1_pd(-coef), lo = _mm512_set1_pd(-cut);
  __mmask8 any = 0;
  for (int p = 0; p < g.HW; p += 8) {
    const __mmask8 valid = g.HW - p >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (g.HW - p)) - 1u);
    const __m512d a = _mm512_fmsub_pd(nc, _mm512_maskz_loadu_pd(valid, dist + p), _mm512_maskz_loadu_pd(valid, lse + p));
    any |= _mm512_mask_cmp_pd_mask(valid, a, lo, _CMP_GE_OQ);
    _mm512_mask_storeu_pd(w + p, valid, exp_neg(a));
  }
  return any != 0;
#else
  bool any = false;
  for (int p = 0; p < g.HW; ++p) {
    const double a = -coef * dist[p] - lse[p];
    any |= a >= -cut;
    w[p] = std::exp(a);
  }
  return any;
#endif
}

}  // namespace OPTDEN_PKNS
}  // namespace optden
