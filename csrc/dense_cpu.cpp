// The CPU dense pass of the optimal denoiser: one fused pass over blocks of rows that
// computes coarse logits, an online softmax, the weighted sum and the top-K logits, with
// a rigorous per-query bound `delta` on the logit error (see optden/backends/cpu.py for
// the derivation).
//
// Logits: l_i = -coef ||v - q_i||^2 = -coef ((||v||^2 - 2 v.q_i) + ||q_i||^2), with v the
// centered query (float64) and q_i = raw_i - center the centered row.
//
// uint8 rows with an integral center ("int" path): v is split into fixed-point limbs
// v ~ sum_l 2^(-k-15l) Q_l (Q_0 int8, the others int16), and each Q_l . raw_i is computed
// exactly in integers (vpdpbusd for Q_0, vpdpwssd / vpmaddwd, int32 lanes flushed to
// int64), so the dot product's only error is the known query residual e = v - vq:
// |e.q_i| <= ||e|| max||q||. Limb 0 alone gives every row a coarse logit with a bound
// delta_1; only the rows that can matter (within kSkipT of the best logit, or candidates
// for the top K) get the other limbs. The rest are left out, and the bound on their
// total weight is added to delta.
// Other rows ("float" path: fp16, bf16, fp32, or a non-integral center): float64 dot
// products of v with rows centered in float64, error <= gamma_{d+1} ||v|| max||q||.
//
// Work is split over sub-blocks of rows (OpenMP, static: each thread takes every T-th, so
// results are the same on every run); each thread keeps its own
// (max, sumexp, weighted sum, top-K) and the threads are merged by log-sum-exp.
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu_dispatch.h"

namespace py = pybind11;

namespace optden {
namespace {

constexpr double kU = 1.1102230246251565e-16;  // unit roundoff of float64, 2^-53

// the storage types, numbered as the kernels take them (cpu_dispatch.h)
enum class DType { U8, F16, BF16, F32 };

DType parse_dtype(const std::string& s) {
  if (s == "uint8") return DType::U8;
  if (s == "float16") return DType::F16;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float32") return DType::F32;
  throw std::invalid_argument("dtype: expected uint8, float16, bfloat16 or float32, got '" + s + "'");
}

size_t itemsize(DType t) { return t == DType::U8 ? 1 : t == DType::F32 ? 4 : 2; }

// Whether x[0..n) are all finite. A double is NaN or inf when its exponent bits are all
// ones, and exactly then does (bits & exponent mask) + 2^52 reach bit 63; an OR of those
// sums vectorizes, unlike a loop of std::isfinite that stops at the first bad value.
bool all_finite(const double* x, size_t n) {
  constexpr uint64_t kExp = 0x7ff0000000000000ull, kOne = 0x0010000000000000ull;
  uint64_t acc = 0;
  for (size_t j = 0; j < n; ++j) {
    uint64_t b;
    std::memcpy(&b, x + j, sizeof b);
    acc |= (b & kExp) + kOne;
  }
  return (acc >> 63) == 0;
}

// Compensated sum of squares (Ogita, Rump, Oishi Dot2): error <= u|s| + gamma_n^2 s.
// A clone with the FMA instruction is picked at load time where the CPU has it (the
// baseline calls libm's fma); both round the same, fma being exact.
__attribute__((target_clones("fma", "default"))) double sumsq2(const double* x, int n) {
  double s = 0.0, c = 0.0;
  for (int j = 0; j < n; ++j) {
    const double p = x[j] * x[j];
    const double pe = std::fma(x[j], x[j], -p);
    const double t = s + p;
    const double z = t - s;
    c += ((s - (t - z)) + (p - z)) + pe;
    s = t;
  }
  return s + c;
}

double gamma(double n) { return n * kU / (1.0 - n * kU); }

// nearbyint (round to nearest, ties to even) for |x| < 2^51: x + 1.5 * 2^52 lies where the
// spacing of doubles is 1, so the addition rounds x; unlike a call to nearbyint on the
// baseline target, this vectorizes
inline double round_even(double x) {
  constexpr double kMagic = 6755399441055744.0;
  return (x + kMagic) - kMagic;
}

constexpr int kSB = 128;  // rows per sub-block (one unit of parallel work)
// A row whose coarse logit bound is this far below the best logit seen is left out of the
// refinement and of the sums: weight <= e^-40 (4e-18) of the maximum; the pass adds the
// exact bound of these rows' total weight to delta, so the choice only affects speed.
constexpr double kSkipT = 40.0;
// Relative weight error of a query's quantized weights in one sub-block above which a
// third int16 limb is used (the default tolerance needs delta <= 2.5e-7 in all).
constexpr double kWeightTarget = 5e-8;
constexpr int kJC = 240;  // columns per chunk of the float64 buffers (a multiple of 3 * 8 * 2)
constexpr int kRowGroup = 16;  // float path, N <= 16: rows read together (see row_group)

using TopHeap = std::vector<std::pair<double, int64_t>>;  // min-heap of the K best

inline void heap_push(TopHeap& h, size_t K, double val, int64_t idx) {
  auto gt = [](const std::pair<double, int64_t>& a, const std::pair<double, int64_t>& b) { return a.first > b.first; };
  if (h.size() < K) {
    h.emplace_back(val, idx);
    std::push_heap(h.begin(), h.end(), gt);
  } else if (val > h.front().first) {
    std::pop_heap(h.begin(), h.end(), gt);
    h.back() = {val, idx};
    std::push_heap(h.begin(), h.end(), gt);
  }
}

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

struct ThreadState {
  // m running max, s normaliser, xs bound on the weight left out, es weight error of the
  // quantized weights (int path), acc centered weighted sum (float path), accr raw weighted
  // sum and ps the sum of its weights (int path); all but m relative to exp(m)
  std::vector<double> m, s, xs, es, ps, acc, accr;
  int64_t refined = 0;
  int dense_run = 0;  // one query: how many sub-blocks in a row needed every limb of every row
  std::vector<TopHeap> top;

