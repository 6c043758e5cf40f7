// The per-instruction-set entry points behind fv_accumulate_cpu (internal to csrc/cpu).
#pragma once

#include "../fv_accumulate.h"

namespace fvk::isa {

// Float32 or Float64 (the dispatcher has checked args). Each is compiled in its own TU with its own -m
// flags; call one only when the CPU supports its instruction set. The portable build lives in the
// dispatcher's TU.
void fv_accumulate_avx2(const FVAccumulateArgs& args, int num_threads);
void fv_accumulate_avx512(const FVAccumulateArgs& args, int num_threads);
// BFloat16 inputs, out and gradients (fp32 accumulation); call only when the CPU has AVX512-BF16.
void fv_accumulate_bf16_avx512bf16(const FVAccumulateArgs& args, int num_threads);
void fv_accumulate_backward_bf16_avx512bf16(const FVAccumulateBackwardArgs& args, int num_threads);
void fv_accumulate_backward_avx2(const FVAccumulateBackwardArgs& args, int num_threads);
void fv_accumulate_backward_avx512(const FVAccumulateBackwardArgs& args, int num_threads);

}  // namespace fvk::isa
