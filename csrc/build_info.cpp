// Build facts of optden._C, reported by optden.info().
#include <pybind11/pybind11.h>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace optden {
py::dict build_info() {
  py::dict d;
#ifdef _OPENMP
  d["openmp"] = true;
  d["omp_max_threads"] = omp_get_max_threads();
#else
  d["openmp"] = false;
#endif
#ifdef __VERSION__
  d["compiler"] = __VERSION__;
#endif
  __builtin_cpu_init();  // SIMD seen at run time; the dense pass dispatches on these
  d["cpu_avx2_fma"] = (bool)(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"));
  d["cpu_avx512_vnni"] = (bool)(__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                                __builtin_cpu_supports("avx512vnni"));
#ifdef OPTDEN_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  return d;
}
}  // namespace optden
