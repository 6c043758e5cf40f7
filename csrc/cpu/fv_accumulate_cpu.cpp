// fv_accumulate_cpu: argument checks, and the run-time choice of the instruction set whose build of the
// fused kernel (fv_accumulate_kernel.h) runs. This TU is compiled for the baseline ISA, so it also holds
// the portable build.
#include "fv_accumulate_cpu.h"

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

#include "fv_accumulate_backward_kernel.h"
#include "fv_accumulate_isa.h"
#include "fv_accumulate_kernel.h"

#ifdef __SSE2__
#include <emmintrin.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

namespace fvk {
namespace {

struct Generic {
  static constexpr int vector_bytes = 16;  // SSE2 / NEON
  static constexpr int max_rows = 6;       // 6 × 2 accumulators + 2 B vectors + 1 broadcast of 16 registers
#ifdef __SSE2__
  static void stream(float* p, __m128 v) { _mm_stream_ps(p, v); }
  static void stream(double* p, __m128d v) { _mm_stream_pd(p, v); }
  static void fence() { _mm_sfence(); }
#else  // no portable non-temporal store: plain stores
  template <typename Scalar, typename Vector>
  static void stream(Scalar* p, Vector v) { std::memcpy(p, &v, sizeof v); }
  static void fence() {}
#endif
};

enum class Isa { Generic, Avx2, Avx512 };

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "generic";
  }
}

Isa best_supported_isa() {
#ifdef FVK_X86_KERNELS
  __builtin_cpu_init();
  // Exactly the extensions the TUs are compiled with (CMakeLists.txt).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c"))
    return Isa::Avx2;
#endif
  return Isa::Generic;
}

// The best ISA of this CPU, or a lower one named by FVK_CPU_ISA (so tests can run every build on one
// machine).
Isa selected_isa() {
  const Isa best = best_supported_isa();
  const char* requested = std::getenv("FVK_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  for (Isa isa : {Isa::Generic, Isa::Avx2, Isa::Avx512}) {
    if (std::string(requested) != isa_name(isa)) continue;
    if (static_cast<int>(isa) > static_cast<int>(best))
      throw std::invalid_argument(std::string("FVK_CPU_ISA=") + requested + " is not supported by this CPU (or build); " +
                                  "the best available is " + isa_name(best));
    return isa;
  }
  throw std::invalid_argument(std::string("FVK_CPU_ISA must be one of avx512, avx2, generic, got '") + requested + "'");
}

}  // namespace

