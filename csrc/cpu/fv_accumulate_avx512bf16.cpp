// The bfloat16 kernels (forward and backward) for AVX512-BF16 (compiled with -mavx512bf16 on top of the AVX-512
// flags, see CMakeLists.txt).
#include "fv_accumulate_bf16_backward_kernel.h"
#include "fv_accumulate_bf16_kernel.h"
#include "fv_accumulate_isa.h"

namespace fvk::isa {

void fv_accumulate_bf16_avx512bf16(const FVAccumulateArgs& args, int num_threads) {
  Bf16Kernel::run(args, num_threads);
}

void fv_accumulate_backward_bf16_avx512bf16(const FVAccumulateBackwardArgs& args, int num_threads) {
  Bf16Backward::run(args, num_threads);
}

}  // namespace fvk::isa
