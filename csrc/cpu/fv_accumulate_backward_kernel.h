// The fused CPU backward of csrc/fv_accumulate.h (FVAccumulateBackwardArgs), written once and compiled
// once per instruction set next to the forward (fv_accumulate_<isa>.cpp include this file).
//
// One work item is (set n, block of rows). Like the forward it recomputes the decoder tile instead of
// keeping T × C intermediates from it; per item, with the set's h = gout · fisher_rsqrt packed once per
// thread and set:
//   1. decoder GEMM  P = Z·Wᵀ + b                          (depth d)
//   2. GEMM          A = Z·H_wᵀ + h_b, whose epilogue forms Q = ∂L/∂p and R = r in place of P, writes
//                    grad_x and grad_x_scale, and adds up grad_bias and grad_inv_sigma2 (depth d)
//   3. GEMM          grad_z = R·H_w + Q·W                   (depth C, both products in one accumulator)
//   4. GEMM          grad_weight += Qᵀ·Z                    (depth = rows of the block)
// Nothing of size T × C leaves the per-thread scratch. grad_weight, grad_bias and grad_inv_sigma2 are
// summed per thread and added up in thread order at the end: items are split statically, so results are
// deterministic for a given thread count. A gradient that is not asked for (null) costs nothing: its
// GEMM or epilogue term is skipped.
#pragma once

#include "cpu_microkernel.h"

namespace fvk {
namespace {

// Bytes of one row block's three T × C tiles (x, P/R, Q): they stay in L2 beside the packed weights.
constexpr int64_t kBackwardTileBytes = 384 * 1024;
constexpr int64_t kMaxBackwardRows = 128;

template <typename Scalar, class Isa>
class FusedBackward : Microkernel<Scalar, Isa> {
 public:
  static void run(const FVAccumulateBackwardArgs& args, int num_threads) {
    const FVAccumulateArgs& f = args.forward;
    if (f.num_sets == 0 || f.channels == 0) return zero_all_gradients<Scalar>(args);
    const FusedBackward kernel(args, num_threads);
    kernel.execute();
  }

 private:
  using Base = Microkernel<Scalar, Isa>;
  using typename Base::Vec;
  template <int Rows>
  using Tile = typename Base::template Tile<Rows>;
  using Base::conflict_free_stride;
  using Base::kLanes;
  using Base::kMaxRows;
  using Base::kPanelWidth;
  using Base::kVecsPerRow;
  using Base::load;
  using Base::store;

  struct Scratch {           // one thread's tiles and sums
    Scalar* z_rows;          // [row][latent_stride]
    Scalar* x;               // [row][channel_stride]: x (not x̂)
    Scalar* pre;             // [row][channel_stride]: P, then R
    Scalar* q;               // [row][channel_stride]
    Scalar* h_panels;        // [C_padded / kPanelWidth][d][kPanelWidth]: H_wᵀ, B of step 2
    Scalar* h_rows;          // [C_padded][latent_stride]: H_w, B of step 3
    Scalar* h_bias;          // [C_padded]
    Scalar* grad_weight;     // [C_padded][latent_stride]
    Scalar* grad_bias;       // [C_padded]
    Scalar* grad_inv_sigma2; // [C_padded]
    Scalar* row_scale;       // [row]: x_scale of the block's rows
    Scalar* grad_scale;      // [row][kLanes]: lane sums of −Σ_c q·x
  };

