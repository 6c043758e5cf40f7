// The fused CPU forward of csrc/fv_accumulate.h for bfloat16 inputs on AVX512-BF16 (vdpbf16ps: 16 lanes,
// each the fp32 sum of two bf16 products), compiled only in fv_accumulate_avx512bf16.cpp.
//
// The same walk as the fp32 kernel (fv_accumulate_kernel.h): one work item is (set n, block of channels),
// its G block stays in cache while the set's descriptors pass in row blocks. The two GEMMs multiply bf16
// pairs along their depth, so their operands are packed pairwise ("VNNI" layout: the two bf16 of a pair
// side by side in one 32-bit lane):
//   1. decoder GEMM  P = Z·Wᵀ, pairs along d: A = z rows as they are, B = W packed [d/2][channel][2];
//      its epilogue forms the residual in fp32 (mask, x̂, σx⁻², the bias column's sums in fp32) and stores
//      it as bf16 pairs along t, R2[t/2][channel][2];
//   2. outer-product GEMM  G += Rᵀ·Z, pairs along t: A = R2, B = z packed [t/2][k][2];
//      the last block applies fisher_rsqrt and the signed square root in fp32 and stores bf16.
// Accumulation is fp32 throughout; only the GEMM operands are bf16 (the inputs already are; R is rounded
// to bf16 once, as torch's bf16 composite rounds it).
#pragma once

#include "bf16_microkernel.h"

namespace fvk {
namespace {

class Bf16Kernel : Bf16Microkernel {
 public:
  static void run(const FVAccumulateArgs& args, int num_threads) {
    if (args.num_sets == 0 || args.channels == 0) return;
    const Bf16Kernel kernel(args, num_threads);
    kernel.execute();
  }

 private:
  static constexpr int64_t kMaxBlockRows = 128;  // even: rows pair up

  struct Scratch {
    Bf16* z_rows;       // [row][latent_padded]: z rows, zero-padded
    Bf16* z_pairs;      // [latent_padded / 32][row / 2][32][2]: z paired along t (B of the outer GEMM)
    float* x_hat;       // [row][channel_block]
    Bf16* residual;     // [row / 2][channel_block][2]: R paired along t (A of the outer GEMM)
    float* partial;     // [channel][latent_padded]: G of the earlier row blocks
    float* column_sums; // [channel_block]
    float* staged;      // [kMaxRows][latent_padded]: a finished channel panel before its store
  };

  Bf16Kernel(const FVAccumulateArgs& args, int num_threads)
      : args_(args),
        latent_(args.latent),
        latent_pairs_(ceil_div(args.latent, 2)),
        latent_padded_(round_up(args.latent, kPanelWidth)),
        channels_padded_(round_up(args.channels, kPanelWidth)),
        block_rows_(std::min(kMaxBlockRows, round_up(std::max<int64_t>(args.set_size, 1), 2))) {
    num_threads_ = num_threads > 0 ? num_threads : omp_get_max_threads();
    const ChannelBlocks split = channel_blocks(channels_padded_, kPanelWidth, latent_padded_, int64_t(sizeof(float)),
                                               args.num_sets, num_threads_);
    channel_block_ = split.block;
    blocks_per_set_ = split.per_set;

    weight_ = aligned_array<Bf16>(channels_padded_ * latent_pairs_ * 2);
    bias_ = aligned_array<float>(channels_padded_);
    inv_sigma2_ = aligned_array<float>(channels_padded_);
    const Bf16* bias = static_cast<const Bf16*>(args.dec_bias);
    const Bf16* inv_sigma2 = static_cast<const Bf16*>(args.inv_sigma2);
    for (int64_t c = 0; c < channels_padded_; ++c) {  // zero padding: padded channels' residual is exactly 0
      bias_[c] = c < args.channels ? to_float(bias[c]) : 0.0f;
      inv_sigma2_[c] = c < args.channels ? to_float(inv_sigma2[c]) : 0.0f;
    }
    if (args.fisher_rsqrt != nullptr) fisher_ = aligned_array<float>(args.channels * (latent_ + 1));
    scratch_stride_ = 0;
    for (int64_t size : scratch_bytes()) scratch_stride_ += round_up(size, 64);
    scratch_ = aligned_array<char>(scratch_stride_ * num_threads_);
  }

