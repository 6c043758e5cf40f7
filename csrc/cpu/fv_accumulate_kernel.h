// The fused CPU kernel of csrc/fv_accumulate.h, written once and compiled once per instruction set
// (fv_accumulate_<isa>.cpp include this file under their own -m flags).
//
// One work item is (set n, block of channels). Its output block G (channels × d, plus the bias column)
// stays in cache while the set's descriptors are walked in row blocks — the flash-attention dK/dV
// pattern on the CPU. Per row block:
//   1. copy the block's z rows (zero-padded to whole column panels) and x̂ of the item's channels into
//      the residual tile R;
//   2. decoder GEMM P = Z·Wᵀ (depth d), whose epilogue turns P into the residual in place of x̂ and adds
//      R's column sums (G's bias column);
//   3. outer-product GEMM G += Rᵀ·Z (depth = rows of the block). On the last block its epilogue applies
//      fisher_rsqrt and the signed square root and stages the finished rows, which later microkernels
//      stream to out (OutputStream).
// Nothing of size T × C leaves the per-thread scratch. Both GEMMs run one register-blocked microkernel:
// Rows × 2 vectors of accumulators, A broadcast from memory in place, B loaded as vectors.
//
// Each output element is computed by exactly one work item with a summation order fixed by the row
// blocking alone, so results do not depend on the thread count or on the channel blocking.
#pragma once

#include "cpu_microkernel.h"

namespace fvk {
namespace {

// Descriptors per row block: R (rows × channels) and the packed z rows stay in L2, and the
// outer-product GEMM still gets a deep enough reduction to amortise its loads and stores of G.
constexpr int64_t kMaxBlockRows = 128;

template <typename Scalar, class Isa>
class FusedKernel : Microkernel<Scalar, Isa> {
 public:
  static void run(const FVAccumulateArgs& args, int num_threads) {
    if (args.num_sets == 0 || args.channels == 0) return;
    const FusedKernel kernel(args, num_threads);
    kernel.execute();
  }

 private:
  using Base = Microkernel<Scalar, Isa>;
  using typename Base::StreamSlice;
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

  // ---- decoder GEMM: P = Z·Wᵀ for one panel of kPanelWidth channels -------------------------------

  struct DecoderPanel {
    const Scalar* weight;      // [d][kPanelWidth]: the packed weight rows of the panel's channels
    const Scalar* bias;        // the panel's kPanelWidth channels (zero-padded past C)
    const Scalar* inv_sigma2;  // likewise; zero padding makes padded channels' residual exactly 0
    Scalar* column_sums;       // running Σ_t r[t, c]
    int64_t latent;
    int64_t z_stride;          // of the z rows
    int64_t residual_stride;
  };

  // Rows descriptors × one channel panel. `residual` holds x̂ on entry and r on exit.
  template <int Rows>
  static void decoder_tile(const DecoderPanel& panel, const Scalar* z_rows, Scalar* residual, const StreamSlice& slice) {
    Tile<Rows> pre;
    Base::template multiply<Rows>(pre, panel.latent, z_rows, panel.z_stride, 1, panel.weight, kPanelWidth, slice);
    unrolled<kVecsPerRow>([&](auto j) {
      const Vec bias = load(panel.bias + j * kLanes);
      const Vec inv_sigma2 = load(panel.inv_sigma2 + j * kLanes);
      Vec column_sum{};
      unrolled<Rows>([&](auto i) {
        Scalar* slot = residual + i * panel.residual_stride + j * kLanes;
        const Vec p = pre.v[i][j] + bias;
        const Vec r = p > Vec{} ? (p - load(slot)) * inv_sigma2 : Vec{};
        store(slot, r);
        column_sum += r;
      });
      Scalar* sums = panel.column_sums + j * kLanes;
      store(sums, load(sums) + column_sum);
    });
  }

  // ---- outer-product GEMM: G += Rᵀ·Z ---------------------------------------------------------------

