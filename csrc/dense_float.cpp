// The float path of the CPU dense pass (fp16 / bf16 / fp32 rows, or uint8 with a
// non-integral center; see dense_pass.h): float64 dots of the queries with rows centered
// in float64, read a chunk of columns at a time, and their float64 weighted sum.
#include "dense_pass.h"

namespace optden {
namespace {

// The float path reads rows a chunk of columns at a time, a group of short streams at
// once, which the hardware prefetcher does not follow: for the row at position t of the
// list (row rows[t], or t when rows is null, of the rows from x0, rb bytes each), the
// chunk [j0, j0 + w) of the row kCenterAhead on (past the last, the first rows' next
// chunk, up to column d) is asked for in software.
__attribute__((always_inline)) inline void prefetch_ahead(const char* x0, size_t rb, size_t isz, const int* rows,
                                                          int nr, int t, int j0, int w, int d) {
  constexpr int kCenterAhead = 8;
  const int tp = t + kCenterAhead < nr ? t + kCenterAhead : t + kCenterAhead - nr;
  if (tp >= nr) return;
  const bool next = t + kCenterAhead >= nr;
  const char* xp = x0 + (size_t)(rows ? rows[tp] : tp) * rb;
  for (size_t o = (size_t)(next ? j0 + w : j0) * isz, e = (size_t)(next ? std::min(d, j0 + 2 * w) : j0 + w) * isz;
       o < e; o += 64)
    __builtin_prefetch(xp + o);
}

}  // namespace

// ---- float path: the queries' ||v||^2 (compensated) and logit bounds delta_base
void DensePass::prepare_float() {
#pragma omp parallel for schedule(static) if (N_ > 4)
  for (int n = 0; n < N_; ++n) vsq_[n] = sumsq2(&v_[(size_t)n * d_], d_);
  delta_base_.resize(N_);
  delta1_.assign(N_, 0.0);
  delta2_.assign(N_, 0.0);
  nlimbs_.assign(N_, 0);
  for (int n = 0; n < N_; ++n) {
    const double c = coef_[n], q = qmax_, vs = vsq_[n];
    const double vn = std::sqrt(vs) * (1.0 + 4.0 * kU);
    // + gamma_{d+2} qmax^2: the float64 norms ||q_i||^2 of float rows carry their own rounding
    const double t = 2.0 * gamma(d_ + 2) * vn * q + gamma(d_ + 2) * q * q + 2.0 * kU * vs +
                     2.0 * kU * (1.0 + kU) * (vs + 2.0 * vn * q + q * q);
    delta_base_[n] = c * t * (1.0 + 1e-6);
  }
}

// Rows row0 + rows[t] (t < nr; rows null: t itself), columns [j0, j0 + w), centered into
// XC + rows[t] * w.
void DensePass::center_chunk(const void* X, int64_t row0, const int* rows, int nr, int j0, int w, double* XC) const {
  const size_t isz = itemsize(dtype_), rb = (size_t)d_ * isz;
  const char* x0 = static_cast<const char*>(X) + (size_t)row0 * rb;
  for (int t = 0; t < nr; ++t) {
    prefetch_ahead(x0, rb, isz, rows, nr, t, j0, w, d_);
    const int i = rows ? rows[t] : t;
    kern_->center_row((int)dtype_, x0 + (size_t)i * rb + (size_t)j0 * isz, w, &center_[j0], XC + (size_t)i * w);
  }
}

// D[n, t] += v_n[j0, j0 + w) . (rows row0 + t - center)[j0, j0 + w) for t < nr, n < N,
// the rows centered in registers (dot_raw), two at a time
void DensePass::dot_chunk_raw(const void* X, int64_t row0, int nr, int j0, int w, double* D) const {
  const size_t isz = itemsize(dtype_), rb = (size_t)d_ * isz;
  const char* x0 = static_cast<const char*>(X) + (size_t)row0 * rb;
  for (int t = 0; t < nr; t += 2) {
    prefetch_ahead(x0, rb, isz, nullptr, nr, t, j0, w, d_);
    if (t + 1 < nr) prefetch_ahead(x0, rb, isz, nullptr, nr, t + 1, j0, w, d_);
    kern_->dot_raw((int)dtype_, v_.data() + j0, N_, d_, x0 + (size_t)t * rb + (size_t)j0 * isz, rb,
                   std::min(2, nr - t), w, &center_[j0], D + t, kSB);
  }
}

// Sub-block of nb rows from row r0 of X: P[n * kSB + i] for every row (lst: all of them),
// by float64 dots D. `group` rows at a time, each read along its length chunk by chunk
// (a few long streams, not nb short ones); D[n, i] adds its chunks in the same order
// either way.
void DensePass::float_logits(const void* X, const double* csq, int64_t r0, int nb, BlockBuffers& buf) const {
  double* D = buf.D.data();
  std::fill(buf.D.begin(), buf.D.end(), 0.0);
  const int group = row_group();
  for (int g0 = 0; g0 < nb; g0 += group) {
    const int gn = std::min(group, nb - g0);
    for (int j0 = 0; j0 < d_; j0 += kJC) {
      const int w = std::min(kJC, d_ - j0);
      if (N_ <= 4) {  // few queries: no copy
        dot_chunk_raw(X, r0 + g0, gn, j0, w, D + g0);
        continue;
      }
      center_chunk(X, r0 + g0, nullptr, gn, j0, w, buf.XC.data());
      kern_->dot_f64(v_.data() + j0, N_, d_, buf.XC.data(), gn, w, D + g0, kSB);
    }
  }
  double* P = buf.P.data();
  int* lst = buf.lst.data();
  for (int n = 0; n < N_; ++n) {
    for (int i = 0; i < nb; ++i) {
      P[(size_t)n * kSB + i] = -coef_[n] * ((vsq_[n] - 2.0 * D[(size_t)n * kSB + i]) + csq[r0 + i]);
      lst[(size_t)n * kSB + i] = i;
    }
    buf.cnt[n] = nb;
    buf.nskip[n] = 0;
  }
}

// Float path: per tile of 4 queries the rows any of them weighs (buf.rows, buf.nrows),
// and their union buf.uni; returns its size.
int DensePass::float_row_lists(int nb, BlockBuffers& buf) const {
  const double* P = buf.P.data();
  int* rows = buf.rows.data();
  const int ntiles = (N_ + 3) / 4;
  for (int n0 = 0, tile = 0; n0 < N_; n0 += 4, ++tile) {
    const int nt = std::min(4, N_ - n0);
    int* lst = &rows[(size_t)tile * kSB];
    int nr = 0;
    for (int i = 0; i < nb; ++i) {
      bool any = false;
      for (int t = 0; t < nt; ++t) any = any || P[(size_t)(n0 + t) * kSB + i] != 0.0;
      if (any) lst[nr++] = i;
    }
    buf.nrows[tile] = nr;
  }
  char* used = buf.used.data();
  std::fill(used, used + kSB, 0);
  for (int tile = 0; tile < ntiles; ++tile)
    for (int t = 0; t < buf.nrows[tile]; ++t) used[rows[(size_t)tile * kSB + t]] = 1;
  int nu = 0;
  for (int i = 0; i < nb; ++i)
    if (used[i]) buf.uni[nu++] = i;
  return nu;
}

// Float path, sub-block of nb rows from row r0 of X: the weighted sum of the rows that
// carry weight, queries in tiles of 4, in groups of rows as the logits. Each column chunk
// of the rows any tile needs is centered once (into XC; N <= 4: in registers). Each tile
// adds its rows of a group [tb, te) in list order, so every A[n, j] sums its rows in the
// same order whatever the grouping.
void DensePass::float_weighted_sum(const void* X, int64_t r0, int nb, ThreadState& st, BlockBuffers& buf) const {
  const int nu = float_row_lists(nb, buf);
  if (nu == 0) return;
  const int ntiles = (N_ + 3) / 4, group = row_group();
  const int *rows = buf.rows.data(), *nrows = buf.nrows.data(), *uni = buf.uni.data();
  std::fill(buf.tb.begin(), buf.tb.end(), 0);
  const size_t isz = itemsize(dtype_), rb = (size_t)d_ * isz;
  const char* x0 = static_cast<const char*>(X) + (size_t)r0 * rb;
  for (int g0 = 0; g0 < nu; g0 += group) {
    int *tb = buf.tb.data(), *te = buf.te.data();
    const int gn = std::min(group, nu - g0), last = uni[g0 + gn - 1];
    for (int tile = 0; tile < ntiles; ++tile) {
      te[tile] = tb[tile];
      while (te[tile] < nrows[tile] && rows[(size_t)tile * kSB + te[tile]] <= last) ++te[tile];
    }
    for (int j0 = 0; j0 < d_; j0 += kJC) {
      const int w = std::min(kJC, d_ - j0);
      if (N_ <= 4) {  // one tile: the rows centered in registers, no copy
        for (int t = 0; t < gn; ++t) prefetch_ahead(x0, rb, isz, uni + g0, gn, t, j0, w, d_);
        if (te[0] > tb[0])
          kern_->acc_raw((int)dtype_, buf.P.data(), N_, kSB, x0 + (size_t)j0 * isz, rb, &rows[tb[0]], te[0] - tb[0], w,
                         &center_[j0], st.acc.data() + j0, d_);
        continue;
      }
      center_chunk(X, r0, uni + g0, gn, j0, w, buf.XC.data());
      for (int n0 = 0, tile = 0; n0 < N_; n0 += 4, ++tile) {
        if (te[tile] == tb[tile]) continue;
        kern_->acc_f64(buf.P.data() + (size_t)n0 * kSB, std::min(4, N_ - n0), kSB, buf.XC.data(), w,
                       st.acc.data() + (size_t)n0 * d_ + j0, d_, &rows[(size_t)tile * kSB + tb[tile]],
                       te[tile] - tb[tile], 4);
      }
    }
    std::swap(buf.tb, buf.te);
  }
}

}  // namespace optden
