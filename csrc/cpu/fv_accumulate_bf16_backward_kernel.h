// The fused CPU backward of csrc/fv_accumulate.h (FVAccumulateBackwardArgs) for bfloat16 on AVX512-BF16,
// compiled only in fv_accumulate_avx512bf16.cpp.
//
// The walk of the fp32 backward (fv_accumulate_backward_kernel.h): one work item is (set n, block of rows), the
// decoder tile recomputed rather than kept. Per item, over all channels:
//   1. P = Z·Wᵀ + b        pairs along d: A = z rows, B = W packed [C/32][d/2][32][2]; P kept in fp32;
//   2. A = Z·H_wᵀ + h_b    pairs along d: B = H_w likewise (packed once per set); its epilogue forms Q = ∂L/∂p
//                          and R in fp32, writes grad_x and grad_x_scale, adds up grad_bias and grad_inv_sigma2,
//                          and stores R and Q as bf16 rows (A of 3) and Q paired along t (A of 4);
//   3. grad_z = R·H_w + Q·W    pairs along c: B = H_w and W packed [d/32][C/2][32][2], one accumulator;
//   4. grad_weight += Qᵀ·Z     pairs along t: B = z packed [d/32][t/2][32][2].
// GEMM operands are bf16 (h = gout·fisher_rsqrt, R and Q rounded once each, as torch's bf16 composite rounds
// them); accumulation and the epilogue are fp32. grad_weight, grad_bias and grad_inv_sigma2 are summed per thread
// in fp32, added up in thread order (items are split statically: deterministic for a given thread count) and
// rounded once. A gradient that is not asked for (null) skips its GEMM (steps 3, 4) or its epilogue store; steps 1
// and 2 run whenever any gradient is asked for.
#pragma once

#include "bf16_microkernel.h"

namespace fvk {
namespace {

class Bf16Backward : Bf16Microkernel {
 public:
  static void run(const FVAccumulateBackwardArgs& args, int num_threads) {
    const FVAccumulateArgs& f = args.forward;
    if (f.num_sets == 0 || f.channels == 0) return zero_all_gradients<Bf16>(args);
    const Bf16Backward kernel(args, num_threads);
    kernel.execute();
  }

 private:
  // Tables of Rows-specialised tiles, indexed by Rows − 1: row panels come in every size up to kMaxRows (the
  // gradient tile takes only even sizes; its odd entries are never called).
  struct DecoderTile {
    template <int Rows>
    static constexpr auto get() { return &decoder_tile<Rows>; }
  };
  struct GradientTile {
    template <int Rows>
    static constexpr auto get() { return &gradient_tile<Rows + Rows % 2>; }
  };
  struct GradZTile {
    template <int Rows>
    static constexpr auto get() { return &grad_z_tile<Rows>; }
  };
  struct GradWeightTile {
    template <int Rows>
    static constexpr auto get() { return &grad_weight_tile<Rows>; }
  };
  template <class Kind, int... I>
  static constexpr auto tile_table(std::integer_sequence<int, I...>) {
    return std::array<decltype(Kind::template get<1>()), sizeof...(I)>{Kind::template get<I + 1>()...};
  }

  // Bytes of one row block's tiles (x and P in fp32; R, Q and Q's pairs in bf16): they stay in L2 beside the
  // packed weights.
  static constexpr int64_t kTileBytes = 384 * 1024;
  static constexpr int64_t kTileBytesPerElement = 2 * sizeof(float) + 3 * sizeof(Bf16);
  static constexpr int64_t kMaxBlockRows = 128;

