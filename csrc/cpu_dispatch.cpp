// CPU-feature detection and the kernel sets of the CPU dense pass (see cpu_dispatch.h).
#include "cpu_dispatch.h"

#include <immintrin.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <stdexcept>
#include <type_traits>

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

#define OPTDEN_KERNEL_SET(NS, NAME)                                                                          \
  Kernels {                                                                                                  \
    NAME, NS::dot_u8, NS::dot_q0, NS::dot_f64, NS::acc_f64, NS::wsum_u8, NS::ws_scratch_elems, NS::classify, \
        NS::dot_fused1, NS::center_row, NS::dot_raw, NS::acc_raw                                             \
  }
const Kernels kAvx512 = OPTDEN_KERNEL_SET(k_avx512, "avx512");
const Kernels kAvx2 = OPTDEN_KERNEL_SET(k_avx2, "avx2");
const Kernels kPortable = OPTDEN_KERNEL_SET(k_portable, "portable");
#undef OPTDEN_KERNEL_SET

}  // namespace

// (__builtin_cpu_supports takes a string literal only, hence one call per feature;
// __builtin_cpu_init first, as these may run before the runtime's own initialisation.)
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

std::vector<std::string> dense_paths() {
  std::vector<std::string> paths;
  if (cpu_has_avx512()) paths.push_back("avx512");
  if (cpu_has_avx2()) paths.push_back("avx2");
  paths.push_back("portable");
  return paths;
}

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

py::dict cpu_features() {
  __builtin_cpu_init();
  py::dict f;
  f["avx2"] = (bool)__builtin_cpu_supports("avx2");
  f["fma"] = (bool)__builtin_cpu_supports("fma");
  f["f16c"] = (bool)__builtin_cpu_supports("f16c");
  f["avx512f"] = (bool)__builtin_cpu_supports("avx512f");
  f["avx512bw"] = (bool)__builtin_cpu_supports("avx512bw");
  f["avx512vl"] = (bool)__builtin_cpu_supports("avx512vl");
  f["avx512dq"] = (bool)__builtin_cpu_supports("avx512dq");
  f["avx512vnni"] = (bool)__builtin_cpu_supports("avx512vnni");
  f["dense_paths"] = dense_paths();
  try {  // a report: an OPTDEN_CPU_PATH this CPU cannot run is shown, not raised
    f["dense_default_path"] = std::string(pick_kernels("auto").name);
  } catch (const std::invalid_argument& e) {
    f["dense_default_path"] = py::none();
    f["dense_path_error"] = std::string(e.what());
  }
  return f;
}

}  // namespace optden
