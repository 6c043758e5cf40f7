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
// and the backward of g (FVAccumulateBackwardArgs, below).
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

// The gradients of g (before the signed square root) with respect to the forward's inputs, given
// gout = ∂L/∂v (v = g · fisher_rsqrt as above). With h = gout · fisher_rsqrt, split into h_w (C, d) and
// h_b (C,), per set and descriptor (DESIGN §1.5; the mask 1(p > 0) is a constant almost everywhere):
//   a[t,c]  = Σ_k z[t,k]·h_w[c,k] + h_b[c]              (∂L/∂r)
//   q[t,c]  = (p > 0 ∧ t < len) ? a[t,c]·inv_sigma2[c] : 0    (∂L/∂p)
//   grad_z[t,k]        = Σ_c r[t,c]·h_w[c,k] + Σ_c q[t,c]·w[c,k]
//   grad_x[t,c]        = −q[t,c]·x_scale[t]
//   grad_x_scale[t]    = −Σ_c q[t,c]·x[t,c]
//   grad_weight[c,k]  += Σ_t q[t,c]·z[t,k]      grad_bias[c] += Σ_t q[t,c]
//   grad_inv_sigma2[c]+= Σ_t (p > 0 ∧ t < len) ? a[t,c]·(p − xh)[t,c] : 0
// Rows t ≥ len get zero gradients. Each output pointer may be null (not needed: no work for it).
struct FVAccumulateBackwardArgs {
  FVAccumulateArgs forward;  // the forward call's inputs; its out, row_sumsq and signed_sqrt are unused
  const void* grad_out = nullptr;  // (N, C, d+1), each set's block contiguous, sets grad_out_stride_n apart
  int64_t grad_out_stride_n = 0;
  // Outputs, contiguous, in the forward's dtype.
  void* grad_z = nullptr;           // (N, T, d)
  void* grad_x = nullptr;           // (N, T, C)
  void* grad_x_scale = nullptr;     // (N, T)
  void* grad_weight = nullptr;      // (C, d)
  void* grad_bias = nullptr;        // (C,)
  void* grad_inv_sigma2 = nullptr;  // (C,)
};

}  // namespace fvk
