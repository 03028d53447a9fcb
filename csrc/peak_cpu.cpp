// The arithmetic peaks of this CPU's vector units, for the benchmarks' "ratio to the
// physical limit": how many 512-bit (or, without AVX-512, 256-bit) instructions of each
// kind the cores retire per second in a loop of independent accumulators (no memory).
// The dense pass is built from exactly these instructions (vpdpbusd, vpdpwssd, vfmadd*pd),
// so these rates bound what any exact kernel on this machine can reach.
#include <immintrin.h>
#include <omp.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <chrono>
#include <stdexcept>
#include <string>

#include "cpu_dispatch.h"

namespace py = pybind11;

namespace optden {
namespace {

#define OPTDEN_R12(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11)
#define OPTDEN_PEAK_LOOP(NAME, TARGET, T, SET1, OP, SUM)                                  \
  __attribute__((noinline, target(TARGET))) double NAME(long n, int seed) {              \
    OPTDEN_R12(SET1)                                                                      \
    const T x = _mm512_set1_epi32(0x01020304 + seed), y = _mm512_set1_epi32(0x00010001); \
    for (long i = 0; i < n; ++i) { OPTDEN_R12(OP) }                                       \
    long s = 0;                                                                           \
    OPTDEN_R12(SUM)                                                                       \
    return (double)s;                                                                     \
  }
#define OPTDEN_SET_I(k) __m512i a##k = _mm512_set1_epi32(k);
#define OPTDEN_SUM_I(k) s += _mm512_reduce_add_epi32(a##k);
#define OPTDEN_OP_BUSD(k) a##k = _mm512_dpbusd_epi32(a##k, x, y);
#define OPTDEN_OP_WSSD(k) a##k = _mm512_dpwssd_epi32(a##k, x, y);
#define OPTDEN_SET_D(k) __m512d a##k = _mm512_set1_pd(k);
#define OPTDEN_SUM_D(k) s += (long)_mm512_reduce_add_pd(a##k);
#define OPTDEN_OP_FMAD(k) a##k = _mm512_fmadd_pd(a##k, _mm512_castsi512_pd(x), _mm512_castsi512_pd(y));

OPTDEN_PEAK_LOOP(loop_dpbusd, "avx512f,avx512vnni", __m512i, OPTDEN_SET_I, OPTDEN_OP_BUSD, OPTDEN_SUM_I)
OPTDEN_PEAK_LOOP(loop_dpwssd, "avx512f,avx512vnni", __m512i, OPTDEN_SET_I, OPTDEN_OP_WSSD, OPTDEN_SUM_I)
OPTDEN_PEAK_LOOP(loop_fmapd, "avx512f", __m512i, OPTDEN_SET_D, OPTDEN_OP_FMAD, OPTDEN_SUM_D)

// Instructions per second of `loop` summed over all OpenMP threads (best of `repeats`).
double rate(double (*loop)(long, int), long n, int repeats) {
  double best = 0.0;
  volatile double sink = 0.0;
  for (int r = 0; r < repeats; ++r) {
    const auto t0 = std::chrono::steady_clock::now();
    int threads = 1;
#pragma omp parallel
    {
#pragma omp single
      threads = omp_get_num_threads();
      const double v = loop(n, omp_get_thread_num());
#pragma omp atomic
      sink += v;
    }
    const double t = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 12.0 * (double)n * threads / t);
  }
  return best;
}

py::dict cpu_peaks(long n, int repeats) {
  if (!cpu_has_avx512())  // the instruction set of the avx512 kernel path, which these loops time
    throw std::runtime_error("cpu_peaks: measures AVX-512 (F, BW, VL, DQ, VNNI) instructions, which this CPU lacks");
  if (n < 1 || repeats < 1) throw std::invalid_argument("n and repeats: expected >= 1");
  py::dict out;
  {
    py::gil_scoped_release nogil;
    const double busd = rate(loop_dpbusd, n, repeats), wssd = rate(loop_dpwssd, n, repeats),
                 fmad = rate(loop_fmapd, n, repeats);
    py::gil_scoped_acquire gil;
    // multiply-adds per second: vpdpbusd 64 (u8 x s8), vpdpwssd 32 (int16), vfmadd231pd 8
    out["int8_gmacs"] = busd * 64 / 1e9;
    out["int16_gmacs"] = wssd * 32 / 1e9;
    out["fp64_gflops"] = fmad * 16 / 1e9;
  }
  return out;
}

}  // namespace

void register_peaks(py::module_& m) {
  m.def("cpu_peaks", &cpu_peaks, py::arg("n") = 20000000, py::arg("repeats") = 3,
        "Peak rates of all OpenMP threads in register-only loops: {'int8_gmacs': vpdpbusd u8 x s8, "
        "'int16_gmacs': vpdpwssd, 'fp64_gflops': vfmadd pd} (AVX-512 VNNI CPUs only; n loop trips of 12 "
        "instructions per thread).");
}
}  // namespace optden
