#pragma once

#include "../fv_accumulate.h"

namespace fvk {

// Fused FV accumulation on the GPU, enqueued on `stream` (a cudaStream_t; null = legacy default).
// All pointers are device pointers. Throws std::runtime_error on a CUDA error.
void fv_accumulate_cuda(const FVAccumulateArgs& args, void* stream);

}  // namespace fvk