  struct Scratch {             // one thread's tiles and sums
    Bf16* z_rows;              // [row][latent_padded]
    Bf16* z_pairs;             // [latent_padded / 32][row / 2][32][2]
    float* x;                  // [row][channels_padded]: x (not x̂)
    float* pre;                // [row][channels_padded]: P
    Bf16* r_rows;              // [row][channels_padded]
    Bf16* q_rows;              // [row][channels_padded]
    Bf16* q_pairs;             // [row / 2][channels_padded][2]
    Bf16* h_rows;              // [channels_padded][latent_padded]: H_w, zero-padded
    Bf16* h_pairs_d;           // [channels_padded / 32][d / 2][32][2]: B of step 2
    Bf16* h_pairs_c;           // [latent_padded / 32][channels_padded / 2][32][2]: B of step 3
    float* h_bias;             // [channels_padded]
    float* grad_weight;        // [channels_padded][latent_padded]
    float* grad_bias;          // [channels_padded]
    float* grad_inv_sigma2;    // [channels_padded]
    float* row_scale;          // [row]: x_scale of the block's rows
    float* grad_scale;         // [row][kLanes]: lane sums of −Σ_c q·x
  };
  static constexpr int kScratchParts = 16;

  Bf16Backward(const FVAccumulateBackwardArgs& args, int num_threads)
      : args_(args),
        f_(args.forward),
        latent_(f_.latent),
        latent_pairs_(ceil_div(f_.latent, 2)),
        latent_padded_(round_up(f_.latent, kPanelWidth)),
        channels_padded_(round_up(f_.channels, kPanelWidth)),
        block_rows_(std::min({kMaxBlockRows, std::max<int64_t>(f_.set_size, 1),
                              std::max<int64_t>(kMaxRows, kTileBytes / (kTileBytesPerElement * channels_padded_))})),
        block_capacity_(round_up(block_rows_, 2)),
        blocks_per_set_(ceil_div(std::max<int64_t>(f_.set_size, 1), block_rows_)) {
    num_threads_ = num_threads > 0 ? num_threads : omp_get_max_threads();
    weight_pairs_d_ = aligned_array<Bf16>(channels_padded_ * latent_pairs_ * 2);
    weight_rows_ = aligned_array<Bf16>(channels_padded_ * latent_padded_);
    weight_pairs_c_ = aligned_array<Bf16>(channels_padded_ * latent_padded_);
    bias_ = aligned_array<float>(channels_padded_);
    inv_sigma2_ = aligned_array<float>(channels_padded_);
    const Bf16* bias = static_cast<const Bf16*>(f_.dec_bias);
    const Bf16* inv_sigma2 = static_cast<const Bf16*>(f_.inv_sigma2);
    for (int64_t c = 0; c < channels_padded_; ++c) {  // zero padding: padded channels' R and Q are exactly 0
      bias_[c] = c < f_.channels ? to_float(bias[c]) : 0.0f;
      inv_sigma2_[c] = c < f_.channels ? to_float(inv_sigma2[c]) : 0.0f;
    }
    scratch_stride_ = 0;
    for (int64_t size : scratch_bytes()) scratch_stride_ += round_up(size, kAlignment);
    scratch_ = aligned_array<char>(scratch_stride_ * num_threads_);
  }

  std::array<int64_t, kScratchParts> scratch_bytes() const {
    const int64_t b = sizeof(Bf16), fp = sizeof(float), tile = block_capacity_ * channels_padded_;
    const int64_t h = channels_padded_ * latent_padded_;
    return {block_capacity_ * latent_padded_ * b, block_capacity_ * latent_padded_ * b, tile * fp, tile * fp,
            tile * b, tile * b, tile * b, h * b, channels_padded_ * latent_pairs_ * 2 * b, h * b,
            channels_padded_ * fp, args_.grad_weight == nullptr ? 0 : h * fp, channels_padded_ * fp,
            channels_padded_ * fp, block_capacity_ * fp, block_capacity_ * kLanes * fp};
  }

  Scratch thread_scratch(int thread) const {
    char* parts[kScratchParts];
    char* p = scratch_.get() + thread * scratch_stride_;
    const auto sizes = scratch_bytes();
    for (int i = 0; i < kScratchParts; ++i) {
      parts[i] = p;
      p += round_up(sizes[i], kAlignment);
    }
    auto bf16 = [&](int i) { return reinterpret_cast<Bf16*>(parts[i]); };
    auto fp32 = [&](int i) { return reinterpret_cast<float*>(parts[i]); };
    return Scratch{bf16(0), bf16(1), fp32(2), fp32(3), bf16(4),  bf16(5),  bf16(6),  bf16(7),
                   bf16(8), bf16(9), fp32(10), fp32(11), fp32(12), fp32(13), fp32(14), fp32(15)};
  }

