// The fused kernels (forward and backward) for AVX-512 (compiled with -mavx512f … -mfma, see CMakeLists.txt).
#include <immintrin.h>

#include "fv_accumulate_isa.h"
#include "fv_accumulate_backward_kernel.h"
#include "fv_accumulate_kernel.h"

namespace fvk::isa {
namespace {

struct Avx512 {
  static constexpr int vector_bytes = 64;
  static constexpr int max_rows = 12;  // 12 × 2 accumulators + 2 B vectors + 1 broadcast: 27 of 32 zmm
  static void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
  static void stream(double* p, __m512d v) { _mm512_stream_pd(p, v); }
  static void fence() { _mm_sfence(); }
};

}  // namespace

void fv_accumulate_avx512(const FVAccumulateArgs& args, int num_threads) {
  run_fused_kernel<Avx512>(args, num_threads);
}

void fv_accumulate_backward_avx512(const FVAccumulateBackwardArgs& args, int num_threads) {
  run_fused_backward<Avx512>(args, num_threads);
}

}  // namespace fvk::isa
