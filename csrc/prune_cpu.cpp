// The exact re-score of pruned candidate sets (optden/prune/): for each query, the float64
// direct-difference logits of its candidate rows, read in place from the dataset's rows
// (a memory map or an array: only the rows named are touched), their softmax, log-sum-exp
// and weighted sum. This is what a certified pruned evaluation costs once FAISS has named
// the candidates, so it runs in C++ threads with the GIL released instead of a torch gather.
//
// Logits l_t = -coef ||v - (raw_t - center)||^2, float64 direct differences (the same
// arithmetic as optden.engine.precision.exact_logits: error <= gamma_{d+1} of the squared
// distance, far inside the certificate's margins).
//
// Also the three parts of the embedding index's search (optden/prune/embedding.py): the
// distance from each query to each leaf's box, histograms of lower bounds (shells), and the
// range scan of the probed leaves (float32 direct differences, leaf after leaf: measured,
// FAISS's IVF range search paid 50-300 ns per row here, most of it per list visited).
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace optden {
namespace {

enum class RowType { U8, F16, BF16, F32 };

RowType row_type(const std::string& s) {
  if (s == "uint8") return RowType::U8;
  if (s == "float16") return RowType::F16;
  if (s == "bfloat16") return RowType::BF16;
  if (s == "float32") return RowType::F32;
  throw std::invalid_argument("dtype: expected uint8, float16, bfloat16 or float32, got '" + s + "'");
}

size_t row_itemsize(RowType t) { return t == RowType::U8 ? 1 : t == RowType::F32 ? 4 : 2; }

// out[j] = row[j] - center[j] in float64: every stored value converts exactly, so the one
// rounding is the subtraction (none for uint8 rows and an integral center)
template <RowType T>
void center_row(const char* row, int64_t d, const double* center, double* out) {
  if constexpr (T == RowType::U8) {
    const uint8_t* x = reinterpret_cast<const uint8_t*>(row);
    for (int64_t j = 0; j < d; ++j) out[j] = (double)x[j] - center[j];
  } else if constexpr (T == RowType::F32) {
    const float* x = reinterpret_cast<const float*>(row);
    for (int64_t j = 0; j < d; ++j) out[j] = (double)x[j] - center[j];
  } else if constexpr (T == RowType::F16) {
    const _Float16* x = reinterpret_cast<const _Float16*>(row);
    for (int64_t j = 0; j < d; ++j) out[j] = (double)x[j] - center[j];
  } else {  // bfloat16 bits: the high half of a float32
    const uint16_t* x = reinterpret_cast<const uint16_t*>(row);
    for (int64_t j = 0; j < d; ++j) {
      const uint32_t b = (uint32_t)x[j] << 16;
      float f;
      std::memcpy(&f, &b, 4);
      out[j] = (double)f - center[j];
    }
  }
}

// ||v - r||^2 with eight partial sums (a vectorizable order; any order meets the bound)
double sq_dist(const double* v, const double* r, int64_t d) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t j = 0;
  for (; j + 8 <= d; j += 8)
    for (int t = 0; t < 8; ++t) {
      const double e = v[j + t] - r[j + t];
      acc[t] += e * e;
    }
  for (; j < d; ++j) {
    const double e = v[j] - r[j];
    acc[0] += e * e;
  }
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

// One query: exact logits of its candidates and their softmax in one sweep over the rows
// (an online softmax: the running maximum m, s = sum exp(l - m), acc = sum exp(l - m) r,
// rescaled when m grows), so no candidate row is read twice.
template <RowType T>
void softmax_one(const double* v, double coef, const char* rows, size_t row_bytes, const int64_t* idx, int64_t K,
                 int64_t d, const double* center, double* logits, double* lse, double* dc, std::vector<double>& buf) {
  buf.resize((size_t)d);
  double* r = buf.data();
  double m = -std::numeric_limits<double>::infinity(), s = 0.0;
  std::fill(dc, dc + d, 0.0);
  for (int64_t t = 0; t < K; ++t) {
    if (idx[t] < 0) {
      logits[t] = -std::numeric_limits<double>::infinity();
      continue;
    }
    center_row<T>(rows + (size_t)idx[t] * row_bytes, d, center, r);
    const double l = -coef * sq_dist(v, r, d);
    logits[t] = l;
    if (l > m) {  // rescale what was summed so far to the new maximum
      const double f = std::exp(m - l);
      s *= f;
      for (int64_t j = 0; j < d; ++j) dc[j] *= f;
      m = l;
    }
    const double w = std::exp(l - m);
    s += w;
    for (int64_t j = 0; j < d; ++j) dc[j] += w * r[j];
  }
  if (!(s > 0)) {
    *lse = -std::numeric_limits<double>::infinity();
    return;
  }
  const double inv = 1.0 / s;
  for (int64_t j = 0; j < d; ++j) dc[j] *= inv;
  *lse = m + std::log(s);
}

// f(std::integral_constant<RowType, T>) for the row type rt: one instantiation per storage type.
template <class F>
void with_row_type(RowType rt, F&& f) {
  switch (rt) {
    case RowType::U8: f(std::integral_constant<RowType, RowType::U8>()); break;
    case RowType::F16: f(std::integral_constant<RowType, RowType::F16>()); break;
    case RowType::BF16: f(std::integral_constant<RowType, RowType::BF16>()); break;
    case RowType::F32: f(std::integral_constant<RowType, RowType::F32>()); break;
  }
}

// The checks candidate_softmax and candidate_sqdist share: v (n, d), rows (M, d) of dtype
// rt, C-contiguous, idx (n, K) in -1..M-1, center (d,).
void check_candidates(const py::array_t<double, py::array::c_style | py::array::forcecast>& v, const py::array& rows,
                      const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& idx,
                      const py::array_t<double, py::array::c_style | py::array::forcecast>& center, RowType rt,
                      const std::string& dtype) {
  if (v.ndim() != 2) throw std::invalid_argument("v: expected a 2-D (n, d) float64 array");
  const int64_t n = v.shape(0), d = v.shape(1);
  if (rows.ndim() != 2 || rows.shape(1) != d) throw std::invalid_argument("rows: expected a 2-D (M, d) array with d = " + std::to_string(d));
  if (!(rows.flags() & py::array::c_style)) throw std::invalid_argument("rows: expected a C-contiguous array");
  if ((size_t)rows.itemsize() != row_itemsize(rt)) throw std::invalid_argument("rows: item size does not match dtype '" + dtype + "'");
  if (idx.ndim() != 2 || idx.shape(0) != n) throw std::invalid_argument("idx: expected shape (n, K) with n = " + std::to_string(n));
  if (center.ndim() != 1 || center.shape(0) != d) throw std::invalid_argument("center: expected shape (d,)");
  const int64_t K = idx.shape(1), M = rows.shape(0);
  const int64_t* ip = idx.data();
  for (int64_t t = 0; t < n * K; ++t)
    if (ip[t] >= M || ip[t] < -1)
      throw std::invalid_argument("idx: row " + std::to_string(ip[t]) + " out of range -1.." + std::to_string(M - 1));
}

// candidate_softmax: see the docstring at the registration below.
py::tuple candidate_softmax(py::array_t<double, py::array::c_style | py::array::forcecast> v,
                            py::array_t<double, py::array::c_style | py::array::forcecast> coef, py::array rows,
                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> idx,
                            py::array_t<double, py::array::c_style | py::array::forcecast> center,
                            const std::string& dtype) {
  const RowType rt = row_type(dtype);
  check_candidates(v, rows, idx, center, rt, dtype);
  const int64_t n = v.shape(0), d = v.shape(1), K = idx.shape(1);
  if (coef.ndim() != 1 || coef.shape(0) != n) throw std::invalid_argument("coef: expected shape (n,) = (" + std::to_string(n) + ",)");
  const int64_t* ip = idx.data();
  py::array_t<double> logits({(py::ssize_t)n, (py::ssize_t)K});
  py::array_t<double> lse({(py::ssize_t)n});
  py::array_t<double> dc({(py::ssize_t)n, (py::ssize_t)d});
  double *lp = logits.mutable_data(), *sp = lse.mutable_data(), *dp = dc.mutable_data();
  const double *vp = v.data(), *cp = coef.data(), *ctr = center.data();
  const char* base = static_cast<const char*>(rows.data());
  const size_t row_bytes = (size_t)d * row_itemsize(rt);
  {
    py::gil_scoped_release nogil;
#pragma omp parallel
    {
      std::vector<double> buf;
#pragma omp for schedule(dynamic, 1)
      for (int64_t q = 0; q < n; ++q) {
        auto run = [&](auto tag) {
          softmax_one<decltype(tag)::value>(vp + q * d, cp[q], base, row_bytes, ip + q * K, K, d, ctr, lp + q * K,
                                            sp + q, dp + q * d, buf);
        };
        with_row_type(rt, run);
      }
    }
  }
  return py::make_tuple(logits, lse, dc);
}

// candidate_sqdist: see the docstring at the registration below.
py::array_t<double> candidate_sqdist(py::array_t<double, py::array::c_style | py::array::forcecast> v, py::array rows,
                                     py::array_t<int64_t, py::array::c_style | py::array::forcecast> idx,
                                     py::array_t<double, py::array::c_style | py::array::forcecast> center,
                                     const std::string& dtype) {
  const RowType rt = row_type(dtype);
  check_candidates(v, rows, idx, center, rt, dtype);
  const int64_t n = v.shape(0), d = v.shape(1), K = idx.shape(1);
  const int64_t* ip = idx.data();
  py::array_t<double> out({(py::ssize_t)n, (py::ssize_t)K});
  double* op = out.mutable_data();
  const double *vp = v.data(), *ctr = center.data();
  const char* base = static_cast<const char*>(rows.data());
  const size_t row_bytes = (size_t)d * row_itemsize(rt);
  {
    py::gil_scoped_release nogil;
#pragma omp parallel
    {
      std::vector<double> buf((size_t)d);
#pragma omp for schedule(dynamic, 1)
      for (int64_t q = 0; q < n; ++q) {
        auto run = [&](auto tag) {
          for (int64_t t = 0; t < K; ++t) {
            const int64_t r = ip[q * K + t];
            if (r < 0) {
              op[q * K + t] = std::numeric_limits<double>::infinity();
              continue;
            }
            center_row<decltype(tag)::value>(base + (size_t)r * row_bytes, d, ctr, buf.data());
            op[q * K + t] = sq_dist(vp + q * d, buf.data(), d);
          }
        };
        with_row_type(rt, run);
      }
    }
  }
  return out;
}

// One query's bounds row (L,) over the boxes stored coordinate after coordinate (loT, hiT
// (t, L)): the loop over boxes runs in vector lanes (measured 5x faster than box after box
// on 18,750 boxes of t = 5), and the clones use AVX-512 where the machine has it (the
// extension builds for baseline x86-64): 90 -> 16 us per query for 8,192 boxes of t = 5.
__attribute__((target_clones("avx512f", "avx2", "default"))) void box_lower_row(
    const double* x, int64_t t, int64_t L, const double* __restrict loT, const double* __restrict hiT, double shq,
    double factor, double* __restrict row) {
  std::fill(row, row + L, 0.0);
  for (int64_t j = 0; j < t; ++j) {  // same sum order per box as before: j ascending
    const double xj = x[j];
    const double *__restrict a = loT + j * L, *__restrict b = hiT + j * L;
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const double below = a[l] - xj, above = xj - b[l];  // ternaries, not std::max: GCC vectorizes these
      const double g0 = below > above ? below : above;
      const double g = g0 > 0.0 ? g0 : 0.0;
      row[l] += g * g;
    }
  }
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) row[l] = std::max(0.0, std::sqrt(row[l]) - shq) * factor;
}

