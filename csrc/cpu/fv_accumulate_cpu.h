#pragma once

#include <cstdint>
#include <string>

#include "../fv_accumulate.h"

namespace fvk {

// Fused FV accumulation on the CPU (OpenMP over sets × channel blocks) in float32 or float64, or bfloat16
// where bf16_kernel_available(); throws
// std::invalid_argument for another dtype or inconsistent arguments. num_threads <= 0 means OpenMP's
// default. Results do not depend on num_threads.
void fv_accumulate_cpu(const FVAccumulateArgs& args, int num_threads);

// Whether the CPU (and FVK_CPU_ISA) allow the bfloat16 forward (AVX512-BF16: fv_accumulate_bf16_kernel.h);
// without it fv_accumulate_cpu refuses bfloat16.
bool bf16_kernel_available();

// Its fused backward (csrc/fv_accumulate.h), same dtypes (bfloat16 included) and ISA choice; deterministic for a given
// num_threads (the weight, bias and inv_sigma2 gradients are summed per thread, then in thread order).
void fv_accumulate_backward_cpu(const FVAccumulateBackwardArgs& args, int num_threads);

// Asks Linux for transparent huge pages on the 2 MiB-aligned interior of [pointer, pointer + bytes) when it spans
// at least 4 MiB (FVK_HUGE_PAGES=0: never): the kernels do so for their outputs, which are mostly fresh
// allocations they touch first. A hint: refusals change nothing.
void advise_huge_pages(void* pointer, int64_t bytes);

// The instruction set the kernel dispatches to: "avx512", "avx2" or "generic" — the best this CPU
// supports, or a lower one named by the environment variable FVK_CPU_ISA (read at every call; naming
// one the CPU lacks throws std::invalid_argument).
std::string cpu_kernel_isa();

}  // namespace fvk
