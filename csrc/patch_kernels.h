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
// (bounds.EXP_REL_ERR). Results below e^-700 are 0 (no subnormals, whose microcode assists
// cost ~100x); they weigh below e^-45 of the largest anyway, which delta counts as left
// out. The portable version uses std::exp.

#if !defined(OPTDEN_PKNS) || !defined(OPTDEN_PISA)
#error "define OPTDEN_PKNS and OPTDEN_PISA (2: AVX-512, 0: portable) first"
#endif

namespace optden {
namespace OPTDEN_PKNS {

// Fill the pad columns of rows [ya, yb) of a padded map (stride W + 2 rh, data at rh).
inline void pad_columns(const PatchGeo& g, double* e, int ya, int yb) {
  const int W = g.W, rh = g.rh, Wp = W + 2 * rh;
  for (int py = ya; py < yb; ++py) {
    double* er = e + (size_t)py * Wp + rh;
    for (int j = 1; j <= rh; ++j) {
      er[-j] = g.circular ? er[W - j] : 0.0;
      er[W - 1 + j] = g.circular ? er[j - 1] : 0.0;
    }
  }
}

#if OPTDEN_PISA == 2
__attribute__((always_inline)) inline __mmask8 lanes(int left) {
  return left >= 8 ? (__mmask8)0xFF : left <= 0 ? (__mmask8)0 : (__mmask8)((1u << left) - 1u);
}
#endif

// e[row][rh + x] = sum_c (v[c][row][x] - y[c][row][x])^2 for rows [ya, yb) (row = wrap_row), each row of e
// padded to W + 2 rh columns with the wrapped (circular) or zero values the windows read.
inline void sqdiff_rows(const PatchGeo& g, const double* v, const double* y, int ya, int yb, double* e) {
  const int W = g.W, rh = g.rh, Wp = W + 2 * rh, C = g.C;  // locals: stores to e cannot change them
  const size_t HW = (size_t)g.HW;
  for (int j = ya; j < yb; ++j) {
    const int py = wrap_row(g, j);
    const size_t o = (size_t)py * W;
    double* er = e + (size_t)py * Wp + rh;
#if OPTDEN_PISA == 2
    for (int x = 0; x < W; x += 8) {
      const __mmask8 m = lanes(W - x);
      __m512d d = _mm512_sub_pd(_mm512_maskz_loadu_pd(m, v + o + x), _mm512_maskz_loadu_pd(m, y + o + x));
      __m512d a = _mm512_mul_pd(d, d);
      for (int c = 1; c < C; ++c) {
        const size_t oc = (size_t)c * HW + o + x;
        d = _mm512_sub_pd(_mm512_maskz_loadu_pd(m, v + oc), _mm512_maskz_loadu_pd(m, y + oc));
        a = _mm512_fmadd_pd(d, d, a);
      }
      _mm512_mask_storeu_pd(er + x, m, a);
    }
#else
    for (int x = 0; x < W; ++x) {
      double a = 0.0;
      for (int c = 0; c < C; ++c) {
        const double d = v[(size_t)c * HW + o + x] - y[(size_t)c * HW + o + x];
        a += d * d;
      }
      er[x] = a;
    }
#endif
  }
  for (int j = ya; j < yb; ++j) pad_columns(g, e, wrap_row(g, j), wrap_row(g, j) + 1);
}

// out[x] = sum_t rows[t][x + t * step] for t < n, x < W (step 1: a row's horizontal taps;
// step 0 with n row pointers: the vertical taps). AVX-512: four vectors of x at a time, so
// that four independent chains of adds hide the add latency.
__attribute__((always_inline)) inline void tap_sum(const double* const* rows, int n, int step, int W, double* out) {
#if OPTDEN_PISA == 2
  for (int x = 0; x < W; x += 32) {
    const __mmask8 m0 = lanes(W - x), m1 = lanes(W - x - 8), m2 = lanes(W - x - 16), m3 = lanes(W - x - 24);
    const double* r = rows[0] + x;
    __m512d a0 = _mm512_maskz_loadu_pd(m0, r), a1 = _mm512_maskz_loadu_pd(m1, r + 8);
    __m512d a2 = _mm512_maskz_loadu_pd(m2, r + 16), a3 = _mm512_maskz_loadu_pd(m3, r + 24);
    for (int t = 1; t < n; ++t) {
      r = rows[step ? 0 : t] + x + t * step;
      a0 = _mm512_add_pd(a0, _mm512_maskz_loadu_pd(m0, r));
      a1 = _mm512_add_pd(a1, _mm512_maskz_loadu_pd(m1, r + 8));
      a2 = _mm512_add_pd(a2, _mm512_maskz_loadu_pd(m2, r + 16));
      a3 = _mm512_add_pd(a3, _mm512_maskz_loadu_pd(m3, r + 24));
    }
    _mm512_mask_storeu_pd(out + x, m0, a0);
    _mm512_mask_storeu_pd(out + x + 8, m1, a1);
    _mm512_mask_storeu_pd(out + x + 16, m2, a2);
    _mm512_mask_storeu_pd(out + x + 24, m3, a3);
  }
#else
  for (int x = 0; x < W; ++x) {
    double a = rows[0][x];
    for (int t = 1; t < n; ++t) a += rows[step ? 0 : t][x + t * step];
    out[x] = a;
  }
#endif
}

// out[py][x] = k x k window sum of e (rows padded as sqdiff_rows writes them) at (py, x)
// for output rows [oa, ob); e must hold the rows those windows read (input_rows).
// hs: H * W scratch.
inline void box_sum(const PatchGeo& g, const double* e, int oa, int ob, double* hs, double* out) {
  const int H = g.H, W = g.W, kh = 2 * g.rh + 1, Wp = W + 2 * g.rh;
  int ia, ib;
  input_rows(g, oa, ob, &ia, &ib);
  for (int j = ia; j < ib; ++j) {
    const int row = wrap_row(g, j);
    const double* er = e + (size_t)row * Wp;
    tap_sum(&er, kh, 1, W, hs + (size_t)row * W);
  }
  const double* rowp[2 * kMaxRadius + 1];
  for (int py = oa; py < ob; ++py) {
    int nr = 0;
    for (int j = -g.rv; j <= g.rv; ++j) {
      const int row = py + j;
      if (g.circular) {
        rowp[nr++] = hs + (size_t)wrap_row(g, row) * W;
      } else if (row >= 0 && row < H) {
        rowp[nr++] = hs + (size_t)row * W;
      }
    }
    tap_sum(rowp, nr, 0, W, out + (size_t)py * W);
  }
}

#if OPTDEN_PISA == 2
__attribute__((always_inline)) inline __m512d exp_neg(__m512d x) {
  const __mmask8 normal = _mm512_cmp_pd_mask(x, _mm512_set1_pd(-700.0), _CMP_GE_OQ);
  x = _mm512_max_pd(x, _mm512_set1_pd(-700.0));
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
  return _mm512_maskz_scalef_pd(normal, p, n);
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
  const int C = g.C;
  const size_t HW = (size_t)g.HW;
  double *const m = st.m, *const s = st.s, *const acc = st.acc;
  int64_t* const top = st.top;
#if OPTDEN_PISA == 2
  const __m512d nc = _mm512_set1_pd(-coef), one = _mm512_set1_pd(1.0), skip = _mm512_set1_pd(kSkip);
  const __m512i base = _mm512_set1_epi64(idx_base);
  for (int p = pa; p < pb; p += 8) {
    __mmask8 valid = pb - p >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (pb - p)) - 1u);
    if (allowed)
      valid = (__mmask8)_mm_mask_cmpneq_epi8_mask((__mmask16)valid, _mm_maskz_loadu_epi8((__mmask16)valid, allowed + p),
                                                   _mm_setzero_si128());
    const __m512d l = _mm512_mul_pd(nc, _mm512_maskz_loadu_pd(valid, dist + p));
    const __m512d mo = _mm512_mask_loadu_pd(_mm512_set1_pd(-INFINITY), valid, m + p);
    const __mmask8 keep = _mm512_mask_cmp_pd_mask(valid, l, _mm512_sub_pd(mo, skip), _CMP_GE_OQ);
    if (!keep) continue;
    const __mmask8 up = _mm512_mask_cmp_pd_mask(keep, l, mo, _CMP_GT_OQ);
    const __m512d e = exp_neg(_mm512_sub_pd(_mm512_setzero_pd(), _mm512_abs_pd(_mm512_sub_pd(l, mo))));
    // blend(k, a, b): b where k is set
    const __m512d alpha = _mm512_mask_blend_pd(up, one, e), w = _mm512_mask_blend_pd(up, e, one);
    _mm512_mask_storeu_pd(s + p, keep, _mm512_fmadd_pd(_mm512_maskz_loadu_pd(keep, s + p), alpha, w));
    if (acc) {
      for (int c = 0; c < C; ++c) {
        double* a = acc + (size_t)c * HW + p;
        const __m512d yc = _mm512_maskz_loadu_pd(keep, y + (size_t)c * HW + p);
        _mm512_mask_storeu_pd(a, keep, _mm512_fmadd_pd(_mm512_maskz_loadu_pd(keep, a), alpha, _mm512_mul_pd(w, yc)));
      }
    }
    _mm512_mask_storeu_pd(m + p, up, l);
    _mm512_mask_storeu_epi64(top + p, up, _mm512_add_epi64(base, _mm512_maskz_loadu_epi64(up, qpos + p)));
  }
#else
  for (int p = pa; p < pb; ++p) {
    if (allowed && !allowed[p]) continue;
    const double l = -coef * dist[p], mo = m[p];
    if (!(l >= mo - kSkip)) continue;
    const bool up = l > mo;
    const double e = std::exp(-std::fabs(l - mo));
    const double alpha = up ? e : 1.0, w = up ? 1.0 : e;
    s[p] = s[p] * alpha + w;
    if (acc)
      for (int c = 0; c < C; ++c) {
        double& a = acc[(size_t)c * HW + p];
        a = a * alpha + w * y[(size_t)c * HW + p];
      }
    if (up) {
      m[p] = l;
      top[p] = idx_base + qpos[p];
    }
  }
#endif
}