  struct OuterPass {
    const Scalar* residual;  // R[t][c]
    int64_t residual_stride;
    const Scalar* z_rows;  // Z[t][k], zero-padded to whole column panels
    int64_t latent_stride; // row stride of z_rows, partial and fisher
    int64_t depth;      // rows of this block
    Scalar* partial;    // G of the earlier blocks, [c][latent_stride]
    bool has_partial;   // false on the first block: nothing to add
    bool last;          // the last block finishes into `staged` instead of updating partial
    // Used by the last block only.
    const Scalar* fisher;  // [c][latent_stride], zero-padded; null without fisher_rsqrt
    bool signed_sqrt;
    int64_t latent;
    Scalar* staged;        // the channel panel's finished rows, latent + 1 apart as in out
    Scalar* row_squares;   // [row of the panel][kLanes]: running Σ out² per lane; null without row_sumsq
  };

  template <int Rows>
  static void outer_tile(const OuterPass& pass, int64_t channel, int64_t column, const StreamSlice& slice) {
    const int64_t ld = pass.latent_stride;
    Tile<Rows> g;
    Base::template multiply<Rows>(g, pass.depth, pass.residual + channel, std::integral_constant<int64_t, 1>{}, pass.residual_stride,
                   pass.z_rows + column, ld, slice);
    Scalar* partial = pass.partial + channel * ld + column;
    if (pass.has_partial) {
      unrolled<Rows>([&](auto i) {
        unrolled<kVecsPerRow>([&](auto j) { g.v[i][j] += load(partial + i * ld + j * kLanes); });
      });
    }
    if (!pass.last) {
      unrolled<Rows>([&](auto i) {
        unrolled<kVecsPerRow>([&](auto j) { store(partial + i * ld + j * kLanes, g.v[i][j]); });
      });
      return;
    }
    if (pass.fisher != nullptr) {
      const Scalar* fisher = pass.fisher + channel * ld + column;
      unrolled<Rows>([&](auto i) {
        unrolled<kVecsPerRow>([&](auto j) { g.v[i][j] *= load(fisher + i * ld + j * kLanes); });
      });
    }
    if (pass.signed_sqrt) {
      unrolled<Rows>([&](auto i) { unrolled<kVecsPerRow>([&](auto j) { g.v[i][j] = signed_sqrt(g.v[i][j]); }); });
    }
    if (pass.row_squares != nullptr) {  // padded columns are exactly zero (zero z padding): they add nothing
      unrolled<Rows>([&](auto i) {
        Vec squares = load(pass.row_squares + i * kLanes);
        unrolled<kVecsPerRow>([&](auto j) { squares += g.v[i][j] * g.v[i][j]; });
        store(pass.row_squares + i * kLanes, squares);
      });
    }
    const int64_t row_stride = pass.latent + 1;
    Scalar* staged = pass.staged + column;
    if (column + kPanelWidth <= pass.latent) {
      unrolled<Rows>([&](auto i) {
        unrolled<kVecsPerRow>([&](auto j) { store(staged + i * row_stride + j * kLanes, g.v[i][j]); });
      });
    } else {  // the last column panel is partial: its padding must not spill into the next row
      const int64_t width = pass.latent - column;
      unrolled<Rows>([&](auto i) {
        Scalar row[kPanelWidth];
        unrolled<kVecsPerRow>([&](auto j) { store(row + j * kLanes, g.v[i][j]); });
        std::copy_n(row, width, staged + i * row_stride);
      });
    }
  }

  static FVK_ALWAYS_INLINE Vec signed_sqrt(Vec v) {
    const Vec magnitude = v < Vec{} ? -v : v;
    Vec root;
    for (int l = 0; l < kLanes; ++l) root[l] = std::sqrt(magnitude[l]);  // vectorised into one vsqrt
    return v < Vec{} ? -root : root;
  }

