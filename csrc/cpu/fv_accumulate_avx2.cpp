// The fused kernels (forward and backward) for AVX2 + FMA (compiled with -mavx2 -mfma, see CMakeLists.txt).
#include <immintrin.h>

#include "fv_accumulate_isa.h"
#include "fv_accumulate_backward_kernel.h"
#include "fv_accumulate_kernel.h"

namespace fvk::isa {
namespace {

struct Avx2 {
  static constexpr int vector_bytes = 32;
  static constexpr int max_rows = 6;  // 6 × 2 accumulators + 2 B vectors + 1 broadcast of 16 ymm
  static void stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
  static void stream(double* p, __m256d v) { _mm256_stream_pd(p, v); }
  static void fence() { _mm_sfence(); }
};

}  // namespace

void fv_accumulate_avx2(const FVAccumulateArgs& args, int num_threads) { run_fused_kernel<Avx2>(args, num_threads); }

void fv_accumulate_backward_avx2(const FVAccumulateBackwardArgs& args, int num_threads) {
  run_fused_backward<Avx2>(args, num_threads);
}

}  // namespace fvk::isa
