// Fused compact sparse AdamW: gather the dense gradient at the selected flat indices, AdamW on the compact fp32
// moments (and fp32 master values for bf16/fp16 weights), write the values back into the weight in its dtype.
// One pass, one thread per selected entry. Reference: lightning_ft.sparse.compact.sparse_adamw_.
#include "common.cuh"

template <typename Index>
__global__ void lft_sparse_adamw_kernel(void* __restrict__ param, int param_dtype, const void* __restrict__ grad,
                                        int grad_dtype, const Index* __restrict__ indices, int64_t n,
                                        float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
                                        float* __restrict__ master, float weight1, float beta2, float weight2,
                                        float eps, float decay, float step_size, float bias_correction2_sqrt,
                                        int maximize) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t j = static_cast<int64_t>(indices[i]);
    float g = lft_load(grad, j, grad_dtype);
    if (maximize) g = -g;
    float v = master != nullptr ? master[i] : lft_load(param, j, param_dtype);
    v = v * decay;
    float m = exp_avg[i];
    m = weight1 < 0.5f ? m + weight1 * (g - m) : g - (g - m) * (1.0f - weight1);  // torch.lerp's two branches
    float s = exp_avg_sq[i] * beta2 + weight2 * g * g;
    const float denom = sqrtf(s) / bias_correction2_sqrt + eps;
    v = v + (-step_size) * (m / denom);
    exp_avg[i] = m;
    exp_avg_sq[i] = s;
    if (master != nullptr) master[i] = v;
    lft_store(param, j, param_dtype, v);
  }
}

// Returns a cudaError_t code (0 on success). ``index64`` selects int64 instead of int32 indices; ``master`` may be
// null (fp32 weights). The scalars are computed by the caller in double precision as torch.optim.AdamW does:
// weight1 = 1 - beta1, weight2 = 1 - beta2, decay = 1 - lr * weight_decay, step_size = lr / (1 - beta1**step),
// bias_correction2_sqrt = (1 - beta2**step) ** 0.5. ``stream`` is a cudaStream_t passed as an integer.
extern "C" int lft_sparse_adamw(void* param, int param_dtype, const void* grad, int grad_dtype,
                                const void* indices, int index64, int64_t n, float* exp_avg, float* exp_avg_sq,
                                float* master, float weight1, float beta2, float weight2, float eps, float decay,
                                float step_size, float bias_correction2_sqrt, int maximize, uintptr_t stream) {
  if (n <= 0) return 0;
  const int threads = 256;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  if (index64) {
    lft_sparse_adamw_kernel<int64_t><<<lft_blocks(n, threads), threads, 0, s>>>(
        param, param_dtype, grad, grad_dtype, static_cast<const int64_t*>(indices), n, exp_avg, exp_avg_sq, master,
        weight1, beta2, weight2, eps, decay, step_size, bias_correction2_sqrt, maximize);
  } else {
    lft_sparse_adamw_kernel<int32_t><<<lft_blocks(n, threads), threads, 0, s>>>(
        param, param_dtype, grad, grad_dtype, static_cast<const int32_t*>(indices), n, exp_avg, exp_avg_sq, master,
        weight1, beta2, weight2, eps, decay, step_size, bias_correction2_sqrt, maximize);
  }
  return static_cast<int>(cudaGetLastError());
}
