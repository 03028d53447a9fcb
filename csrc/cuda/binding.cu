// pybind11 layer of the CUDA kernels: optden::register_cuda, called by module.cpp when
// the extension is built with -DOPTDEN_WITH_CUDA. Tensors cross as raw device pointers
// (torch's data_ptr()), so no torch header is needed to build this.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "dense.cuh"

namespace py = pybind11;

namespace optden {

void register_cuda(py::module_& m) {
  m.attr("CUDA_QUERIES_PER_BLOCK") = cuda::kQueriesPerBlock;
  m.attr("CUDA_TILE_ROWS") = cuda::kTileRows;

  m.def(
      "cuda_device_count",
      []() {
        const char* err = nullptr;
        const int n = cuda::device_count(&err);
        if (n < 0) throw std::runtime_error(std::string("CUDA runtime: ") + err);
        return n;
      },
      "Number of CUDA devices the extension's runtime sees (raises RuntimeError when the runtime fails).");

  m.def(
      "cuda_dense_partial",
      [](int dtype, uintptr_t x, int64_t stride_x, uintptr_t center, uintptr_t csq, uintptr_t v, int64_t stride_v,
         uintptr_t coef, uintptr_t logits, int64_t stride_l, uintptr_t mo, uintptr_t so, uintptr_t acc, int64_t n,
         int64_t b, int64_t d, int64_t rows_per_split, bool centered, int device, uintptr_t stream) {
        cuda::DenseArgs a;
        a.x = reinterpret_cast<const void*>(x);
        a.stride_x = stride_x;
        a.center = reinterpret_cast<const float*>(center);
        a.csq = reinterpret_cast<const float*>(csq);
        a.v = reinterpret_cast<const float*>(v);
        a.stride_v = stride_v;
        a.coef = reinterpret_cast<const float*>(coef);
        a.logits = reinterpret_cast<float*>(logits);
        a.stride_l = stride_l;
        a.m = reinterpret_cast<float*>(mo);
        a.s = reinterpret_cast<float*>(so);
        a.acc = reinterpret_cast<float*>(acc);
        a.n = n;
        a.b = b;
        a.d = d;
        a.rows_per_split = rows_per_split;
        a.centered = centered;
        const char* err = nullptr;
        {
          py::gil_scoped_release release;
          err = cuda::dense_partial(dtype, a, device, stream);
        }
        if (err != nullptr) throw std::runtime_error(std::string("cuda_dense_partial: ") + err);
      },
      py::arg("dtype"), py::arg("x"), py::arg("stride_x"), py::arg("center"), py::arg("csq"), py::arg("v"),
      py::arg("stride_v"), py::arg("coef"), py::arg("logits"), py::arg("stride_l"), py::arg("m"), py::arg("s"),
      py::arg("acc"), py::arg("n"), py::arg("b"), py::arg("d"), py::arg("rows_per_split"), py::arg("centered"),
      py::arg("device"), py::arg("stream"),
      "Fused dense pass on device pointers (see csrc/cuda/dense.cuh): dtype code 0 uint8, 1 fp16, 2 bf16, "
      "3 fp32; writes logits (N, B), m and s (S, N), acc (S, N, d), all fp32, asynchronously on CUDA device `device` and `stream`.");
}

}  // namespace optden