  // Empty sums for N queries of width d. The float path sums centered rows into acc, the
  // int path raw rows into accr (centered once, when the threads are merged).
  void start(int N, int d, bool int_path) {
    m.assign(N, -std::numeric_limits<double>::infinity());
    s.assign(N, 0.0);
    xs.assign(N, 0.0);
    es.assign(N, 0.0);
    ps.assign(N, 0.0);
    (int_path ? accr : acc).assign((size_t)N * d, 0.0);
    top.assign(N, TopHeap());
  }
};

// How the int path refines one query's rows in a sub-block (int_logits): kOne, a single
// limb (the coarse logits are exact to delta); kSparse, few rows, one kernel call per row;
// kDenseA, many top-K candidates but few weight rows: limb 1 of every row by the tiled
// kernel, then the rows that stay one by one; kDense, every limb of every row, tiled.
enum QueryMode : char { kOne, kSparse, kDenseA, kDense };
// The role of row i for query n (kind[n * kSB + i], modes kSparse and kDenseA): left out,
// a weight row (within kSkipT of the best logit: every limb), a top-K candidate with limb
// 1 to come, or a candidate whose bound from limbs 0 and 1 kept it in (every limb).
enum RowKind : char { kLeftOut = 0, kWeightRow = 1, kCandidate = 2, kCandidateKept = 3 };

// One thread's buffers for the sub-blocks it runs, sized once per update() call. Per
// query n, row i < kSB of the current sub-block, at [n * kSB + i]:
struct BlockBuffers {
  BlockBuffers(int N, int Rr, bool int_path, int ws_elems)
      : S0(int_path ? (size_t)N * kSB : 0),
        Sr(int_path ? (size_t)Rr * kSB : 0),
        D((size_t)N * kSB),
        P((size_t)N * kSB),
        XC(int_path ? 0 : (size_t)kSB * kJC),
        kind((size_t)N * kSB, kLeftOut),
        lst((size_t)N * kSB),
        cnt(N),
        nskip(N),
        skmax(N),
        Dl(kSB),
        mode(N),
        hmin(N),
        rc(kSB + 1),
        W(int_path ? (size_t)3 * N * kSB : 0),
        wscratch(ws_elems),
        wscale(3 * N),
        pmax(N),
        wout(3 * N),
        aq(N),
        rows((size_t)(N + 3) / 4 * kSB),
        nrows((N + 3) / 4),
        uni(kSB),
        tb((N + 3) / 4),
        te((N + 3) / 4),
        used(kSB) {}
  // logits: S0 limb 0's exact dots (int path), Sr limbs 1..'s (row r of Qr_ at [r * kSB + i]);
  // D the coarse logits (int path) or the float64 dots (float path); P the logits of the
  // listed rows, then their weights exp(l - m) (0 for the rows not listed)
  std::vector<int64_t> S0, Sr;
  std::vector<double> D, P, XC;  // XC: float path, a column chunk of rows centered in float64
  std::vector<char> kind;        // RowKind
  // lst[n * kSB + t], t < cnt[n]: the listed rows, ascending; nskip[n] rows left out, skmax[n]
  // the largest upper bound of their logits; Dl the listed logits gathered (softmax_block)
  std::vector<int> lst, cnt, nskip;
  std::vector<double> skmax, Dl;
  // int_logits: each query's mode, the smallest of its top K (-inf while the heap is not
  // full), and the work lists of the per-row refinement (per_row_limbs)
  std::vector<char> mode;
  std::vector<double> hmin;
  std::vector<const int16_t*> lp;
  std::vector<int64_t> tmp;
  std::vector<int> rc, rq;
  // int path weighted sum: W the quantized weights (up to 3 limb rows per query) and each
  // row's scale and output query, wsum_u8's scratch, the queries with weight and their max
  std::vector<int16_t> W, wscratch;
  std::vector<double> wscale, pmax;
  std::vector<int> wout, aq;
  // float path weighted sum: per tile of 4 queries the rows any of them weighs (rows,
  // nrows), their union (uni; also the int path's), and the part of each tile's list in
  // the current group of rows [tb, te)
  std::vector<int> rows, nrows, uni, tb, te;
  std::vector<char> used;
  // prefetch cursor over this thread's next sub-block (int path): the kernels that compute
  // on rows already in cache (refinement, weighted sum) take lines off its front, so memory
  // keeps streaming between the coarse passes
  const uint8_t *pf = nullptr, *pfe = nullptr;
};

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

class DensePass {
 public:
  DensePass(py::array_t<double, py::array::c_style | py::array::forcecast> v,
            py::array_t<double, py::array::c_style | py::array::forcecast> coef,
            py::array_t<double, py::array::c_style | py::array::forcecast> center, double max_cnorm, int64_t k,
            const std::string& dtype, const std::string& path, double target_delta, int limbs)
      : kern_(&pick_kernels(path)), dtype_(parse_dtype(dtype)), target_(target_delta) {
    if (v.ndim() != 2) throw std::invalid_argument("v: expected a 2-D (N, d) float64 array");
    N_ = (int)v.shape(0);
    d_ = (int)v.shape(1);
    if (N_ < 1 || d_ < 1) throw std::invalid_argument("v: expected N >= 1 queries of width d >= 1");
    if (coef.ndim() != 1 || coef.shape(0) != N_) throw std::invalid_argument("coef: expected shape (N,) = (" + std::to_string(N_) + ",)");
    if (center.ndim() != 1 || center.shape(0) != d_) throw std::invalid_argument("center: expected shape (d,) = (" + std::to_string(d_) + ",)");
    if (k < 1) throw std::invalid_argument("k: expected k >= 1");
    if (!(max_cnorm >= 0.0) || !std::isfinite(max_cnorm)) throw std::invalid_argument("max_cnorm: expected a finite number >= 0");
    if (limbs < 0 || limbs > 4) throw std::invalid_argument("limbs: expected 0 (automatic) or 1..4");
    K_ = (size_t)k;
    v_.assign(v.data(), v.data() + (size_t)N_ * d_);
    coef_.assign(coef.data(), coef.data() + N_);
    for (double c : coef_)
      if (!(c > 0.0) || !std::isfinite(c)) throw std::invalid_argument("coef: expected finite positive values");
    if (!all_finite(v_.data(), v_.size())) throw std::invalid_argument("v: contains NaN or inf");
    center_.assign(center.data(), center.data() + d_);
    qmax_ = max_cnorm * (1.0 + 1e-9);
    bool integral = dtype_ == DType::U8;
    for (double c : center_) integral = integral && std::fabs(c) <= 255.0 && c == round_even(c);  // NaN fails the first test
    int_path_ = integral;
    vsq_.resize(N_);
    if (int_path_) prepare_limbs(limbs);  // computes vsq_ with the limbs
    else prepare_float();
    m_.assign(N_, -std::numeric_limits<double>::infinity());
    s_.assign(N_, 0.0);
    xs_.assign(N_, 0.0);
    es_.assign(N_, 0.0);
    acc_.assign((size_t)N_ * d_, 0.0);
    top_.assign(N_, TopHeap());
  }

