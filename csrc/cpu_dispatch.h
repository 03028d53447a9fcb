// What this CPU can run, and which kernel set each path of the CPU dense pass means.
//
// The dense pass's inner loops (dense_kernels.h, wsum_kernels.h) are compiled three times
// in cpu_dispatch.cpp, each under its own `#pragma GCC target`: "avx512" (F, BW, VL, DQ,
// VNNI), "avx2" (AVX2, FMA, F16C) and "portable" (the x86-64 baseline). A Kernels table
// holds one version's entry points. pick_kernels turns a path name into a table after
// checking, at run time, that this CPU has the instructions: a path it lacks is an error
// the caller can report, never an illegal instruction. This is the one place that asks
// the CPU what it has (the dense pass, the rescore, the peak-rate loops and build_info
// all come here).
#pragma once

#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace optden {

// One version of the dense pass's kernels; each entry is documented where it is defined
// (dense_kernels.h, wsum_kernels.h). Storage types are passed as ints: 0 uint8, 1 float16,
// 2 bfloat16, 3 float32.
struct Kernels {
  const char* name;  // the path: "avx512", "avx2" or "portable"
  void (*dot_u8)(const int16_t* const*, int, const uint8_t*, int, int, int64_t*, int, const uint8_t**,
                 const uint8_t*);
  void (*dot_q0)(const int8_t* const*, const int16_t* const*, int, const uint8_t*, int, int, int64_t*, int,
                 const uint8_t**, const uint8_t*);
  void (*dot_f64)(const double*, int, int, const double*, int, int, double*, int);
  void (*acc_f64)(const double*, int, int, const double*, int, double*, int, const int*, int, int);
  void (*wsum_u8)(const int16_t*, int, int, const double*, const int*, const uint8_t*, int, const int*, int, int,
                  double*, int, int16_t*, const uint8_t**, const uint8_t*);
  int (*ws_scratch)(int);
  int (*classify)(const double*, int, double, double, double, char, int*, char*, int*, double*);
  void (*dot_fused1)(const int8_t*, const int16_t*, const int16_t* const*, int, const uint8_t*, int, int, int64_t*,
                     int64_t*, int, const uint8_t**, const uint8_t*);
  void (*center_row)(int, const void*, int, const double*, double*);
  void (*dot_raw)(int, const double*, int, int, const void*, size_t, int, int, const double*, double*, int);
  void (*acc_raw)(int, const double*, int, int, const void*, size_t, const int*, int, int, const double*, double*, int);
};

// Whether this CPU runs the "avx512" kernels (AVX-512 F, BW, VL, DQ and VNNI).
bool cpu_has_avx512();
// Whether this CPU runs the "avx2" kernels (AVX2, FMA and F16C).
bool cpu_has_avx2();
// The kernel paths this CPU runs, best first; "portable" (last) runs everywhere.
std::vector<std::string> dense_paths();
// The kernel set of `path`: "auto" (the best this CPU runs; a non-empty environment
// variable OPTDEN_CPU_PATH names another), "avx512", "avx2" or "portable". Throws
// std::invalid_argument (Python ValueError) for an unknown path or one this CPU lacks.
const Kernels& pick_kernels(std::string path);
// {avx2, fma, f16c, avx512f, avx512bw, avx512vl, avx512dq, avx512vnni: bool,
//  dense_paths: [str], dense_default_path: str} for build_info; when OPTDEN_CPU_PATH names
// a path this CPU lacks, dense_default_path is None and dense_path_error says why.
pybind11::dict cpu_features();

}  // namespace optden
