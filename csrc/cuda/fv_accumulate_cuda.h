#pragma once

#include "../fv_accumulate.h"

namespace fvk {

// Fused FV accumulation on the GPU, enqueued on `stream` (a cudaStream_t; null = legacy default).
// All pointers are device pointers; args.workspace must hold fv_accumulate_cuda_workspace_floats(args)
// floats. Throws std::invalid_argument on bad arguments, std::runtime_error on a CUDA error.
void fv_accumulate_cuda(const FVAccumulateArgs& args, void* stream);

// The float32 scratch fv_accumulate_cuda needs for these args on the current device (0 for most
// problems: only T-splits of small batches and row sums over several latent tiles use it). The caller
// allocates it from its own allocator, in the order of the stream the kernel runs on.
int64_t fv_accumulate_cuda_workspace_floats(const FVAccumulateArgs& args);

// The fused backward (FVAccumulateBackwardArgs), enqueued on `stream`; float32/bfloat16/float16, d at most
// 256 (std::invalid_argument beyond). Each gradient that is not null is written whole; no workspace.
void fv_accumulate_backward_cuda(const FVAccumulateBackwardArgs& args, void* stream);

// Whether the backward kernels take this problem on the current device: d at most 256 and their shared memory
// within the device's per-block opt-in (about 55 KB at d = 256: more than the 48 KB of pre-Volta GPUs).
bool fv_accumulate_backward_cuda_supported(const FVAccumulateArgs& args);

}  // namespace fvk