  static Scalar signed_sqrt(Scalar v) { return std::copysign(std::sqrt(std::fabs(v)), v); }

  // Copies each finished channel panel from a staging buffer to out with non-temporal stores, handed
  // out in slices to the microkernels that follow. out is written once and is far larger than the
  // caches, so reading its lines in first (and evicting the packed weights and G for them) would only
  // cost. Each pending store holds a line fill buffer until memory takes it, and the microkernels need
  // those buffers for their own L2 loads: stores spread evenly over the next panel's compute leave them
  // free, where a burst per panel stalls the core. Two staging buffers alternate: one is filled while
  // the other streams out.
  class OutputStream {
   public:
    OutputStream(Scalar* buffers, int64_t buffer_size) : buffers_(buffers), buffer_size_(buffer_size) {}
    ~OutputStream() { finish(); }

    Scalar* free_buffer() const { return source_ == buffers_ ? buffers_ + buffer_size_ : buffers_; }

    // Starts copying source[0, count) (a free buffer) to destination; finishes the previous copy first.
    void start(Scalar* destination, const Scalar* source, int64_t count) {
      finish();
      destination_ = destination;
      source_ = source;
      count_ = count;
      const auto address = reinterpret_cast<std::uintptr_t>(destination);
      int64_t head = count;  // a pointer not even element-aligned gets plain stores throughout
      if (address % sizeof(Scalar) == 0) {
        const auto misalignment = static_cast<int64_t>(address % Isa::vector_bytes);
        head = std::min<int64_t>(count, misalignment == 0 ? 0 : (Isa::vector_bytes - misalignment) / sizeof(Scalar));
      }
      std::copy_n(source, head, destination);
      done_ = head;
    }

    int64_t pending_vectors() const { return (count_ - done_) / kLanes; }

    // The next (at most) `vectors` whole vectors, for a microkernel of `depth` iterations to store.
    StreamSlice take(int64_t vectors, int64_t depth) {
      StreamSlice slice{source_ + done_, destination_ + done_, std::min({vectors, depth, pending_vectors()})};
      done_ += slice.vectors * kLanes;
      return slice;
    }

    void finish() {
      const StreamSlice rest = take(count_, count_);
      for (int64_t v = 0; v < rest.vectors; ++v)
        Isa::stream(rest.destination + v * kLanes, load(rest.source + v * kLanes));
      std::copy_n(source_ + done_, count_ - done_, destination_ + done_);
      done_ = count_;
    }

   private:
    Scalar* const buffers_;
    const int64_t buffer_size_;
    Scalar* destination_ = nullptr;
    const Scalar* source_ = nullptr;
    int64_t count_ = 0;
    int64_t done_ = 0;
  };

  // Tables of Rows-specialised tiles, indexed by Rows − 1: row panels come in every size up to kMaxRows.
  template <int... I>
  static constexpr auto decoder_tiles(std::integer_sequence<int, I...>) {
    return std::array<void (*)(const DecoderPanel&, const Scalar*, Scalar*, const StreamSlice&), sizeof...(I)>{
        &decoder_tile<I + 1>...};
  }
  template <int... I>
  static constexpr auto outer_tiles(std::integer_sequence<int, I...>) {
    return std::array<void (*)(const OuterPass&, int64_t, int64_t, const StreamSlice&), sizeof...(I)>{
        &outer_tile<I + 1>...};
  }

  // ---- the call -------------------------------------------------------------------------------------

  struct Scratch {  // one thread's tiles
    Scalar* z_rows;        // [row][latent_stride]
    Scalar* residual;      // [row][residual stride]
    Scalar* partial;       // [channel][latent_stride]
    Scalar* column_sums;   // [channel_block]
    Scalar* staged;        // 2 × [kMaxRows][latent + 1], see OutputStream
    Scalar* row_squares;   // [kMaxRows][kLanes]
  };