  std::array<int64_t, 7> scratch_bytes() const {
    return {block_rows_ * latent_padded_ * int64_t(sizeof(Bf16)),
            latent_padded_ * block_rows_ * int64_t(sizeof(Bf16)),
            block_rows_ * channel_block_ * int64_t(sizeof(float)),
            block_rows_ * channel_block_ * int64_t(sizeof(Bf16)),
            channel_block_ * latent_padded_ * int64_t(sizeof(float)),
            channel_block_ * int64_t(sizeof(float)),
            kMaxRows * latent_padded_ * int64_t(sizeof(float))};
  }

  Scratch thread_scratch(int thread) const {
    char* parts[7];
    char* p = scratch_.get() + thread * scratch_stride_;
    const auto sizes = scratch_bytes();
    for (int i = 0; i < 7; ++i) {
      parts[i] = p;
      p += round_up(sizes[i], 64);
    }
    return Scratch{reinterpret_cast<Bf16*>(parts[0]), reinterpret_cast<Bf16*>(parts[1]),
                   reinterpret_cast<float*>(parts[2]), reinterpret_cast<Bf16*>(parts[3]),
                   reinterpret_cast<float*>(parts[4]), reinterpret_cast<float*>(parts[5]),
                   reinterpret_cast<float*>(parts[6])};
  }

  void execute() const {
    const int64_t items = args_.num_sets * blocks_per_set_;
#pragma omp parallel num_threads(num_threads_)
    {
#pragma omp for schedule(static) nowait
      for (int64_t c = 0; c < channels_padded_; ++c)
        pack_row_pairs(static_cast<const Bf16*>(args_.dec_weight), args_.w_stride[0], args_.w_stride[1], args_.channels,
                       latent_, latent_pairs_, c, weight_.get());
      const int64_t fisher_rows = fisher_ == nullptr ? 0 : args_.channels;
#pragma omp for schedule(static)  // its closing barrier also waits for the weights
      for (int64_t c = 0; c < fisher_rows; ++c) {
        const Bf16* fisher = static_cast<const Bf16*>(args_.fisher_rsqrt) + c * (latent_ + 1);
        for (int64_t k = 0; k <= latent_; ++k) fisher_[c * (latent_ + 1) + k] = to_float(fisher[k]);
      }
      const Scratch scratch = thread_scratch(omp_get_thread_num());
#pragma omp for schedule(dynamic, 1)
      for (int64_t item = 0; item < items; ++item) run_item(item / blocks_per_set_, item % blocks_per_set_, scratch);
    }
  }

  void run_item(int64_t n, int64_t block, const Scratch& s) const {
    const int64_t first_channel = block * channel_block_;
    const int64_t channels = std::min(channel_block_, args_.channels - first_channel);
    const int64_t channels_padded = round_up(channels, kPanelWidth);
    Bf16* out = static_cast<Bf16*>(args_.out) + n * args_.out_stride_n + first_channel * (latent_ + 1);
    float* row_sumsq = args_.row_sumsq == nullptr ? nullptr : args_.row_sumsq + n * args_.channels + first_channel;
    const int64_t length = args_.lengths == nullptr ? args_.set_size : args_.lengths[n];
    if (length == 0) {
      std::fill_n(out, channels * (latent_ + 1), Bf16(0));
      if (row_sumsq != nullptr) std::fill_n(row_sumsq, channels, 0.0f);
      return;
    }
    std::fill_n(s.column_sums, channels_padded, 0.0f);
    const int64_t blocks = ceil_div(length, block_rows_);
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first_row = b * block_rows_;
      const int64_t rows = std::min(block_rows_, length - first_row);
      const int64_t rows_padded = round_up(rows, 2);
      pack_z(args_, n, first_row, rows, latent_padded_, latent_padded_, s.z_rows, s.z_pairs);
      copy_x(args_, true, n, first_row, rows, first_channel, channels, channels_padded, s.x_hat);
      decoder_gemm(first_channel, channels_padded, rows, rows_padded, s);
      outer_gemm(first_channel, channels, channels_padded, rows_padded / 2, b == 0, b + 1 == blocks, out, row_sumsq, s);
    }
  }

  // ---- 1. P = Z·Wᵀ and the residual, stored as bf16 pairs along t --------------------------------------