// box_lower: see the docstring at the registration below.
py::tuple box_lower(py::array_t<double, py::array::c_style | py::array::forcecast> e,
                    py::array_t<double, py::array::c_style | py::array::forcecast> lo,
                    py::array_t<double, py::array::c_style | py::array::forcecast> hi, int64_t nearest,
                    py::array_t<double, py::array::c_style | py::array::forcecast> shift, double factor) {
  if (e.ndim() != 2) throw std::invalid_argument("e: expected a 2-D (n, t) float64 array");
  const int64_t n = e.shape(0), t = e.shape(1);
  if (lo.ndim() != 2 || lo.shape(1) != t) throw std::invalid_argument("lo: expected a 2-D (L, t) array with t = " + std::to_string(t));
  if (hi.ndim() != 2 || hi.shape(0) != lo.shape(0) || hi.shape(1) != t) throw std::invalid_argument("hi: expected the shape of lo");
  const int64_t L = lo.shape(0);
  if (nearest < 1 || nearest > L) throw std::invalid_argument("nearest: expected 1.." + std::to_string(L));
  if (shift.ndim() != 1 || shift.shape(0) != n) throw std::invalid_argument("shift: expected shape (n,)");
  if (!(factor > 0)) throw std::invalid_argument("factor: expected > 0");
  const double* sh = shift.data();
  py::array_t<double> out({(py::ssize_t)n, (py::ssize_t)L});
  py::array_t<int64_t> near({(py::ssize_t)n, (py::ssize_t)nearest});
  double* o = out.mutable_data();
  int64_t* np_ = near.mutable_data();
  const double *ep = e.data(), *lp = lo.data(), *hp = hi.data();
  {
    py::gil_scoped_release nogil;
    // the corners coordinate after coordinate (t, L): the loop over boxes then runs in
    // vector lanes (measured 5x faster than box after box on 18,750 boxes of t = 5)
    std::vector<double> loT((size_t)(t * L)), hiT((size_t)(t * L));
    for (int64_t l = 0; l < L; ++l)
      for (int64_t j = 0; j < t; ++j) {
        loT[(size_t)(j * L + l)] = lp[l * t + j];
        hiT[(size_t)(j * L + l)] = hp[l * t + j];
      }
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < n; ++q) {
      double* row = o + q * L;
      box_lower_row(ep + q * t, t, L, loT.data(), hiT.data(), sh[q], factor, row);
      // the `nearest` smallest, ascending (insertion into a short sorted array)
      std::vector<double> bv(nearest, std::numeric_limits<double>::infinity());
      std::vector<int64_t> bi(nearest, -1);
      for (int64_t l = 0; l < L; ++l) {
        if (row[l] < bv[nearest - 1]) {
          int64_t p = nearest - 1;
          while (p > 0 && bv[p - 1] > row[l]) {
            bv[p] = bv[p - 1];
            bi[p] = bi[p - 1];
            --p;
          }
          bv[p] = row[l];
          bi[p] = l;
        }
      }
      for (int64_t j = 0; j < nearest; ++j) np_[q * nearest + j] = bi[j];
    }
  }
  return py::make_tuple(out, near);
}

