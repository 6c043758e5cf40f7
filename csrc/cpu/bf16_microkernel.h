// What the bfloat16 CPU kernels share (fv_accumulate_bf16_kernel.h, the forward, and
// fv_accumulate_bf16_backward_kernel.h): the AVX512-BF16 microkernel (vdpbf16ps: 16 fp32 lanes, each the fp32
// sum of two bf16 products), conversions, and the packings of GEMM operands into bf16 pairs along the depth
// ("VNNI" layout: the two bf16 of a pair side by side in one 32-bit lane). Included only by
// fv_accumulate_avx512bf16.cpp, compiled with -mavx512bf16.
#pragma once

#include <immintrin.h>

#include "cpu_microkernel.h"

namespace fvk {
namespace {

struct Bf16Microkernel {
  using Bf16 = uint16_t;
  static constexpr int kLanes = 16;               // fp32 lanes of a vector
  static constexpr int kPanelWidth = 2 * kLanes;  // columns of one microkernel tile
  static constexpr int kMaxRows = 12;             // 12 × 2 accumulators + 2 B vectors + 1 broadcast of 32 zmm

  static float to_float(Bf16 v) {
    const uint32_t bits = uint32_t(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static Bf16 to_bf16(float f) {  // round to nearest even, as vcvtneps2bf16 (NaN stays NaN)
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return Bf16((bits >> 16) | 0x40);
    return Bf16((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }

  // The first `count` (≤ 16) lanes' mask.
  static FVK_ALWAYS_INLINE __mmask16 first_lanes(int64_t count) {
    return count >= kLanes ? __mmask16(0xffff) : __mmask16((1u << std::max<int64_t>(count, 0)) - 1);
  }
  // 16 bf16 (the masked-off ones read as 0) widened to fp32.
  static FVK_ALWAYS_INLINE __m512 load_widened(const Bf16* p, __mmask16 lanes = 0xffff) {
    const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, p));
    return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
  }
  static FVK_ALWAYS_INLINE void store_rounded(Bf16* p, __m512 v, __mmask16 lanes = 0xffff) {
    _mm256_mask_storeu_epi16(p, lanes, (__m256i)_mm512_cvtneps_pbh(v));
  }

  // acc[i][j] (+)= Σ_p pair(a[i·a_row + p·a_step]) · b[p][j·16 .. j·16 + 15][2]: the one microkernel of every
  // bf16 GEMM. a holds bf16 pairs as 32-bit words, read in place and broadcast; b holds, per pair p, 32 columns
  // of bf16 pairs (two vectors). With Accumulate the tile's contents are added to instead of replaced.
  template <int Rows, typename RowStride, bool Accumulate = false>
  static FVK_ALWAYS_INLINE void multiply(__m512 (&acc)[Rows][2], int64_t pairs, const uint32_t* a, RowStride a_row,
                                         int64_t a_step, const Bf16* b) {
    if constexpr (!Accumulate) unrolled<Rows>([&](auto i) { acc[i][0] = acc[i][1] = _mm512_setzero_ps(); });
    for (int64_t p = 0; p < pairs; ++p, a += a_step, b += 2 * kPanelWidth) {
      const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b);
      const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + kPanelWidth);
      unrolled<Rows>([&](auto i) {
        const __m512bh a_i = (__m512bh)_mm512_set1_epi32(int(a[i * a_row]));
        acc[i][0] = _mm512_dpbf16_ps(acc[i][0], a_i, b0);
        acc[i][1] = _mm512_dpbf16_ps(acc[i][1], a_i, b1);
      });
    }
  }

  // 32 bf16 of two rows of 16 columns, interleaved: (row0[c], row1[c]) pairs for c = 0…15.
  static FVK_ALWAYS_INLINE __m512i interleave_rows(__m512 row0, __m512 row1) {
    const __m512i halves = (__m512i)_mm512_cvtne2ps_pbh(row1, row0);  // [row0 (16), row1 (16)]
    const __m512i order = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                           21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    return _mm512_permutexvar_epi16(order, halves);
  }

  // destination[panel][q][32][2] = (rows[2q][panel·32 + j], rows[2q + 1][panel·32 + j]) for j < 32: bf16 rows
  // (row_stride apart, whole panels wide) paired along the rows, per 32-column panel — B of a GEMM whose depth
  // runs down the rows.
  static void pair_rows(const Bf16* rows, int64_t row_stride, int64_t row_pairs, int64_t panels, Bf16* destination) {
    const __m512i low = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                         37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i high = _mm512_add_epi16(low, _mm512_set1_epi16(16));
    for (int64_t panel = 0; panel < panels; ++panel) {
      Bf16* out = destination + panel * row_pairs * 2 * kPanelWidth;
      for (int64_t q = 0; q < row_pairs; ++q) {
        const __m512i even = _mm512_loadu_si512(rows + 2 * q * row_stride + panel * kPanelWidth);
        const __m512i odd = _mm512_loadu_si512(rows + (2 * q + 1) * row_stride + panel * kPanelWidth);
        _mm512_storeu_si512(out + q * 2 * kPanelWidth, _mm512_permutex2var_epi16(even, low, odd));
        _mm512_storeu_si512(out + q * 2 * kPanelWidth + kPanelWidth, _mm512_permutex2var_epi16(even, high, odd));
      }
    }
  }