  template <int Rows>
  static void decoder_tile(const uint32_t* z_pairs, int64_t z_stride, int64_t latent_pairs, const Bf16* weight,
                           const float* bias, const float* inv_sigma2, const float* x_hat, int64_t x_stride,
                           int64_t valid_rows, float* column_sums, Bf16* residual, int64_t residual_stride) {
    __m512 acc[Rows][2];
    multiply<Rows>(acc, latent_pairs, z_pairs, z_stride, 1, weight);
    unrolled<2>([&](auto j) {
      const __m512 b = _mm512_loadu_ps(bias + j * kLanes);
      const __m512 s = _mm512_loadu_ps(inv_sigma2 + j * kLanes);
      __m512 sums = _mm512_loadu_ps(column_sums + j * kLanes);
      unrolled<Rows>([&](auto i) {
        const __m512 p = _mm512_add_ps(acc[i][j], b);
        __mmask16 active = _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_GT_OQ);
        if (i >= valid_rows) active = 0;  // the zero padding row of an odd block
        const __m512 r = _mm512_maskz_mul_ps(active, _mm512_sub_ps(p, _mm512_loadu_ps(x_hat + i * x_stride + j * kLanes)), s);
        sums = _mm512_add_ps(sums, r);
        acc[i][j] = r;
      });
      _mm512_storeu_ps(column_sums + j * kLanes, sums);
    });
    unrolled<Rows / 2>([&](auto q) {
      unrolled<2>([&](auto j) {
        _mm512_storeu_si512(residual + q * residual_stride + j * kPanelWidth,
                            interleave_rows(acc[2 * q][j], acc[2 * q + 1][j]));
      });
    });
  }

  template <int... I>
  static constexpr auto decoder_tiles(std::integer_sequence<int, I...>) {
    return std::array<void (*)(const uint32_t*, int64_t, int64_t, const Bf16*, const float*, const float*,
                               const float*, int64_t, int64_t, float*, Bf16*, int64_t),
                      sizeof...(I)>{&decoder_tile<2 * (I + 1)>...};
  }

  void decoder_gemm(int64_t first_channel, int64_t channels_padded, int64_t rows, int64_t rows_padded,
                    const Scratch& s) const {
    static constexpr auto tiles = decoder_tiles(std::make_integer_sequence<int, kMaxRows / 2>{});
    const BalancedSplit panels(rows_padded / 2, kMaxRows / 2);  // in row pairs
    const int64_t row_width = latent_padded_;
    for (int64_t c = 0; c < channels_padded; c += kPanelWidth) {
      const Bf16* weight = weight_.get() + (first_channel + c) * latent_pairs_ * 2;
      for (int64_t part = 0; part < panels.parts; ++part) {
        const int64_t row = 2 * panels.begin(part);
        tiles[panels.size(part) - 1](reinterpret_cast<const uint32_t*>(s.z_rows + row * row_width), row_width / 2,
                                     latent_pairs_, weight, bias_.get() + first_channel + c,
                                     inv_sigma2_.get() + first_channel + c, s.x_hat + row * channels_padded + c,
                                     channels_padded, rows - row, s.column_sums + c,
                                     s.residual + (row / 2) * channels_padded * 2 + c * 2, channels_padded * 2);
      }
    }
  }

  // ---- 2. G += Rᵀ·Z, finished on the last block ---------------------------------------------------------

  template <int Rows>
  static void outer_tile(const uint32_t* residual, int64_t pairs, int64_t pair_stride, const Bf16* z_pairs,
                         float* partial, int64_t partial_stride, bool first, bool last, float* staged) {
    __m512 acc[Rows][2];
    multiply<Rows>(acc, pairs, residual, std::integral_constant<int64_t, 1>{}, pair_stride, z_pairs);
    unrolled<Rows>([&](auto i) {
      unrolled<2>([&](auto j) {
        float* slot = partial + i * partial_stride + j * kLanes;
        const __m512 g = first ? acc[i][j] : _mm512_add_ps(acc[i][j], _mm512_loadu_ps(slot));
        _mm512_storeu_ps(last ? staged + i * partial_stride + j * kLanes : slot, g);
      });
    });
  }

  template <int... I>
  static constexpr auto outer_tiles(std::integer_sequence<int, I...>) {
    return std::array<void (*)(const uint32_t*, int64_t, int64_t, const Bf16*, float*, int64_t, bool, bool, float*),
                      sizeof...(I)>{&outer_tile<I + 1>...};
  }