  void execute() const {
    const int64_t items = f_.num_sets * blocks_per_set_;
    const int64_t channel_panels = channels_padded_ / kPanelWidth, latent_panels = latent_padded_ / kPanelWidth;
    const Bf16* weight = static_cast<const Bf16*>(f_.dec_weight);
    // The team OpenMP grants may be smaller than asked (OMP_DYNAMIC, OMP_THREAD_LIMIT, a nested region): only
    // its threads' sums exist to be added up.
    int team = 0;
#pragma omp parallel num_threads(num_threads_)
    {
#pragma omp single
      team = omp_get_num_threads();
#pragma omp for schedule(static)
      for (int64_t c = 0; c < channels_padded_; ++c) {
        Bf16* row = weight_rows_.get() + c * latent_padded_;
        for (int64_t k = 0; k < latent_padded_; ++k)
          row[k] = c < f_.channels && k < latent_ ? weight[c * f_.w_stride[0] + k * f_.w_stride[1]] : Bf16(0);
      }
#pragma omp for schedule(static) nowait
      for (int64_t panel = 0; panel < channel_panels; ++panel)
        pair_columns(weight_rows_.get() + panel * kPanelWidth * latent_padded_, latent_padded_, 1, latent_pairs_,
                     weight_pairs_d_.get() + panel * latent_pairs_ * 2 * kPanelWidth);
#pragma omp for schedule(static)  // its closing barrier also waits for the other layout
      for (int64_t panel = 0; panel < latent_panels; ++panel)
        pair_rows(weight_rows_.get() + panel * kPanelWidth, latent_padded_, channels_padded_ / 2, 1,
                  weight_pairs_c_.get() + panel * channels_padded_ * kPanelWidth);
      const Scratch scratch = thread_scratch(omp_get_thread_num());
      // Padding channels and columns of the per-set buffers stay zero: packing writes only real ones.
      std::fill_n(scratch.h_rows, channels_padded_ * latent_padded_, Bf16(0));
      std::fill_n(scratch.h_bias, channels_padded_, 0.0f);
      if (args_.grad_weight != nullptr) std::fill_n(scratch.grad_weight, channels_padded_ * latent_padded_, 0.0f);
      std::fill_n(scratch.grad_bias, channels_padded_, 0.0f);
      std::fill_n(scratch.grad_inv_sigma2, channels_padded_, 0.0f);
      int64_t packed_set = -1;
#pragma omp for schedule(static)
      for (int64_t item = 0; item < items; ++item) {
        const int64_t n = item / blocks_per_set_;
        if (n != packed_set) {
          pack_gradient(n, scratch);
          packed_set = n;
        }
        run_item(n, item % blocks_per_set_, scratch);
      }
      // The per-thread sums, added up in thread order (deterministic for a given thread count).
#pragma omp for schedule(static)
      for (int64_t c = 0; c < f_.channels; ++c) reduce_channel(c, team);
    }
  }

  // h = gout[n] · fisher_rsqrt in fp32, rounded to bf16 once: H_w as rows, then in both pair layouts; h_b in fp32.
  void pack_gradient(int64_t n, const Scratch& s) const {
    const Bf16* gout = static_cast<const Bf16*>(args_.grad_out) + n * args_.grad_out_stride_n;
    const Bf16* fisher = static_cast<const Bf16*>(f_.fisher_rsqrt);
    const int64_t width = latent_ + 1;
    for (int64_t c = 0; c < f_.channels; ++c) {
      const Bf16* g = gout + c * width;
      Bf16* row = s.h_rows + c * latent_padded_;
      for (int64_t k = 0; k < latent_; k += kLanes) {
        const __mmask16 lanes = first_lanes(latent_ - k);
        __m512 h = load_widened(g + k, lanes);
        if (fisher != nullptr) h = _mm512_mul_ps(h, load_widened(fisher + c * width + k, lanes));
        store_rounded(row + k, h, lanes);
      }
      s.h_bias[c] = to_float(g[latent_]) * (fisher == nullptr ? 1.0f : to_float(fisher[c * width + latent_]));
    }
    pair_columns(s.h_rows, latent_padded_, channels_padded_ / kPanelWidth, latent_pairs_, s.h_pairs_d);
    pair_rows(s.h_rows, latent_padded_, channels_padded_ / 2, latent_padded_ / kPanelWidth, s.h_pairs_c);
  }

