// Build facts of optden._C and what this CPU runs, reported by optden.info().
#include <pybind11/pybind11.h>

#include "cpu_dispatch.h"
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
  d["cpu"] = cpu_features();  // SIMD seen at run time and the dense pass's kernel paths
#ifdef OPTDEN_WITH_CUDA
  d["cuda"] = true;
#else
  d["cuda"] = false;
#endif
  return d;
}
}  // namespace optden
