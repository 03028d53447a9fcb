// The CPU dense pass of the optimal denoiser: one fused pass over blocks of rows that
// computes coarse logits, an online softmax, the weighted sum and the top-K logits, with
// a rigorous per-query bound `delta` on the logit error (see optden/backends/cpu.py for
// the derivation). Also the exact re-score of gathered rows and a top-k selection.
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
#include <immintrin.h>
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---- the kernels, once per instruction set (see dense_kernels.h)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#define OPTDEN_KNS k_avx512
#define OPTDEN_ISA 2
#include "dense_kernels.h"
#include "wsum_kernels.h"
#undef OPTDEN_KNS
#undef OPTDEN_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define OPTDEN_KNS k_avx2
#define OPTDEN_ISA 1
#include "dense_kernels.h"
#include "wsum_kernels.h"
#undef OPTDEN_KNS
#undef OPTDEN_ISA
#pragma GCC pop_options

#define OPTDEN_KNS k_portable
#define OPTDEN_ISA 0
#include "dense_kernels.h"
#include "wsum_kernels.h"
#undef OPTDEN_KNS
#undef OPTDEN_ISA

namespace py = pybind11;

namespace optden {
namespace {

constexpr double kU = 1.1102230246251565e-16;  // unit roundoff of float64, 2^-53

struct Kernels {
  const char* name;
  void (*dot_u8)(const int16_t* const*, int, const uint8_t*, int, int, int64_t*, int, const uint8_t**,
                 const uint8_t*);
  void (*dot_q0)(const int8_t* const*, const int16_t* const*, int, const uint8_t*, int, int, int64_t*, int,
                 const uint8_t**, const uint8_t*);
  void (*dot_f64)(const double*, int, int, const double*, int, int, double*, int);
  void (*acc_f64)(const double*, int, int, const double*, int, double*, int, const int*, int, int);
  void (*wsum_u8)(const int16_t*, int, int, const double*, const int*, const uint8_t*, int, const int*, int, int,
                  double*, int, int16_t*, const uint8_t**, const uint8_t*);
  int (*ws_scratch)(int);
  int (*classify)(const double*, int, double, double, double, char, int*, char*, int*, double*);
  void (*dot_fused1)(const int8_t*, const int16_t*, const int16_t* const*, int, const uint8_t*, int, int, int64_t*,
                     int64_t*, int, const uint8_t**, const uint8_t*);
  void (*center_row)(int, const void*, int, const double*, double*);
  void (*dot_raw)(int, const double*, int, int, const void*, size_t, int, int, const double*, double*, int);
  void (*acc_raw)(int, const double*, int, int, const void*, size_t, const int*, int, int, const double*, double*, int);
};

const Kernels kAvx512{"avx512", k_avx512::dot_u8, k_avx512::dot_q0, k_avx512::dot_f64, k_avx512::acc_f64, k_avx512::wsum_u8, k_avx512::ws_scratch_elems, k_avx512::classify, k_avx512::dot_fused1, k_avx512::center_row, k_avx512::dot_raw, k_avx512::acc_raw};
const Kernels kAvx2{"avx2", k_avx2::dot_u8, k_avx2::dot_q0, k_avx2::dot_f64, k_avx2::acc_f64, k_avx2::wsum_u8, k_avx2::ws_scratch_elems, k_avx2::classify, k_avx2::dot_fused1, k_avx2::center_row, k_avx2::dot_raw, k_avx2::acc_raw};
const Kernels kPortable{"portable", k_portable::dot_u8, k_portable::dot_q0, k_portable::dot_f64, k_portable::acc_f64, k_portable::wsum_u8, k_portable::ws_scratch_elems, k_portable::classify, k_portable::dot_fused1, k_portable::center_row, k_portable::dot_raw, k_portable::acc_raw};

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512vnni");
}
bool cpu_has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

// The kernel set for `path`: "auto" (best the CPU has; env OPTDEN_CPU_PATH overrides),
// "avx512", "avx2" or "portable". A path the CPU lacks is an error, never a crash.
const Kernels& pick_kernels(std::string path) {
  if (path == "auto") {
    const char* env = std::getenv("OPTDEN_CPU_PATH");
    if (env && *env) path = env;
  }
  if (path == "auto") return cpu_has_avx512() ? kAvx512 : cpu_has_avx2() ? kAvx2 : kPortable;
  if (path == "avx512") {
    if (!cpu_has_avx512()) throw std::invalid_argument("path: this CPU lacks AVX-512 (F, BW, VL, DQ, VNNI)");
    return kAvx512;
  }
  if (path == "avx2") {
    if (!cpu_has_avx2()) throw std::invalid_argument("path: this CPU lacks AVX2 + FMA + F16C");
    return kAvx2;
  }
  if (path == "portable") return kPortable;
  throw std::invalid_argument("path: expected 'auto', 'avx512', 'avx2' or 'portable', got '" + path + "'");
}

enum class DType { U8, F16, BF16, F32 };

DType parse_dtype(const std::string& s) {
  if (s == "uint8") return DType::U8;
  if (s == "float16") return DType::F16;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float32") return DType::F32;
  throw std::invalid_argument("dtype: expected uint8, float16, bfloat16 or float32, got '" + s + "'");
}

size_t itemsize(DType t) { return t == DType::U8 ? 1 : t == DType::F32 ? 4 : 2; }

// one stored value as a double (exact); the scalar reference of center_row's conversions
inline double raw_value(const void* base, DType t, size_t idx) { return k_portable::raw_value(base, (int)t, idx); }

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
constexpr int kRowGroup = 16;  // float path, N <= 16: rows read together (see run_block)

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
  // sum and ps the sum of its weights (int path); all but m relative to exp(m). With pass
  // statistics: s2 = sum exp(2 (l - m)) and e1 = sum exp(l - m) (l - m) (see optden/engine/partial.py)
  std::vector<double> m, s, xs, es, ps, acc, accr, s2, e1;
  int64_t refined = 0;
  int dense_run = 0;  // one query: how many sub-blocks in a row needed every limb of every row
  std::vector<TopHeap> top;
};