  void run_item(int64_t n, int64_t block, const Scratch& s) const {
    const BalancedSplit blocks(std::max<int64_t>(f_.set_size, 1), block_rows_);
    const int64_t first_row = std::min(blocks.begin(block), f_.set_size);
    const int64_t end_row = std::min(blocks.begin(block + 1), f_.set_size);
    const int64_t length = f_.lengths == nullptr ? f_.set_size : f_.lengths[n];
    const int64_t rows = std::max<int64_t>(0, std::min(end_row, length) - first_row);
    zero_gradient_rows<Bf16>(args_, n, first_row + rows, end_row);  // past the set's length: no gradient
    if (rows == 0) return;
    pack_z(f_, n, first_row, rows, latent_padded_, latent_padded_, s.z_rows, s.z_pairs);
    copy_x(f_, false, n, first_row, rows, 0, f_.channels, channels_padded_, s.x);
    const Bf16* x_scale = static_cast<const Bf16*>(f_.x_scale);
    for (int64_t t = 0; t < round_up(rows, 2); ++t)
      s.row_scale[t] = x_scale == nullptr || t >= rows
                           ? 1.0f
                           : to_float(x_scale[n * f_.x_scale_stride[0] + (first_row + t) * f_.x_scale_stride[1]]);
    decoder_gemm(round_up(rows, 2), s);
    gradient_gemm(n, first_row, rows, s);
    if (args_.grad_z != nullptr) grad_z_gemm(n, first_row, rows, s);
    if (args_.grad_weight != nullptr) grad_weight_gemm(round_up(rows, 2) / 2, s);
  }

  // ---- 1. P = Z·Wᵀ + b ------------------------------------------------------------------------------

  template <int Rows>
  static void decoder_tile(const uint32_t* z_rows, int64_t z_row_words, int64_t latent_pairs, const Bf16* weight,
                           const float* bias, float* pre, int64_t pre_stride) {
    __m512 acc[Rows][2];
    multiply<Rows>(acc, latent_pairs, z_rows, z_row_words, 1, weight);
    unrolled<2>([&](auto j) {
      const __m512 b = _mm512_loadu_ps(bias + j * kLanes);
      unrolled<Rows>([&](auto i) { _mm512_storeu_ps(pre + i * pre_stride + j * kLanes, _mm512_add_ps(acc[i][j], b)); });
    });
  }

  void decoder_gemm(int64_t rows_padded, const Scratch& s) const {
    static constexpr auto tiles = tile_table<DecoderTile>(std::make_integer_sequence<int, kMaxRows>{});
    const BalancedSplit panels(rows_padded, kMaxRows);
    const auto* z_rows = reinterpret_cast<const uint32_t*>(s.z_rows);
    for (int64_t c = 0; c < channels_padded_; c += kPanelWidth) {
      for (int64_t part = 0; part < panels.parts; ++part) {
        const int64_t row = panels.begin(part);
        tiles[panels.size(part) - 1](z_rows + row * latent_padded_ / 2, latent_padded_ / 2, latent_pairs_,
                                     weight_pairs_d_.get() + c * latent_pairs_ * 2, bias_.get() + c,
                                     s.pre + row * channels_padded_ + c, channels_padded_);
      }
    }
  }

  // ---- 2. A = Z·H_wᵀ + h_b and its epilogue ------------------------------------------------------