  // Add rows raw (B, d) whose positions in the row source start at `offset`.
  void update(py::array raw, py::array_t<double, py::array::c_style | py::array::forcecast> csq, int64_t offset) {
    if (finished_) throw std::runtime_error("DensePass: update() after finish()");
    if (raw.ndim() != 2 || raw.shape(1) != d_)
      throw std::invalid_argument("raw: expected a 2-D (B, " + std::to_string(d_) + ") array");
    if (!(raw.flags() & py::array::c_style)) throw std::invalid_argument("raw: expected a C-contiguous array");
    if ((size_t)raw.itemsize() != itemsize(dtype_))
      throw std::invalid_argument("raw: item size " + std::to_string(raw.itemsize()) + " does not match the dtype of this pass");
    const int64_t B = raw.shape(0);
    if (csq.ndim() != 1 || csq.shape(0) != B) throw std::invalid_argument("csq: expected shape (B,) = (" + std::to_string(B) + ",)");
    if (B == 0) return;
    const void* base = raw.data();
    const double* cs = csq.data();
    {
      py::gil_scoped_release nogil;
      run_block(base, cs, B, offset);
    }
  }

  // (m (N,), s (N,), acc (N, d) centered, top_val (N, K) descending, top_idx (N, K), delta (N,))
  py::tuple finish() {
    finished_ = true;
    py::array_t<double> m(N_), s(N_), acc({(py::ssize_t)N_, (py::ssize_t)d_}), delta(N_);
    const size_t K = K_;
    py::array_t<double> tv({(py::ssize_t)N_, (py::ssize_t)K});
    py::array_t<int64_t> ti({(py::ssize_t)N_, (py::ssize_t)K});
    double* tvp = tv.mutable_data();
    int64_t* tip = ti.mutable_data();
    for (int n = 0; n < N_; ++n) {
      TopHeap h = top_[n];
      std::sort(h.begin(), h.end(), [](const auto& a, const auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
      for (size_t t = 0; t < K; ++t) {
        tvp[n * K + t] = t < h.size() ? h[t].first : -std::numeric_limits<double>::infinity();
        tip[n * K + t] = t < h.size() ? h[t].second : 0;
      }
      const double top0 = h.empty() ? 0.0 : std::fabs(h[0].first);
      // rows left out and weights quantized (int path): relative weight <= (xs + es) / s,
      // folded into delta (a relative perturbation eps of the weights is covered by
      // delta + eps; see cpu.py)
      const double left_out = s_[n] > 0.0 ? 1.01 * (xs_[n] + es_[n]) / s_[n] : 0.0;
      delta.mutable_data()[n] = delta_base_[n] + 4.0 * kU * top0 + left_out;
    }
    std::memcpy(m.mutable_data(), m_.data(), N_ * sizeof(double));
    std::memcpy(s.mutable_data(), s_.data(), N_ * sizeof(double));
    std::memcpy(acc.mutable_data(), acc_.data(), acc_.size() * sizeof(double));
    return py::make_tuple(m, s, acc, tv, ti, delta);
  }

  std::string path() const { return kern_->name; }
  std::string arith() const { return int_path_ ? "int-limbs" : "float64"; }
  std::vector<int> limbs() const { return nlimbs_; }
  // fraction of (query, row) pairs whose logits were computed exactly to delta (the rest
  // were left out after the coarse limb showed them negligible)
  double refined() const { return pairs_ ? (double)refined_ / (double)pairs_ : 1.0; }

 private:
  // Query n's limbs: limb 0 into Q0_ / Q08_ (row n), limbs 1..3 into hi (3 rows of dp_),
  // sc[l] = limb l . center, *kexp the scale exponent; sets vsq_[n], nlimbs_, delta_base_,
  // delta1_, delta2_.
  void split_query(int n, int forced, const int16_t* cint, int16_t* hi, int64_t* sc, int* kexp_out) {
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
  double limb_bound(int n, int L, bool with_quant, const double* enorm, const double* anorm) const {
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
  int choose_limbs(int n, int forced, const double* enorm, const double* anorm) {
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
  void prepare_limbs(int forced) {
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

  void prepare_float() {
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

  // The float path reads rows a chunk of columns at a time, a group of short streams at
  // once, which the hardware prefetcher does not follow: for the row at position t of the
  // list, the chunk of the row kCenterAhead on (past the last, the first rows' next chunk)
  // is asked for in software.
  __attribute__((always_inline)) void prefetch_ahead(const char* x0, size_t rb, size_t isz, const int* rows, int nr,
                                                      int t, int j0, int w) const {
    constexpr int kCenterAhead = 8;
    const int tp = t + kCenterAhead < nr ? t + kCenterAhead : t + kCenterAhead - nr;
    if (tp >= nr) return;
    const bool next = t + kCenterAhead >= nr;
    const char* xp = x0 + (size_t)(rows ? rows[tp] : tp) * rb;
    for (size_t o = (size_t)(next ? j0 + w : j0) * isz, e = (size_t)(next ? std::min(d_, j0 + 2 * w) : j0 + w) * isz;
         o < e; o += 64)
      __builtin_prefetch(xp + o);
  }

  // Rows row0 + rows[t] (t < nr; rows null: t itself), columns [j0, j0 + w), centered into
  // XC + rows[t] * w.
  void center_chunk(const void* X, int64_t row0, const int* rows, int nr, int j0, int w, double* XC) const {
    const size_t isz = itemsize(dtype_), rb = (size_t)d_ * isz;
    const char* x0 = static_cast<const char*>(X) + (size_t)row0 * rb;
    for (int t = 0; t < nr; ++t) {
      prefetch_ahead(x0, rb, isz, rows, nr, t, j0, w);
      const int i = rows ? rows[t] : t;
      kern_->center_row((int)dtype_, x0 + (size_t)i * rb + (size_t)j0 * isz, w, &center_[j0], XC + (size_t)i * w);
    }
  }

  // D[n, t] += v_n[j0, j0 + w) . (rows row0 + t - center)[j0, j0 + w) for t < nr, n < N,
  // the rows centered in registers (dot_raw), two at a time
  void dot_chunk_raw(const void* X, int64_t row0, int nr, int j0, int w, double* D) const {
    const size_t isz = itemsize(dtype_), rb = (size_t)d_ * isz;
    const char* x0 = static_cast<const char*>(X) + (size_t)row0 * rb;
    for (int t = 0; t < nr; t += 2) {
      prefetch_ahead(x0, rb, isz, nullptr, nr, t, j0, w);
      if (t + 1 < nr) prefetch_ahead(x0, rb, isz, nullptr, nr, t + 1, j0, w);
      kern_->dot_raw((int)dtype_, v_.data() + j0, N_, d_, x0 + (size_t)t * rb + (size_t)j0 * isz, rb,
                     std::min(2, nr - t), w, &center_[j0], D + t, kSB);
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
  void int_logits(const uint8_t* Xsb, const double* csq, int nb, ThreadState& st, BlockBuffers& buf) const {
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

  // which refinements int_logits' stages have to run
  struct Refinement {
    bool sparse = false, dense_a = false, dense = false;
  };

  // The coarse logits of every row and query (buf.D), and each query's mode, row list and
  // rows left out, from classify (which decides weight rows, candidates and the rest on
  // the coarse bound delta1).
  Refinement classify_rows(const double* csq, int nb, const ThreadState& st, BlockBuffers& buf) const {
    Refinement need;
    for (int n = 0; n < N_; ++n) {
      double* Cn = &buf.D[(size_t)n * kSB];
      int* ln = &buf.lst[(size_t)n * kSB];
      const double cmax = coarse_logits(&buf.S0[(size_t)n * kSB], Sc0_[n], pw0_[n], coef_[n], vsq_[n], csq, nb, Cn);
      buf.mode[n] = kOne;
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
  void dense_limbs(const uint8_t* Xsb, int nb, BlockBuffers& buf) const {
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
  void dense_first_limb(const uint8_t* Xsb, int nb, BlockBuffers& buf) const {
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

  // One kernel call per row with the limbs [l0, lim(n, i)) of every query that `use`
  // selects and that lists the row and needs them (the row's uint8 -> int16 conversion is
  // shared by all of them), into Sr. The listed rows are bucketed by row first (a counting
  // sort), so the work follows the refined pairs, not nb x N.
  template <class Use, class Lim>
  void per_row_limbs(int l0, const uint8_t* Xsb, int nb, BlockBuffers& buf, Use&& use, Lim&& lim) const {
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

  // The candidates' bounds from limbs 0 and 1 (delta2): those that can still enter the top
  // K are kept (kCandidateKept, as are kDenseA's weight rows, which lack limbs 2..), the
  // others left out and counted with the rows left out. Returns whether any row was kept.
  bool keep_candidates(const double* csq, BlockBuffers& buf) const {
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
  void combine_limbs(const double* csq, int nb, BlockBuffers& buf) const {
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

  // ---- float path, step 1: every row's logit
  // float path: rows per group (the logits, the weighted sum). Short groups keep the rows
  // few long streams (fp32, N = 1: 1.6x); with many queries the arithmetic bounds the pass,
  // and one group of the whole sub-block is slightly faster.
  int row_group() const { return N_ <= 16 ? kRowGroup : kSB; }

  // Sub-block of nb rows from row r0 of X: P[n * kSB + i] for every row (lst: all of them),
  // by float64 dots D. `group` rows at a time, each read along its length chunk by chunk
  // (a few long streams, not nb short ones); D[n, i] adds its chunks in the same order
  // either way.
  void float_logits(const void* X, const double* csq, int64_t r0, int nb, BlockBuffers& buf) const {
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

  // ---- step 2, both paths: online softmax, top-K, the bound on the rows left out, for the
  // listed rows of a sub-block of nb rows at source positions row0 + i. P becomes the
  // weights exp(l - m) of the listed rows, 0 elsewhere.
  void softmax_block(int nb, int64_t row0, ThreadState& st, BlockBuffers& buf) const {
    double* Dl = buf.Dl.data();
    for (int n = 0; n < N_; ++n) {
      double* Pn = &buf.P[(size_t)n * kSB];
      const int* ln = &buf.lst[(size_t)n * kSB];
      const int c = buf.cnt[n];
      double bm = -std::numeric_limits<double>::infinity();
      for (int t = 0; t < c; ++t) bm = std::max(bm, Pn[ln[t]]);
      st.refined += c;
      if (bm > st.m[n]) {
        if (std::isfinite(st.m[n])) {
          const double a = std::exp(st.m[n] - bm);
          st.s[n] *= a;
          st.xs[n] *= a;
          st.es[n] *= a;
          st.ps[n] *= a;
          double* An = int_path_ ? &st.accr[(size_t)n * d_] : &st.acc[(size_t)n * d_];
          for (int j = 0; j < d_; ++j) An[j] *= a;
        }
        st.m[n] = bm;
      }
      const double mn = st.m[n];
      double sum = 0.0, dropped = 0.0;
      if (c < nb) {  // gather the listed logits so the rest of P can be zeroed
        for (int t = 0; t < c; ++t) Dl[t] = Pn[ln[t]];
        std::fill(Pn, Pn + nb, 0.0);
      }
      for (int t = 0; t < c; ++t) {
        const int i = ln[t];
        const double l = c < nb ? Dl[t] : Pn[i];
        heap_push(st.top[n], K_, l, row0 + i);
        const double p = std::exp(l - mn);
        sum += p;
        // weights below 2^-80 of the running max are left out of the weighted sum
        // (float path: they stay in the normaliser, at most M 2^-80 relative; int path:
        // counted in the weight error es)
        if (p >= 0x1p-80) {
          Pn[i] = p;
        } else {
          Pn[i] = 0.0;
          dropped += p;
        }
      }
      st.s[n] += sum;
      if (int_path_) st.es[n] += dropped;  // missing from the int path's weighted sum
      if (buf.nskip[n]) st.xs[n] += buf.nskip[n] * std::exp(buf.skmax[n] - mn);
    }
  }

  // ---- step 3: the weighted sum of the rows that carry weight
  //
  // Int path, sub-block of nb rows Xsb: the weights quantized to two (or three) int16 limbs
  // per query (quantize_weights), and the weighted sum of the raw rows done exactly in
  // integers (wsum_kernels.h). The normaliser keeps the float64 weights (the log density
  // and top weights stay exact to delta); es collects sum |p - p_hat|, the total variation
  // this adds to the normalised weights of D*, added to delta at the end.
  void int_weighted_sum(const uint8_t* Xsb, int nb, ThreadState& st, BlockBuffers& buf) const {
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

  // Float path: per tile of 4 queries the rows any of them weighs (buf.rows, buf.nrows),
  // and their union buf.uni; returns its size.
  int float_row_lists(int nb, BlockBuffers& buf) const {
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
  void float_weighted_sum(const void* X, int64_t r0, int nb, ThreadState& st, BlockBuffers& buf) const {
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
          for (int t = 0; t < gn; ++t) prefetch_ahead(x0, rb, isz, uni + g0, gn, t, j0, w);
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

  // ---- one update(): its B rows in sub-blocks of kSB, in OpenMP threads
  void run_block(const void* X, const double* csq, int64_t B, int64_t offset) {
    const int nsb = (int)((B + kSB - 1) / kSB);
    const int T = std::max(1, std::min(omp_get_max_threads(), nsb));
    std::vector<ThreadState> ts(T);
#pragma omp parallel num_threads(T)
    {
      const int nthr = omp_get_num_threads();
      ThreadState& st = ts[omp_get_thread_num()];
      st.start(N_, d_, int_path_);
      BlockBuffers buf(N_, Rr_, int_path_, int_path_ ? kern_->ws_scratch(d_) : 0);
      // static: which thread sees which sub-blocks, and so its running max, its skip
      // decisions and its weights' quantization, is the same on every run (bit-identical
      // results for the same inputs and thread count)
#pragma omp for schedule(static, 1)
      for (int sb = 0; sb < nsb; ++sb) {
        const int64_t r0 = (int64_t)sb * kSB;
        const int nb = (int)std::min<int64_t>(kSB, B - r0);
        if (int_path_) {
          const uint8_t* Xsb = static_cast<const uint8_t*>(X) + (size_t)r0 * d_;
          const int64_t rn = r0 + (int64_t)nthr * kSB;  // this thread's next sub-block (static, 1)
          buf.pf = rn < B ? static_cast<const uint8_t*>(X) + (size_t)rn * d_ : nullptr;
          buf.pfe = rn < B ? buf.pf + (size_t)std::min<int64_t>(kSB, B - rn) * d_ : nullptr;
          int_logits(Xsb, csq + r0, nb, st, buf);
          softmax_block(nb, offset + r0, st, buf);
          int_weighted_sum(Xsb, nb, st, buf);
        } else {
          float_logits(X, csq, r0, nb, buf);
          softmax_block(nb, offset + r0, st, buf);
          float_weighted_sum(X, r0, nb, st, buf);
        }
      }
    }
    pairs_ += (int64_t)N_ * B;
    merge_threads(ts);
  }

  // The threads' states into the pass state, by log-sum-exp. A runtime may give the region
  // fewer threads than asked: their states stay empty.
  void merge_threads(std::vector<ThreadState>& ts) {
    ts.erase(std::remove_if(ts.begin(), ts.end(), [](const ThreadState& st) { return st.m.empty(); }), ts.end());
    for (auto& st : ts) refined_ += st.refined;
    for (int n = 0; n < N_; ++n) {
      double mm = m_[n];
      for (auto& st : ts) mm = std::max(mm, st.m[n]);
      if (!std::isfinite(mm)) continue;
      const double a0 = s_[n] > 0.0 ? std::exp(m_[n] - mm) : 0.0;
      s_[n] *= a0;
      xs_[n] *= a0;
      es_[n] *= a0;
      double* An = &acc_[(size_t)n * d_];
      for (int j = 0; j < d_; ++j) An[j] *= a0;
      for (auto& st : ts) {
        if (!(st.s[n] > 0.0)) continue;
        const double a = std::exp(st.m[n] - mm);
        s_[n] += st.s[n] * a;
        xs_[n] += st.xs[n] * a;
        es_[n] += st.es[n] * a;
        if (int_path_) {  // raw sums, centered here: sum p_hat raw - (sum p_hat) center
          const double* Rn = &st.accr[(size_t)n * d_];
          const double ps = st.ps[n];
          for (int j = 0; j < d_; ++j) An[j] += a * (Rn[j] - ps * center_[j]);
        } else {
          const double* Bn = &st.acc[(size_t)n * d_];
          for (int j = 0; j < d_; ++j) An[j] += a * Bn[j];
        }
        for (auto& e : st.top[n]) heap_push(top_[n], K_, e.first, e.second);
      }
      m_[n] = mm;
    }
  }

  const Kernels* kern_;
  DType dtype_;
  double target_;
  int N_ = 0, d_ = 0, dp_ = 0, Rr_ = 0;
  size_t K_ = 1;
  bool int_path_ = false, finished_ = false;
  double qmax_ = 0.0;
  // delta1_, delta2_: the logit bounds from limb 0 alone and from limbs 0 and 1
  std::vector<double> v_, coef_, center_, vsq_, delta_base_, delta1_, delta2_;
  // int path: limb 0 of every query (Q0_, one row each) gives the coarse dot of every row;
  // limbs 1..L-1 (Qr_, rows rstart_[n] .. rstart_[n] + nlimbs_[n] - 2) refine the rows
  // that can matter. Sc = limb . center, pw = the limb's power of two.
  std::vector<int16_t> Q0_, Qr_;
  std::vector<int8_t> Q08_;  // limb 0 as int8 (the AVX-512 coarse kernel)
  std::vector<const int16_t*> q0p_, qrp_;
  std::vector<const int8_t*> q08p_;
  std::vector<int64_t> Sc0_, Scr_;
  std::vector<double> pw0_, pwr_;
  std::vector<int> nlimbs_, rstart_;
  std::vector<double> xs_;  // per query: bound on the weight of the rows left out (scaled like s_)
  std::vector<double> es_;  // per query: sum |p - p_hat| of the quantized weights (scaled like s_)
  int64_t refined_ = 0, pairs_ = 0;
  std::vector<double> m_, s_, acc_;
  std::vector<TopHeap> top_;
};

}  // namespace

void register_dense(py::module_& m) {
  py::class_<DensePass>(m, "DensePass",
                        "One coarse pass over rows for N queries: logits -coef ||v - q_i||^2, online softmax, weighted "
                        "sum, top-K logits and the logit error bound delta. Feed row blocks with update(), then finish().")
      .def(py::init<py::array_t<double, py::array::c_style | py::array::forcecast>,
                    py::array_t<double, py::array::c_style | py::array::forcecast>,
                    py::array_t<double, py::array::c_style | py::array::forcecast>, double, int64_t, const std::string&,
                    const std::string&, double, int>(),
           py::arg("v"), py::arg("coef"), py::arg("center"), py::arg("max_cnorm"), py::arg("k"), py::arg("dtype"),
           py::arg("path") = "auto", py::arg("target_delta") = 1e-8, py::arg("limbs") = 0,
           "v (N, d) float64 centered queries; coef (N,) > 0; center (d,); max_cnorm >= max_i ||raw_i - center||; "
           "k top logits kept; dtype of the rows; path 'auto'|'avx512'|'avx2'|'portable'; target_delta the logit "
           "error the limb count aims for; limbs 0 (automatic) or 1..4 (uint8 int path).")
      .def("update", &DensePass::update, py::arg("raw"), py::arg("csq"), py::arg("offset"),
           "raw (B, d) rows in the pass dtype (bfloat16 as uint16 bits), csq (B,) float64 ||raw_i - center||^2, "
           "offset = source position of raw[0]. Releases the GIL.")
      .def("finish", &DensePass::finish,
           "-> (m (N,), s (N,), acc (N, d) centered, top_val (N, K) descending, top_idx (N, K) int64, delta (N,))")
      .def_property_readonly("path", &DensePass::path)
      .def_property_readonly("arith", &DensePass::arith)
      .def_property_readonly("limbs", &DensePass::limbs)
      .def_property_readonly("refined", &DensePass::refined);
}
}  // namespace optden