  // packed[c / 32][p][c % 32][j] = rows[c][2p + j] for every row of a bf16 matrix whose rows lie row_stride (even)
  // apart, a whole number of 32-row panels: the transposing packing of pack_row_pairs, 16 pairs per gather, for a
  // matrix packed once per set.
  static void pair_columns(const Bf16* rows, int64_t row_stride, int64_t panels, int64_t depth_pairs, Bf16* packed) {
    const __m512i offsets = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                               _mm512_set1_epi32(int(row_stride / 2)));
    for (int64_t panel = 0; panel < panels; ++panel) {
      for (int half = 0; half < 2; ++half) {
        const int* words = reinterpret_cast<const int*>(rows + (panel * kPanelWidth + half * kLanes) * row_stride);
        Bf16* out = packed + panel * depth_pairs * 2 * kPanelWidth + half * kPanelWidth;
        for (int64_t p = 0; p < depth_pairs; ++p)
          _mm512_storeu_si512(out + p * 2 * kPanelWidth, _mm512_i32gather_epi32(offsets, words + p, 4));
      }
    }
  }

  // packed[c / 32][p][c % 32][j] = source[c, 2p + j] for one row c of a (rows × depth) matrix with element strides
  // (row_stride, depth_stride), zero past `rows` and `depth`: B of a GEMM whose depth runs along the matrix's rows
  // and whose columns are its rows (Z·Wᵀ with W (C, d)).
  static void pack_row_pairs(const Bf16* source, int64_t row_stride, int64_t depth_stride, int64_t rows, int64_t depth,
                             int64_t depth_pairs, int64_t c, Bf16* packed) {
    Bf16* panel = packed + (c / kPanelWidth) * depth_pairs * 2 * kPanelWidth + (c % kPanelWidth) * 2;
    for (int64_t k = 0; k < depth_pairs * 2; ++k) {
      const bool real = c < rows && k < depth;
      panel[(k / 2) * 2 * kPanelWidth + (k % 2)] = real ? source[c * row_stride + k * depth_stride] : Bf16(0);
    }
  }

  // z rows [first_row, first_row + rows) of set n as bf16 rows `row_width` apart, zero-padded (A of a GEMM of
  // depth d, read as pairs along d), and paired along t per 32-column panel (B of a GEMM of depth t); an odd
  // block gets a zero padding row.
  static void pack_z(const FVAccumulateArgs& args, int64_t n, int64_t first_row, int64_t rows, int64_t row_width,
                     int64_t latent_padded, Bf16* z_rows, Bf16* z_pairs) {
    const Bf16* z = static_cast<const Bf16*>(args.z) + n * args.z_stride[0] + first_row * args.z_stride[1];
    const int64_t rows_padded = round_up(rows, 2);
    for (int64_t t = 0; t < rows_padded; ++t) {
      Bf16* row = z_rows + t * row_width;
      const Bf16* source = z + t * args.z_stride[1];
      if (t < rows && args.z_stride[2] == 1) {
        std::copy_n(source, args.latent, row);
      } else {
        for (int64_t k = 0; k < args.latent; ++k) row[k] = t < rows ? source[k * args.z_stride[2]] : Bf16(0);
      }
      std::fill(row + args.latent, row + row_width, Bf16(0));
    }
    pair_rows(z_rows, row_width, rows_padded / 2, latent_padded / kPanelWidth, z_pairs);
  }

  // tile[t][c] = x[n, first_row + t, first_channel + c] in fp32 (times x_scale[n, first_row + t] when `scaled`:
  // x̂), zero in the padding channels up to channels_padded.
  static void copy_x(const FVAccumulateArgs& args, bool scaled, int64_t n, int64_t first_row, int64_t rows,
                     int64_t first_channel, int64_t channels, int64_t channels_padded, float* tile) {
    const Bf16* x = static_cast<const Bf16*>(args.x) + n * args.x_stride[0] + first_row * args.x_stride[1] +
                    first_channel * args.x_stride[2];
    const Bf16* x_scale = scaled ? static_cast<const Bf16*>(args.x_scale) : nullptr;
    for (int64_t t = 0; t < rows; ++t) {
      const float scale = x_scale == nullptr ? 1.0f : to_float(x_scale[n * args.x_scale_stride[0] +
                                                                       (first_row + t) * args.x_scale_stride[1]]);
      float* row = tile + t * channels_padded;
      const Bf16* source = x + t * args.x_stride[1];
      if (args.x_stride[2] == 1) {
        const __m512 scales = _mm512_set1_ps(scale);
        for (int64_t c = 0; c < channels_padded; c += kLanes)
          _mm512_storeu_ps(row + c, _mm512_mul_ps(load_widened(source + c, first_lanes(channels - c)), scales));
      } else {
        for (int64_t c = 0; c < channels; ++c) row[c] = to_float(source[c * args.x_stride[2]]) * scale;
        std::fill(row + channels, row + channels_padded, 0.0f);
      }
    }
  }
};

}  // namespace
}  // namespace fvk