// The composite's normalised weights w = exp(-coef dist[p] - lse[p]) of all HW positions,
// written as a padded map for box_sum; returns whether any exceeds exp(-cut) (else the
// pair adds nothing worth counting).
inline bool weights(const PatchGeo& g, const double* dist, double coef, const double* lse, double cut, double* w) {
  const int W = g.W, Wp = W + 2 * g.rh;
  bool any = false;
#if OPTDEN_PISA == 2
  const __m512d nc = _mm512_set1_pd(-coef), lo = _mm512_set1_pd(-cut);
  for (int py = 0; py < g.H; ++py) {
    const double* dr = dist + (size_t)py * W;
    const double* lr = lse + (size_t)py * W;
    double* wr = w + (size_t)py * Wp + g.rh;
    for (int x = 0; x < W; x += 8) {
      const __mmask8 valid = W - x >= 8 ? (__mmask8)0xFF : (__mmask8)((1u << (W - x)) - 1u);
      const __m512d a = _mm512_fmsub_pd(nc, _mm512_maskz_loadu_pd(valid, dr + x), _mm512_maskz_loadu_pd(valid, lr + x));
      any |= _mm512_mask_cmp_pd_mask(valid, a, lo, _CMP_GE_OQ) != 0;
      _mm512_mask_storeu_pd(wr + x, valid, exp_neg(a));
    }
  }
#else
  for (int py = 0; py < g.H; ++py)
    for (int x = 0; x < W; ++x) {
      const double a = -coef * dist[(size_t)py * W + x] - lse[(size_t)py * W + x];
      any |= a >= -cut;
      w[(size_t)py * Wp + g.rh + x] = std::exp(a);
    }
#endif
  pad_columns(g, w, 0, g.H);
  return any;
}

}  // namespace OPTDEN_PKNS
}  // namespace optden
