// optden._C: the compiled extension (one pybind11 module).
// Each concern lives in its own source file and registers its functions here.
#include <pybind11/pybind11.h>

namespace py = pybind11;

namespace optden {
void register_dense(py::module_& m);  // csrc/dense_cpu.cpp: the cpu backend's dense pass
void register_peaks(py::module_& m);  // csrc/peak_cpu.cpp: vector-unit peak rates for the benchmarks
void register_prune(py::module_& m);  // csrc/prune_cpu.cpp: exact re-score of pruned candidate sets, leaf bounds and scans
void register_patch(py::module_& m);  // csrc/patch_pass.cpp: the local denoisers' passes
py::dict build_info();                // csrc/build_info.cpp: compiler, OpenMP, CUDA, CPU features (cpu_dispatch.cpp)
#ifdef OPTDEN_WITH_CUDA
void register_cuda(py::module_& m);  // csrc/cuda/*.cu, built when nvcc and a CUDA torch exist
#endif
}  // namespace optden

PYBIND11_MODULE(_C, m) {
  m.doc() = "optden compiled kernels (C++ CPU; CUDA when built with it)";
  optden::register_dense(m);
  optden::register_peaks(m);
  optden::register_prune(m);
  optden::register_patch(m);
#ifdef OPTDEN_WITH_CUDA
  optden::register_cuda(m);
#endif
  m.def("build_info", &optden::build_info,
        "How this extension was built (compiler, OpenMP, CUDA) and what this CPU runs: 'cpu' holds the SIMD "
        "features seen at run time, the dense pass's kernel paths (dense_paths, best first) and the one 'auto' "
        "picks (dense_default_path).");
}
