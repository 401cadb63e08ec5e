// Shared helpers of the lightning_ft kernels: dtype codes and fp32 load/store for fp32, bf16 and fp16.
// Plain CUDA C with raw pointers (no torch headers), so every file compiles with a bare nvcc.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// dtype codes shared with lightning_ft/cuda_ext/_build.py
#define LFT_F32 0
#define LFT_BF16 1
#define LFT_F16 2

__device__ __forceinline__ float lft_load(const void* p, int64_t i, int dtype) {
  if (dtype == LFT_BF16) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
  if (dtype == LFT_F16) return __half2float(static_cast<const __half*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

__device__ __forceinline__ void lft_store(void* p, int64_t i, int dtype, float v) {
  if (dtype == LFT_BF16) {
    static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16_rn(v);
  } else if (dtype == LFT_F16) {
    static_cast<__half*>(p)[i] = __float2half_rn(v);
  } else {
    static_cast<float*>(p)[i] = v;
  }
}

static inline int lft_blocks(int64_t n, int threads) {
  int64_t b = (n + threads - 1) / threads;
  return static_cast<int>(b > 65535LL * 32 ? 65535LL * 32 : b);  // grid-stride loops cover the rest
}