  struct GradientPanel {
    const uint32_t* z_rows;
    int64_t z_row_words;
    int64_t latent_pairs;
    const Bf16* h_panel;     // [d / 2][32][2]
    const float* h_bias;     // the panel's 32 channels
    const float* inv_sigma2; // likewise
    const float* pre;        // P, row 0 of the panel; x, r_rows and q_rows at the same element offsets
    const float* x;
    Bf16* r_rows;
    Bf16* q_rows;
    int64_t tile_stride;     // of pre, x, r_rows and q_rows
    Bf16* q_pairs;           // row pair 0 of the panel
    int64_t pair_stride;     // bf16 between row pairs of q_pairs
    const float* row_scale;
    int64_t valid_rows;      // real rows of the panel (one fewer than Rows for the padding row of an odd block)
    float* grad_bias;        // running sums of the panel's channels
    float* grad_inv_sigma2;  // likewise
    float* grad_scale;       // [row][kLanes], or null
    Bf16* grad_x;            // row 0 of the panel in grad_x (N, T, C), or null
    int64_t grad_x_stride;
    int64_t width;           // real channels of the panel (< 32 for the last one)
  };

  template <int Rows>
  static void gradient_tile(const GradientPanel& g) {
    __m512 acc[Rows][2];
    multiply<Rows>(acc, g.latent_pairs, g.z_rows, g.z_row_words, 1, g.h_panel);
    unrolled<2>([&](auto j) {
      const __m512 h_bias = _mm512_loadu_ps(g.h_bias + j * kLanes);
      const __m512 inv_sigma2 = _mm512_loadu_ps(g.inv_sigma2 + j * kLanes);
      const __mmask16 real_channels = first_lanes(g.width - j * kLanes);
      __m512 bias_sum = _mm512_loadu_ps(g.grad_bias + j * kLanes);
      __m512 sigma_sum = _mm512_loadu_ps(g.grad_inv_sigma2 + j * kLanes);
      unrolled<Rows>([&](auto i) {
        const int64_t at = i * g.tile_stride + j * kLanes;
        const __m512 p = _mm512_loadu_ps(g.pre + at);
        const __m512 x = _mm512_loadu_ps(g.x + at);
        const __m512 scale = _mm512_set1_ps(g.row_scale[i]);
        __mmask16 active = _mm512_cmp_ps_mask(p, _mm512_setzero_ps(), _CMP_GT_OQ);
        if (i >= g.valid_rows) active = 0;
        const __m512 dr = _mm512_add_ps(acc[i][j], h_bias);
        const __m512 difference = _mm512_fnmadd_ps(x, scale, p);
        const __m512 q = _mm512_maskz_mul_ps(active, dr, inv_sigma2);
        store_rounded(g.r_rows + at, _mm512_maskz_mul_ps(active, difference, inv_sigma2));
        store_rounded(g.q_rows + at, q);
        bias_sum = _mm512_add_ps(bias_sum, q);
        sigma_sum = _mm512_mask3_fmadd_ps(dr, difference, sigma_sum, active);
        if (g.grad_scale != nullptr) {
          float* lanes = g.grad_scale + i * kLanes;
          _mm512_storeu_ps(lanes, _mm512_fnmadd_ps(q, x, _mm512_loadu_ps(lanes)));
        }
        if (g.grad_x != nullptr && i < g.valid_rows)
          store_rounded(g.grad_x + i * g.grad_x_stride + j * kLanes, _mm512_sub_ps(_mm512_setzero_ps(),
                                                                                   _mm512_mul_ps(q, scale)),
                        real_channels);
        acc[i][j] = q;
      });
      _mm512_storeu_ps(g.grad_bias + j * kLanes, bias_sum);
      _mm512_storeu_ps(g.grad_inv_sigma2 + j * kLanes, sigma_sum);
    });
    unrolled<Rows / 2>([&](auto q) {
      unrolled<2>([&](auto j) {
        _mm512_storeu_si512(g.q_pairs + q * g.pair_stride + j * kPanelWidth,
                            interleave_rows(acc[2 * q][j], acc[2 * q + 1][j]));
      });
    });
  }

