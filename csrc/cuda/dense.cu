// CUDA kernels of the fused dense pass (see dense.cuh for the contract).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "dense.cuh"

namespace optden {
namespace cuda {
namespace {

__device__ __forceinline__ float to_float(uint8_t x) { return static_cast<float>(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(float x) { return x; }

__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}

// grid: (ceil(N / kQueriesPerBlock), S); block: kThreads.
template <typename T>
__global__ void __launch_bounds__(kThreads) dense_partial_kernel(DenseArgs a) {
  constexpr int QN = kQueriesPerBlock;
  constexpr int TM = kTileRows;
  constexpr int WARPS = kThreads / 32;
  __shared__ float dots[QN][TM];
  __shared__ float probs[QN][TM];
  __shared__ float m_run[QN], s_run[QN], alpha[QN], coef[QN];

  const T* x = static_cast<const T*>(a.x);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t q0 = static_cast<int64_t>(blockIdx.x) * QN;
  const int64_t split = blockIdx.y;
  const int64_t row0 = split * a.rows_per_split;
  const int64_t row1 = min(row0 + a.rows_per_split, a.b);
  const int nq = static_cast<int>((a.n - q0 < QN ? a.n - q0 : QN));
  const int64_t d = a.d;

  if (tid < QN) {
    m_run[tid] = -INFINITY;
    s_run[tid] = 0.0f;
    coef[tid] = tid < nq ? a.coef[q0 + tid] : 0.0f;
  }
  __syncthreads();

  for (int64_t r0 = row0; r0 < row1; r0 += TM) {
    const int tm = static_cast<int>((row1 - r0 < TM ? row1 - r0 : TM));
    // 1. dots: warp w takes rows w, w + WARPS, ...; lanes stride over d
    for (int r = warp; r < TM; r += WARPS) {
      float part[QN];
#pragma unroll
      for (int q = 0; q < QN; ++q) part[q] = 0.0f;
      if (r < tm) {
        const T* xr = x + (r0 + r) * a.stride_x;
        for (int64_t j = lane; j < d; j += 32) {
          float xv = to_float(xr[j]);
          if (a.centered) xv -= a.center[j];
#pragma unroll
          for (int q = 0; q < QN; ++q)
            if (q < nq) part[q] = fmaf(a.v[(q0 + q) * a.stride_v + j], xv, part[q]);
        }
      }
#pragma unroll
      for (int q = 0; q < QN; ++q) {
        const float t = warp_sum(part[q]);
        if (lane == 0) dots[q][r] = t;
      }
    }
    __syncthreads();
    // 2. logits and the online softmax: warp q owns query q, lane r owns row r
    if (warp < QN) {
      const int q = warp, r = lane;
      float l = -INFINITY;
      if (r < tm) {
        l = coef[q] * (2.0f * dots[q][r] - a.csq[r0 + r]);
        if (q < nq) a.logits[(q0 + q) * a.stride_l + r0 + r] = l;
      }
      const float m_old = m_run[q];
      const float m_new = fmaxf(m_old, warp_max(l));
      const float p = r < tm ? expf(l - m_new) : 0.0f;
      probs[q][r] = p;
      const float sum = warp_sum(p);
      if (lane == 0) {
        const float al = expf(m_old - m_new);  // 0 on the first tile
        alpha[q] = al;
        s_run[q] = s_run[q] * al + sum;
        m_run[q] = m_new;
      }
    }
    __syncthreads();
    // 3. weighted sum of the raw rows into the split's accumulator (global memory)
    const bool first = r0 == row0;
    for (int64_t j = tid; j < d; j += kThreads) {
      float acc[QN];
#pragma unroll
      for (int q = 0; q < QN; ++q) {
        acc[q] = 0.0f;
        if (q < nq && !first) acc[q] = a.acc[(split * a.n + q0 + q) * d + j] * alpha[q];
      }
      for (int r = 0; r < tm; ++r) {
        const float xv = to_float(x[(r0 + r) * a.stride_x + j]);
#pragma unroll
        for (int q = 0; q < QN; ++q) acc[q] = fmaf(probs[q][r], xv, acc[q]);
      }
#pragma unroll
      for (int q = 0; q < QN; ++q)
        if (q < nq) a.acc[(split * a.n + q0 + q) * d + j] = acc[q];
    }
    __syncthreads();
  }
  if (tid < nq) {
    a.m[split * a.n + q0 + tid] = m_run[tid];
    a.s[split * a.n + q0 + tid] = s_run[tid];
  }
}

template <typename T>
cudaError_t launch(const DenseArgs& a, cudaStream_t stream) {
  const int64_t splits = (a.b + a.rows_per_split - 1) / a.rows_per_split;
  dim3 grid(static_cast<unsigned>((a.n + kQueriesPerBlock - 1) / kQueriesPerBlock), static_cast<unsigned>(splits));
  dense_partial_kernel<T><<<grid, kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

const char* dense_partial(int dtype, const DenseArgs& args, int device, uintptr_t stream) {
  if (args.n < 1 || args.b < 1 || args.d < 1 || args.rows_per_split < 1) return "dense_partial: empty shape";
  if ((args.b + args.rows_per_split - 1) / args.rows_per_split > 65535) return "dense_partial: too many splits (> 65535)";
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  cudaError_t err = cudaSetDevice(device);
  if (err != cudaSuccess) return cudaGetErrorString(err);
  switch (dtype) {
    case kUInt8: err = launch<uint8_t>(args, st); break;
    case kFloat16: err = launch<__half>(args, st); break;
    case kBFloat16: err = launch<__nv_bfloat16>(args, st); break;
    case kFloat32: err = launch<float>(args, st); break;
    default: return "dense_partial: unknown dtype code";
  }
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

int device_count(const char** error) {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    *error = cudaGetErrorString(err);
    return -1;
  }
  *error = nullptr;
  return n;
}

}  // namespace cuda
}  // namespace optden
