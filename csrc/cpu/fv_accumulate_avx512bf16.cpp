// The bfloat16 forward for AVX512-BF16 (compiled with -mavx512bf16 on top of the AVX-512 flags, see
// CMakeLists.txt).
#include "fv_accumulate_bf16_kernel.h"
#include "fv_accumulate_isa.h"

namespace fvk::isa {

void fv_accumulate_bf16_avx512bf16(const FVAccumulateArgs& args, int num_threads) {
  Bf16Kernel::run(args, num_threads);
}

}  // namespace fvk::isa
