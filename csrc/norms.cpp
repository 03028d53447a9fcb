// Float64 squared norms of centered uint8 rows: ||q_i - c||^2, exact in int64 when
// the center c is integral (the Dataset rounds it so), otherwise accumulated in double.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace optden {
namespace {

py::array_t<double> centered_sqnorms_u8(py::array_t<uint8_t, py::array::c_style> rows,
                                        py::array_t<double, py::array::c_style | py::array::forcecast> center) {
  if (rows.ndim() != 2) throw std::invalid_argument("rows: expected a 2-D (M, d) uint8 array");
  if (center.ndim() != 1 || center.shape(0) != rows.shape(1))
    throw std::invalid_argument("center: expected shape (" + std::to_string(rows.shape(1)) + ",)");
  const int64_t M = rows.shape(0), d = rows.shape(1);
  const uint8_t* q = rows.data();
  const double* c = center.data();
  bool integral = true;
  for (int64_t j = 0; j < d; ++j) integral = integral && (c[j] == std::nearbyint(c[j]));
  py::array_t<double> out(M);
  double* o = out.mutable_data();
  {
    py::gil_scoped_release nogil;
    if (integral) {
      std::vector<int32_t> ci(d);
      for (int64_t j = 0; j < d; ++j) ci[j] = static_cast<int32_t>(c[j]);
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < M; ++i) {
        const uint8_t* r = q + i * d;
        int64_t acc = 0;
        for (int64_t j = 0; j < d; ++j) {
          const int32_t t = static_cast<int32_t>(r[j]) - ci[j];
          acc += static_cast<int64_t>(t * t);
        }
        o[i] = static_cast<double>(acc);
      }
    } else {
#pragma omp parallel for schedule(static)
      for (int64_t i = 0; i < M; ++i) {
        const uint8_t* r = q + i * d;
        double acc = 0.0;
        for (int64_t j = 0; j < d; ++j) {
          const double t = static_cast<double>(r[j]) - c[j];
          acc += t * t;
        }
        o[i] = acc;
      }
    }
  }
  return out;
}

}  // namespace

void register_norms(py::module_& m) {
  m.def("centered_sqnorms_u8", &centered_sqnorms_u8, py::arg("rows"), py::arg("center"),
        "||rows_i - center||^2 as float64 (M,) for uint8 rows (M, d); exact for an integral center.");
}
}  // namespace optden