// shell_histogram: see the docstring at the registration below.
py::tuple shell_histogram(py::array_t<double, py::array::c_style | py::array::forcecast> low,
                          py::array_t<double, py::array::c_style | py::array::forcecast> count,
                          py::array_t<double, py::array::c_style | py::array::forcecast> ref2,
                          py::array_t<double, py::array::c_style | py::array::forcecast> coef, double width,
                          int64_t bins) {
  if (low.ndim() != 2) throw std::invalid_argument("low: expected a 2-D (n, X) float64 array");
  const int64_t n = low.shape(0), X = low.shape(1);
  const bool shared = count.ndim() == 1;
  if (!(shared ? count.shape(0) == X : (count.ndim() == 2 && count.shape(0) == n && count.shape(1) == X)))
    throw std::invalid_argument("count: expected shape (X,) or (n, X) with (n, X) the shape of low");
  if (ref2.ndim() != 1 || ref2.shape(0) != n || coef.ndim() != 1 || coef.shape(0) != n)
    throw std::invalid_argument("ref2, coef: expected shape (n,)");
  if (!(width > 0)) throw std::invalid_argument("width: expected > 0");
  if (bins < 1 || bins > 255) throw std::invalid_argument("bins: expected 1..255");
  py::array_t<uint8_t> bin({(py::ssize_t)n, (py::ssize_t)X});
  py::array_t<double> counts({(py::ssize_t)n, (py::ssize_t)bins});
  py::array_t<double> lower({(py::ssize_t)n, (py::ssize_t)bins});
  const double *lp = low.data(), *cp = count.data(), *rp = ref2.data(), *fp = coef.data();
  uint8_t* bp = bin.mutable_data();
  double *co = counts.mutable_data(), *lo = lower.mutable_data();
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < n; ++q) {
      double* c = co + q * bins;
      double* m = lo + q * bins;
      std::fill(c, c + bins, 0.0);
      std::fill(m, m + bins, std::numeric_limits<double>::infinity());
      const double inv = fp[q] / width;
      for (int64_t x = 0; x < X; ++x) {
        const double w = shared ? cp[x] : cp[q * X + x];
        const double l = lp[q * X + x];
        if (!(w > 0) || !std::isfinite(l)) {
          bp[q * X + x] = 255;  // no rows, or no bound: in no bin
          continue;
        }
        const double tb = (l * l - rp[q]) * inv;  // t / width
        const int64_t b = !(tb > 0) ? 0 : tb >= (double)(bins - 1) ? bins - 1 : (int64_t)tb;
        bp[q * X + x] = (uint8_t)b;
        c[b] += w;
        m[b] = std::min(m[b], l);
      }
    }
  }
  return py::make_tuple(bin, counts, lower);
}

