// The copilot's error of one token: onehot(target) - softmax(logits) over the vocabulary, computed in fp32 per row
// and written compactly in bf16 (or fp16 / fp32 by dtype code). Rows whose target is ``ignore_index`` are zero.
// One block per row: pass 1 is an online max / sum-of-exp reduction, pass 2 writes the row.
// Reference: lightning_ft.cuda_ext.reference.copilot_error.
#include <cub/block/block_reduce.cuh>

#include "common.cuh"

#define LFT_COPILOT_THREADS 256

struct LftMaxSum {
  float max;
  float sum;
};

struct LftMaxSumOp {
  __device__ __forceinline__ LftMaxSum operator()(const LftMaxSum& a, const LftMaxSum& b) const {
    if (a.max == -INFINITY) return b;
    if (b.max == -INFINITY) return a;
    const float m = fmaxf(a.max, b.max);
    return LftMaxSum{m, a.sum * expf(a.max - m) + b.sum * expf(b.max - m)};
  }
};

__global__ void lft_copilot_error_kernel(const void* __restrict__ logits, int logits_dtype, int64_t row_stride,
                                         const int64_t* __restrict__ targets, int64_t vocab, int64_t ignore_index,
                                         void* __restrict__ out, int out_dtype) {
  typedef cub::BlockReduce<LftMaxSum, LFT_COPILOT_THREADS> Reduce;
  __shared__ typename Reduce::TempStorage storage;
  __shared__ LftMaxSum total;
  const int64_t row = blockIdx.x;
  const int64_t target = targets[row];
  const int64_t in_base = row * row_stride;
  const int64_t out_base = row * vocab;
  if (target == ignore_index) {
    for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) lft_store(out, out_base + c, out_dtype, 0.0f);
    return;
  }
  LftMaxSum local{-INFINITY, 0.0f};
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) {
    const float x = lft_load(logits, in_base + c, logits_dtype);
    if (x > local.max) {
      local.sum = (local.max == -INFINITY ? 0.0f : local.sum * expf(local.max - x)) + 1.0f;
      local.max = x;
    } else if (x != -INFINITY) {  // a masked (-inf) logit adds nothing, also before any finite one
      local.sum += expf(x - local.max);
    }
  }
  LftMaxSum reduced = Reduce(storage).Reduce(local, LftMaxSumOp());
  if (threadIdx.x == 0) total = reduced;
  __syncthreads();
  const float inv = 1.0f / total.sum;
  for (int64_t c = threadIdx.x; c < vocab; c += blockDim.x) {
    const float p = expf(lft_load(logits, in_base + c, logits_dtype) - total.max) * inv;
    lft_store(out, out_base + c, out_dtype, (c == target ? 1.0f : 0.0f) - p);
  }
}

// ``logits`` rows of ``vocab`` entries start ``row_stride`` elements apart (the last dimension is contiguous);
// ``out`` is contiguous [rows, vocab]. Returns a cudaError_t code.
extern "C" int lft_copilot_error(const void* logits, int logits_dtype, int64_t rows, int64_t vocab,
                                 int64_t row_stride, const int64_t* targets, int64_t ignore_index, void* out,
                                 int out_dtype, uintptr_t stream) {
  if (rows <= 0 || vocab <= 0) return 0;
  if (rows > 2147483647LL) return static_cast<int>(cudaErrorInvalidValue);
  lft_copilot_error_kernel<<<static_cast<unsigned int>(rows), LFT_COPILOT_THREADS, 0,
                             reinterpret_cast<cudaStream_t>(stream)>>>(logits, logits_dtype, row_stride, targets,
                                                                       vocab, ignore_index, out, out_dtype);
  return static_cast<int>(cudaGetLastError());
}
