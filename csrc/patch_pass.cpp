// The local denoisers' passes over whole training images (optden/engine/patch_cpu.py):
//
//   PatchPass      LS and ELS: for n query images and blocks of training images (uint8 or
//                  float64), at each shift of the plan (LS: none; ELS: t = q - p), the
//                  patch distances of every position by box sums and one online softmax
//                  per (query, position): m, s, acc (the center pixels) and the top logit's
//                  patch index. finish() merges the threads' states.
//   CompositePass  the composite's second pass: the normalised LS weights of every
//                  position, box-summed over the windows covering each pixel, weigh the
//                  pixels of each training image.
//
// Every distance is float64 direct differences summed as nonnegative terms; the bound
// delta is computed in Python from the result (optden.engine.bounds.direct_pass_delta).
// The per-pair kernels are in patch_kernels.h, compiled for AVX-512 and portable C++.
//
// Threads: with at least as many queries as threads, each thread takes every T-th query
// and all rows (converting the rows itself); otherwise each takes every T-th tile of rows
// for all queries. Each thread keeps its own states; finish() merges them by log-sum-exp
// (the composite's sums add). The split depends only on the thread count, so results are
// the same from run to run.
#include <immintrin.h>
#include <omp.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

namespace optden {

// The window geometry the kernels need: images (C, H, W), horizontal / vertical radius.
struct PatchGeo {
  int C, H, W, HW, rh, rv;
  bool circular;
};

// Rows [*ia, *ib) of e that the windows of output rows [oa, ob) read; under circular
// padding they may run past the image (row j is image row wrap_row(g, j)), never more than H.
inline void input_rows(const PatchGeo& g, int oa, int ob, int* ia, int* ib) {
  *ia = oa - g.rv;
  *ib = ob + g.rv;
  if (!g.circular) {
    *ia = std::max(0, *ia);
    *ib = std::min(g.H, *ib);
  } else if (*ib - *ia >= g.H) {
    *ia = 0;
    *ib = g.H;
  }
}

// j in [-H, 2H) (every row a window reads): no division in the inner loops.
inline int wrap_row(const PatchGeo& g, int j) { return j < 0 ? j + g.H : (j >= g.H ? j - g.H : j); }

constexpr double kSkip = 45.0;  // optden.engine.bounds.SKIP_LOGITS
constexpr int kMaxRadius = 4096;  // the largest window radius used (images up to 8193 pixels high)

}  // namespace optden

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")
#define OPTDEN_PKNS p_avx512
#define OPTDEN_PISA 2
#include "patch_kernels.h"
#undef OPTDEN_PKNS
#undef OPTDEN_PISA
#pragma GCC pop_options

#define OPTDEN_PKNS p_portable
#define OPTDEN_PISA 0
#include "patch_kernels.h"
#undef OPTDEN_PKNS
#undef OPTDEN_PISA

#include "patch_prune.h"
#include "cpu_dispatch.h"

namespace py = pybind11;

