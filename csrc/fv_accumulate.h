// The framework-agnostic contract shared by the CPU and CUDA kernels.
//
// No torch headers on purpose: the compiled module only sees raw pointers, element strides and a
// stream handle, so one build works with the CPU torch wheel and with any CUDA torch build. The torch
// glue (dtype/device checks, allocation) lives in fvkernels/ops/.
//
// Computes, for every set n (DESIGN.md §1.5–6):
//   p[t,c]   = Σ_k z[n,t,k]·w[c,k] + bias[c]
//   xh[t,c]  = x[n,t,c] · (x_scale ? x_scale[n,t] : 1)
//   r[t,c]   = (p[t,c] > 0) ? (p[t,c] − xh[t,c])·inv_sigma2[c] : 0        for t < lengths[n]
//   g[c,k]   = Σ_t r[t,c]·z[n,t,k]   (k < d),      g[c,d] = Σ_t r[t,c]
//   v        = g · fisher_rsqrt[c,k]            (if fisher_rsqrt)
//   out[n,c,k] = signed_sqrt ? sign(v)·sqrt(|v|) : v
//   row_sumsq[n,c] = Σ_k out[n,c,k]²            (if row_sumsq; float32, one writer per row)
#pragma once

#include <cstdint>

namespace fvk {

enum class DType : int32_t { Float32 = 0, Float64 = 1, BFloat16 = 2, Float16 = 3 };

struct FVAccumulateArgs {
  int64_t num_sets = 0;  // N
  int64_t set_size = 0;  // T
  int64_t channels = 0;  // C
  int64_t latent = 0;    // d
  // One dtype for every floating input and for out; accumulation is float32 (float64 for Float64).
  DType dtype = DType::Float32;

  const void* z = nullptr;           // (N, T, d)
  int64_t z_stride[3] = {0, 0, 0};   // element strides
  const void* x = nullptr;           // (N, T, C)
  int64_t x_stride[3] = {0, 0, 0};
  const void* x_scale = nullptr;     // (N, T) or null: x̂ = x_scale · x (prenorm folded in)
  int64_t x_scale_stride[2] = {0, 0};
  const void* dec_weight = nullptr;  // (C, d)
  int64_t w_stride[2] = {0, 0};
  const void* dec_bias = nullptr;      // (C,) contiguous
  const void* inv_sigma2 = nullptr;    // (C,) contiguous
  const void* fisher_rsqrt = nullptr;  // (C, d+1) contiguous, or null
  const int64_t* lengths = nullptr;    // (N,) each in [0, T], or null for all T

  void* out = nullptr;  // (N, C, d+1): each set's (C, d+1) block contiguous, sets out_stride_n apart
  int64_t out_stride_n = 0;
  bool signed_sqrt = false;
  float* row_sumsq = nullptr;  // (N, C) contiguous, or null

  // CUDA only: float32 scratch of workspace_floats elements, at least fv_accumulate_cuda_workspace_floats.
  float* workspace = nullptr;
  int64_t workspace_floats = 0;
};

}  // namespace fvk
