// Fused dense pass of the optimal denoiser over one block of rows (CUDA, fp32).
//
// Same contract as the Triton kernel (kernels/dense.py): for queries v (N, d) fp32 and
// rows x_i (B, d) (uint8 / fp16 / bf16 / fp32; x_i = raw_i - center when `centered`),
// writes the row-dependent logits l_ni = coef_n (2 v_n . x_i - csq_i) to logits (N, B),
// and per split of `rows_per_split` rows an online softmax: m (S, N), s (S, N) and the
// raw-space weighted sum acc (S, N, d) = sum_i exp(l_ni - m) raw_i. The host merges the
// splits by log-sum-exp and bounds every rounding (optden/kernels/bounds.py with
// kTileRows as BLOCK_M and one query piece).
//
// Kernels take raw device pointers, so this compiles with plain nvcc (no torch headers).
#pragma once
#include <cstdint>

namespace optden {
namespace cuda {

// Storage dtype codes shared with optden/backends/cuda.py.
enum DTypeCode : int { kUInt8 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat32 = 3 };

constexpr int kQueriesPerBlock = 8;  // queries one thread block handles (one warp each in the softmax)
constexpr int kTileRows = 32;        // rows per tile (one per lane in the softmax)
constexpr int kThreads = 256;        // threads per block (8 warps)

struct DenseArgs {
  const void* x;          // (B, d) rows, unit stride along d
  int64_t stride_x;       // elements between rows
  const float* center;    // (d,)
  const float* csq;       // (B,)
  const float* v;         // (N, d) fp32 queries
  int64_t stride_v;
  const float* coef;      // (N,)
  float* logits;          // (N, B) out
  int64_t stride_l;
  float* m;               // (S, N) out
  float* s;               // (S, N) out
  float* acc;             // (S, N, d) out, contiguous
  int64_t n, b, d, rows_per_split;
  bool centered;
};

// Launches the pass on `device` and `stream` (a cudaStream_t as an integer; 0 = legacy
// default). The device is set explicitly: this extension's CUDA runtime keeps its own
// current device, apart from torch's. Returns a CUDA error string, or nullptr on success.
const char* dense_partial(int dtype, const DenseArgs& args, int device, uintptr_t stream);

// Number of visible CUDA devices, or -1 with `error` set when the runtime fails.
int device_count(const char** error);

}  // namespace cuda
}  // namespace optden
