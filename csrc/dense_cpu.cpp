// The CPU dense pass: construction, update() over sub-blocks of rows in OpenMP threads,
// the online softmax, the merge of the threads, finish, and the Python binding. The
// overview and the pass's state: dense_pass.h.
#include <omp.h>
#include <pybind11/stl.h>

#include <cstring>

#include "dense_pass.h"

namespace optden {
namespace {

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

}  // namespace

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

DensePass::DensePass(py::array_t<double, py::array::c_style | py::array::forcecast> v,
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
void DensePass::update(py::array raw, py::array_t<double, py::array::c_style | py::array::forcecast> csq, int64_t offset) {
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
py::tuple DensePass::finish() {
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

py::tuple DensePass::stats() const {
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

// ---- one update(): its B rows in sub-blocks of kSB, in OpenMP threads
void DensePass::run_block(const void* X, const double* csq, int64_t B, int64_t offset) {
  const int nsb = (int)((B + kSB - 1) / kSB);
  const int T = std::max(1, std::min(omp_get_max_threads(), nsb));
  std::vector<ThreadState> ts(T);
#pragma omp parallel num_threads(T)
  {
    const int nthr = omp_get_num_threads();
    ThreadState& st = ts[omp_get_thread_num()];
    st.start(N_, d_, int_path_, stats_);
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

// ---- step 2, both paths: online softmax, top-K, the bound on the rows left out, for the
// listed rows of a sub-block of nb rows at source positions row0 + i. P becomes the
// weights exp(l - m) of the listed rows, 0 elsewhere.
void DensePass::softmax_block(int nb, int64_t row0, ThreadState& st, BlockBuffers& buf) const {
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
      heap_push(st.top[n], K_, l, row0 + i);
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
    if (buf.nskip[n]) st.xs[n] += buf.nskip[n] * std::exp(buf.skmax[n] - mn);
  }
}

// The threads' states into the pass state, by log-sum-exp. A runtime may give the region
// fewer threads than asked: their states stay empty.
void DensePass::merge_threads(std::vector<ThreadState>& ts) {
  ts.erase(std::remove_if(ts.begin(), ts.end(), [](const ThreadState& st) { return st.m.empty(); }), ts.end());
  for (auto& st : ts) refined_ += st.refined;
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

void register_dense(py::module_& m) {
  // module_local: two builds of the extension can be loaded side by side (the in-process
  // A/B comparisons of old and new kernels) without their DensePass types colliding
  py::class_<DensePass>(m, "DensePass", py::module_local(),
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
}
}  // namespace optden