  FusedBackward(const FVAccumulateBackwardArgs& args, int num_threads)
      : args_(args),
        f_(args.forward),
        latent_(f_.latent),
        latent_padded_(round_up(f_.latent, kPanelWidth)),
        latent_stride_(conflict_free_stride(latent_padded_)),
        channels_padded_(round_up(f_.channels, kPanelWidth)),
        channel_stride_(conflict_free_stride(channels_padded_)),
        block_rows_(std::max<int64_t>(
            1, std::min({kMaxBackwardRows, std::max<int64_t>(f_.set_size, 1),
                         std::max<int64_t>(kMaxRows, kBackwardTileBytes / (3 * channel_stride_ * int64_t(sizeof(Scalar))))}))),
        blocks_per_set_(ceil_div(std::max<int64_t>(f_.set_size, 1), block_rows_)) {
    num_threads_ = num_threads > 0 ? num_threads : omp_get_max_threads();
    weight_panels_ = aligned_array<Scalar>(channels_padded_ * latent_);
    weight_rows_ = aligned_array<Scalar>(channels_padded_ * latent_stride_);
    bias_ = aligned_array<Scalar>(channels_padded_);
    inv_sigma2_ = aligned_array<Scalar>(channels_padded_);
    std::fill_n(bias_.get(), channels_padded_, Scalar(0));
    std::fill_n(inv_sigma2_.get(), channels_padded_, Scalar(0));
    std::copy_n(static_cast<const Scalar*>(f_.dec_bias), f_.channels, bias_.get());
    std::copy_n(static_cast<const Scalar*>(f_.inv_sigma2), f_.channels, inv_sigma2_.get());
    scratch_stride_ = 0;
    for (int64_t size : scratch_sizes()) scratch_stride_ += round_up(size, kPanelWidth);
    scratch_ = aligned_array<Scalar>(scratch_stride_ * num_threads_);
  }

  std::array<int64_t, 12> scratch_sizes() const {
    const int64_t tile = block_rows_ * channel_stride_;
    return {block_rows_ * latent_stride_, tile, tile, tile, channels_padded_ * latent_,
            channels_padded_ * latent_stride_, channels_padded_,
            args_.grad_weight == nullptr ? 0 : channels_padded_ * latent_stride_, channels_padded_, channels_padded_,
            block_rows_, block_rows_ * kLanes};
  }

  Scratch thread_scratch(int thread) const {
    Scalar* parts[12];
    Scalar* p = scratch_.get() + thread * scratch_stride_;
    const auto sizes = scratch_sizes();
    for (int i = 0; i < 12; ++i) {
      parts[i] = p;
      p += round_up(sizes[i], kPanelWidth);
    }
    return Scratch{parts[0], parts[1], parts[2], parts[3], parts[4],  parts[5],
                   parts[6], parts[7], parts[8], parts[9], parts[10], parts[11]};
  }

