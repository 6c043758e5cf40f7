#pragma once

#include <string>

#include "../fv_accumulate.h"

namespace fvk {

// Fused FV accumulation on the CPU (OpenMP over sets × channel blocks). Throws std::invalid_argument
// for a dtype it does not implement. num_threads <= 0 means OpenMP's default.
void fv_accumulate_cpu(const FVAccumulateArgs& args, int num_threads);

// The instruction set the kernel dispatches to on this CPU, e.g. "avx512", "avx2", "generic".
std::string cpu_kernel_isa();

}  // namespace fvk