class DensePass {
 public:
  DensePass(py::array_t<double, py::array::c_style | py::array::forcecast> v,
            py::array_t<double, py::array::c_style | py::array::forcecast> coef,
            py::array_t<double, py::array::c_style | py::array::forcecast> center, double max_cnorm, int64_t k,
            const std::string& dtype, const std::string& path, double target_delta, int limbs, bool stats)
      : kern_(&pick_kernels(path)), dtype_(parse_dtype(dtype)), target_(target_delta), stats_(stats) {
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
    s2_.assign(N_, 0.0);
    e1_.assign(N_, 0.0);
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

  // The pass statistics after finish(): (s2 (N,), e1 (N,), left_out (N,)), s2 and e1 relative
  // to m like s, left_out the relative weight of the rows left out of s, s2 and e1.
  py::tuple stats() const {
    if (!stats_) throw std::runtime_error("DensePass: constructed without stats=True");
    if (!finished_) throw std::runtime_error("DensePass: stats() before finish()");
    py::array_t<double> s2(N_), e1(N_), out(N_);
    for (int n = 0; n < N_; ++n) {
      s2.mutable_data()[n] = s2_[n];
      e1.mutable_data()[n] = e1_[n];
      out.mutable_data()[n] = s_[n] > 0.0 ? 1.01 * xs_[n] / s_[n] : 0.0;
    }
    return py::make_tuple(s2, e1, out);
  }

  std::string path() const { return kern_->name; }
  std::string arith() const { return int_path_ ? "int-limbs" : "float64"; }
  std::vector<int> limbs() const { return nlimbs_; }
  // fraction of (query, row) pairs whose logits were computed exactly to delta (the rest
  // were left out after the coarse limb showed them negligible)
  double refined() const { return pairs_ ? (double)refined_ / (double)pairs_ : 1.0; }

 private:
  // Query n's limbs: limb 0 into Q0_ / Q08_ (row n), limbs 1..3 into hi (3 rows of dp_),
  // sc[l] = limb l . center, *kexp the scale exponent; sets nlimbs_, delta_base_, delta1_,
  // delta2_.
  // Scaling multiplies by exact powers of two (2^-1017 .. 2^1017, all normal), which rounds
  // exactly as ldexp would.
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
    const double up = std::ldexp(1.0, kexp);
    std::vector<double> r(d_), a(d_, 0.0);
    for (int j = 0; j < d_; ++j) r[j] = vn[j] * up;
    double enorm[4], anorm[4];
    for (int l = 0; l < 4; ++l) {
      // the squares are summed in kLanes interleaved partial sums (independent chains, which
      // the compiler vectorizes); gamma_{d+2} covers the rounding in any order of summation
      constexpr int kLanes = 8;
      double e2[kLanes] = {}, a2[kLanes] = {};
      const double pw = std::ldexp(1.0, -kexp - 15 * l);
      int16_t* lq = limb[l];
      const int dv = d_ / kLanes * kLanes;
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
      for (int j = dv; j < d_; ++j) step(j, e2[j - dv], a2[j - dv]);
      const double e2s = ((e2[0] + e2[1]) + (e2[2] + e2[3])) + ((e2[4] + e2[5]) + (e2[6] + e2[7]));
      const double a2s = ((a2[0] + a2[1]) + (a2[2] + a2[3])) + ((a2[4] + a2[5]) + (a2[6] + a2[7]));
      enorm[l] = std::sqrt(e2s) * (1.0 + 2.0 * gamma(d_ + 2));
      anorm[l] = std::sqrt(a2s) * (1.0 + 2.0 * gamma(d_ + 2));
    }
    auto bound = [&](int L, bool with_quant) {
      const double c = coef_[n], q = qmax_, vs = vsq_[n];
      const double an = anorm[L - 1];
      double t = 2.0 * gamma(L - 1 > 0 ? L - 1 : 0) * an * q  // combining the limbs' sums
                 + 2.0 * kU * vs                                  // compensated ||v||^2
                 + 2.0 * kU * (1.0 + kU) * (vs + 2.0 * an * q + q * q);  // (vsq - 2 dot) + csq
      if (with_quant) t += 2.0 * enorm[L - 1] * q;
      return c * t * (1.0 + 1e-6);
    };
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

  // Sub-block of nb rows starting at row r0 of X, int path: coarse logits of every row from
  // limb 0 (C), then the rows that can matter are refined with the other limbs (exact to
  // delta_base): rows within kSkipT of the best logit seen ("weight" rows), and rows that
  // could enter the top K ("candidates"). Per query n: lst[n * kSB + t], t < cnt[n], the
  // refined rows (ascending) and P[n * kSB + i] their logits; the nskip[n] others (weight
  // <= e^-kSkipT of the maximum each) are left out, skmax[n] the largest upper bound of
  // their logits. With 3 or more limbs a candidate goes in two stages: limb 1 first, then
  // the other limbs only if the tighter bound (delta2) still lets it into the top K; the
  // others are left out like the rest. Work per query (mode): kSparse, few rows, one call
  // per row; kDenseA, many candidates but few weight rows, limb 1 of every row by the tiled
  // kernel, then the rows that stay one by one; kDense, every limb of every row, tiled.
  // kind: (N, kSB) scratch. pf, pfe: the prefetch cursor over the rows this thread reads
  // next; the tiled kernels take lines off its front as they go.
  void int_logits(const uint8_t* Xsb, const double* csq, int nb, ThreadState& st, int64_t* S0, int64_t* Sr,
                  double* C, double* P, int* lst, int* cnt, int* nskip, double* skmax, char* kind, const uint8_t*& pf,
                  const uint8_t* pfe) const {
    enum : char { kOne, kSparse, kDenseA, kDense };
    // kind: 0 not refined, 1 weight row, 2 candidate (limb 1 only so far), 3 candidate kept
    // one query whose last two sub-blocks were dense (large sigma: every row carries
    // weight; the first sub-block alone often is, before the running max settles) gets
    // every limb of every row in one pass; the decisions below are the same as without
    // (the same integers), only the limbs need not be computed again
    const bool all_limbs = N_ == 1 && nlimbs_[0] > 1 && st.dense_run >= 2;
    if (all_limbs)
      kern_->dot_fused1(q08p_[0], q0p_[0], &qrp_[rstart_[0]], nlimbs_[0] - 1, Xsb, nb, d_, S0, Sr + (size_t)rstart_[0] * kSB,
                        kSB, &pf, pfe);
    else
      kern_->dot_q0(q08p_.data(), q0p_.data(), N_, Xsb, nb, d_, S0, kSB, &pf, pfe);
    std::vector<char> mode(N_, kOne);
    std::vector<double> hmv(N_, -std::numeric_limits<double>::infinity());  // heap minimum per query
    bool any_row = false, any_a = false, any_dense = false;
    for (int n = 0; n < N_; ++n) {
      double* Cn = C + (size_t)n * kSB;
      int* ln = lst + (size_t)n * kSB;
      const double cmax = coarse_logits(S0 + (size_t)n * kSB, Sc0_[n], pw0_[n], coef_[n], vsq_[n], csq, nb, Cn);
      nskip[n] = 0;
      skmax[n] = -std::numeric_limits<double>::infinity();
      const int L = nlimbs_[n];
      if (L > 1) {
        const double d1 = delta1_[n];
        const double thr = std::max(st.m[n], cmax - d1) - kSkipT;
        const bool hfull = st.top[n].size() >= K_;
        const double hmin = hfull ? st.top[n].front().first : -std::numeric_limits<double>::infinity();
        hmv[n] = hmin;
        char* kn = kind + (size_t)n * kSB;
        double sk;
        int cw;
        // a candidate with only two limbs gets its one refining limb at once, like a weight row
        const int c = kern_->classify(Cn, nb, d1, thr, hmin, (char)(L == 2 ? 1 : 2), ln, kn, &cw, &sk);
        const bool few = 8 * c <= nb;
        if (few || (L > 2 && 8 * cw <= nb)) {
          mode[n] = few ? kSparse : kDenseA;
          nskip[n] = nb - c;
          skmax[n] = sk;
          cnt[n] = c;
          any_row = any_row || (few && c > 0);
          any_a = any_a || !few;
          continue;
        }
        mode[n] = kDense;
        any_dense = true;
      }
      for (int i = 0; i < nb; ++i) ln[i] = i;  // every row (one limb, or a dense query)
      cnt[n] = nb;
    }
    if (N_ == 1) st.dense_run = mode[0] == kDense ? st.dense_run + 1 : 0;
    if (all_limbs) any_dense = any_a = any_row = false;  // every limb is in S0 and Sr already
    std::vector<const int16_t*> lp;
    std::vector<int64_t> tmp;
    // kDense: every limb of every row, a run of consecutive queries (contiguous limb rows)
    // per call; the next sub-block streams in along the way from the prefetch cursor (with
    // more than 8 queries the coarse pass's later passes have mostly taken it already)
    for (int n = 0; any_dense && n < N_;) {
      if (mode[n] != kDense) {
        ++n;
        continue;
      }
      int e = n;
      while (e < N_ && mode[e] == kDense) ++e;
      const int ra = rstart_[n], rb = rstart_[e - 1] + nlimbs_[e - 1] - 1;
      kern_->dot_u8(&qrp_[ra], rb - ra, Xsb, nb, d_, Sr + (size_t)ra * kSB, kSB, &pf, pfe);
      n = e;
    }
    // kDenseA: limb 1 of every row, tiled, into Sr
    if (any_a) {
      lp.clear();
      for (int n = 0; n < N_; ++n)
        if (mode[n] == kDenseA) lp.push_back(qrp_[rstart_[n]]);
      tmp.resize(lp.size() * kSB);
      kern_->dot_u8(lp.data(), (int)lp.size(), Xsb, nb, d_, tmp.data(), kSB, &pf, pfe);
      for (int n = 0, a = 0; n < N_; ++n)
        if (mode[n] == kDenseA) {
          std::copy(&tmp[(size_t)a * kSB], &tmp[(size_t)a * kSB] + nb, &Sr[(size_t)rstart_[n] * kSB]);
          ++a;
        }
    }
    // one call per row with the limbs [l0, lim(n, i)) of every query that `use` selects
    // and that lists the row and needs them (the row's uint8 -> int16 conversion is shared by
    // all of them), into Sr. The listed rows are bucketed by row first (a counting sort),
    // so the work follows the refined pairs, not nb x N.
    std::vector<int> rc(nb + 1), rq;
    const auto per_row = [&](int l0, auto&& use, auto&& lim) {
      std::fill(rc.begin(), rc.end(), 0);
      for (int n = 0; n < N_; ++n) {
        if (!use(n)) continue;
        const int* ln = lst + (size_t)n * kSB;
        for (int t = 0; t < cnt[n]; ++t) rc[ln[t] + 1] += lim(n, ln[t]) > l0;
      }
      for (int i = 0; i < nb; ++i) rc[i + 1] += rc[i];
      if (rc[nb] == 0) return;
      rq.resize(rc[nb]);
      for (int n = 0; n < N_; ++n) {  // ascending n within each row's bucket
        if (!use(n)) continue;
        const int* ln = lst + (size_t)n * kSB;
        for (int t = 0; t < cnt[n]; ++t)
          if (lim(n, ln[t]) > l0) rq[rc[ln[t]]++] = n;
      }
      // rc[i] is now the end of row i's bucket (the start of row i + 1's)
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
    };
    // kSparse: every limb for weight rows, limb 1 for candidates
    if (any_row)
      per_row(
          0, [&](int n) { return mode[n] == kSparse; },
          [&](int n, int i) -> int {
            const char k = kind[(size_t)n * kSB + i];
            return k == 1 ? nlimbs_[n] - 1 : k == 2 ? 1 : 0;
          });
    // the candidates' bounds from limbs 0 and 1: those that can still enter the top K are
    // kept (kind 3, as are kDenseA's weight rows, which lack limbs 2..), the others left out
    bool any_b = false;
    for (int n = 0; n < N_; ++n) {
      if (!(mode[n] == kDenseA || (mode[n] == kSparse && nlimbs_[n] > 2))) continue;
      int* ln = lst + (size_t)n * kSB;
      char* kn = kind + (size_t)n * kSB;
      const int r1 = rstart_[n];
      int c = 0;
      for (int t = 0; t < cnt[n]; ++t) {
        const int i = ln[t];
        if (kn[i] == 2) {
          const double dot = (double)(Sr[(size_t)r1 * kSB + i] - Scr_[r1]) * pwr_[r1] +
                             (double)(S0[(size_t)n * kSB + i] - Sc0_[n]) * pw0_[n];
          const double ub2 = -coef_[n] * ((vsq_[n] - 2.0 * dot) + csq[i]) + delta2_[n];
          if (!(ub2 > hmv[n])) {
            ++nskip[n];
            skmax[n] = std::max(skmax[n], std::min(ub2, C[(size_t)n * kSB + i] + delta1_[n]));
            kn[i] = 0;
            continue;
          }
          kn[i] = 3;
        } else if (mode[n] == kDenseA) {
          kn[i] = 3;
        }
        any_b = any_b || kn[i] == 3;
        ln[c++] = i;
      }
      cnt[n] = c;
    }
    // limbs 2.. of the rows of kind 3
    if (any_b && !all_limbs)
      per_row(
          1, [&](int n) { return mode[n] == kSparse || mode[n] == kDenseA; },
          [&](int n, int i) -> int { return kind[(size_t)n * kSB + i] == 3 ? nlimbs_[n] - 1 : 1; });
    for (int n = 0; n < N_; ++n) {
      const double* Cn = C + (size_t)n * kSB;
      double* Pn = P + (size_t)n * kSB;
      const int* ln = lst + (size_t)n * kSB;
      const int L = nlimbs_[n];
      if (L == 1) {
        std::copy(Cn, Cn + nb, Pn);
        continue;
      }
      for (int t = 0; t < cnt[n]; ++t) {
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

  void run_block(const void* X, const double* csq, int64_t B, int64_t offset) {
    const int nsb = (int)((B + kSB - 1) / kSB);
    const int T = std::max(1, std::min(omp_get_max_threads(), nsb));
    std::vector<ThreadState> ts(T);
#pragma omp parallel num_threads(T)
    {
      const int tid = omp_get_thread_num(), nthr = omp_get_num_threads();
      ThreadState& st = ts[tid];
      st.m.assign(N_, -std::numeric_limits<double>::infinity());
      st.s.assign(N_, 0.0);
      st.xs.assign(N_, 0.0);
      if (stats_) st.s2.assign(N_, 0.0), st.e1.assign(N_, 0.0);
      // the float path sums into acc (centered rows), the int path into accr (raw rows)
      if (!int_path_) st.acc.assign((size_t)N_ * d_, 0.0);
      st.top.assign(N_, TopHeap());
      std::vector<int64_t> S0(int_path_ ? (size_t)N_ * kSB : 0), Sr(int_path_ ? (size_t)Rr_ * kSB : 0);
      std::vector<double> D((size_t)N_ * kSB), P((size_t)N_ * kSB), XC(int_path_ ? 0 : (size_t)kSB * kJC);
      std::vector<char> kind((size_t)N_ * kSB, 0);
      std::vector<int> lst((size_t)N_ * kSB), cnt(N_), nskip(N_);
      std::vector<double> skmax(N_), Dl(kSB);
      if (int_path_) st.accr.assign((size_t)N_ * d_, 0.0);
      st.ps.assign(N_, 0.0);
      st.es.assign(N_, 0.0);
      std::vector<int16_t> W(int_path_ ? (size_t)3 * N_ * kSB : 0), scratch(int_path_ ? kern_->ws_scratch(d_) : 0);
      std::vector<double> wscale(3 * N_), pmax(N_);
      std::vector<int> wout(3 * N_), aq(N_);
      const int ntiles = (N_ + 3) / 4;
      std::vector<int> rows((size_t)ntiles * kSB), nrows(ntiles), uni(kSB), tb(ntiles), te(ntiles);
      // float path: rows per group (the logits, the weighted sum). Short groups keep the
      // rows few long streams (fp32, N = 1: 1.6x); with many queries the arithmetic bounds
      // the pass, and one group of the whole sub-block is slightly faster.
      const int group = N_ <= 16 ? kRowGroup : kSB;
      std::vector<char> used(kSB);
      // prefetch cursor over this thread's next sub-block: the kernels that compute on rows
      // already in cache (refinement, weighted sum) take lines off its front, so memory
      // keeps streaming between the coarse passes
      const uint8_t *pf = nullptr, *pfe = nullptr;
      // static: which thread sees which sub-blocks, and so its running max, its skip
      // decisions and its weights' quantization, is the same on every run (bit-identical
      // results for the same inputs and thread count)
#pragma omp for schedule(static, 1)
      for (int sb = 0; sb < nsb; ++sb) {
        const int64_t r0 = (int64_t)sb * kSB;
        const int nb = (int)std::min<int64_t>(kSB, B - r0);
        // 1. logits: P[n * kSB + i] for the rows lst[n * kSB + t], t < cnt[n] (every row on
        //    the float path; on the int path the others are left out, see int_logits)
        if (int_path_) {
          const int64_t rn = r0 + (int64_t)nthr * kSB;  // this thread's next sub-block (static, 1)
          pf = rn < B ? static_cast<const uint8_t*>(X) + (size_t)rn * d_ : nullptr;
          pfe = rn < B ? pf + (size_t)std::min<int64_t>(kSB, B - rn) * d_ : nullptr;
          int_logits(static_cast<const uint8_t*>(X) + (size_t)r0 * d_, csq + r0, nb, st, S0.data(), Sr.data(),
                     D.data(), P.data(), lst.data(), cnt.data(), nskip.data(), skmax.data(), kind.data(), pf, pfe);
        } else {
          // `group` rows at a time, each read along its length chunk by chunk (a few long
          // streams, not nb short ones); D[n, i] adds its chunks in the same order either way
          std::fill(D.begin(), D.end(), 0.0);
          for (int g0 = 0; g0 < nb; g0 += group) {
            const int gn = std::min(group, nb - g0);
            for (int j0 = 0; j0 < d_; j0 += kJC) {
              const int w = std::min(kJC, d_ - j0);
              if (N_ <= 4) {  // few queries: no copy
                dot_chunk_raw(X, r0 + g0, gn, j0, w, D.data() + g0);
                continue;
              }
              center_chunk(X, r0 + g0, nullptr, gn, j0, w, XC.data());
              kern_->dot_f64(v_.data() + j0, N_, d_, XC.data(), gn, w, D.data() + g0, kSB);
            }
          }
          for (int n = 0; n < N_; ++n) {
            for (int i = 0; i < nb; ++i) {
              P[(size_t)n * kSB + i] = -coef_[n] * ((vsq_[n] - 2.0 * D[(size_t)n * kSB + i]) + csq[r0 + i]);
              lst[(size_t)n * kSB + i] = i;
            }
            cnt[n] = nb;
            nskip[n] = 0;
          }
        }
        // 2. online softmax, top-K, the bound on the rows left out. P becomes the weights
        //    exp(l - m) of the rows in the lists, 0 elsewhere.
        for (int n = 0; n < N_; ++n) {
          double* Pn = &P[(size_t)n * kSB];
          const int* ln = &lst[(size_t)n * kSB];
          const int c = cnt[n];
          double bm = -std::numeric_limits<double>::infinity();
          for (int t = 0; t < c; ++t) bm = std::max(bm, Pn[ln[t]]);
          st.refined += c;
          if (bm > st.m[n]) {
            if (std::isfinite(st.m[n])) {
              const double a = std::exp(st.m[n] - bm);
              if (stats_) {  // e1 moves from m to bm: + (m - bm) s, before s is rescaled
                st.e1[n] = a * (st.e1[n] + (st.m[n] - bm) * st.s[n]);
                st.s2[n] *= a * a;
              }
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
          double sum = 0.0, dropped = 0.0, sum2 = 0.0, sum1 = 0.0;
          if (c < nb) {  // gather the listed logits so the rest of P can be zeroed
            for (int t = 0; t < c; ++t) Dl[t] = Pn[ln[t]];
            std::fill(Pn, Pn + nb, 0.0);
          }
          for (int t = 0; t < c; ++t) {
            const int i = ln[t];
            const double l = c < nb ? Dl[t] : Pn[i];
            heap_push(st.top[n], K_, l, offset + r0 + i);
            const double p = std::exp(l - mn);
            sum += p;
            if (stats_) sum2 += p * p, sum1 += p * (l - mn);
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
          if (stats_) st.s2[n] += sum2, st.e1[n] += sum1;
          if (int_path_) st.es[n] += dropped;  // missing from the int path's weighted sum
          if (nskip[n]) st.xs[n] += nskip[n] * std::exp(skmax[n] - mn);
        }
        // 3a. int path: the weights quantized to two (or three) int16 limbs per query,
        //     p ~ (W1 + W2 2^-15 [+ W3 2^-30]) 2^-e with 2^13 <= max_i p 2^e < 2^14, and the weighted sum of the raw
        //     rows done exactly in integers (wsum_kernels.h). The normaliser keeps the
        //     float64 weights (the log density and top weights stay exact to delta); es
        //     collects sum |p - p_hat|, the total variation this adds to the normalised
        //     weights of D*, added to delta at the end.
        if (int_path_) {
          int na = 0;
          std::fill(used.begin(), used.end(), 0);
          for (int n = 0; n < N_; ++n) {
            const double* Pn = &P[(size_t)n * kSB];
            const int* ln = &lst[(size_t)n * kSB];
            double pm = 0.0;
            for (int t = 0; t < cnt[n]; ++t) {
              const double p = Pn[ln[t]];
              pm = std::max(pm, p);
              used[ln[t]] |= (char)(p != 0.0);
            }
            if (pm > 0.0) aq[na] = n, pmax[na++] = pm;
          }
          if (na == 0) continue;
          int nu = 0;
          for (int i = 0; i < nb; ++i)
            if (used[i]) uni[nu++] = i;
          int R = 0;
          for (int a2 = 0; a2 < na; ++a2) {
            const int n = aq[a2];
            const double* Pn = &P[(size_t)n * kSB];
            const int e = 13 - std::ilogb(pmax[a2]);  // pmax >= 2^-80: no overflow
            int16_t* w1 = &W[(size_t)R * kSB];
            int16_t* w2 = w1 + kSB;
            int16_t* w3 = w2 + kSB;
            const double se = std::ldexp(1.0, e);  // 2^13 .. 2^93: the products below are exact
            int64_t isum = 0;
            double err = 0.0, psum = 0.0;
            for (int t = 0; t < nu; ++t) {
              const double x = Pn[uni[t]] * se;  // < 2^14
              const double q1 = round_even(x);
              const double y = (x - q1) * 32768.0;  // exact, |y| <= 2^14
              const double q2 = round_even(y);
              w1[t] = (int16_t)q1;
              w2[t] = (int16_t)q2;
              isum += (int64_t)q1 * 32768 + (int64_t)q2;
              err += std::fabs(y - q2);                     // exact terms, |.| <= 1/2
              psum += x;
            }
            // two limbs (30 bits) leave a relative weight error err / psum of ~1e-9 when the
            // rows' weights are alike, up to ~1e-7 when one row dominates a block of tiny
            // ones; above kWeightTarget a third limb takes it to ~2^-15 of that
            int L = 2;
            if (err * 0x1p-15 > kWeightTarget * psum) {
              L = 3;
              isum = 0;
              err = 0.0;
              for (int t = 0; t < nu; ++t) {
                const double x = Pn[uni[t]] * se;
                const double y = (x - (double)w1[t]) * 32768.0;
                const double z = (y - (double)w2[t]) * 32768.0;  // exact, |z| <= 2^14
                const double q3 = round_even(z);
                w3[t] = (int16_t)q3;
                isum += ((int64_t)w1[t] * 32768 + (int64_t)w2[t]) * 32768 + (int64_t)q3;
                err += std::fabs(z - q3);
              }
              err *= 0x1p-15;
            }
            for (int l = 0; l < L; ++l) wscale[R + l] = std::ldexp(1.0, -e - 15 * l), wout[R + l] = n;
            R += L;
            const double ps = std::ldexp((double)isum, -e - 15 * (L - 1));  // exact: |isum| < 2^52
            st.ps[n] += ps;
            st.es[n] += std::ldexp(err, -e - 15) * (1.0 + 1e-12);
          }
          kern_->wsum_u8(W.data(), R, kSB, wscale.data(), wout.data(),
                         static_cast<const uint8_t*>(X) + (size_t)r0 * d_, d_, uni.data(), nu, d_, st.accr.data(), d_,
                         scratch.data(), &pf, pfe);
          continue;
        }
        // 3b. float path: weighted sum of the rows that carry weight, queries in tiles of 4; each column
        //    chunk of the rows any tile needs is centered once into XC
        int nu = 0;
        for (int n0 = 0, tile = 0; n0 < N_; n0 += 4, ++tile) {
          const int nt = std::min(4, N_ - n0);
          int* lst = &rows[(size_t)tile * kSB];
          int nr = 0;
          for (int i = 0; i < nb; ++i) {
            bool any = false;
            for (int t = 0; t < nt; ++t) any = any || P[(size_t)(n0 + t) * kSB + i] != 0.0;
            if (any) lst[nr++] = i;
          }
          nrows[tile] = nr;
        }
        std::fill(used.begin(), used.end(), 0);
        for (int tile = 0; tile < ntiles; ++tile)
          for (int t = 0; t < nrows[tile]; ++t) used[rows[(size_t)tile * kSB + t]] = 1;
        for (int i = 0; i < nb; ++i)
          if (used[i]) uni[nu++] = i;
        if (nu == 0) continue;
        // in groups of rows, as the logits; each tile adds its rows of a group [tb, te) in list
        // order, so every A[n, j] sums its rows in the same order whatever the grouping
        std::fill(tb.begin(), tb.end(), 0);
        const size_t isz = itemsize(dtype_), rb = (size_t)d_ * isz;
        const char* x0 = static_cast<const char*>(X) + (size_t)r0 * rb;
        for (int g0 = 0; g0 < nu; g0 += group) {
          const int gn = std::min(group, nu - g0), last = uni[g0 + gn - 1];
          for (int tile = 0; tile < ntiles; ++tile) {
            te[tile] = tb[tile];
            while (te[tile] < nrows[tile] && rows[(size_t)tile * kSB + te[tile]] <= last) ++te[tile];
          }
          for (int j0 = 0; j0 < d_; j0 += kJC) {
            const int w = std::min(kJC, d_ - j0);
            if (N_ <= 4) {  // one tile: the rows centered in registers, no copy
              for (int t = 0; t < gn; ++t) prefetch_ahead(x0, rb, isz, uni.data() + g0, gn, t, j0, w);
              if (te[0] > tb[0])
                kern_->acc_raw((int)dtype_, P.data(), N_, kSB, x0 + (size_t)j0 * isz, rb, &rows[tb[0]], te[0] - tb[0], w,
                               &center_[j0], st.acc.data() + j0, d_);
              continue;
            }
            center_chunk(X, r0, uni.data() + g0, gn, j0, w, XC.data());
            for (int n0 = 0, tile = 0; n0 < N_; n0 += 4, ++tile) {
              if (te[tile] == tb[tile]) continue;
              kern_->acc_f64(P.data() + (size_t)n0 * kSB, std::min(4, N_ - n0), kSB, XC.data(), w,
                             st.acc.data() + (size_t)n0 * d_ + j0, d_, &rows[(size_t)tile * kSB + tb[tile]],
                             te[tile] - tb[tile], 4);
            }
          }
          std::swap(tb, te);
        }
      }
    }
    pairs_ += (int64_t)N_ * B;
    // a runtime may give the region fewer threads than asked: their states stay empty
    ts.erase(std::remove_if(ts.begin(), ts.end(), [](const ThreadState& st) { return st.m.empty(); }), ts.end());
    for (auto& st : ts) refined_ += st.refined;
    // merge the threads into the pass state by log-sum-exp
    for (int n = 0; n < N_; ++n) {
      double mm = m_[n];
      for (auto& st : ts) mm = std::max(mm, st.m[n]);
      if (!std::isfinite(mm)) continue;
      const double a0 = s_[n] > 0.0 ? std::exp(m_[n] - mm) : 0.0;
      if (stats_) {
        e1_[n] = s_[n] > 0.0 ? a0 * (e1_[n] + (m_[n] - mm) * s_[n]) : 0.0;
        s2_[n] *= a0 * a0;
      }
      s_[n] *= a0;
      xs_[n] *= a0;
      es_[n] *= a0;
      double* An = &acc_[(size_t)n * d_];
      for (int j = 0; j < d_; ++j) An[j] *= a0;
      for (auto& st : ts) {
        if (!(st.s[n] > 0.0)) continue;
        const double a = std::exp(st.m[n] - mm);
        if (stats_) {
          e1_[n] += a * (st.e1[n] + (st.m[n] - mm) * st.s[n]);
          s2_[n] += a * a * st.s2[n];
        }
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
  bool stats_ = false;
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
  std::vector<double> s2_, e1_;  // pass statistics (stats_), scaled like s_
  std::vector<TopHeap> top_;
};

// Exact logits -coef ||v_n - (rows[idx[n, t]] - center)||^2 by float64 direct differences.
py::array_t<double> rescore(py::array_t<double, py::array::c_style | py::array::forcecast> v,
                            py::array_t<double, py::array::c_style | py::array::forcecast> coef, py::array rows,
                            py::array_t<int64_t, py::array::c_style | py::array::forcecast> idx,
                            py::array_t<double, py::array::c_style | py::array::forcecast> center,
                            const std::string& dtype) {
  const DType dt = parse_dtype(dtype);
  if (v.ndim() != 2) throw std::invalid_argument("v: expected a 2-D (n, d) float64 array");
  const int64_t n = v.shape(0), d = v.shape(1);
  if (coef.ndim() != 1 || coef.shape(0) != n) throw std::invalid_argument("coef: expected shape (n,)");
  if (rows.ndim() != 2 || rows.shape(1) != d) throw std::invalid_argument("rows: expected a 2-D (R, d) array");
  if (!(rows.flags() & py::array::c_style)) throw std::invalid_argument("rows: expected a C-contiguous array");
  if ((size_t)rows.itemsize() != itemsize(dt)) throw std::invalid_argument("rows: item size does not match dtype");
  if (idx.ndim() != 2 || idx.shape(0) != n) throw std::invalid_argument("idx: expected shape (n, K)");
  if (center.ndim() != 1 || center.shape(0) != d) throw std::invalid_argument("center: expected shape (d,)");
  const int64_t K = idx.shape(1), R = rows.shape(0);
  const int64_t* ip = idx.data();
  for (int64_t t = 0; t < n * K; ++t)
    if (ip[t] < 0 || ip[t] >= R) throw std::invalid_argument("idx: row index " + std::to_string(ip[t]) + " out of range 0.." + std::to_string(R - 1));
  py::array_t<double> out({(py::ssize_t)n, (py::ssize_t)K});
  double* o = out.mutable_data();
  const double *vp = v.data(), *cp = coef.data(), *ctr = center.data();
  const void* base = rows.data();
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t t = 0; t < n * K; ++t) {
      const int64_t q = t / K;
      const size_t row = (size_t)ip[t] * d;
      double acc = 0.0;
      for (int64_t j = 0; j < d; ++j) {
        const double diff = vp[q * d + j] - (raw_value(base, dt, row + j) - ctr[j]);
        acc += diff * diff;
      }
      o[t] = -cp[q] * acc;
    }
  }
  return out;
}

// rows (B, w) in dtype, centered in float64 by the float path's center_row kernel of `path`:
// the kernel's own entry point, for the tests of its conversions
py::array_t<double> center_rows(py::array rows, py::array_t<double, py::array::c_style | py::array::forcecast> center,
                                const std::string& dtype, const std::string& path) {
  const DType dt = parse_dtype(dtype);
  const Kernels& kern = pick_kernels(path);
  if (rows.ndim() != 2) throw std::invalid_argument("rows: expected a 2-D (B, w) array");
  if (!(rows.flags() & py::array::c_style)) throw std::invalid_argument("rows: expected a C-contiguous array");
  if ((size_t)rows.itemsize() != itemsize(dt)) throw std::invalid_argument("rows: item size does not match dtype");
  const int64_t B = rows.shape(0), w = rows.shape(1);
  if (center.ndim() != 1 || center.shape(0) != w) throw std::invalid_argument("center: expected shape (w,)");
  py::array_t<double> out({(py::ssize_t)B, (py::ssize_t)w});
  const char* base = static_cast<const char*>(rows.data());
  for (int64_t i = 0; i < B; ++i)
    kern.center_row((int)dt, base + (size_t)i * w * itemsize(dt), (int)w, center.data(), out.mutable_data() + i * w);
  return out;
}

// The k largest entries of each row of vals (n, M), descending (ties: smaller index first).
py::tuple topk(py::array_t<double, py::array::c_style | py::array::forcecast> vals, int64_t k) {
  if (vals.ndim() != 2) throw std::invalid_argument("vals: expected a 2-D (n, M) array");
  const int64_t n = vals.shape(0), M = vals.shape(1);
  if (k < 1 || k > M) throw std::invalid_argument("k: expected 1 <= k <= " + std::to_string(M));
  py::array_t<double> tv({(py::ssize_t)n, (py::ssize_t)k});
  py::array_t<int64_t> ti({(py::ssize_t)n, (py::ssize_t)k});
  const double* vp = vals.data();
  double* tvp = tv.mutable_data();
  int64_t* tip = ti.mutable_data();
  {
    py::gil_scoped_release nogil;
#pragma omp parallel for schedule(dynamic, 1)
    for (int64_t q = 0; q < n; ++q) {
      const double* row = vp + q * M;
      std::vector<int64_t> order(M);
      for (int64_t i = 0; i < M; ++i) order[i] = i;
      auto better = [row](int64_t a, int64_t b) {
        const bool na = std::isnan(row[a]), nb = std::isnan(row[b]);
        if (na != nb) return nb;  // NaN ranks last
        return row[a] > row[b] || (!(row[a] < row[b]) && a < b);
      };
      std::partial_sort(order.begin(), order.begin() + k, order.end(), better);
      for (int64_t t = 0; t < k; ++t) {
        tvp[q * k + t] = row[order[t]];
        tip[q * k + t] = order[t];
      }
    }
  }
  return py::make_tuple(tv, ti);
}

py::dict cpu_features() {
  py::dict f;
  __builtin_cpu_init();
  f["avx2"] = (bool)__builtin_cpu_supports("avx2");
  f["fma"] = (bool)__builtin_cpu_supports("fma");
  f["avx512f"] = (bool)__builtin_cpu_supports("avx512f");
  f["avx512bw"] = (bool)__builtin_cpu_supports("avx512bw");
  f["avx512vnni"] = (bool)__builtin_cpu_supports("avx512vnni");
  f["f16c"] = (bool)__builtin_cpu_supports("f16c");
  // the kernel paths this CPU runs (pick_kernels refuses the others)
  std::vector<std::string> paths;
  if (cpu_has_avx512()) paths.push_back("avx512");
  if (cpu_has_avx2()) paths.push_back("avx2");
  paths.push_back("portable");
  f["dense_paths"] = paths;
  f["dense_default_path"] = std::string(pick_kernels("auto").name);
  return f;
}

}  // namespace

void register_dense(py::module_& m) {
  py::class_<DensePass>(m, "DensePass",
                        "One coarse pass over rows for N queries: logits -coef ||v - q_i||^2, online softmax, weighted "
                        "sum, top-K logits and the logit error bound delta. Feed row blocks with update(), then finish().")
      .def(py::init<py::array_t<double, py::array::c_style | py::array::forcecast>,
                    py::array_t<double, py::array::c_style | py::array::forcecast>,
                    py::array_t<double, py::array::c_style | py::array::forcecast>, double, int64_t, const std::string&,
                    const std::string&, double, int, bool>(),
           py::arg("v"), py::arg("coef"), py::arg("center"), py::arg("max_cnorm"), py::arg("k"), py::arg("dtype"),
           py::arg("path") = "auto", py::arg("target_delta") = 1e-8, py::arg("limbs") = 0, py::arg("stats") = false,
           "v (N, d) float64 centered queries; coef (N,) > 0; center (d,); max_cnorm >= max_i ||raw_i - center||; "
           "k top logits kept; dtype of the rows; path 'auto'|'avx512'|'avx2'|'portable'; target_delta the logit "
           "error the limb count aims for; limbs 0 (automatic) or 1..4 (uint8 int path); stats: also accumulate the "
           "pass statistics s2 and e1 (see stats()).")
      .def("update", &DensePass::update, py::arg("raw"), py::arg("csq"), py::arg("offset"),
           "raw (B, d) rows in the pass dtype (bfloat16 as uint16 bits), csq (B,) float64 ||raw_i - center||^2, "
           "offset = source position of raw[0]. Releases the GIL.")
      .def("finish", &DensePass::finish,
           "-> (m (N,), s (N,), acc (N, d) centered, top_val (N, K) descending, top_idx (N, K) int64, delta (N,))")
      .def("stats", &DensePass::stats,
           "-> (s2 (N,), e1 (N,), left_out (N,)) after finish(), for a pass built with stats=True: "
           "s2 = sum exp(2 (l - m)), e1 = sum exp(l - m) (l - m), left_out the relative weight left out of s")
      .def_property_readonly("path", &DensePass::path)
      .def_property_readonly("arith", &DensePass::arith)
      .def_property_readonly("limbs", &DensePass::limbs)
      .def_property_readonly("refined", &DensePass::refined);
  m.def("rescore", &rescore, py::arg("v"), py::arg("coef"), py::arg("rows"), py::arg("idx"), py::arg("center"),
        py::arg("dtype"),
        "Exact logits (n, K) float64: -coef_n ||v_n - (rows[idx[n, t]] - center)||^2 by direct differences. "
        "v (n, d) float64, rows (R, d) in dtype (bfloat16 as uint16 bits), idx (n, K) int64.");
  m.def("topk", &topk, py::arg("vals"), py::arg("k"),
        "The k largest of each row of vals (n, M) float64 -> (values (n, k) descending, indices (n, k) int64).");
  m.def("center_rows", &center_rows, py::arg("rows"), py::arg("center"), py::arg("dtype"), py::arg("path") = "auto",
        "rows (B, w) in dtype (bfloat16 as uint16 bits) minus center (w,), in float64 by the float path's kernel "
        "of `path` (every conversion exact: one rounding, the subtraction).");
  m.def("cpu_features", &cpu_features, "CPU features seen at run time and the dense pass's kernel paths.");
}
}  // namespace optden