  void gradient_gemm(int64_t n, int64_t first_row, int64_t rows, const Scratch& s) const {
    static constexpr auto tiles = tile_table<GradientTile>(std::make_integer_sequence<int, kMaxRows>{});
    const BalancedSplit pair_panels(round_up(rows, 2) / 2, kMaxRows / 2);
    if (args_.grad_x_scale != nullptr) std::fill_n(s.grad_scale, round_up(rows, 2) * kLanes, 0.0f);
    GradientPanel g;
    g.z_row_words = latent_padded_ / 2;
    g.latent_pairs = latent_pairs_;
    g.tile_stride = channels_padded_;
    g.pair_stride = 2 * channels_padded_;
    g.grad_x_stride = f_.channels;
    for (int64_t c = 0; c < channels_padded_; c += kPanelWidth) {
      g.h_panel = s.h_pairs_d + c * latent_pairs_ * 2;
      g.h_bias = s.h_bias + c;
      g.inv_sigma2 = inv_sigma2_.get() + c;
      g.grad_bias = s.grad_bias + c;
      g.grad_inv_sigma2 = s.grad_inv_sigma2 + c;
      g.width = std::min<int64_t>(kPanelWidth, f_.channels - c);
      for (int64_t part = 0; part < pair_panels.parts; ++part) {
        const int64_t row = 2 * pair_panels.begin(part);
        const int64_t at = row * channels_padded_ + c;
        g.z_rows = reinterpret_cast<const uint32_t*>(s.z_rows) + row * latent_padded_ / 2;
        g.pre = s.pre + at;
        g.x = s.x + at;
        g.r_rows = s.r_rows + at;
        g.q_rows = s.q_rows + at;
        g.q_pairs = s.q_pairs + (row / 2) * g.pair_stride + 2 * c;
        g.row_scale = s.row_scale + row;
        g.valid_rows = rows - row;
        g.grad_scale = args_.grad_x_scale == nullptr ? nullptr : s.grad_scale + row * kLanes;
        g.grad_x = args_.grad_x == nullptr
                       ? nullptr
                       : static_cast<Bf16*>(args_.grad_x) + (n * f_.set_size + first_row + row) * f_.channels + c;
        tiles[2 * pair_panels.size(part) - 1](g);
      }
    }
    if (args_.grad_x_scale == nullptr) return;
    Bf16* grad_scale = static_cast<Bf16*>(args_.grad_x_scale) + n * f_.set_size + first_row;
    for (int64_t t = 0; t < rows; ++t) grad_scale[t] = to_bf16(_mm512_reduce_add_ps(_mm512_loadu_ps(s.grad_scale + t * kLanes)));
  }

  // ---- 3. grad_z = R·H_w + Q·W ----------------------------------------------------------------------

  template <int Rows>
  static void grad_z_tile(const uint32_t* r, const uint32_t* q, int64_t row_words, const Bf16* h_panel,
                          const Bf16* weight_panel, Bf16* grad_z, int64_t latent, int64_t column) {
    __m512 acc[Rows][2];
    multiply<Rows>(acc, row_words, r, row_words, 1, h_panel);
    multiply<Rows, int64_t, true>(acc, row_words, q, row_words, 1, weight_panel);
    unrolled<2>([&](auto j) {
      const __mmask16 lanes = first_lanes(latent - column - j * kLanes);
      unrolled<Rows>([&](auto i) { store_rounded(grad_z + i * latent + column + j * kLanes, acc[i][j], lanes); });
    });
  }

  void grad_z_gemm(int64_t n, int64_t first_row, int64_t rows, const Scratch& s) const {
    static constexpr auto tiles = tile_table<GradZTile>(std::make_integer_sequence<int, kMaxRows>{});
    const BalancedSplit panels(rows, kMaxRows);
    const int64_t row_words = channels_padded_ / 2;  // also the depth in pairs
    Bf16* grad_z = static_cast<Bf16*>(args_.grad_z) + (n * f_.set_size + first_row) * latent_;
    for (int64_t column = 0; column < latent_padded_; column += kPanelWidth) {
      const int64_t panel = (column / kPanelWidth) * channels_padded_ * kPanelWidth;
      for (int64_t part = 0; part < panels.parts; ++part) {
        const int64_t row = panels.begin(part);
        tiles[panels.size(part) - 1](reinterpret_cast<const uint32_t*>(s.r_rows) + row * row_words,
                                     reinterpret_cast<const uint32_t*>(s.q_rows) + row * row_words, row_words,
                                     s.h_pairs_c + panel, weight_pairs_c_.get() + panel, grad_z + row * latent_,
                                     latent_, column);
      }
    }
  }