  void execute() const {
    const int64_t panels = channels_padded_ / kPanelWidth;
    const int64_t items = f_.num_sets * blocks_per_set_;
    // The team OpenMP grants may be smaller than asked (OMP_DYNAMIC, OMP_THREAD_LIMIT, a nested region): only
    // its threads' sums exist to be added up.
    int team = 0;
#pragma omp parallel num_threads(num_threads_)
    {
#pragma omp single
      team = omp_get_num_threads();
#pragma omp for schedule(static) nowait
      for (int64_t panel = 0; panel < panels; ++panel) Base::pack_weight_panel(f_, panel, weight_panels_.get());
#pragma omp for schedule(static)  // its closing barrier also waits for the weight panels
      for (int64_t c = 0; c < channels_padded_; ++c) pack_weight_row(c);
      const Scratch scratch = thread_scratch(omp_get_thread_num());
      // Padding channels and columns of the per-set buffers stay zero: packing writes only real ones.
      std::fill_n(scratch.h_panels, channels_padded_ * latent_, Scalar(0));
      std::fill_n(scratch.h_rows, channels_padded_ * latent_stride_, Scalar(0));
      std::fill_n(scratch.h_bias, channels_padded_, Scalar(0));
      if (args_.grad_weight != nullptr) std::fill_n(scratch.grad_weight, channels_padded_ * latent_stride_, Scalar(0));
      std::fill_n(scratch.grad_bias, channels_padded_, Scalar(0));
      std::fill_n(scratch.grad_inv_sigma2, channels_padded_, Scalar(0));
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

  // weight_rows_[c] = W[c, :d], zero-padded (B of grad_z's Q·W).
  void pack_weight_row(int64_t c) const {
    const Scalar* w = static_cast<const Scalar*>(f_.dec_weight);
    Scalar* row = weight_rows_.get() + c * latent_stride_;
    std::fill_n(row, latent_stride_, Scalar(0));
    if (c >= f_.channels) return;
    for (int64_t k = 0; k < latent_; ++k) row[k] = w[c * f_.w_stride[0] + k * f_.w_stride[1]];
  }

  // h = gout[n] · fisher_rsqrt, as H_wᵀ panels, H_w rows and h_b.
  void pack_gradient(int64_t n, const Scratch& scratch) const {
    const Scalar* gout = static_cast<const Scalar*>(args_.grad_out) + n * args_.grad_out_stride_n;
    const Scalar* fisher = static_cast<const Scalar*>(f_.fisher_rsqrt);
    const int64_t row_stride = latent_ + 1;
    for (int64_t c = 0; c < f_.channels; ++c) {
      const Scalar* g = gout + c * row_stride;
      const Scalar* s = fisher == nullptr ? nullptr : fisher + c * row_stride;
      Scalar* row = scratch.h_rows + c * latent_stride_;
      Scalar* panel = scratch.h_panels + (c / kPanelWidth) * latent_ * kPanelWidth + c % kPanelWidth;
      for (int64_t k = 0; k < latent_; ++k) {
        const Scalar h = s == nullptr ? g[k] : g[k] * s[k];
        row[k] = h;
        panel[k * kPanelWidth] = h;
      }
      scratch.h_bias[c] = s == nullptr ? g[latent_] : g[latent_] * s[latent_];
    }
  }

  void run_item(int64_t n, int64_t block, const Scratch& scratch) const {
    const BalancedSplit blocks(std::max<int64_t>(f_.set_size, 1), block_rows_);
    const int64_t first_row = std::min(blocks.begin(block), f_.set_size);
    const int64_t end_row = std::min(blocks.begin(block + 1), f_.set_size);
    const int64_t length = f_.lengths == nullptr ? f_.set_size : f_.lengths[n];
    const int64_t rows = std::max<int64_t>(0, std::min(end_row, length) - first_row);
    zero_gradient_rows<Scalar>(args_, n, first_row + rows, end_row);  // past the set's length: no gradient
    if (rows == 0) return;
    const BalancedSplit row_panels(rows, kMaxRows);
    Base::pack_z(f_, n, first_row, rows, latent_padded_, latent_stride_, scratch.z_rows);
    Base::copy_x(f_, false, n, first_row, rows, 0, f_.channels, channels_padded_, channel_stride_, scratch.x);
    const Scalar* x_scale = static_cast<const Scalar*>(f_.x_scale);
    for (int64_t t = 0; t < rows; ++t)
      scratch.row_scale[t] =
          x_scale == nullptr ? Scalar(1) : x_scale[n * f_.x_scale_stride[0] + (first_row + t) * f_.x_scale_stride[1]];
    decoder_gemm(row_panels, scratch);
    gradient_gemm(n, first_row, row_panels, scratch);
    if (args_.grad_z != nullptr) grad_z_gemm(n, first_row, row_panels, scratch);
    if (args_.grad_weight != nullptr) grad_weight_gemm(rows, scratch);
  }

  // ---- 1. P = Z·Wᵀ + b ------------------------------------------------------------------------------

  template <int Rows>
  static void decoder_tile(const Scalar* z_rows, int64_t z_stride, const Scalar* weight, const Scalar* bias,
                           int64_t latent, Scalar* pre, int64_t pre_stride) {
    Tile<Rows> acc;
    Base::template multiply<Rows>(acc, latent, z_rows, z_stride, 1, weight, kPanelWidth);
    unrolled<kVecsPerRow>([&](auto j) {
      const Vec b = load(bias + j * kLanes);
      unrolled<Rows>([&](auto i) { store(pre + i * pre_stride + j * kLanes, acc.v[i][j] + b); });
    });
  }

  void decoder_gemm(const BalancedSplit& row_panels, const Scratch& scratch) const {
    static constexpr auto tiles = tile_table<DecoderTile>(std::make_integer_sequence<int, kMaxRows>{});
    for (int64_t c = 0; c < channels_padded_; c += kPanelWidth) {
      for (int64_t p = 0; p < row_panels.parts; ++p) {
        const int64_t begin = row_panels.begin(p);
        tiles[row_panels.size(p) - 1](scratch.z_rows + begin * latent_stride_, latent_stride_,
                                      weight_panels_.get() + c * latent_, bias_.get() + c, latent_,
                                      scratch.pre + begin * channel_stride_ + c, channel_stride_);
      }
    }
  }

  // ---- 2. A = Z·H_wᵀ + h_b and its epilogue ------------------------------------------------------

  struct GradientPanel {
    const Scalar* z_rows;
    int64_t z_stride;
    const Scalar* h_panel;  // [d][kPanelWidth]
    const Scalar* h_bias;   // the panel's kPanelWidth channels
    const Scalar* inv_sigma2;
    int64_t latent;
    Scalar* pre;  // P in, R out
    Scalar* q;
    const Scalar* x;
    int64_t tile_stride;  // of pre, q and x
    const Scalar* row_scale;
    Scalar* grad_bias;        // running sums of the panel's channels
    Scalar* grad_inv_sigma2;  // likewise
    Scalar* grad_scale;       // [row][kLanes], or null
    Scalar* grad_x;           // row 0 of the panel in grad_x (N, T, C), or null
    int64_t grad_x_stride;
    int64_t width;  // real channels of the panel (< kPanelWidth for the last one)
  };

  template <int Rows>
  static void gradient_tile(const GradientPanel& g) {
    Tile<Rows> a;
    Base::template multiply<Rows>(a, g.latent, g.z_rows, g.z_stride, 1, g.h_panel, kPanelWidth);
    unrolled<kVecsPerRow>([&](auto j) {
      const Vec h_bias = load(g.h_bias + j * kLanes);
      const Vec inv_sigma2 = load(g.inv_sigma2 + j * kLanes);
      Vec bias_sum{}, sigma_sum{};
      unrolled<Rows>([&](auto i) {
        const int64_t at = i * g.tile_stride + j * kLanes;
        const Vec scale = Vec{} + g.row_scale[i];
        const Vec x = load(g.x + at);
        const Vec p = load(g.pre + at);
        const Vec dr = a.v[i][j] + h_bias;
        const auto active = p > Vec{};
        const Vec difference = p - x * scale;
        const Vec q = active ? dr * inv_sigma2 : Vec{};
        store(g.pre + at, active ? difference * inv_sigma2 : Vec{});
        store(g.q + at, q);
        bias_sum += q;
        sigma_sum += active ? dr * difference : Vec{};
        if (g.grad_scale != nullptr) {
          Scalar* lanes = g.grad_scale + i * kLanes;
          store(lanes, load(lanes) - q * x);
        }
        if (g.grad_x != nullptr) {
          const Vec value = -(q * scale);
          Scalar* destination = g.grad_x + i * g.grad_x_stride + j * kLanes;
          if (g.width == kPanelWidth) {
            store(destination, value);
          } else {
            for (int l = 0; l < kLanes && j * kLanes + l < g.width; ++l) destination[l] = value[l];
          }
        }
      });
      store(g.grad_bias + j * kLanes, load(g.grad_bias + j * kLanes) + bias_sum);
      store(g.grad_inv_sigma2 + j * kLanes, load(g.grad_inv_sigma2 + j * kLanes) + sigma_sum);
    });
  }

  void gradient_gemm(int64_t n, int64_t first_row, const BalancedSplit& row_panels, const Scratch& scratch) const {
    static constexpr auto tiles = tile_table<GradientTile>(std::make_integer_sequence<int, kMaxRows>{});
    const int64_t rows = row_panels.count;
    if (args_.grad_x_scale != nullptr) std::fill_n(scratch.grad_scale, rows * kLanes, Scalar(0));
    GradientPanel g;
    g.z_stride = latent_stride_;
    g.latent = latent_;
    g.tile_stride = channel_stride_;
    g.grad_x_stride = f_.channels;
    for (int64_t c = 0; c < channels_padded_; c += kPanelWidth) {
      g.h_panel = scratch.h_panels + c * latent_;
      g.h_bias = scratch.h_bias + c;
      g.inv_sigma2 = inv_sigma2_.get() + c;
      g.grad_bias = scratch.grad_bias + c;
      g.grad_inv_sigma2 = scratch.grad_inv_sigma2 + c;
      g.width = std::min<int64_t>(kPanelWidth, f_.channels - c);
      for (int64_t p = 0; p < row_panels.parts; ++p) {
        const int64_t begin = row_panels.begin(p);
        g.z_rows = scratch.z_rows + begin * latent_stride_;
        g.pre = scratch.pre + begin * channel_stride_ + c;
        g.q = scratch.q + begin * channel_stride_ + c;
        g.x = scratch.x + begin * channel_stride_ + c;
        g.row_scale = scratch.row_scale + begin;
        g.grad_scale = args_.grad_x_scale == nullptr ? nullptr : scratch.grad_scale + begin * kLanes;
        g.grad_x = args_.grad_x == nullptr ? nullptr
                                           : static_cast<Scalar*>(args_.grad_x) +
                                                 (n * f_.set_size + first_row + begin) * f_.channels + c;
        tiles[row_panels.size(p) - 1](g);
      }
    }
    if (args_.grad_x_scale == nullptr) return;
    Scalar* grad_scale = static_cast<Scalar*>(args_.grad_x_scale) + n * f_.set_size + first_row;
    for (int64_t t = 0; t < rows; ++t) {
      Scalar sum = 0;
      for (int l = 0; l < kLanes; ++l) sum += scratch.grad_scale[t * kLanes + l];
      grad_scale[t] = sum;
    }
  }

  // ---- 3. grad_z = R·H_w + Q·W ----------------------------------------------------------------------

  template <int Rows>
  static void grad_z_tile(const Scalar* r, const Scalar* q, int64_t tile_stride, int64_t depth, const Scalar* h_rows,
                          const Scalar* weight_rows, int64_t ld, Scalar* grad_z, int64_t latent, int64_t column) {
    Tile<Rows> acc;
    Base::template multiply<Rows>(acc, depth, r, tile_stride, 1, h_rows + column, ld);
    Base::template multiply<Rows, int64_t, true>(acc, depth, q, tile_stride, 1, weight_rows + column, ld);
    const int64_t width = std::min<int64_t>(kPanelWidth, latent - column);
    unrolled<Rows>([&](auto i) {
      Scalar* destination = grad_z + i * latent + column;
      if (width == kPanelWidth) {
        unrolled<kVecsPerRow>([&](auto j) { store(destination + j * kLanes, acc.v[i][j]); });
      } else {
        Scalar row[kPanelWidth];
        unrolled<kVecsPerRow>([&](auto j) { store(row + j * kLanes, acc.v[i][j]); });
        std::copy_n(row, width, destination);
      }
    });
  }

  void grad_z_gemm(int64_t n, int64_t first_row, const BalancedSplit& row_panels, const Scratch& scratch) const {
    static constexpr auto tiles = tile_table<GradZTile>(std::make_integer_sequence<int, kMaxRows>{});
    Scalar* grad_z = static_cast<Scalar*>(args_.grad_z) + (n * f_.set_size + first_row) * latent_;
    for (int64_t column = 0; column < latent_padded_; column += kPanelWidth) {
      for (int64_t p = 0; p < row_panels.parts; ++p) {
        const int64_t begin = row_panels.begin(p);
        tiles[row_panels.size(p) - 1](scratch.pre + begin * channel_stride_, scratch.q + begin * channel_stride_,
                                      channel_stride_, channels_padded_, scratch.h_rows, weight_rows_.get(),
                                      latent_stride_, grad_z + begin * latent_, latent_, column);
      }
    }
  }

  // ---- 4. grad_weight += Qᵀ·Z -----------------------------------------------------------------------

  template <int Rows>
  static void grad_weight_tile(const Scalar* q, int64_t q_stride, int64_t depth, const Scalar* z_rows, int64_t ld,
                               Scalar* grad_weight) {
    Tile<Rows> acc;
    unrolled<Rows>([&](auto i) {
      unrolled<kVecsPerRow>([&](auto j) { acc.v[i][j] = load(grad_weight + i * ld + j * kLanes); });
    });
    Base::template multiply<Rows, std::integral_constant<int64_t, 1>, true>(
        acc, depth, q, std::integral_constant<int64_t, 1>{}, q_stride, z_rows, ld);
    unrolled<Rows>([&](auto i) {
      unrolled<kVecsPerRow>([&](auto j) { store(grad_weight + i * ld + j * kLanes, acc.v[i][j]); });
    });
  }

  void grad_weight_gemm(int64_t rows, const Scratch& scratch) const {
    static constexpr auto tiles = tile_table<GradWeightTile>(std::make_integer_sequence<int, kMaxRows>{});
    const BalancedSplit channel_panels(f_.channels, kMaxRows);
    for (int64_t p = 0; p < channel_panels.parts; ++p) {
      const int64_t channel = channel_panels.begin(p);
      for (int64_t column = 0; column < latent_padded_; column += kPanelWidth)
        tiles[channel_panels.size(p) - 1](scratch.q + channel, channel_stride_, rows, scratch.z_rows + column,
                                          latent_stride_, scratch.grad_weight + channel * latent_stride_ + column);
    }
  }

  void reduce_channel(int64_t c, int team) const {
    Scalar bias = 0, inv_sigma2 = 0;
    std::vector<Scalar> weight(args_.grad_weight == nullptr ? 0 : latent_, Scalar(0));
    for (int thread = 0; thread < team; ++thread) {
      const Scratch s = thread_scratch(thread);
      bias += s.grad_bias[c];
      inv_sigma2 += s.grad_inv_sigma2[c];
      for (int64_t k = 0; k < int64_t(weight.size()); ++k) weight[k] += s.grad_weight[c * latent_stride_ + k];
    }
    if (args_.grad_bias != nullptr) static_cast<Scalar*>(args_.grad_bias)[c] = bias;
    if (args_.grad_inv_sigma2 != nullptr) static_cast<Scalar*>(args_.grad_inv_sigma2)[c] = inv_sigma2;
    if (args_.grad_weight != nullptr)
      std::copy(weight.begin(), weight.end(), static_cast<Scalar*>(args_.grad_weight) + c * latent_);
  }

  // Tables of Rows-specialised tiles, indexed by Rows − 1: row panels come in every size up to kMaxRows.
  struct DecoderTile {
    template <int Rows>
    static constexpr auto get() { return &decoder_tile<Rows>; }
  };
  struct GradientTile {
    template <int Rows>
    static constexpr auto get() { return &gradient_tile<Rows>; }
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

  const FVAccumulateBackwardArgs& args_;
  const FVAccumulateArgs& f_;
  const int64_t latent_;
  const int64_t latent_padded_;   // d rounded up to whole column panels
  const int64_t latent_stride_;   // row stride of z_rows, h_rows, weight_rows_ and the grad_weight sums
  const int64_t channels_padded_;
  const int64_t channel_stride_;  // row stride of the T × C tiles
  const int64_t block_rows_;
  const int64_t blocks_per_set_;
  int num_threads_ = 1;
  AlignedArray<Scalar> weight_panels_;  // [C_padded / kPanelWidth][d][kPanelWidth]
  AlignedArray<Scalar> weight_rows_;    // [C_padded][latent_stride]
  AlignedArray<Scalar> bias_;           // [C_padded]
  AlignedArray<Scalar> inv_sigma2_;     // [C_padded]
  int64_t scratch_stride_ = 0;
  AlignedArray<Scalar> scratch_;
};

// The entry point each instruction-set TU exports (see fv_accumulate_isa.h).
template <class Isa>
void run_fused_backward(const FVAccumulateBackwardArgs& args, int num_threads) {
  if (args.forward.dtype == DType::Float64) {
    FusedBackward<double, Isa>::run(args, num_threads);
  } else {
    FusedBackward<float, Isa>::run(args, num_threads);
  }
}

}  // namespace
}  // namespace fvk