  void outer_gemm(int64_t first_channel, int64_t channels, int64_t channels_padded, int64_t pairs, bool first,
                  bool last, Bf16* out, float* row_sumsq, const Scratch& s) const {
    static constexpr auto tiles = outer_tiles(std::make_integer_sequence<int, kMaxRows>{});
    const BalancedSplit panels(channels, kMaxRows);
    const auto* residual = reinterpret_cast<const uint32_t*>(s.residual);
    for (int64_t part = 0; part < panels.parts; ++part) {
      const int64_t channel = panels.begin(part), rows = panels.size(part);
      for (int64_t column = 0; column < latent_padded_; column += kPanelWidth)
        tiles[rows - 1](residual + channel, pairs, channels_padded, s.z_pairs + (column / kPanelWidth) * pairs * 2 *
                        kPanelWidth, s.partial + channel * latent_padded_ + column, latent_padded_, first, last,
                        s.staged + column);
      if (last) finish_channels(first_channel + channel, rows, s.column_sums + channel, s.staged,
                                out + channel * (latent_ + 1), row_sumsq == nullptr ? nullptr : row_sumsq + channel);
    }
  }

  // Fisher scaling, signed square root and row sums of squares (of the stored bf16 values) in fp32, then the
  // bf16 store, 16 values at a time.
  void finish_channels(int64_t first_channel, int64_t rows, const float* column_sums, float* staged, Bf16* out,
                       float* row_sumsq) const {
    const int64_t width = latent_ + 1;
    for (int64_t i = 0; i < rows; ++i) {
      const int64_t c = first_channel + i;
      const float* fisher = fisher_ == nullptr ? nullptr : fisher_.get() + c * width;
      float* values = staged + i * latent_padded_;
      const float bias_term = column_sums[i];
      __m512 squares = _mm512_setzero_ps();
      for (int64_t k = 0; k < width; k += kLanes) {
        const __mmask16 lanes = width - k >= kLanes ? __mmask16(0xffff) : __mmask16((1u << (width - k)) - 1);
        // the bias column (k = d) comes from the column sums, not from staged
        __m512 v = _mm512_maskz_loadu_ps(k + kLanes <= latent_ ? lanes : __mmask16(lanes & ((1u << std::max<int64_t>(latent_ - k, 0)) - 1)),
                                         values + k);
        if (latent_ >= k && latent_ < k + kLanes)
          v = _mm512_mask_blend_ps(__mmask16(1u << (latent_ - k)), v, _mm512_set1_ps(bias_term));
        if (fisher != nullptr) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(lanes, fisher + k));
        if (args_.signed_sqrt) {
          const __m512 magnitude = _mm512_abs_ps(v);
          const __m512 root = _mm512_sqrt_ps(magnitude);
          v = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(root),
                                                  _mm512_and_si512(_mm512_castps_si512(v),
                                                                   _mm512_set1_epi32(int(0x80000000u)))));
        }
        const __m256i stored = (__m256i)_mm512_cvtneps_pbh(v);
        _mm256_mask_storeu_epi16(out + i * width + k, lanes, stored);
        const __m512 rounded = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(stored), 16));
        squares = _mm512_mask3_fmadd_ps(rounded, rounded, squares, lanes);
      }
      if (row_sumsq != nullptr) row_sumsq[i] = _mm512_reduce_add_ps(squares);
    }
  }

  const FVAccumulateArgs& args_;
  const int64_t latent_;
  const int64_t latent_pairs_;   // ceil(d / 2): depth of the decoder GEMM
  const int64_t latent_padded_;  // d rounded up to whole column panels
  const int64_t channels_padded_;
  const int64_t block_rows_;
  int num_threads_ = 1;
  int64_t channel_block_ = 0;
  int64_t blocks_per_set_ = 0;
  AlignedArray<Bf16> weight_;      // [C_padded / 32][d / 2][32][2]
  AlignedArray<float> bias_;       // [C_padded]
  AlignedArray<float> inv_sigma2_; // [C_padded]
  AlignedArray<float> fisher_;     // [C][d + 1]; null without fisher_rsqrt
  int64_t scratch_stride_ = 0;     // bytes
  AlignedArray<char> scratch_;
};

}  // namespace
}  // namespace fvk