  // ---- 4. grad_weight += Qᵀ·Z -----------------------------------------------------------------------

  template <int Rows>
  static void grad_weight_tile(const uint32_t* q_pairs, int64_t pair_words, int64_t pairs, const Bf16* z_panel,
                               float* sums, int64_t ld) {
    __m512 acc[Rows][2];
    unrolled<Rows>([&](auto i) {
      unrolled<2>([&](auto j) { acc[i][j] = _mm512_loadu_ps(sums + i * ld + j * kLanes); });
    });
    multiply<Rows, std::integral_constant<int64_t, 1>, true>(acc, pairs, q_pairs, std::integral_constant<int64_t, 1>{},
                                                             pair_words, z_panel);
    unrolled<Rows>([&](auto i) {
      unrolled<2>([&](auto j) { _mm512_storeu_ps(sums + i * ld + j * kLanes, acc[i][j]); });
    });
  }

  void grad_weight_gemm(int64_t pairs, const Scratch& s) const {
    static constexpr auto tiles = tile_table<GradWeightTile>(std::make_integer_sequence<int, kMaxRows>{});
    const BalancedSplit channel_panels(f_.channels, kMaxRows);
    const auto* q_pairs = reinterpret_cast<const uint32_t*>(s.q_pairs);
    for (int64_t part = 0; part < channel_panels.parts; ++part) {
      const int64_t channel = channel_panels.begin(part);
      for (int64_t column = 0; column < latent_padded_; column += kPanelWidth)
        tiles[channel_panels.size(part) - 1](q_pairs + channel, channels_padded_, pairs,
                                             s.z_pairs + (column / kPanelWidth) * pairs * 2 * kPanelWidth,
                                             s.grad_weight + channel * latent_padded_ + column, latent_padded_);
    }
  }

  void reduce_channel(int64_t c, int team) const {
    float bias = 0, inv_sigma2 = 0;
    std::vector<float> weight(args_.grad_weight == nullptr ? 0 : latent_, 0.0f);
    for (int thread = 0; thread < team; ++thread) {
      const Scratch s = thread_scratch(thread);
      bias += s.grad_bias[c];
      inv_sigma2 += s.grad_inv_sigma2[c];
      for (int64_t k = 0; k < int64_t(weight.size()); ++k) weight[k] += s.grad_weight[c * latent_padded_ + k];
    }
    if (args_.grad_bias != nullptr) static_cast<Bf16*>(args_.grad_bias)[c] = to_bf16(bias);
    if (args_.grad_inv_sigma2 != nullptr) static_cast<Bf16*>(args_.grad_inv_sigma2)[c] = to_bf16(inv_sigma2);
    Bf16* grad_weight = static_cast<Bf16*>(args_.grad_weight);
    for (int64_t k = 0; k < int64_t(weight.size()); ++k) grad_weight[c * latent_ + k] = to_bf16(weight[k]);
  }

  const FVAccumulateBackwardArgs& args_;
  const FVAccumulateArgs& f_;
  const int64_t latent_;
  const int64_t latent_pairs_;     // ceil(d / 2): depth of steps 1 and 2
  const int64_t latent_padded_;    // d rounded up to whole column panels; row stride of the d-wide buffers
  const int64_t channels_padded_;  // row stride of the C-wide tiles
  const int64_t block_rows_;
  const int64_t block_capacity_;   // block_rows_ rounded up to whole row pairs
  const int64_t blocks_per_set_;
  int num_threads_ = 1;
  AlignedArray<Bf16> weight_pairs_d_;  // [C_padded / 32][d / 2][32][2]: B of step 1
  AlignedArray<Bf16> weight_rows_;     // [C_padded][latent_padded]: W, zero-padded
  AlignedArray<Bf16> weight_pairs_c_;  // [latent_padded / 32][C_padded / 2][32][2]: B of step 3
  AlignedArray<float> bias_;           // [C_padded]
  AlignedArray<float> inv_sigma2_;     // [C_padded]
  int64_t scratch_stride_ = 0;         // bytes
  AlignedArray<char> scratch_;
};

}  // namespace
}  // namespace fvk
