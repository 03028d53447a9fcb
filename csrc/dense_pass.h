// The CPU dense pass of the optimal denoiser (DensePass, optden._C.DensePass in Python):
// one fused pass over blocks of rows that computes coarse logits, an online softmax, the
// weighted sum and the top-K logits, with a rigorous per-query bound `delta` on the logit
// error (see optden/backends/cpu.py for the derivation).
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
//
// Files: dense_pass.h (this: the pass's state and shared helpers), dense_cpu.cpp (the
// pass: construction, update() over sub-blocks in threads, the online softmax, the merge
// of the threads, finish, the Python binding), dense_limbs.cpp (the int path: the limb
// split of the queries, the refined logits, the exact integer weighted sum),
// dense_float.cpp (the float path). The kernels they call are in dense_kernels.h and
// wsum_kernels.h, picked per CPU by cpu_dispatch.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "cpu_dispatch.h"

namespace optden {

namespace py = pybind11;

constexpr double kU = 1.1102230246251565e-16;  // unit roundoff of float64, 2^-53

// the storage types, numbered as the kernels take them (cpu_dispatch.h)
enum class DType { U8, F16, BF16, F32 };

inline DType parse_dtype(const std::string& s) {
  if (s == "uint8") return DType::U8;
  if (s == "float16") return DType::F16;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float32") return DType::F32;
  throw std::invalid_argument("dtype: expected uint8, float16, bfloat16 or float32, got '" + s + "'");
}

inline size_t itemsize(DType t) { return t == DType::U8 ? 1 : t == DType::F32 ? 4 : 2; }

// Compensated sum of squares of x[0..n) (dense_cpu.cpp).
double sumsq2(const double* x, int n);

inline double gamma(double n) { return n * kU / (1.0 - n * kU); }

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

struct ThreadState {
  // m running max, s normaliser, xs bound on the weight left out, es weight error of the
  // quantized weights (int path), acc centered weighted sum (float path), accr raw weighted
  // sum and ps the sum of its weights (int path); all but m relative to exp(m). With pass
  // statistics: s2 = sum exp(2 (l - m)) and e1 = sum exp(l - m) (l - m) (see optden/engine/partial.py)
  std::vector<double> m, s, xs, es, ps, acc, accr, s2, e1;
  int64_t refined = 0;
  int dense_run = 0;  // one query: how many sub-blocks in a row needed every limb of every row
  std::vector<TopHeap> top;

  // Empty sums for N queries of width d. The float path sums centered rows into acc, the
  // int path raw rows into accr (centered once, when the threads are merged); stats: the
  // pass statistics s2 and e1 as well.
  void start(int N, int d, bool int_path, bool stats) {
    m.assign(N, -std::numeric_limits<double>::infinity());
    s.assign(N, 0.0);
    xs.assign(N, 0.0);
    es.assign(N, 0.0);
    ps.assign(N, 0.0);
    if (stats) s2.assign(N, 0.0), e1.assign(N, 0.0);
    (int_path ? accr : acc).assign((size_t)N * d, 0.0);
    top.assign(N, TopHeap());
  }
};

// How the int path refines one query's rows in a sub-block (int_logits): kOneLimb, the
// query has one limb (the coarse logits are exact to delta); kSparse, few rows, one kernel
// call per row; kDenseA, many top-K candidates but few weight rows: limb 1 of every row by
// the tiled kernel, then the rows that stay one by one; kDense, every limb of every row,
// tiled.
enum QueryMode : char { kOneLimb, kSparse, kDenseA, kDense };
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

class DensePass {
 public:
  DensePass(py::array_t<double, py::array::c_style | py::array::forcecast> v,
            py::array_t<double, py::array::c_style | py::array::forcecast> coef,
            py::array_t<double, py::array::c_style | py::array::forcecast> center, double max_cnorm, int64_t k,
            const std::string& dtype, const std::string& path, double target_delta, int limbs, bool stats);

  // Add rows raw (B, d) whose positions in the row source start at `offset`.
  void update(py::array raw, py::array_t<double, py::array::c_style | py::array::forcecast> csq, int64_t offset);

  // (m (N,), s (N,), acc (N, d) centered, top_val (N, K) descending, top_idx (N, K), delta (N,))
  py::tuple finish();

  // The pass statistics after finish(): (s2 (N,), e1 (N,), left_out (N,)), s2 and e1 relative
  // to m like s, left_out the relative weight of the rows left out of s, s2 and e1.
  py::tuple stats() const;

  std::string path() const { return kern_->name; }
  std::string arith() const { return int_path_ ? "int-limbs" : "float64"; }
  std::vector<int> limbs() const { return nlimbs_; }
  // fraction of (query, row) pairs whose logits were computed exactly to delta (the rest
  // were left out after the coarse limb showed them negligible)
  double refined() const { return pairs_ ? (double)refined_ / (double)pairs_ : 1.0; }

 private:
  // which refinements int_logits' stages have to run
  struct Refinement {
    bool sparse = false, dense_a = false, dense = false;
  };

  // the int path (dense_limbs.cpp): the limb split of the queries, then per sub-block the
  // refined logits (int_logits and its stages) and the exact weighted sum
  void split_query(int n, int forced, const int16_t* cint, int16_t* hi, int64_t* sc, int* kexp_out);
  double limb_bound(int n, int L, bool with_quant, const double* enorm, const double* anorm) const;
  int choose_limbs(int n, int forced, const double* enorm, const double* anorm);
  void prepare_limbs(int forced);
  void int_logits(const uint8_t* Xsb, const double* csq, int nb, ThreadState& st, BlockBuffers& buf) const;
  Refinement classify_rows(const double* csq, int nb, const ThreadState& st, BlockBuffers& buf) const;
  void dense_limbs(const uint8_t* Xsb, int nb, BlockBuffers& buf) const;
  void dense_first_limb(const uint8_t* Xsb, int nb, BlockBuffers& buf) const;
  template <class Use, class Lim>
  void per_row_limbs(int l0, const uint8_t* Xsb, int nb, BlockBuffers& buf, Use&& use, Lim&& lim) const;
  bool keep_candidates(const double* csq, BlockBuffers& buf) const;
  void combine_limbs(const double* csq, int nb, BlockBuffers& buf) const;
  void int_weighted_sum(const uint8_t* Xsb, int nb, ThreadState& st, BlockBuffers& buf) const;

  // the float path (dense_float.cpp). row_group: rows per group (the logits, the weighted
  // sum). Short groups keep the rows few long streams (fp32, N = 1: 1.6x); with many
  // queries the arithmetic bounds the pass, and one group of the whole sub-block is
  // slightly faster.
  int row_group() const { return N_ <= 16 ? kRowGroup : kSB; }
  void prepare_float();
  void center_chunk(const void* X, int64_t row0, const int* rows, int nr, int j0, int w, double* XC) const;
  void dot_chunk_raw(const void* X, int64_t row0, int nr, int j0, int w, double* D) const;
  void float_logits(const void* X, const double* csq, int64_t r0, int nb, BlockBuffers& buf) const;
  int float_row_lists(int nb, BlockBuffers& buf) const;
  void float_weighted_sum(const void* X, int64_t r0, int nb, ThreadState& st, BlockBuffers& buf) const;

  // the pass over one update()'s rows, both paths (dense_cpu.cpp)
  void run_block(const void* X, const double* csq, int64_t B, int64_t offset);
  void softmax_block(int nb, int64_t row0, ThreadState& st, BlockBuffers& buf) const;
  void merge_threads(std::vector<ThreadState>& ts);

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

}  // namespace optden
