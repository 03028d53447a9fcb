// The int path of the CPU dense pass (uint8 rows, integral center; see dense_pass.h):
// each query split into fixed-point limbs, the coarse logits of limb 0 and the refinement
// of the rows that can matter with the other limbs (exact integer dots), and the weighted
// sum of the raw rows in integers with quantized weights.
#include "dense_pass.h"

namespace optden {
namespace {

// Coarse logits of one query over a sub-block: out[i] = -coef ((vsq - 2 dot_i) + csq[i]),
// dot_i = (S[i] - sc) pw (exact: pw is a power of two); returns max_i out[i]. Cloned for
// AVX-512 (vectorized int64 -> double) and the baseline; both give the same numbers.
__attribute__((target_clones("arch=x86-64-v4", "default"))) double coarse_logits(
    const int64_t* S, int64_t sc, double pw, double coef, double vsq, const double* csq, int nb, double* out) {
  double m = -std::numeric_limits<double>::infinity();
#pragma omp simd reduction(max : m)
  for (int i = 0; i < nb; ++i) {
    const double dot = (double)(S[i] - sc) * pw;
    const double t = vsq - 2.0 * dot;  // exact product by 2: no contraction can change it
    const double l = -coef * (t + csq[i]);
    out[i] = l;
    m = l > m ? l : m;
  }
  return m;
}

// Splits the query vn (d values) into 4 limbs: limb[l][j] = Q_lj with v_j ~ sum_l Q_lj
// 2^(-kexp-15l), |Q_0j| <= 127, |Q_lj| <= 2^14 (each the nearest integer of what the
// limbs before leave, times 2^15). enorm[l] bounds the norm of the residual e = v - (limbs
// 0..l), anorm[l] that of a_j = sum_{l' <= l} |Q_l'j| 2^(...) (for the float64 combination
// of the limbs' sums), both rounded up. Scaling multiplies by exact powers of two
// (2^-1017 .. 2^1017, all normal), which rounds exactly as ldexp would.
void quantize_limbs(const double* vn, int d, int kexp, int16_t* const* limb, double* enorm, double* anorm) {
  const double up = std::ldexp(1.0, kexp);
  std::vector<double> r(d), a(d, 0.0);
  for (int j = 0; j < d; ++j) r[j] = vn[j] * up;
  for (int l = 0; l < 4; ++l) {
    // the squares are summed in kLanes interleaved partial sums (independent chains, which
    // the compiler vectorizes); gamma_{d+2} covers the rounding in any order of summation
    constexpr int kLanes = 8;
    double e2[kLanes] = {}, a2[kLanes] = {};
    const double pw = std::ldexp(1.0, -kexp - 15 * l);
    int16_t* lq = limb[l];
    const int dv = d / kLanes * kLanes;
    auto step = [&](int j, double& e2t, double& a2t) {
      const double q = round_even(r[j]);  // |r| <= 127 (l = 0) or 2^14, and so is |q|
      lq[j] = (int16_t)q;
      r[j] -= q;  // exact, |r| <= 1/2
      a[j] += std::fabs(q) * pw;
      const double e = r[j] * pw;
      e2t += e * e;
      a2t += a[j] * a[j];
      r[j] *= 32768.0;
    };
    for (int j0 = 0; j0 < dv; j0 += kLanes)
      for (int t = 0; t < kLanes; ++t) step(j0 + t, e2[t], a2[t]);
    for (int j = dv; j < d; ++j) step(j, e2[j - dv], a2[j - dv]);
    const double e2s = ((e2[0] + e2[1]) + (e2[2] + e2[3])) + ((e2[4] + e2[5]) + (e2[6] + e2[7]));
    const double a2s = ((a2[0] + a2[1]) + (a2[2] + a2[3])) + ((a2[4] + a2[5]) + (a2[6] + a2[7]));
    enorm[l] = std::sqrt(e2s) * (1.0 + 2.0 * gamma(d + 2));
    anorm[l] = std::sqrt(a2s) * (1.0 + 2.0 * gamma(d + 2));
  }
}

// One query's weights p = P[uni[t]] (t < nu, max p 2^e in [2^13, 2^14)) quantized to
// int16 limbs, p 2^e ~ W1 + W2 2^-15 [+ W3 2^-30], into w[l * kSB + t]; returns how many
// limbs (2 or 3). Adds to *ps the sum of the quantized weights (exact) and to *es a bound
// on sum |p - p_hat|. Every product by 2^e and 2^15 is exact, and so is each remainder.
int quantize_weights(const double* P, const int* uni, int nu, int e, int16_t* w, double* ps, double* es) {
  int16_t* w1 = w;
  int16_t* w2 = w1 + kSB;
  int16_t* w3 = w2 + kSB;
  const double se = std::ldexp(1.0, e);  // 2^13 .. 2^93: the products below are exact
  int64_t isum = 0;
  double err = 0.0, psum = 0.0;
  for (int t = 0; t < nu; ++t) {
    const double x = P[uni[t]] * se;  // < 2^14
    const double q1 = round_even(x);
    const double y = (x - q1) * 32768.0;  // exact, |y| <= 2^14
    const double q2 = round_even(y);
    w1[t] = (int16_t)q1;
    w2[t] = (int16_t)q2;
    isum += (int64_t)q1 * 32768 + (int64_t)q2;
    err += std::fabs(y - q2);  // exact terms, |.| <= 1/2
    psum += x;
  }
  // two limbs (30 bits) leave a relative weight error err / psum of ~1e-9 when the rows'
  // weights are alike, up to ~1e-7 when one row dominates a block of tiny ones; above
  // kWeightTarget a third limb takes it to ~2^-15 of that
  int L = 2;
  if (err * 0x1p-15 > kWeightTarget * psum) {
    L = 3;
    isum = 0;
    err = 0.0;
    for (int t = 0; t < nu; ++t) {
      const double x = P[uni[t]] * se;
      const double y = (x - (double)w1[t]) * 32768.0;
      const double z = (y - (double)w2[t]) * 32768.0;  // exact, |z| <= 2^14
      const double q3 = round_even(z);
      w3[t] = (int16_t)q3;
      isum += ((int64_t)w1[t] * 32768 + (int64_t)w2[t]) * 32768 + (int64_t)q3;
      err += std::fabs(z - q3);
    }
    err *= 0x1p-15;
  }
  *ps += std::ldexp((double)isum, -e - 15 * (L - 1));  // exact: |isum| < 2^52
  *es += std::ldexp(err, -e - 15) * (1.0 + 1e-12);
  return L;
}

}  // namespace

// Query n's limbs: limb 0 into Q0_ / Q08_ (row n), limbs 1..3 into hi (3 rows of dp_),
// sc[l] = limb l . center, *kexp the scale exponent; sets vsq_[n], nlimbs_, delta_base_,
// delta1_, delta2_.
void DensePass::split_query(int n, int forced, const int16_t* cint, int16_t* hi, int64_t* sc, int* kexp_out) {
  const double* vn = &v_[(size_t)n * d_];
  vsq_[n] = sumsq2(vn, d_);
  double amax = 0.0;
  for (int j = 0; j < d_; ++j) amax = std::max(amax, std::fabs(vn[j]));
  // limb 0 is int8 (|Q_0| <= 127: the coarse pass runs u8 x s8 on AVX-512), the others
  // int16 (|Q_l| <= 2^14, 15 bits each)
  int kexp = 0;
  if (amax > 0.0) {
    kexp = std::min(900, 6 - std::ilogb(amax));  // amax * 2^k in [64, 128)
    if (std::ldexp(amax, kexp) > 127.0) --kexp;
  }
  *kexp_out = kexp;
  int16_t* limb[4] = {&Q0_[(size_t)n * dp_], hi, hi + dp_, hi + 2 * (size_t)dp_};
  double enorm[4], anorm[4];
  quantize_limbs(vn, d_, kexp, limb, enorm, anorm);
  const int L = choose_limbs(n, forced, enorm, anorm);
  int8_t* q8 = &Q08_[(size_t)n * dp_];
  const int16_t* q0 = limb[0];
  const int d = d_;  // a local bound: stores through int8_t* may alias *this
  for (int j = 0; j < d; ++j) q8[j] = (int8_t)q0[j];
  // limb . center, exact: |limb| <= 2^14 and 0 <= cint <= 255, so a chunk of 2^8 products
  // sums to < 2^30 in int32 (which vectorizes; int64 products do not on the baseline)
  for (int l = 0; l < L; ++l) {
    int64_t s = 0;
    for (int j0 = 0; j0 < d_; j0 += 256) {
      const int j1 = std::min(d_, j0 + 256);
      int32_t c = 0;
      for (int j = j0; j < j1; ++j) c += (int32_t)limb[l][j] * (int32_t)cint[j];
      s += c;
    }
    sc[l] = s;
  }
}

// Query n's logit bound with its first L limbs: the float64 combination of the limbs'
// exact sums, the compensated ||v||^2, the two additions (vsq - 2 dot) + csq, and, with
// with_quant, the residual the limbs leave (2 ||e|| qmax); enorm, anorm: quantize_limbs'.
double DensePass::limb_bound(int n, int L, bool with_quant, const double* enorm, const double* anorm) const {
  const double c = coef_[n], q = qmax_, vs = vsq_[n];
  const double an = anorm[L - 1];
  double t = 2.0 * gamma(L - 1 > 0 ? L - 1 : 0) * an * q  // combining the limbs' sums
             + 2.0 * kU * vs                                  // compensated ||v||^2
             + 2.0 * kU * (1.0 + kU) * (vs + 2.0 * an * q + q * q);  // (vsq - 2 dot) + csq
  if (with_quant) t += 2.0 * enorm[L - 1] * q;
  return c * t * (1.0 + 1e-6);
}

// Query n's number of limbs: `forced`, or (0) the fewest whose bound meets target_ (or,
// when the rounding floor of 4 limbs is above it, max(floor, 1e-3), which suffices for
// the top-K certificate). Sets nlimbs_[n] and its bounds with L, 1 and 2 limbs.
int DensePass::choose_limbs(int n, int forced, const double* enorm, const double* anorm) {
  auto bound = [&](int L, bool with_quant) { return limb_bound(n, L, with_quant, enorm, anorm); };
  int L = forced;
  if (L == 0) {
    const double floor4 = bound(4, false);
    const double goal = floor4 <= target_ ? target_ : std::max(floor4, 1e-3);
    L = 4;
    for (int t = 1; t <= 4; ++t)
      if (bound(t, true) <= goal) {
        L = t;
        break;
      }
  }
  nlimbs_[n] = L;
  delta_base_[n] = bound(L, true);
  delta1_[n] = L > 1 ? bound(1, true) : delta_base_[n];
  delta2_[n] = L > 2 ? bound(2, true) : delta_base_[n];
  return L;
}

// Split each query into limbs: v_j ~ sum_l Q_lj 2^(-k-15l), |Q_0j| <= 127, |Q_lj| <= 2^14, the
// residual e = v - vq known exactly. Picks per query the fewest limbs (1..4) whose
// residual keeps delta <= target (or, when the rounding floor alone is above target,
// at most 1e-3, which suffices for the top-K certificate). Queries are split in
// parallel (at N = 64, d = 3072 the serial split took 10% of a pass).
void DensePass::prepare_limbs(int forced) {
  dp_ = (d_ + 63) / 64 * 64;
  std::vector<int16_t> cint(d_);
  for (int j = 0; j < d_; ++j) cint[j] = (int16_t)center_[j];
  nlimbs_.resize(N_);
  rstart_.resize(N_);
  delta_base_.resize(N_);
  delta1_.resize(N_);
  delta2_.resize(N_);
  Q0_.assign((size_t)N_ * dp_, 0);
  Q08_.assign((size_t)N_ * dp_, 0);
  Sc0_.resize(N_);
  pw0_.resize(N_);
  std::vector<int16_t> hi((size_t)N_ * 3 * dp_, 0);  // limbs 1..3 of each query
  std::vector<int64_t> sc((size_t)N_ * 4);           // limb . center
  std::vector<int> kx(N_);
#pragma omp parallel for schedule(dynamic, 1) if (N_ > 1)
  for (int n = 0; n < N_; ++n) split_query(n, forced, cint.data(), &hi[(size_t)n * 3 * dp_], &sc[(size_t)n * 4], &kx[n]);
  size_t rows_hi = 0;
  for (int n = 0; n < N_; ++n) rows_hi += (size_t)std::max(0, nlimbs_[n] - 1);
  Qr_.reserve(rows_hi * dp_);
  for (int n = 0; n < N_; ++n) {
    rstart_[n] = (int)pwr_.size();
    Sc0_[n] = sc[(size_t)n * 4];
    pw0_[n] = std::ldexp(1.0, -kx[n]);
    for (int l = 1; l < nlimbs_[n]; ++l) {
      const int16_t* src = &hi[((size_t)n * 3 + l - 1) * dp_];
      Qr_.insert(Qr_.end(), src, src + dp_);
      Scr_.push_back(sc[(size_t)n * 4 + l]);
      pwr_.push_back(std::ldexp(1.0, -kx[n] - 15 * l));
    }
  }
  Rr_ = (int)pwr_.size();
  q0p_.resize(N_);
  q08p_.resize(N_);
  for (int n = 0; n < N_; ++n) q0p_[n] = &Q0_[(size_t)n * dp_], q08p_[n] = &Q08_[(size_t)n * dp_];
  qrp_.resize(Rr_);
  for (int r = 0; r < Rr_; ++r) qrp_[r] = &Qr_[(size_t)r * dp_];
}

// One kernel call per row with the limbs [l0, lim(n, i)) of every query that `use`
// selects and that lists the row and needs them (the row's uint8 -> int16 conversion is
// shared by all of them), into Sr. The listed rows are bucketed by row first (a counting
// sort), so the work follows the refined pairs, not nb x N.
template <class Use, class Lim>
void DensePass::per_row_limbs(int l0, const uint8_t* Xsb, int nb, BlockBuffers& buf, Use&& use, Lim&& lim) const {
  int* rc = buf.rc.data();
  std::vector<int>& rq = buf.rq;
  std::vector<const int16_t*>& lp = buf.lp;
  std::vector<int64_t>& tmp = buf.tmp;
  std::fill(rc, rc + nb + 1, 0);
  for (int n = 0; n < N_; ++n) {
    if (!use(n)) continue;
    const int* ln = &buf.lst[(size_t)n * kSB];
    for (int t = 0; t < buf.cnt[n]; ++t) rc[ln[t] + 1] += lim(n, ln[t]) > l0;
  }
  for (int i = 0; i < nb; ++i) rc[i + 1] += rc[i];
  if (rc[nb] == 0) return;
  rq.resize(rc[nb]);
  for (int n = 0; n < N_; ++n) {  // ascending n within each row's bucket
    if (!use(n)) continue;
    const int* ln = &buf.lst[(size_t)n * kSB];
    for (int t = 0; t < buf.cnt[n]; ++t)
      if (lim(n, ln[t]) > l0) rq[rc[ln[t]]++] = n;
  }
  // rc[i] is now the end of row i's bucket (the start of row i + 1's)
  int64_t* Sr = buf.Sr.data();
  for (int i = 0, b = 0; i < nb; b = rc[i++]) {
    if (b == rc[i]) continue;
    lp.clear();
    for (int u = b; u < rc[i]; ++u)
      for (int l = l0, n = rq[u], e = lim(n, i); l < e; ++l) lp.push_back(qrp_[rstart_[n] + l]);
    tmp.resize(lp.size());
    kern_->dot_u8(lp.data(), (int)lp.size(), Xsb + (size_t)i * d_, 1, d_, tmp.data(), 1, nullptr, nullptr);
    size_t t = 0;
    for (int u = b; u < rc[i]; ++u)
      for (int l = l0, n = rq[u], e = lim(n, i); l < e; ++l) Sr[(size_t)(rstart_[n] + l) * kSB + i] = tmp[t++];
  }
}

// ---- int path, step 1: the logits of a sub-block (int_logits and its stages)
//
// Sub-block of nb rows Xsb (uint8, row stride d): coarse logits of every row from limb 0
// (buf.D), then the rows that can matter are refined with the other limbs (exact to
// delta_base): rows within kSkipT of the best logit seen (weight rows), and rows that
// could enter the top K (candidates). Per query n: lst[n * kSB + t], t < cnt[n], the
// refined rows (ascending) and P[n * kSB + i] their logits; the nskip[n] others (weight
// <= e^-kSkipT of the maximum each) are left out, skmax[n] the largest upper bound of
// their logits. With 3 or more limbs a candidate goes in two stages: limb 1 first, then
// the other limbs only if the tighter bound (delta2) still lets it into the top K; the
// others are left out like the rest. The work per query follows its QueryMode. The tiled
// kernels take lines off the prefetch cursor (buf.pf) as they go.
void DensePass::int_logits(const uint8_t* Xsb, const double* csq, int nb, ThreadState& st, BlockBuffers& buf) const {
  // one query whose last two sub-blocks were dense (large sigma: every row carries
  // weight; the first sub-block alone often is, before the running max settles) gets
  // every limb of every row in one pass; the decisions below are the same as without
  // (the same integers), only the limbs need not be computed again
  const bool all_limbs = N_ == 1 && nlimbs_[0] > 1 && st.dense_run >= 2;
  if (all_limbs)
    kern_->dot_fused1(q08p_[0], q0p_[0], &qrp_[rstart_[0]], nlimbs_[0] - 1, Xsb, nb, d_, buf.S0.data(),
                      buf.Sr.data() + (size_t)rstart_[0] * kSB, kSB, &buf.pf, buf.pfe);
  else
    kern_->dot_q0(q08p_.data(), q0p_.data(), N_, Xsb, nb, d_, buf.S0.data(), kSB, &buf.pf, buf.pfe);
  const Refinement need = classify_rows(csq, nb, st, buf);
  if (N_ == 1) st.dense_run = buf.mode[0] == kDense ? st.dense_run + 1 : 0;
  if (!all_limbs) {  // else every limb is in S0 and Sr already
    if (need.dense) dense_limbs(Xsb, nb, buf);
    if (need.dense_a) dense_first_limb(Xsb, nb, buf);
    const char* kind = buf.kind.data();
    // kSparse: every limb for weight rows, limb 1 for candidates
    if (need.sparse)
      per_row_limbs(
          0, Xsb, nb, buf, [&](int n) { return buf.mode[n] == kSparse; },
          [&](int n, int i) -> int {
            const char k = kind[(size_t)n * kSB + i];
            return k == kWeightRow ? nlimbs_[n] - 1 : k == kCandidate ? 1 : 0;
          });
  }
  // limbs 2.. of the candidates kept (and of kDenseA's weight rows)
  if (keep_candidates(csq, buf) && !all_limbs) {
    const char* kind = buf.kind.data();
    per_row_limbs(
        1, Xsb, nb, buf, [&](int n) { return buf.mode[n] == kSparse || buf.mode[n] == kDenseA; },
        [&](int n, int i) -> int { return kind[(size_t)n * kSB + i] == kCandidateKept ? nlimbs_[n] - 1 : 1; });
  }
  combine_limbs(csq, nb, buf);
}

// The coarse logits of every row and query (buf.D), and each query's mode, row list and
// rows left out, from classify (which decides weight rows, candidates and the rest on
// the coarse bound delta1).
DensePass::Refinement DensePass::classify_rows(const double* csq, int nb, const ThreadState& st, BlockBuffers& buf) const {
  Refinement need;
  for (int n = 0; n < N_; ++n) {
    double* Cn = &buf.D[(size_t)n * kSB];
    int* ln = &buf.lst[(size_t)n * kSB];
    const double cmax = coarse_logits(&buf.S0[(size_t)n * kSB], Sc0_[n], pw0_[n], coef_[n], vsq_[n], csq, nb, Cn);
    buf.mode[n] = kOneLimb;
    buf.hmin[n] = -std::numeric_limits<double>::infinity();
    buf.nskip[n] = 0;
    buf.skmax[n] = -std::numeric_limits<double>::infinity();
    const int L = nlimbs_[n];
    if (L > 1) {
      const double d1 = delta1_[n];
      const double thr = std::max(st.m[n], cmax - d1) - kSkipT;
      const bool hfull = st.top[n].size() >= K_;
      const double hmin = hfull ? st.top[n].front().first : -std::numeric_limits<double>::infinity();
      buf.hmin[n] = hmin;
      double sk;
      int cw;
      // a candidate with only two limbs gets its one refining limb at once, like a weight row
      const int c = kern_->classify(Cn, nb, d1, thr, hmin, L == 2 ? kWeightRow : kCandidate, ln,
                                    &buf.kind[(size_t)n * kSB], &cw, &sk);
      const bool few = 8 * c <= nb;
      if (few || (L > 2 && 8 * cw <= nb)) {
        buf.mode[n] = few ? kSparse : kDenseA;
        buf.nskip[n] = nb - c;
        buf.skmax[n] = sk;
        buf.cnt[n] = c;
        need.sparse = need.sparse || (few && c > 0);
        need.dense_a = need.dense_a || !few;
        continue;
      }
      buf.mode[n] = kDense;
      need.dense = true;
    }
    for (int i = 0; i < nb; ++i) ln[i] = i;  // every row (one limb, or a dense query)
    buf.cnt[n] = nb;
  }
  return need;
}

// kDense: every limb of every row into Sr, a run of consecutive queries (contiguous limb
// rows) per call; the next sub-block streams in along the way from the prefetch cursor
// (with more than 8 queries the coarse pass's later passes have mostly taken it already)
void DensePass::dense_limbs(const uint8_t* Xsb, int nb, BlockBuffers& buf) const {
  for (int n = 0; n < N_;) {
    if (buf.mode[n] != kDense) {
      ++n;
      continue;
    }
    int e = n;
    while (e < N_ && buf.mode[e] == kDense) ++e;
    const int ra = rstart_[n], rb = rstart_[e - 1] + nlimbs_[e - 1] - 1;
    kern_->dot_u8(&qrp_[ra], rb - ra, Xsb, nb, d_, &buf.Sr[(size_t)ra * kSB], kSB, &buf.pf, buf.pfe);
    n = e;
  }
}

// kDenseA: limb 1 of every row, tiled, into Sr
void DensePass::dense_first_limb(const uint8_t* Xsb, int nb, BlockBuffers& buf) const {
  std::vector<const int16_t*>& lp = buf.lp;
  lp.clear();
  for (int n = 0; n < N_; ++n)
    if (buf.mode[n] == kDenseA) lp.push_back(qrp_[rstart_[n]]);
  buf.tmp.resize(lp.size() * kSB);
  const int64_t* tmp = buf.tmp.data();
  kern_->dot_u8(lp.data(), (int)lp.size(), Xsb, nb, d_, buf.tmp.data(), kSB, &buf.pf, buf.pfe);
  for (int n = 0, a = 0; n < N_; ++n)
    if (buf.mode[n] == kDenseA) {
      std::copy(&tmp[(size_t)a * kSB], &tmp[(size_t)a * kSB] + nb, &buf.Sr[(size_t)rstart_[n] * kSB]);
      ++a;
    }
}

// The candidates' bounds from limbs 0 and 1 (delta2): those that can still enter the top
// K are kept (kCandidateKept, as are kDenseA's weight rows, which lack limbs 2..), the
// others left out and counted with the rows left out. Returns whether any row was kept.
bool DensePass::keep_candidates(const double* csq, BlockBuffers& buf) const {
  bool any_kept = false;
  const int64_t *S0 = buf.S0.data(), *Sr = buf.Sr.data();
  for (int n = 0; n < N_; ++n) {
    const char mode = buf.mode[n];
    if (!(mode == kDenseA || (mode == kSparse && nlimbs_[n] > 2))) continue;
    int* ln = &buf.lst[(size_t)n * kSB];
    char* kn = &buf.kind[(size_t)n * kSB];
    const int r1 = rstart_[n];
    int c = 0;
    for (int t = 0; t < buf.cnt[n]; ++t) {
      const int i = ln[t];
      if (kn[i] == kCandidate) {
        const double dot = (double)(Sr[(size_t)r1 * kSB + i] - Scr_[r1]) * pwr_[r1] +
                           (double)(S0[(size_t)n * kSB + i] - Sc0_[n]) * pw0_[n];
        const double ub2 = -coef_[n] * ((vsq_[n] - 2.0 * dot) + csq[i]) + delta2_[n];
        if (!(ub2 > buf.hmin[n])) {
          ++buf.nskip[n];
          buf.skmax[n] = std::max(buf.skmax[n], std::min(ub2, buf.D[(size_t)n * kSB + i] + delta1_[n]));
          kn[i] = kLeftOut;
          continue;
        }
        kn[i] = kCandidateKept;
      } else if (mode == kDenseA) {
        kn[i] = kCandidateKept;
      }
      any_kept = any_kept || kn[i] == kCandidateKept;
      ln[c++] = i;
    }
    buf.cnt[n] = c;
  }
  return any_kept;
}

// P[n * kSB + i], the logits of the listed rows from all their limbs (the coarse ones
// where the query has one limb): the limbs' exact sums combined in float64, smallest first
void DensePass::combine_limbs(const double* csq, int nb, BlockBuffers& buf) const {
  const int64_t *S0 = buf.S0.data(), *Sr = buf.Sr.data();
  for (int n = 0; n < N_; ++n) {
    const double* Cn = &buf.D[(size_t)n * kSB];
    double* Pn = &buf.P[(size_t)n * kSB];
    const int* ln = &buf.lst[(size_t)n * kSB];
    const int L = nlimbs_[n];
    if (L == 1) {
      std::copy(Cn, Cn + nb, Pn);
      continue;
    }
    for (int t = 0; t < buf.cnt[n]; ++t) {
      const int i = ln[t];
      double dot = 0.0;
      for (int l = L - 2; l >= 0; --l) {
        const int r = rstart_[n] + l;
        dot += (double)(Sr[(size_t)r * kSB + i] - Scr_[r]) * pwr_[r];
      }
      dot += (double)(S0[(size_t)n * kSB + i] - Sc0_[n]) * pw0_[n];
      Pn[i] = -coef_[n] * ((vsq_[n] - 2.0 * dot) + csq[i]);
    }
  }
}

// ---- int path, step 3: the weighted sum of the rows that carry weight
//
// Sub-block of nb rows Xsb: the weights quantized to two (or three) int16 limbs
// per query (quantize_weights), and the weighted sum of the raw rows done exactly in
// integers (wsum_kernels.h). The normaliser keeps the float64 weights (the log density
// and top weights stay exact to delta); es collects sum |p - p_hat|, the total variation
// this adds to the normalised weights of D*, added to delta at the end.
void DensePass::int_weighted_sum(const uint8_t* Xsb, int nb, ThreadState& st, BlockBuffers& buf) const {
  int na = 0;
  char* used = buf.used.data();
  std::fill(used, used + kSB, 0);
  for (int n = 0; n < N_; ++n) {
    const double* Pn = &buf.P[(size_t)n * kSB];
    const int* ln = &buf.lst[(size_t)n * kSB];
    double pm = 0.0;
    for (int t = 0; t < buf.cnt[n]; ++t) {
      const double p = Pn[ln[t]];
      pm = std::max(pm, p);
      used[ln[t]] |= (char)(p != 0.0);
    }
    if (pm > 0.0) buf.aq[na] = n, buf.pmax[na++] = pm;
  }
  if (na == 0) return;
  int nu = 0;
  for (int i = 0; i < nb; ++i)
    if (used[i]) buf.uni[nu++] = i;
  int R = 0;
  for (int a = 0; a < na; ++a) {
    const int n = buf.aq[a];
    const int e = 13 - std::ilogb(buf.pmax[a]);  // pmax >= 2^-80: no overflow
    const int L = quantize_weights(&buf.P[(size_t)n * kSB], buf.uni.data(), nu, e, &buf.W[(size_t)R * kSB],
                                   &st.ps[n], &st.es[n]);
    for (int l = 0; l < L; ++l) buf.wscale[R + l] = std::ldexp(1.0, -e - 15 * l), buf.wout[R + l] = n;
    R += L;
  }
  kern_->wsum_u8(buf.W.data(), R, kSB, buf.wscale.data(), buf.wout.data(), Xsb, d_, buf.uni.data(), nu, d_,
                 st.accr.data(), d_, buf.wscratch.data(), &buf.pf, buf.pfe);
}

}  // namespace optden