  FusedKernel(const FVAccumulateArgs& args, int num_threads)
      : args_(args),
        latent_(args.latent),
        latent_padded_(round_up(args.latent, kPanelWidth)),
        latent_stride_(conflict_free_stride(latent_padded_)),
        channels_padded_(round_up(args.channels, kPanelWidth)),
        block_rows_(std::min(kMaxBlockRows, std::max<int64_t>(args.set_size, 1))) {
    num_threads_ = num_threads > 0 ? num_threads : omp_get_max_threads();
    const ChannelBlocks split = channel_blocks(channels_padded_, kPanelWidth, latent_padded_, int64_t(sizeof(Scalar)),
                                               args.num_sets, num_threads_);
    channel_block_ = split.block;
    blocks_per_set_ = split.per_set;
    weight_ = aligned_array<Scalar>(channels_padded_ * latent_);
    if (args.fisher_rsqrt != nullptr) {
      fisher_ = aligned_array<Scalar>(args.channels * latent_stride_);
      fisher_bias_ = aligned_array<Scalar>(args.channels);
    }
    // Zero padding to whole panels makes the padded channels' residual exactly 0 (see DecoderPanel).
    bias_ = aligned_array<Scalar>(channels_padded_);
    inv_sigma2_ = aligned_array<Scalar>(channels_padded_);
    std::fill_n(bias_.get(), channels_padded_, Scalar(0));
    std::fill_n(inv_sigma2_.get(), channels_padded_, Scalar(0));
    std::copy_n(static_cast<const Scalar*>(args.dec_bias), args.channels, bias_.get());
    std::copy_n(static_cast<const Scalar*>(args.inv_sigma2), args.channels, inv_sigma2_.get());
    scratch_stride_ = 0;
    for (int64_t size : scratch_sizes()) scratch_stride_ += round_up(size, kPanelWidth);
    scratch_ = aligned_array<Scalar>(scratch_stride_ * num_threads_);
  }

  std::array<int64_t, 6> scratch_sizes() const {
    return {block_rows_ * latent_stride_,
            block_rows_ * conflict_free_stride(channel_block_),
            channel_block_ * latent_stride_,
            channel_block_,
            2 * staging_size(),
            kMaxRows * kLanes};
  }

  int64_t staging_size() const { return round_up(kMaxRows * (latent_ + 1), kPanelWidth); }

  Scratch thread_scratch(int thread) const {
    Scalar* parts[6];
    Scalar* p = scratch_.get() + thread * scratch_stride_;
    const auto sizes = scratch_sizes();
    for (int i = 0; i < 6; ++i) {
      parts[i] = p;
      p += round_up(sizes[i], kPanelWidth);
    }
    return Scratch{parts[0], parts[1], parts[2], parts[3], parts[4], parts[5]};
  }

  void execute() const {
    const int64_t panels = channels_padded_ / kPanelWidth;
    const int64_t items = args_.num_sets * blocks_per_set_;
#pragma omp parallel num_threads(num_threads_)
    {
#pragma omp for schedule(static) nowait
      for (int64_t panel = 0; panel < panels; ++panel) Base::pack_weight_panel(args_, panel, weight_.get());
      const int64_t fisher_rows = fisher_ == nullptr ? 0 : args_.channels;
#pragma omp for schedule(static)  // its closing barrier also waits for the weights
      for (int64_t c = 0; c < fisher_rows; ++c) pack_fisher_row(c);
      const Scratch scratch = thread_scratch(omp_get_thread_num());
      {
        OutputStream stream(scratch.staged, staging_size());
#pragma omp for schedule(dynamic, 1) nowait
        for (int64_t item = 0; item < items; ++item)
          run_item(item / blocks_per_set_, item % blocks_per_set_, scratch, stream);
      }
      Isa::fence();  // orders the non-temporal stores before the caller reads out
    }
  }