// Squared distances of one leaf's float32 rows from the query, direct differences, stopping
// early once the leading kLead coordinates alone reach r2: every partial sum of squares is
// a lower bound of the full one, and the caller's bound (any order, n terms) covers it.
//
// A leaf's rows are stored split (EmbeddingIndex's layout, version 3): first the leading
// kLead coordinates of all its rows, coordinate after coordinate (lead x rows: rows summed
// in vector lanes), then the other coordinates of all its rows, row after row (rows x (dim -
// lead)), read only for the rows that pass the leading ones. Measured on 1.2M rows of 49
// float32: with the leading block row after row (one horizontal sum and one branch per
// row) 2,000 memorization queries spent 0.93 s in their scans, 0.78 s with this block; a
// layout of whole leaves coordinate after coordinate (groups of rows go on while any of
// them may be near) cost mean shift 30% (9.5 -> 12.2 s: its radii let many rows pass 8
// coordinates).
constexpr int64_t kLead = 8;
constexpr int64_t kGroup = 64;  // rows summed together before the survivors are finished

__attribute__((target_clones("avx512f", "avx2", "default"))) void scan_leaf(
    const float* __restrict q, const float* __restrict block, const int64_t* id, int64_t rows, int64_t dim, float r2,
    std::vector<float>& D, std::vector<int64_t>& I) {
  const int64_t lead = std::min(kLead, dim), rest = dim - lead;
  const float* __restrict head = block;               // lead x rows
  const float* __restrict tail = block + rows * lead;  // rows x rest
  for (int64_t r0 = 0; r0 < rows; r0 += kGroup) {
    const int64_t m = std::min(kGroup, rows - r0);
    float s[kGroup];
    for (int64_t i = 0; i < kGroup; ++i) s[i] = 0.0f;
    for (int64_t j = 0; j < lead; ++j) {
      const float qj = q[j];
      const float* __restrict col = head + j * rows + r0;
#pragma omp simd
      for (int64_t i = 0; i < m; ++i) {
        const float e = qj - col[i];
        s[i] += e * e;
      }
    }
    for (int64_t i = 0; i < m; ++i) {
      if (s[i] >= r2) continue;
      // coordinate j of the row (j >= lead) is z[j - lead]
      const float* z = tail + (r0 + i) * rest - lead;
      float acc[8] = {s[i], 0, 0, 0, 0, 0, 0, 0};
      int64_t j = lead;
      for (; j + 8 <= dim; j += 8)
        for (int t = 0; t < 8; ++t) {
          const float e = q[j + t] - z[j + t];
          acc[t] += e * e;
        }
      for (; j < dim; ++j) {
        const float e = q[j] - z[j];
        acc[j & 7] += e * e;
      }
      const float full = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
      if (full < r2) {
        D.push_back(full);
        I.push_back(id[r0 + i]);
      }
    }
  }
}