bool bf16_kernel_available() {
#ifdef FVK_X86_KERNELS
  __builtin_cpu_init();
  return selected_isa() == Isa::Avx512 && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

namespace {

void require(bool condition, const std::string& message) {
  if (!condition) throw std::invalid_argument("fv_accumulate_cpu: " + message);
}

// with_out: the forward's out must be given (the backward takes the forward's inputs only).
void check_args(const FVAccumulateArgs& a, bool with_out) {
  require(a.dtype == DType::Float32 || a.dtype == DType::Float64 ||
              (a.dtype == DType::BFloat16 && bf16_kernel_available()),
          "dtype must be float32 or float64, or bfloat16 on a CPU with AVX512-BF16 (the CPU kernels compute in "
          "these; widen other inputs to float32 first, as fvkernels.ops.cpp does)");
  require(a.num_sets >= 0 && a.set_size >= 0 && a.channels >= 0 && a.latent >= 0,
          "num_sets, set_size, channels and latent must be >= 0, got " + std::to_string(a.num_sets) + ", " +
              std::to_string(a.set_size) + ", " + std::to_string(a.channels) + ", " + std::to_string(a.latent));
  if (a.num_sets == 0 || a.channels == 0) return;
  require(!with_out || a.out != nullptr, "out must not be null");
  require(!with_out || a.num_sets == 1 || a.out_stride_n >= a.channels * (a.latent + 1),
          "out_stride_n must be >= channels * (latent + 1) = " + std::to_string(a.channels * (a.latent + 1)) +
              " so that sets do not overlap, got " + std::to_string(a.out_stride_n));
  require(a.dec_bias != nullptr && a.inv_sigma2 != nullptr, "dec_bias and inv_sigma2 must not be null");
  require(a.latent == 0 || a.dec_weight != nullptr, "dec_weight must not be null");
  if (a.lengths != nullptr) {
    for (int64_t n = 0; n < a.num_sets; ++n)
      require(a.lengths[n] >= 0 && a.lengths[n] <= a.set_size,
              "lengths[" + std::to_string(n) + "] = " + std::to_string(a.lengths[n]) + " is outside [0, set_size = " +
                  std::to_string(a.set_size) + "]");
  }
  if (a.set_size > 0) require(a.x != nullptr && (a.latent == 0 || a.z != nullptr), "x and z must not be null");
}

int64_t element_bytes(DType dtype) {
  return dtype == DType::Float64 ? 8 : dtype == DType::Float32 ? 4 : 2;
}

}  // namespace

void fv_accumulate_cpu(const FVAccumulateArgs& args, int num_threads) {
  check_args(args, true);
  if (args.num_sets > 0 && args.channels > 0)
    advise_huge_pages(args.out, ((args.num_sets - 1) * args.out_stride_n + args.channels * (args.latent + 1)) *
                                    element_bytes(args.dtype));
#ifdef FVK_X86_KERNELS
  if (args.dtype == DType::BFloat16) return isa::fv_accumulate_bf16_avx512bf16(args, num_threads);
#endif
  switch (selected_isa()) {
#ifdef FVK_X86_KERNELS
    case Isa::Avx512: isa::fv_accumulate_avx512(args, num_threads); break;
    case Isa::Avx2: isa::fv_accumulate_avx2(args, num_threads); break;
#endif
    default: run_fused_kernel<Generic>(args, num_threads); break;
  }
}

void fv_accumulate_backward_cpu(const FVAccumulateBackwardArgs& args, int num_threads) {
  check_args(args.forward, false);
  require(args.forward.num_sets <= 1 || args.grad_out_stride_n >= args.forward.channels * (args.forward.latent + 1),
          "grad_out_stride_n must be >= channels * (latent + 1)");
  require(args.forward.num_sets == 0 || args.forward.channels == 0 || args.grad_out != nullptr,
          "grad_out must not be null");
  const FVAccumulateArgs& f = args.forward;
  const int64_t element = element_bytes(f.dtype);
  advise_huge_pages(args.grad_x, f.num_sets * f.set_size * f.channels * element);
  advise_huge_pages(args.grad_z, f.num_sets * f.set_size * f.latent * element);
#ifdef FVK_X86_KERNELS
  if (args.forward.dtype == DType::BFloat16) return isa::fv_accumulate_backward_bf16_avx512bf16(args, num_threads);
#endif
  switch (selected_isa()) {
#ifdef FVK_X86_KERNELS
    case Isa::Avx512: isa::fv_accumulate_backward_avx512(args, num_threads); break;
    case Isa::Avx2: isa::fv_accumulate_backward_avx2(args, num_threads); break;
#endif
    default: run_fused_backward<Generic>(args, num_threads); break;
  }
}

// Large outputs are mostly fresh allocations that the kernel touches first. With transparent huge pages in
// "madvise" mode (a common default) every 4 KiB page of them faults separately, which costs more than the
// arithmetic at small T (N = 256 sets of T = 50: 53 ms with 4 KiB pages, 30 ms with 2 MiB ones). So the 2 MiB-
// aligned interior of each output asks for huge pages, as torch's THP_MEM_ALLOC_ENABLE does for its whole
// allocator; pages already faulted in stay as they are, a refusal (file-backed memory, THP off) changes nothing,
// and FVK_HUGE_PAGES=0 turns the advice off.
void advise_huge_pages(void* pointer, int64_t bytes) {
#ifdef __linux__
  constexpr uintptr_t kHugePage = uintptr_t(2) << 20;
  if (pointer == nullptr || bytes < int64_t(2 * kHugePage)) return;
  const char* setting = std::getenv("FVK_HUGE_PAGES");
  if (setting != nullptr && std::string(setting) == "0") return;
  const uintptr_t begin = (reinterpret_cast<uintptr_t>(pointer) + kHugePage - 1) & ~(kHugePage - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(pointer) + uintptr_t(bytes)) & ~(kHugePage - 1);
  if (end > begin) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);
#else
  (void)pointer;
  (void)bytes;
#endif
}

std::string cpu_kernel_isa() { return isa_name(selected_isa()); }

}  // namespace fvk