  // fisher_[c] = fisher_rsqrt[c, :d], zero-padded; fisher_bias_[c] = fisher_rsqrt[c, d].
  void pack_fisher_row(int64_t c) const {
    const Scalar* fisher = static_cast<const Scalar*>(args_.fisher_rsqrt) + c * (latent_ + 1);
    Scalar* row = fisher_.get() + c * latent_stride_;
    std::copy_n(fisher, latent_, row);
    std::fill(row + latent_, row + latent_padded_, Scalar(0));
    fisher_bias_[c] = fisher[latent_];
  }

  void run_item(int64_t n, int64_t block, const Scratch& scratch, OutputStream& stream) const {
    const int64_t first_channel = block * channel_block_;
    const int64_t channels = std::min(channel_block_, args_.channels - first_channel);
    const int64_t channels_padded = round_up(channels, kPanelWidth);
    const int64_t residual_stride = conflict_free_stride(channels_padded);
    Scalar* out = static_cast<Scalar*>(args_.out) + n * args_.out_stride_n + first_channel * (latent_ + 1);
    float* row_sumsq = args_.row_sumsq == nullptr ? nullptr : args_.row_sumsq + n * args_.channels + first_channel;
    const int64_t length = args_.lengths == nullptr ? args_.set_size : args_.lengths[n];
    if (length == 0) {
      std::fill_n(out, channels * (latent_ + 1), Scalar(0));
      if (row_sumsq != nullptr) std::fill_n(row_sumsq, channels, 0.0f);
      return;
    }
    std::fill_n(scratch.column_sums, channels_padded, Scalar(0));

    OuterPass pass;
    pass.residual = scratch.residual;
    pass.residual_stride = residual_stride;
    pass.z_rows = scratch.z_rows;
    pass.latent_stride = latent_stride_;
    pass.partial = scratch.partial;
    pass.fisher = fisher_ == nullptr ? nullptr : fisher_.get() + first_channel * latent_stride_;
    pass.signed_sqrt = args_.signed_sqrt;
    pass.latent = latent_;
    pass.row_squares = row_sumsq == nullptr ? nullptr : scratch.row_squares;

    const BalancedSplit row_blocks(length, kMaxBlockRows);
    for (int64_t b = 0; b < row_blocks.parts; ++b) {
      const int64_t first_row = row_blocks.begin(b), rows = row_blocks.size(b);
      const BalancedSplit row_panels(rows, kMaxRows);
      Base::pack_z(args_, n, first_row, rows, latent_padded_, latent_stride_, scratch.z_rows);
      Base::copy_x(args_, true, n, first_row, rows, first_channel, channels, channels_padded, residual_stride,
                   scratch.residual);
      decoder_gemm(first_channel, channels_padded, residual_stride, row_panels, scratch, stream);
      pass.depth = rows;
      pass.has_partial = b > 0;
      pass.last = b + 1 == row_blocks.parts;
      outer_gemm(pass, first_channel, channels, scratch.column_sums, out, row_sumsq, stream);
    }
  }

  void decoder_gemm(int64_t first_channel, int64_t channels_padded, int64_t residual_stride,
                    const BalancedSplit& row_panels, const Scratch& scratch, OutputStream& stream) const {
    static constexpr auto tiles = decoder_tiles(std::make_integer_sequence<int, kMaxRows>{});
    // Drains what the previous item left pending over this GEMM's tiles.
    const int64_t per_tile = ceil_div(stream.pending_vectors(), channels_padded / kPanelWidth * row_panels.parts);
    DecoderPanel panel;
    panel.latent = latent_;
    panel.z_stride = latent_stride_;
    panel.residual_stride = residual_stride;
    for (int64_t c = 0; c < channels_padded; c += kPanelWidth) {
      panel.weight = weight_.get() + (first_channel + c) * latent_;
      panel.bias = bias_.get() + first_channel + c;
      panel.inv_sigma2 = inv_sigma2_.get() + first_channel + c;
      panel.column_sums = scratch.column_sums + c;
      for (int64_t p = 0; p < row_panels.parts; ++p) {
        const int64_t begin = row_panels.begin(p);
        tiles[row_panels.size(p) - 1](panel, scratch.z_rows + begin * latent_stride_,
                                      scratch.residual + begin * residual_stride + c, stream.take(per_tile, latent_));
      }
    }
  }