// The histogram bin of a lower bound l, t = coef (l^2 - ref2) in steps of width (as
// optden.prune.embedding.histogram_shells): clamped to 0 .. bins - 1.
inline int64_t shell_bin(double l, double ref2, double inv_width_coef, int64_t bins) {
  const double tb = (l * l - ref2) * inv_width_coef;
  return !(tb > 0) ? 0 : tb >= (double)(bins - 1) ? bins - 1 : (int64_t)tb;
}

// The checks leaf_scan and leaf_scan_grouped share: q (n, dim), r2 (n,), emb (M, dim),
// starts (L + 1,) from 0 to M, ids (M,). Returns L.
int64_t check_leaves(const py::array_t<float, py::array::c_style | py::array::forcecast>& q,
                     const py::array_t<float, py::array::c_style | py::array::forcecast>& r2,
                     const py::array_t<float, py::array::c_style>& emb,
                     const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& starts,
                     const py::array_t<int64_t, py::array::c_style | py::array::forcecast>& ids) {
  if (q.ndim() != 2) throw std::invalid_argument("q: expected a 2-D (n, dim) float32 array");
  const int64_t n = q.shape(0), dim = q.shape(1);
  if (r2.ndim() != 1 || r2.shape(0) != n) throw std::invalid_argument("r2: expected shape (n,)");
  if (emb.ndim() != 2 || emb.shape(1) != dim) throw std::invalid_argument("emb: expected a 2-D (M, dim) float32 array");
  const int64_t M = emb.shape(0), L = starts.shape(0) - 1;
  if (starts.ndim() != 1 || L < 1) throw std::invalid_argument("starts: expected shape (L + 1,)");
  if (ids.ndim() != 1 || ids.shape(0) != M) throw std::invalid_argument("ids: expected shape (M,)");
  if (starts.data()[0] != 0 || starts.data()[L] != M) throw std::invalid_argument("starts: expected 0 .. M");
  return L;
}

