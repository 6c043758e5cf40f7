// The CPU's arithmetic peak, for the benchmarks' ceilings (bench/measure.py compiles and runs this): independent
// chains of fp32 FMAs (vfmadd231ps, AVX-512 or AVX2) and of bf16 pair dot products (vdpbf16ps, where the CPU has
// AVX512-BF16) on every OpenMP thread, the best of several runs. A library GEMM can sit well below this (a BLAS
// that takes a narrower code path on some CPUs); the instructions cannot be beaten.
// Prints one JSON object: {"fma_gflops_float32": …, "dot_gflops_bfloat16": … (or absent)}.
#include <immintrin.h>
#include <omp.h>

#include <chrono>
#include <cstdio>

namespace {

constexpr int kChains = 12;  // more independent accumulators than FMA latency × issue width on current x86 cores
constexpr long kIterations = 4000000;

template <class Body>
double best_gflops(Body body, double flops_per_iteration) {
  double best = 0;
  for (int run = 0; run < 5; ++run) {
    float sink = 0;
    int team = 0;  // the threads OpenMP grants, which OMP_THREAD_LIMIT or OMP_DYNAMIC can make fewer than asked
    const auto start = std::chrono::steady_clock::now();
#pragma omp parallel reduction(+ : sink, team)
    {
      sink += body(kIterations);
      team += 1;
    }
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    const double gflops = flops_per_iteration * kIterations * team / seconds / 1e9;
    if (gflops > best) best = gflops;
    if (sink == 1.2345f) std::printf(" ");  // keeps the chains alive
  }
  return best;
}

__attribute__((target("avx512f"))) float fma_avx512(long iterations) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(i * 1e-9f);
  const __m512 scale = _mm512_set1_ps(1.0000001f), shift = _mm512_set1_ps(1e-9f);
  for (long k = 0; k < iterations; ++k)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_fmadd_ps(acc[i], scale, shift);
  __m512 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  return _mm512_reduce_add_ps(sum);
}

__attribute__((target("avx2,fma"))) float fma_avx2(long iterations) {
  __m256 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm256_set1_ps(i * 1e-9f);
  const __m256 scale = _mm256_set1_ps(1.0000001f), shift = _mm256_set1_ps(1e-9f);
  for (long k = 0; k < iterations; ++k)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm256_fmadd_ps(acc[i], scale, shift);
  float lanes[8];
  __m256 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm256_add_ps(sum, acc[i]);
  _mm256_storeu_ps(lanes, sum);
  return lanes[0];
}

__attribute__((target("avx512f,avx512bf16"))) float dot_avx512bf16(long iterations) {
  __m512 acc[kChains];
  for (int i = 0; i < kChains; ++i) acc[i] = _mm512_set1_ps(i * 1e-9f);
  const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80), small = (__m512bh)_mm512_set1_epi16(0x3000);
  for (long k = 0; k < iterations; ++k)
#pragma GCC unroll 12
    for (int i = 0; i < kChains; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], ones, small);
  __m512 sum = acc[0];
  for (int i = 1; i < kChains; ++i) sum = _mm512_add_ps(sum, acc[i]);
  return _mm512_reduce_add_ps(sum);
}

}  // namespace

int main() {
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f");
  const double fma = avx512 ? best_gflops(fma_avx512, kChains * 16 * 2.0)
                            : best_gflops(fma_avx2, kChains * 8 * 2.0);
  std::printf("{\"fma_gflops_float32\": %.1f", fma);
  if (avx512 && __builtin_cpu_supports("avx512bf16"))
    std::printf(", \"dot_gflops_bfloat16\": %.1f", best_gflops(dot_avx512bf16, kChains * 16 * 4.0));
  std::printf("}\n");
}