  // On the last row block each channel panel is finished in a staging buffer (its bias column and row
  // sums of squares included) and then streamed to out, where its rows are contiguous.
  void outer_gemm(OuterPass& pass, int64_t first_channel, int64_t channels, const Scalar* column_sums, Scalar* out,
                  float* row_sumsq, OutputStream& stream) const {
    static constexpr auto tiles = outer_tiles(std::make_integer_sequence<int, kMaxRows>{});
    const BalancedSplit channel_panels(channels, kMaxRows);
    const int64_t row_stride = latent_ + 1;
    for (int64_t p = 0; p < channel_panels.parts; ++p) {
      const int64_t channel = channel_panels.begin(p), rows = channel_panels.size(p);
      const auto tile = tiles[rows - 1];
      if (pass.last) {
        pass.staged = stream.free_buffer();
        if (pass.row_squares != nullptr) std::fill_n(pass.row_squares, rows * kLanes, Scalar(0));
      }
      const int64_t per_tile = ceil_div(stream.pending_vectors(), std::max<int64_t>(latent_padded_ / kPanelWidth, 1));
      for (int64_t column = 0; column < latent_padded_; column += kPanelWidth)
        tile(pass, channel, column, stream.take(per_tile, pass.depth));
      if (!pass.last) continue;
      for (int64_t i = 0; i < rows; ++i) {
        Scalar bias_term = column_sums[channel + i];
        if (pass.fisher != nullptr) bias_term *= fisher_bias_[first_channel + channel + i];
        if (pass.signed_sqrt) bias_term = signed_sqrt(bias_term);
        pass.staged[i * row_stride + latent_] = bias_term;
        if (row_sumsq != nullptr) {
          Scalar squares = bias_term * bias_term;
          for (int l = 0; l < kLanes; ++l) squares += pass.row_squares[i * kLanes + l];
          row_sumsq[channel + i] = static_cast<float>(squares);
        }
      }
      stream.start(out + channel * row_stride, pass.staged, rows * row_stride);
    }
  }

  const FVAccumulateArgs& args_;
  const int64_t latent_;
  const int64_t latent_padded_;  // d rounded up to whole column panels
  const int64_t latent_stride_;  // row stride of z_rows, partial G and fisher_
  const int64_t channels_padded_;
  const int64_t block_rows_;  // rows of the largest row block
  int num_threads_ = 1;
  int64_t channel_block_ = 0;  // channels per work item, a multiple of kPanelWidth
  int64_t blocks_per_set_ = 0;
  AlignedArray<Scalar> weight_;       // [C_padded / kPanelWidth][d][kPanelWidth]
  AlignedArray<Scalar> fisher_;       // [C][latent_stride]; null without fisher_rsqrt
  AlignedArray<Scalar> fisher_bias_;  // [C]; likewise
  AlignedArray<Scalar> bias_;         // [C_padded]
  AlignedArray<Scalar> inv_sigma2_;   // [C_padded]
  int64_t scratch_stride_ = 0;
  AlignedArray<Scalar> scratch_;
};

// The entry point each instruction-set TU exports (see fv_accumulate_isa.h).
template <class Isa>
void run_fused_kernel(const FVAccumulateArgs& args, int num_threads) {
  if (args.dtype == DType::Float64) {
    FusedKernel<double, Isa>::run(args, num_threads);
  } else {
    FusedKernel<float, Isa>::run(args, num_threads);
  }
}

}  // namespace
}  // namespace fvk