// leaf_scan: see the docstring at the registration below.
py::tuple leaf_scan(py::array_t<float, py::array::c_style | py::array::forcecast> q,
                    py::array_t<int64_t, py::array::c_style | py::array::forcecast> lists,
                    py::array_t<float, py::array::c_style | py::array::forcecast> r2,
                    py::array_t<float, py::array::c_style> emb,
                    py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts,
                    py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids,
                    py::array_t<double, py::array::c_style | py::array::forcecast> shift, double s2, double margin,
                    double factor, py::array_t<double, py::array::c_style | py::array::forcecast> ref2,
                    py::array_t<double, py::array::c_style | py::array::forcecast> coef, double width, int64_t bins) {
  const int64_t L = check_leaves(q, r2, emb, starts, ids);
  const int64_t n = q.shape(0), dim = q.shape(1);
  if (lists.ndim() != 2 || lists.shape(0) != n) throw std::invalid_argument("lists: expected shape (n, P)");
  const int64_t P = lists.shape(1);
  for (auto* a : {&shift, &ref2, &coef})
    if (a->ndim() != 1 || a->shape(0) != n) throw std::invalid_argument("shift, ref2, coef: expected shape (n,)");
  if (bins < 0 || bins > 255) throw std::invalid_argument("bins: expected 0..255");
  if (bins > 0 && !(width > 0)) throw std::invalid_argument("width: expected > 0");
  const int64_t *lp = lists.data(), *sp = starts.data(), *ip = ids.data();
  for (int64_t t = 0; t < n * P; ++t)
    if (lp[t] >= L || lp[t] < -1) throw std::invalid_argument("lists: leaf " + std::to_string(lp[t]) + " out of range -1.." + std::to_string(L - 1));
  const float *qp = q.data(), *rp = r2.data(), *ep = emb.data();
  const double *shp = shift.data(), *rfp = ref2.data(), *cfp = coef.data();
  std::vector<std::vector<float>> D(n);
  std::vector<std::vector<int64_t>> I(n);
  std::vector<std::vector<uint8_t>> B(n);
  py::array_t<double> counts({(py::ssize_t)n, (py::ssize_t)std::max<int64_t>(bins, 1)});
  py::array_t<double> lower({(py::ssize_t)n, (py::ssize_t)std::max<int64_t>(bins, 1)});
  double *co = counts.mutable_data(), *lo = lower.mutable_data();
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t p = 0; p < P; ++p) {
        const int64_t l = lp[i * P + p];
        if (l < 0) continue;
        scan_leaf(qp + i * dim, ep + sp[l] * dim, ip + sp[l], sp[l + 1] - sp[l], dim, rp[i], D[i], I[i]);
      }
      if (bins == 0) continue;
      // each returned row's lower bound on its true distance (bounds.scan_lower_terms and
      // embedding_lower_terms), its bin, and the query's histogram
      double* c = co + i * bins;
      double* m = lo + i * bins;
      std::fill(c, c + bins, 0.0);
      std::fill(m, m + bins, std::numeric_limits<double>::infinity());
      const double inv = cfp[i] / width;
      B[i].resize(D[i].size());
      for (size_t r = 0; r < D[i].size(); ++r) {
        const double low1 = std::max(0.0, std::sqrt(std::max(0.0, (double)D[i][r] * s2)) * margin);
        const double lb = std::max(0.0, low1 - shp[i]) * factor;
        const int64_t b = shell_bin(lb, rfp[i], inv, bins);
        B[i][r] = (uint8_t)b;
        c[b] += 1.0;
        m[b] = std::min(m[b], lb);
      }
    }
  }
  py::array_t<int64_t> lims({(py::ssize_t)(n + 1)});
  int64_t* lm = lims.mutable_data();
  lm[0] = 0;
  for (int64_t i = 0; i < n; ++i) lm[i + 1] = lm[i] + (int64_t)D[i].size();
  py::array_t<float> Dout({(py::ssize_t)lm[n]});
  py::array_t<int64_t> Iout({(py::ssize_t)lm[n]});
  py::array_t<uint8_t> Bout({(py::ssize_t)(bins > 0 ? lm[n] : 0)});
  for (int64_t i = 0; i < n; ++i) {
    std::copy(D[i].begin(), D[i].end(), Dout.mutable_data() + lm[i]);
    std::copy(I[i].begin(), I[i].end(), Iout.mutable_data() + lm[i]);
    if (bins > 0) std::copy(B[i].begin(), B[i].end(), Bout.mutable_data() + lm[i]);
  }
  return py::make_tuple(lims, Dout, Iout, Bout, counts, lower);
}