namespace optden {
namespace {

using F64 = py::array_t<double, py::array::c_style | py::array::forcecast>;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;
using U8 = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

struct PatchKernels {
  const char* name;
  void (*sqdiff)(const PatchGeo&, const double*, const double*, int, int, double*);
  void (*box)(const PatchGeo&, const double*, int, int, double*, double*);
  void (*fold)(const PatchGeo&, const double*, double, const double*, const uint8_t*, int, int, int64_t,
               const int64_t*, const p_portable::FoldState&);
  bool (*weights)(const PatchGeo&, const double*, double, const double*, double, double*);
};

// The two FoldState types are the same layout (four pointers); the AVX-512 fold takes its own.
void fold_avx512(const PatchGeo& g, const double* dist, double coef, const double* y, const uint8_t* allowed, int pa,
                 int pb, int64_t base, const int64_t* qpos, const p_portable::FoldState& st) {
  p_avx512::fold(g, dist, coef, y, allowed, pa, pb, base, qpos, p_avx512::FoldState{st.m, st.s, st.acc, st.top});
}

const PatchKernels kPatchAvx512{"avx512", p_avx512::sqdiff_rows, p_avx512::box_sum, fold_avx512, p_avx512::weights};
const PatchKernels kPatchPortable{"portable", p_portable::sqdiff_rows, p_portable::box_sum, p_portable::fold,
                                  p_portable::weights};

const PatchKernels& pick_patch_kernels(const std::string& path) {
  const bool avx512 = cpu_has_avx512();  // cpu_dispatch.cpp: the one place that asks the CPU
  if (path == "auto") {
    // OPTDEN_CPU_PATH (the dense pass's override, cpu_dispatch.h) below avx512 means the portable set here
    const char* env = std::getenv("OPTDEN_CPU_PATH");
    const bool lower = env != nullptr && *env != '\0' && std::string(env) != "avx512";
    return avx512 && !lower ? kPatchAvx512 : kPatchPortable;
  }
  if (path == "avx512") {
    if (!avx512) throw std::invalid_argument("path: this CPU lacks AVX-512 (F, BW, VL, DQ, VNNI)");
    return kPatchAvx512;
  }
  if (path == "portable") return kPatchPortable;
  throw std::invalid_argument("path: expected 'auto', 'avx512' or 'portable', got '" + path + "'");
}

PatchGeo make_geo(const py::buffer_info& v, int k, bool circular) {
  if (v.ndim != 4) throw std::invalid_argument("v: expected (n, C, H, W) float64 query images");
  PatchGeo g{(int)v.shape[1], (int)v.shape[2], (int)v.shape[3], (int)(v.shape[2] * v.shape[3]), k / 2, k / 2,
             circular};
  if (k < 1 || k % 2 == 0) throw std::invalid_argument("k: expected an odd positive patch size");
  if (circular && (k > g.H || k > g.W)) throw std::invalid_argument("k: a circular window must fit the image");
  if (!circular) {  // a radius past the image reads only zeros
    g.rh = std::min(g.rh, g.W - 1);
    g.rv = std::min(g.rv, g.H - 1);
  }
  if (g.rv > kMaxRadius) throw std::invalid_argument("k: the window is taller than the kernels support");
  return g;
}

constexpr int kTile = 16;  // training images converted at a time

// Per-thread work buffers: a tile of converted rows, its shifted copy, and the maps of one pair.
struct Scratch {
  std::vector<double> tile, rolled, e, hs, dist, w, wb;
  std::vector<double> ys, ya, tb, prune;  // block sums of the tile's rows, thresholds, pruning scratch
  std::vector<char> skip;                 // the pairs of a tile and shift that are pruned
  int64_t pairs = 0, pruned = 0;
  int prune_off = 0;  // tiles (and shifts) to run without the test, after one where it rarely paid
  int64_t tests = 0;  // tiles (and shifts) tested
};

// Size a thread's pruning buffers for a tile of kTile rows and n thresholds tables.
void ensure_prune(Scratch& sc, const BlockGrid& bg, int n) {
  if (!bg.enabled || !sc.ys.empty()) return;
  const size_t blocks = (size_t)bg.C * bg.HB * bg.WB;
  sc.ys.resize(kTile * blocks);
  sc.ya.resize(kTile * blocks);
  sc.tb.resize((size_t)n * bg.NY * bg.NX);
  const size_t PW = bg.WB + 2 * bg.r, PH = bg.HB + 2 * bg.r;
  sc.prune.resize(PH * PW + 2 * PW);
}

// Block sums (s, a) of n query images v (n, C * HW), (n, C, HB, WB) each; empty without pruning.
void query_block_sums(const PatchGeo& g, const BlockGrid& bg, const double* v, int n, std::vector<double>* s,
                      std::vector<double>* a) {
  if (!bg.enabled) return;
  const size_t blocks = (size_t)bg.C * bg.HB * bg.WB, chw = (size_t)g.C * g.HW;
  s->resize(n * blocks);
  a->resize(n * blocks);
  for (int b = 0; b < n; ++b) block_sums(g, bg, v + b * chw, s->data() + b * blocks, a->data() + b * blocks);
}

// The block grid of k under g, off where the environment says OPTDEN_PATCH_PRUNE=0.
BlockGrid block_grid(const PatchGeo& g, int k) {
  BlockGrid bg = make_block_grid(g, k);
  const char* env = std::getenv("OPTDEN_PATCH_PRUNE");  // "0": no pruning (benchmarks, tests)
  if (env && std::string(env) == "0") bg.enabled = false;
  return bg;
}

// Block sums of the nr rows of a tile (C * HW each) into sc.ys / sc.ya.
void tile_block_sums(const PatchGeo& g, const BlockGrid& bg, const double* y, int nr, Scratch& sc) {
  const size_t blocks = (size_t)bg.C * bg.HB * bg.WB, chw = (size_t)g.C * g.HW;
  for (int r = 0; r < nr; ++r) block_sums(g, bg, y + r * chw, sc.ys.data() + r * blocks, sc.ya.data() + r * blocks);
}

constexpr int kBand = 32;  // output rows of one band (PatchPass)
constexpr double kPruneMin = 0.2;  // pruning rests after a tile where it skipped fewer pairs than this
constexpr int kPruneRest = 8;      // tiles (and shifts) it rests
constexpr int kThresholdEvery = 4;  // tests between two refreshes of the thresholds

// Rows [r0, r0 + nr) of a block (uint8 or float64, (R, C*HW)) minus c0, into tile.
void convert_tile(const py::buffer_info& rows, bool u8, int r0, int nr, size_t chw, double c0, double* tile) {
  for (int r = 0; r < nr; ++r) {
    double* out = tile + (size_t)r * chw;
    if (u8) {
      const uint8_t* in = static_cast<const uint8_t*>(rows.ptr) + (size_t)(r0 + r) * chw;
      for (size_t j = 0; j < chw; ++j) out[j] = (double)in[j] - c0;
    } else {
      const double* in = static_cast<const double*>(rows.ptr) + (size_t)(r0 + r) * chw;
      for (size_t j = 0; j < chw; ++j) out[j] = in[j] - c0;
    }
  }
}

// out[r][c][py][px] = tile[r][c][(py + ty) mod H][(px + tx) mod W] for nr rows.
void roll_tile(const PatchGeo& g, const double* tile, int nr, int ty, int tx, double* out) {
  const int H = g.H, W = g.W;
  const int sx = ((tx % W) + W) % W;
  for (int rc = 0; rc < nr * g.C; ++rc) {
    const double* src = tile + (size_t)rc * g.HW;
    double* dst = out + (size_t)rc * g.HW;
    for (int py = 0; py < H; ++py) {
      const double* sr = src + (size_t)((((py + ty) % H) + H) % H) * W;
      double* dr = dst + (size_t)py * W;
      std::memcpy(dr, sr + sx, sizeof(double) * (W - sx));
      std::memcpy(dr + (W - sx), sr, sizeof(double) * sx);
    }
  }
}

py::buffer_info check_rows(const py::array& rows, const PatchGeo& g, bool* u8) {
  py::buffer_info b = rows.request();
  *u8 = rows.dtype().is(py::dtype::of<uint8_t>());
  if (!*u8 && !rows.dtype().is(py::dtype::of<double>()))
    throw std::invalid_argument("rows: expected uint8 or float64 training images");
  if (b.ndim != 2 || b.shape[1] != (py::ssize_t)g.C * g.HW)
    throw std::invalid_argument("rows: expected (R, C*H*W) images of the queries' shape");
  if (!(rows.flags() & py::array::c_style)) throw std::invalid_argument("rows: expected a C-contiguous array");
  return b;
}

// The fraction of the (query, image, shift) pairs the threads pruned.
double pruned_fraction(const std::vector<Scratch>& scratch) {
  int64_t pairs = 0, pruned = 0;
  for (const Scratch& sc : scratch) pairs += sc.pairs, pruned += sc.pruned;
  return pairs ? (double)pruned / (double)pairs : 0.0;
}

// Run body(sc, t, r0, nr, b0, db) on every tile of a block of R training images, converted
// into sc.tile: with n >= T queries each thread takes all tiles and queries b0 = t, t + T,
// ... (db = T); otherwise every T-th tile and all queries (b0 = 0, db = 1). ensure(sc)
// sizes a thread's scratch first. Called with the GIL released.
template <class Ensure, class Body>
void over_tiles(const py::buffer_info& rb, bool u8, const PatchGeo& g, int n, int T_req, double c0,
                std::vector<Scratch>& scratch, Ensure ensure, Body body) {
  const int R = (int)rb.shape[0];
  const int tiles = (R + kTile - 1) / kTile;
  const bool by_query = n >= T_req;
#pragma omp parallel num_threads(T_req)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    Scratch& sc = scratch[t];
    ensure(sc);
    for (int tile = by_query ? 0 : t; tile < tiles; tile += by_query ? 1 : T) {
      const int r0 = tile * kTile, nr = std::min(kTile, R - r0);
      convert_tile(rb, u8, r0, nr, (size_t)g.C * g.HW, c0, sc.tile.data());
      body(sc, t, r0, nr, by_query ? t : 0, by_query ? T : 1);
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------- PatchPass

class PatchPass {
 public:
  PatchPass(F64 v, F64 coef, double c0, int k, bool circular, bool values, I64 shifts, U8 allowed, I64 qpos,
            const std::string& path)
      : kern_(&pick_patch_kernels(path)), v_(v), coef_(coef), shifts_(shifts), allowed_(allowed), qpos_(qpos),
        c0_(c0), values_(values) {
    g_ = make_geo(v_.request(), k, circular);
    n_ = (int)v_.shape(0);
    if (coef_.size() != n_) throw std::invalid_argument("coef: expected one value per query");
    if (shifts_.ndim() != 2 || shifts_.shape(1) != 4) throw std::invalid_argument("shifts: expected (S, 4)");
    S_ = (int)shifts_.shape(0);
    if (qpos_.size() != (py::ssize_t)S_ * g_.HW) throw std::invalid_argument("qpos: expected (S, H*W)");
    if (allowed_.size() != 0 && allowed_.size() != (py::ssize_t)S_ * g_.HW)
      throw std::invalid_argument("allowed: expected (S, H*W) or empty");
    T_ = std::max(1, omp_get_max_threads());
    bg_ = block_grid(g_, k);
    query_block_sums(g_, bg_, v_.data(), n_, &vs_, &va_);
    const size_t per = (size_t)n_ * g_.HW;
    m_.assign((size_t)T_ * per, -INFINITY);
    s_.assign((size_t)T_ * per, 0.0);
    top_.assign((size_t)T_ * per, -1);
    if (values_) acc_.assign((size_t)T_ * per * g_.C, 0.0);
    scratch_.resize(T_);
  }

  void update(const py::array& rows, I64 gidx) {
    bool u8 = false;
    const py::buffer_info rb = check_rows(rows, g_, &u8);
    const int R = (int)rb.shape[0];
    if (gidx.size() != R) throw std::invalid_argument("gidx: expected one index per row");
    const int64_t* gi = gidx.data();
    py::gil_scoped_release nogil;
    over_tiles(rb, u8, g_, n_, T_, c0_, scratch_, [this](Scratch& sc) { ensure(sc); },
               [&](Scratch& sc, int t, int r0, int nr, int b0, int db) {
                 for (int si = 0; si < S_; ++si) run_shift(sc, t, si, nr, gi + r0, b0, db);
               });
  }

  py::tuple finish() const;
  std::string path() const { return kern_->name; }
  double pruned() const { return pruned_fraction(scratch_); }

 private:
  void ensure(Scratch& sc) const {
    ensure_prune(sc, bg_, n_);
    if (!sc.tile.empty()) return;
    const size_t chw = (size_t)g_.C * g_.HW;
    sc.tile.resize(kTile * chw);
    sc.rolled.resize(kTile * chw);
    sc.e.resize((size_t)g_.H * (g_.W + 2 * g_.rh));
    sc.hs.resize(g_.HW);
    sc.dist.resize(g_.HW);
  }

  // Every pair of one shift: queries b0, b0 + db, ... against the nr rows of the tile.
  void run_shift(Scratch& sc, int t, int si, int nr, const int64_t* gid, int b0, int db) {
    const int64_t* sh = shifts_.data() + (size_t)si * 4;
    const int ty = (int)sh[0], tx = (int)sh[1], oa = (int)sh[2], ob = (int)sh[3];
    const double* y = sc.tile.data();
    if (ty != 0 || tx != 0) {
      roll_tile(g_, y, nr, ty, tx, sc.rolled.data());
      y = sc.rolled.data();
    }
    const uint8_t* allowed = allowed_.size() ? allowed_.data() + (size_t)si * g_.HW : nullptr;
    const int64_t* qpos = qpos_.data() + (size_t)si * g_.HW;
    const size_t chw = (size_t)g_.C * g_.HW, per = (size_t)n_ * g_.HW;
    const char* skip = prune_pairs(sc, t, y, nr, b0, db);
    // bands of output rows, so that a query's rows and state stay in L1 over the tile's rows
    for (int ba = oa; ba < ob; ba += kBand) {
      const int bb = std::min(ob, ba + kBand);
      int ia, ib;
      input_rows(g_, ba, bb, &ia, &ib);
      for (int b = b0; b < n_; b += db) {
        const double* vb = v_.data() + (size_t)b * chw;
        const size_t o = (size_t)t * per + (size_t)b * g_.HW;
        const p_portable::FoldState st{m_.data() + o, s_.data() + o,
                                       values_ ? acc_.data() + o * g_.C : nullptr, top_.data() + o};
        for (int r = 0; r < nr; ++r) {
          if (skip[(size_t)b * nr + r]) continue;
          const double* yr = y + (size_t)r * chw;
          kern_->sqdiff(g_, vb, yr, ia, ib, sc.e.data());
          kern_->box(g_, sc.e.data(), ba, bb, sc.hs.data(), sc.dist.data());
          kern_->fold(g_, sc.dist.data(), coef_.data()[b], yr, allowed, ba * g_.W, bb * g_.W, gid[r] * g_.HW, qpos,
                      st);
        }
      }
    }
  }

  // skip[b * nr + r]: whether pair (b, r) of this tile and shift is pruned (patch_prune.h),
  // against thresholds from this thread's running maxima.
  // The test costs ~1/5 of a pair: after a tile where it skipped under kPruneMin of the pairs
  // (large sigma, or rows that came before the maxima settled) it rests kPruneRest tiles.
  const char* prune_pairs(Scratch& sc, int t, const double* y, int nr, int b0, int db) {
    std::vector<char>& skip = sc.skip;
    skip.assign((size_t)n_ * nr, 0);
    if (!bg_.enabled) return skip.data();
    if (sc.prune_off > 0) {
      --sc.prune_off;
      return skip.data();
    }
    const int64_t before = sc.pruned, tested = sc.pairs;
    tile_block_sums(g_, bg_, y, nr, sc);
    const size_t blocks = (size_t)bg_.C * bg_.HB * bg_.WB, per = (size_t)n_ * g_.HW;
    // thresholds from the running maxima every kThresholdEvery tests (older ones are valid,
    // only more cautious: the maxima only grow)
    const bool refresh = sc.tests++ % kThresholdEvery == 0;
    for (int b = b0; b < n_; b += db) {
      double* tb = sc.tb.data() + (size_t)b * bg_.NY * bg_.NX;
      if (refresh) window_thresholds(bg_, g_.HW, m_.data() + (size_t)t * per + (size_t)b * g_.HW, kSkip, tb);
      for (int r = 0; r < nr; ++r) {
        skip[(size_t)b * nr + r] = prunable(bg_, vs_.data() + b * blocks, va_.data() + b * blocks,
                                            sc.ys.data() + r * blocks, sc.ya.data() + r * blocks, coef_.data()[b], tb,
                                            sc.prune.data());
        sc.pairs += 1;
        sc.pruned += skip[(size_t)b * nr + r];
      }
    }
    if ((double)(sc.pruned - before) < kPruneMin * (double)(sc.pairs - tested)) sc.prune_off = kPruneRest;
    return skip.data();
  }

  const PatchKernels* kern_;
  F64 v_, coef_;
  I64 shifts_;
  U8 allowed_;
  I64 qpos_;
  double c0_;
  bool values_;
  PatchGeo g_{};
  BlockGrid bg_;
  std::vector<double> vs_, va_;  // block sums of the queries (patch_prune.h)
  int n_ = 0, S_ = 0, T_ = 1;
  std::vector<double> m_, s_, acc_;
  std::vector<int64_t> top_;
  std::vector<Scratch> scratch_;
};

// Merge the threads' states: (m, s, acc (HW n, C), top) position-major (query p * n + b).
py::tuple PatchPass::finish() const {
  const int n = n_, HW = g_.HW, C = values_ ? g_.C : 0;
  const size_t per = (size_t)n * HW;
  F64 m({(py::ssize_t)per}), s({(py::ssize_t)per}), acc({(py::ssize_t)per, (py::ssize_t)C});
  I64 top({(py::ssize_t)per});
  double *mp = m.mutable_data(), *sp = s.mutable_data(), *ap = acc.mutable_data();
  int64_t* tp = top.mutable_data();
  for (int b = 0; b < n; ++b)
    for (int p = 0; p < HW; ++p) {
      const size_t src = (size_t)b * HW + p, dst = (size_t)p * n + b;
      double mx = -INFINITY;
      int best = 0;
      for (int t = 0; t < T_; ++t)
        if (m_[t * per + src] > mx) mx = m_[t * per + src], best = t;
      double ss = 0.0;
      for (int c = 0; c < C; ++c) ap[dst * C + c] = 0.0;
      for (int t = 0; t < T_; ++t) {
        const double mt = m_[t * per + src];
        if (mt == -INFINITY) continue;
        const double f = std::exp(mt - mx);
        ss += s_[t * per + src] * f;
        for (int c = 0; c < C; ++c) ap[dst * C + c] += acc_[(t * per + (size_t)b * HW) * g_.C + (size_t)c * HW + p] * f;
      }
      mp[dst] = mx;
      sp[dst] = ss;
      tp[dst] = top_[best * per + src];
    }
  return py::make_tuple(m, s, acc, top);
}

// ---------------------------------------------------------------------------- CompositePass

class CompositePass {
 public:
  CompositePass(F64 v, F64 coef, double c0, int k, bool circular, F64 lse, double cut, const std::string& path)
      : kern_(&pick_patch_kernels(path)), v_(v), coef_(coef), c0_(c0), cut_(cut) {
    g_ = make_geo(v_.request(), k, circular);
    n_ = (int)v_.shape(0);
    if (coef_.size() != n_ || lse.size() != (py::ssize_t)n_ * g_.HW)
      throw std::invalid_argument("coef, lse: expected (n,) and (H*W*n,) position-major");
    lse_.resize((size_t)n_ * g_.HW);
    for (int p = 0; p < g_.HW; ++p)
      for (int b = 0; b < n_; ++b) lse_[(size_t)b * g_.HW + p] = lse.data()[(size_t)p * n_ + b];
    T_ = std::max(1, omp_get_max_threads());
    acc_.assign((size_t)T_ * n_ * g_.C * g_.HW, 0.0);
    scratch_.resize(T_);
    bg_ = block_grid(g_, k);
    query_block_sums(g_, bg_, v_.data(), n_, &vs_, &va_);
    if (bg_.enabled) {  // a pair is skipped when coef LB(p) > cut - lse(p) at every position
      tb_.resize((size_t)n_ * bg_.NY * bg_.NX);
      for (int b = 0; b < n_; ++b)
        window_thresholds(bg_, g_.HW, lse_.data() + (size_t)b * g_.HW, cut_, tb_.data() + (size_t)b * bg_.NY * bg_.NX);
    }
  }

  double pruned() const { return pruned_fraction(scratch_); }

  void update(const py::array& rows) {
    bool u8 = false;
    const py::buffer_info rb = check_rows(rows, g_, &u8);
    py::gil_scoped_release nogil;
    over_tiles(rb, u8, g_, n_, T_, c0_, scratch_, [this](Scratch& sc) { ensure(sc); },
               [&](Scratch& sc, int t, int, int nr, int b0, int db) {
                 if (bg_.enabled) tile_block_sums(g_, bg_, sc.tile.data(), nr, sc);
                 for (int b = b0; b < n_; b += db)
                   for (int r = 0; r < nr; ++r) pair(sc, t, b, r);
               });
  }

  // -> (n, C, H, W) float64: sum over the windows covering each pixel of the patch means (centered).
  F64 finish() const {
    const size_t total = (size_t)n_ * g_.C * g_.HW;
    F64 out({(py::ssize_t)n_, (py::ssize_t)g_.C, (py::ssize_t)g_.H, (py::ssize_t)g_.W});
    double* o = out.mutable_data();
    for (size_t j = 0; j < total; ++j) {
      double a = 0.0;
      for (int t = 0; t < T_; ++t) a += acc_[(size_t)t * total + j];
      o[j] = a;
    }
    return out;
  }

 private:
  void ensure(Scratch& sc) const {
    ensure_prune(sc, bg_, 1);
    if (!sc.tile.empty()) return;
    sc.tile.resize((size_t)kTile * g_.C * g_.HW);
    sc.e.resize((size_t)g_.H * (g_.W + 2 * g_.rh));
    sc.hs.resize(g_.HW);
    sc.dist.resize(g_.HW);
    sc.w.resize((size_t)g_.H * (g_.W + 2 * g_.rh));
    sc.wb.resize(g_.HW);
  }

  // Pair (query b, row r of the tile): pruned, or its weights box-summed onto the pixels.
  void pair(Scratch& sc, int t, int b, int r) {
    const size_t chw = (size_t)g_.C * g_.HW;
    const double* vb = v_.data() + (size_t)b * chw;
    const double* y = sc.tile.data() + (size_t)r * chw;
    if (bg_.enabled) {
      const size_t blocks = (size_t)bg_.C * bg_.HB * bg_.WB;
      const bool skip = prunable(bg_, vs_.data() + b * blocks, va_.data() + b * blocks, sc.ys.data() + r * blocks,
                                 sc.ya.data() + r * blocks, coef_.data()[b], tb_.data() + (size_t)b * bg_.NY * bg_.NX,
                                 sc.prune.data());
      sc.pairs += 1;
      sc.pruned += skip;
      if (skip) return;
    }
    kern_->sqdiff(g_, vb, y, 0, g_.H, sc.e.data());
    kern_->box(g_, sc.e.data(), 0, g_.H, sc.hs.data(), sc.dist.data());
    if (!kern_->weights(g_, sc.dist.data(), coef_.data()[b], lse_.data() + (size_t)b * g_.HW, cut_, sc.w.data()))
      return;
    kern_->box(g_, sc.w.data(), 0, g_.H, sc.hs.data(), sc.wb.data());
    double* a = acc_.data() + ((size_t)t * n_ + b) * chw;
    const double* wb = sc.wb.data();
    for (int c = 0; c < g_.C; ++c) {
      double* ac = a + (size_t)c * g_.HW;
      const double* yc = y + (size_t)c * g_.HW;
#pragma omp simd
      for (int p = 0; p < g_.HW; ++p) ac[p] += wb[p] * yc[p];
    }
  }

  const PatchKernels* kern_;
  F64 v_, coef_;
  double c0_, cut_;
  PatchGeo g_{};
  BlockGrid bg_;
  std::vector<double> vs_, va_, tb_;  // block sums of the queries, the windows' thresholds (patch_prune.h)
  int n_ = 0, T_ = 1;
  std::vector<double> lse_, acc_;
  std::vector<Scratch> scratch_;
};

void register_patch(py::module_& m) {
  py::class_<PatchPass>(m, "PatchPass",
                        "The LS / ELS pass of the local denoisers: online softmaxes of every (query, position) over "
                        "blocks of training images (see csrc/patch_pass.cpp).")
      .def(py::init<F64, F64, double, int, bool, bool, I64, U8, I64, const std::string&>(), py::arg("v"),
           py::arg("coef"), py::arg("c0"), py::arg("k"), py::arg("circular"), py::arg("values"), py::arg("shifts"),
           py::arg("allowed"), py::arg("qpos"), py::arg("path") = "auto",
           "v (n, C, H, W) float64 queries minus c0; coef (n,); k odd; shifts (S, 4) int64 rows (ty, tx, first "
           "output row, end row); allowed (S, H*W) uint8 or empty (all); qpos (S, H*W) int64 the row position q "
           "of each output position at each shift.")
      .def("update", &PatchPass::update, py::arg("rows"), py::arg("gidx"),
           "rows (R, C*H*W) uint8 or float64 training images, gidx (R,) their data set rows. Releases the GIL.")
      .def("finish", &PatchPass::finish, "-> (m, s, acc (H*W*n, C), top (H*W*n,)) position-major")
      .def_property_readonly("path", &PatchPass::path)
      .def_property_readonly("pruned", &PatchPass::pruned, "fraction of the pairs skipped by the block bound");
  py::class_<CompositePass>(m, "CompositePass",
                            "The composite's second pass: normalised LS weights box-summed over the windows covering "
                            "each pixel weigh the training pixels.")
      .def(py::init<F64, F64, double, int, bool, F64, double, const std::string&>(), py::arg("v"), py::arg("coef"),
           py::arg("c0"), py::arg("k"), py::arg("circular"), py::arg("lse"), py::arg("cut"), py::arg("path") = "auto",
           "lse (H*W*n,) position-major log-sum-exp of the first pass (+inf: left out); cut: pairs whose "
           "weights are all below exp(-cut) are skipped")
      .def("update", &CompositePass::update, py::arg("rows"))
      .def("finish", &CompositePass::finish)
      .def_property_readonly("pruned", &CompositePass::pruned, "fraction of the pairs skipped by the block bound");
  m.attr("patch_pass") = true;
}

}  // namespace optden