// leaf_scan_grouped: see the docstring at the registration below.
py::tuple leaf_scan_grouped(py::array_t<float, py::array::c_style | py::array::forcecast> q,
                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> qlims,
                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> qleaves,
                            py::array_t<float, py::array::c_style | py::array::forcecast> r2,
                            py::array_t<float, py::array::c_style> emb,
                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> starts,
                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> ids) {
  const int64_t L = check_leaves(q, r2, emb, starts, ids);
  const int64_t n = q.shape(0), dim = q.shape(1);
  if (qlims.ndim() != 1 || qlims.shape(0) != n + 1) throw std::invalid_argument("qlims: expected shape (n + 1,)");
  if (qleaves.ndim() != 1) throw std::invalid_argument("qleaves: expected a 1-D array");
  const int64_t nnz = qleaves.shape(0);
  const int64_t *ql = qlims.data(), *lv = qleaves.data(), *sp = starts.data(), *ip = ids.data();
  if (ql[0] != 0 || ql[n] != nnz) throw std::invalid_argument("qlims: expected 0 .. len(qleaves)");
  for (int64_t i = 0; i < n; ++i)
    if (ql[i + 1] < ql[i]) throw std::invalid_argument("qlims: expected non-decreasing");
  for (int64_t t = 0; t < nnz; ++t)
    if (lv[t] >= L || lv[t] < 0) throw std::invalid_argument("qleaves: leaf " + std::to_string(lv[t]) + " out of range 0.." + std::to_string(L - 1));
  const float *qp = q.data(), *rp = r2.data(), *ep = emb.data();
  // the queries of each leaf (an inverted list, queries ascending)
  std::vector<int64_t> llims(L + 1, 0), lq(nnz);
  for (int64_t t = 0; t < nnz; ++t) ++llims[lv[t] + 1];
  for (int64_t l = 0; l < L; ++l) llims[l + 1] += llims[l];
  {
    std::vector<int64_t> fill(llims.begin(), llims.end() - 1);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t t = ql[i]; t < ql[i + 1]; ++t) lq[fill[lv[t]]++] = i;
  }
  const int threads = omp_get_max_threads();
  std::vector<std::vector<float>> Dt(threads);
  std::vector<std::vector<int64_t>> It(threads), Qt(threads);
  {
    py::gil_scoped_release nogil;
#pragma omp parallel
    {
      const int me = omp_get_thread_num();
      std::vector<float>& D = Dt[me];
      std::vector<int64_t>&I = It[me], &Q = Qt[me];
#pragma omp for schedule(dynamic, 8)
      for (int64_t l = 0; l < L; ++l) {
        const float* block = ep + sp[l] * dim;  // leaf l: in cache for all its queries
        for (int64_t t = llims[l]; t < llims[l + 1]; ++t) {
          const int64_t i = lq[t];
          scan_leaf(qp + i * dim, block, ip + sp[l], sp[l + 1] - sp[l], dim, rp[i], D, I);
          Q.resize(D.size(), i);  // the rows just returned are query i's
        }
      }
    }
  }
  // per query, its rows in ascending row number (an order independent of the threads')
  py::array_t<int64_t> lims({(py::ssize_t)(n + 1)});
  int64_t* lm = lims.mutable_data();
  std::fill(lm, lm + n + 1, 0);
  for (int th = 0; th < threads; ++th)
    for (int64_t i : Qt[th]) ++lm[i + 1];
  for (int64_t i = 0; i < n; ++i) lm[i + 1] += lm[i];
  const int64_t total = lm[n];
  py::array_t<float> Dout({(py::ssize_t)total});
  py::array_t<int64_t> Iout({(py::ssize_t)total});
  float* dp = Dout.mutable_data();
  int64_t* op = Iout.mutable_data();
  {
    py::gil_scoped_release nogil;
    std::vector<int64_t> fill(lm, lm + n);
    for (int th = 0; th < threads; ++th)
      for (size_t r = 0; r < Qt[th].size(); ++r) {
        const int64_t at = fill[Qt[th][r]]++;
        dp[at] = Dt[th][r];
        op[at] = It[th][r];
      }
#pragma omp parallel
    {
      std::vector<std::pair<int64_t, float>> buf;
#pragma omp for schedule(dynamic, 16)
      for (int64_t i = 0; i < n; ++i) {
        buf.clear();
        for (int64_t at = lm[i]; at < lm[i + 1]; ++at) buf.emplace_back(op[at], dp[at]);
        std::sort(buf.begin(), buf.end());
        for (size_t r = 0; r < buf.size(); ++r) {
          op[lm[i] + (int64_t)r] = buf[r].first;
          dp[lm[i] + (int64_t)r] = buf[r].second;
        }
      }
    }
  }
  return py::make_tuple(lims, Dout, Iout);
}

}  // namespace

void register_prune(py::module_& m) {
  m.def("candidate_softmax", &candidate_softmax, py::arg("v"), py::arg("coef"), py::arg("rows"), py::arg("idx"),
        py::arg("center"), py::arg("dtype"),
        "Exact softmax over each query's candidate rows. v (n, d) float64 centered queries, coef (n,), rows (M, d) "
        "in dtype (bfloat16 as uint16 bits; a memory map is read in place), idx (n, K) int64 row numbers (-1: none), "
        "center (d,). Returns (logits (n, K) float64 -coef ||v - (rows[idx] - center)||^2 by direct differences, "
        "-inf where idx is -1; lse (n,) their log-sum-exp; dc (n, d) the softmax-weighted mean of the centered rows).");
  m.def("candidate_sqdist", &candidate_sqdist, py::arg("v"), py::arg("rows"), py::arg("idx"), py::arg("center"),
        py::arg("dtype"),
        "Exact squared distances of each query's candidate rows (the logits of candidate_softmax at coef 1, the same "
        "arithmetic, without the softmax): v (n, d) float64 centered queries, rows (M, d) in dtype, idx (n, K) int64 "
        "(-1: none), center (d,). Returns (n, K) float64 ||v - (rows[idx] - center)||^2, inf where idx is -1.");
  m.def("box_lower", &box_lower, py::arg("e"), py::arg("lo"), py::arg("hi"), py::arg("nearest"), py::arg("shift"),
        py::arg("factor"),
        "Lower bounds from each point to each box: e (n, t) float64 points, lo / hi (L, t) the boxes' corners. With "
        "b = sqrt(sum_j max(0, lo_j - e_j, e_j - hi_j)^2) (float64, relative error <= (t + 3) 2^-53), returns "
        "(low (n, L) = max(0, b - shift[i]) * factor, near (n, nearest) int64 the boxes of smallest low, ascending).");
  m.def("leaf_scan", &leaf_scan, py::arg("q"), py::arg("lists"), py::arg("r2"), py::arg("emb"), py::arg("starts"),
        py::arg("ids"), py::arg("shift"), py::arg("s2"), py::arg("margin"), py::arg("factor"), py::arg("ref2"),
        py::arg("coef"), py::arg("width"), py::arg("bins"),
        "Range scan of leaves: rows of emb (M, dim) float32 stored leaf after leaf (leaf l = rows starts[l] .. "
        "starts[l + 1]), each leaf split: its rows' first min(8, dim) coordinates, coordinate after coordinate, then "
        "their others, row after row (the memory of rows starts[l] .. starts[l + 1] of emb holds the two blocks), ids "
        "(M,) their row numbers. For query i (q (n, dim) float32) and each leaf of lists[i] "
        "(-1: none), every row whose squared distance, float32 direct differences, is < r2[i]; a row not returned "
        "has a computed sum of squares (of all its coordinates, or of its first 8) >= r2[i]. With bins > 0 each "
        "returned row gets the lower bound lb = max(0, sqrt(max(0, D s2)) margin - shift[i]) factor and the bin of "
        "t = coef[i] (lb^2 - ref2[i]) in steps of width (0 .. bins - 1). Returns (lims (n + 1,), D (nnz,) float32, "
        "I (nnz,) int64, bin (nnz,) uint8, counts (n, bins), lower (n, bins) the smallest lb per bin), query i's "
        "rows at lims[i] .. lims[i + 1].");
  m.def("leaf_scan_grouped", &leaf_scan_grouped, py::arg("q"), py::arg("qlims"), py::arg("qleaves"), py::arg("r2"),
        py::arg("emb"), py::arg("starts"), py::arg("ids"),
        "leaf_scan's range scan for many queries that share leaves, run leaf after leaf (each leaf read from memory "
        "once for all the queries that name it, not once per query): query i (q (n, dim) float32) scans the leaves "
        "qleaves[qlims[i] .. qlims[i + 1]] (0 .. L - 1) of emb / starts / ids (as leaf_scan) with radius r2[i]. "
        "Returns (lims (n + 1,), D (nnz,) float32, I (nnz,) int64): query i's rows at lims[i] .. lims[i + 1], by row "
        "number, every row whose squared distance is < r2[i] (a row not returned has a computed partial sum of "
        "squares >= r2[i]).");
  m.def("shell_histogram", &shell_histogram, py::arg("low"), py::arg("count"), py::arg("ref2"), py::arg("coef"),
        py::arg("width"), py::arg("bins"),
        "Histogram of groups of rows by t = coef (low^2 - ref2): low (n, X) lower bounds on their distance, count "
        "(X,) or (n, X) rows per group, ref2 / coef (n,). Bin b = floor(t / width) clamped to 0..bins-1. Returns "
        "(bin (n, X) uint8, 255 for groups with no rows or an infinite bound; counts (n, bins) rows per bin; lower "
        "(n, bins) the smallest low in each bin, inf where empty).");
}

}  // namespace optden
