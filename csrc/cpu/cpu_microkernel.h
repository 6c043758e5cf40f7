// What the CPU kernels share (csrc/cpu/fv_accumulate_kernel.h, the forward, and
// fv_accumulate_backward_kernel.h): the register-blocked GEMM microkernel, the packing of a set's rows
// into cache-friendly tiles, and small helpers. Included by each instruction-set TU under its own -m flags.
#pragma once

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <new>
#include <type_traits>
#include <utility>
#include <vector>

#include "../fv_accumulate.h"

#define FVK_ALWAYS_INLINE inline __attribute__((always_inline))

namespace fvk {
// Each instruction-set TU gets its own private copy of everything below. With external linkage the
// linker would keep one instantiation of, say, an inline helper for all TUs, and could hand the
// portable path an AVX-512 body.
namespace {

constexpr std::size_t kAlignment = 64;

template <typename Scalar, int Bytes>
struct VectorOf {
  typedef Scalar type __attribute__((vector_size(Bytes)));
};

template <class F, int... I>
FVK_ALWAYS_INLINE void unrolled_impl(F& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}

// f(0), …, f(N − 1) with compile-time indices, so arrays of accumulators are never indexed at run time
// (which would force them out of registers onto the stack).
template <int N, class F>
FVK_ALWAYS_INLINE void unrolled(F&& f) {
  unrolled_impl(f, std::make_integer_sequence<int, N>{});
}

constexpr int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
constexpr int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }

// `count` items cut into ceil(count / max_size) ranges whose sizes differ by at most one: a set of
// 50 descriptors becomes 5 panels of 10 rows rather than 4 × 12 + 2.
struct BalancedSplit {
  int64_t count;
  int64_t parts;
  BalancedSplit(int64_t count_, int64_t max_size) : count(count_), parts(ceil_div(count_, max_size)) {}
  int64_t begin(int64_t part) const { return count * part / parts; }
  int64_t size(int64_t part) const { return begin(part + 1) - begin(part); }
};

// Upper bound on the bytes of one forward work item's G block, so that it stays in L2 next to the packed
// weights.
constexpr int64_t kOutputBlockBytes = 512 * 1024;
constexpr int64_t kItemsPerThread = 16;

// How the forward kernels split a set's channels into work items: blocks of whole panels as large as the G
// budget allows (G rows of latent_padded values of element_bytes each), and small enough for kItemsPerThread work items per
// thread, so that a thread slowed down by other load leaves little tail to wait for. Splitting costs little
// (each block copies the set's z rows again) and only changes the work split, never an element's summation
// order.
struct ChannelBlocks {
  int64_t block;    // channels per work item, a multiple of the panel width
  int64_t per_set;  // work items per set
};

inline ChannelBlocks channel_blocks(int64_t channels_padded, int64_t panel_width, int64_t latent_padded,
                                    int64_t element_bytes, int64_t num_sets, int num_threads) {
  const int64_t panels = channels_padded / panel_width;
  const int64_t budget_panels = std::max<int64_t>(
      1, kOutputBlockBytes / (panel_width * std::max<int64_t>(latent_padded, 1) * element_bytes));
  int64_t blocks = ceil_div(panels, budget_panels);
  while (blocks < panels && num_sets * blocks < kItemsPerThread * num_threads) ++blocks;
  const int64_t block = ceil_div(panels, blocks) * panel_width;
  return {block, ceil_div(channels_padded, block)};
}

struct AlignedDelete {
  void operator()(void* pointer) const { ::operator delete(pointer, std::align_val_t(kAlignment)); }
};

template <typename T>
using AlignedArray = std::unique_ptr<T[], AlignedDelete>;

template <typename T>
AlignedArray<T> aligned_array(int64_t count) {
  const std::size_t bytes = static_cast<std::size_t>(std::max<int64_t>(count, 1)) * sizeof(T);
  return AlignedArray<T>(static_cast<T*>(::operator new(bytes, std::align_val_t(kAlignment))));
}

// The backward kernels' zero gradients (Element: the gradients' storage type; 0 is all-zero bits in each). With
// no sets or no channels every gradient asked for is zero:
template <typename Element>
void zero_all_gradients(const FVAccumulateBackwardArgs& args) {
  const FVAccumulateArgs& f = args.forward;
  const std::pair<void*, int64_t> gradients[] = {
      {args.grad_z, f.num_sets * f.set_size * f.latent}, {args.grad_x_scale, f.num_sets * f.set_size},
      {args.grad_weight, f.channels * f.latent}, {args.grad_bias, f.channels}, {args.grad_inv_sigma2, f.channels}};
  for (const auto& [pointer, count] : gradients)
    if (pointer != nullptr) std::fill_n(static_cast<Element*>(pointer), count, Element(0));
}

// and the per-descriptor gradients of set n's rows [begin, end), those past its length.
template <typename Element>
void zero_gradient_rows(const FVAccumulateBackwardArgs& args, int64_t n, int64_t begin, int64_t end) {
  if (begin >= end) return;
  const FVAccumulateArgs& f = args.forward;
  const int64_t rows = end - begin, first = n * f.set_size + begin;
  if (args.grad_z != nullptr) std::fill_n(static_cast<Element*>(args.grad_z) + first * f.latent, rows * f.latent,
                                          Element(0));
  if (args.grad_x != nullptr) std::fill_n(static_cast<Element*>(args.grad_x) + first * f.channels,
                                          rows * f.channels, Element(0));
  if (args.grad_x_scale != nullptr) std::fill_n(static_cast<Element*>(args.grad_x_scale) + first, rows, Element(0));
}

// Isa: vector_bytes (register width); max_rows (accumulator rows of the microkernel, bounded by the
// register file: max_rows × 2 accumulators + 2 B vectors must fit); stream(Scalar*, vector), a
// non-temporal store to a vector-aligned address; fence(), ordering those stores.

template <typename Scalar, class Isa>
struct Microkernel {
  using Vec = typename VectorOf<Scalar, Isa::vector_bytes>::type;
  static constexpr int kLanes = Isa::vector_bytes / static_cast<int>(sizeof(Scalar));
  static constexpr int kVecsPerRow = 2;
  static constexpr int kPanelWidth = kLanes * kVecsPerRow;  // columns of one microkernel tile
  static constexpr int kMaxRows = Isa::max_rows;

  template <int Rows>
  struct Tile {
    Vec v[Rows][kVecsPerRow];
  };

  static FVK_ALWAYS_INLINE Vec load(const Scalar* p) {
    Vec v;
    std::memcpy(&v, p, sizeof v);
    return v;
  }
  static FVK_ALWAYS_INLINE void store(Scalar* p, Vec v) { std::memcpy(p, &v, sizeof v); }

  // Finished output vectors for a microkernel to copy to out on its way (see OutputStream).
  struct StreamSlice {
    const Scalar* source = nullptr;
    Scalar* destination = nullptr;
    int64_t vectors = 0;
  };

  // acc[i][·] (+)= Σ_k a[i·a_row + k·a_step] · b[k·ldb + ·]: the one microkernel of every GEMM. A is read
  // in place and broadcast: z rows (a_step = 1) or R's columns (a_row = 1, a compile-time constant so
  // that its rows become plain displacements). Meanwhile it streams `slice` to out, its stores spaced
  // evenly over the iterations.
  // With Accumulate the tile's contents are added to instead of replaced.
  template <int Rows, typename RowStride, bool Accumulate = false>
  static FVK_ALWAYS_INLINE void multiply(Tile<Rows>& acc, int64_t depth, const Scalar* a, RowStride a_row,
                                         int64_t a_step, const Scalar* b, int64_t ldb,
                                         const StreamSlice& slice = StreamSlice{}) {
    const Scalar* stream_source = slice.source;
    Scalar* stream_destination = slice.destination;
    const int64_t stream_vectors = slice.vectors;
    const int64_t stream_interval = stream_vectors > 0 ? depth / stream_vectors : 0;
    int64_t countdown = stream_interval, streamed = 0;
    if constexpr (!Accumulate)
      unrolled<Rows>([&](auto i) { unrolled<kVecsPerRow>([&](auto j) { acc.v[i][j] = Vec{}; }); });
    for (int64_t k = 0; k < depth; ++k, a += a_step, b += ldb) {
      Vec b_row[kVecsPerRow];
      unrolled<kVecsPerRow>([&](auto j) { b_row[j] = load(b + j * kLanes); });
      unrolled<Rows>([&](auto i) {
        const Scalar a_ki = a[i * a_row];
        unrolled<kVecsPerRow>([&](auto j) { acc.v[i][j] += b_row[j] * a_ki; });
      });
      if (--countdown == 0 && streamed < stream_vectors) {
        Isa::stream(stream_destination + streamed * kLanes, load(stream_source + streamed * kLanes));
        ++streamed;
        countdown = stream_interval;
      }
    }
  }

  // A row stride of at least `columns`, whole vectors, and not a multiple of 512 bytes: the rows of a
  // panel walked down a column then fall into different L1 sets instead of evicting each other.
  static int64_t conflict_free_stride(int64_t columns) {
    const int64_t stride = round_up(columns, kLanes);
    return stride * int64_t(sizeof(Scalar)) % 512 == 0 ? stride + kLanes : stride;
  }

  // z rows [first_row, first_row + rows) of set n into rows `row_stride` apart, zero-padded to `padded`
  // columns (whole column panels, so that the padding adds exactly nothing to a GEMM).
  static void pack_z(const FVAccumulateArgs& args, int64_t n, int64_t first_row, int64_t rows, int64_t padded,
                     int64_t row_stride, Scalar* z_rows) {
    const Scalar* z = static_cast<const Scalar*>(args.z) + n * args.z_stride[0] + first_row * args.z_stride[1];
    const int64_t k_stride = args.z_stride[2];
    for (int64_t t = 0; t < rows; ++t) {
      const Scalar* source = z + t * args.z_stride[1];
      Scalar* row = z_rows + t * row_stride;
      if (k_stride == 1) {
        std::copy_n(source, args.latent, row);
      } else {
        for (int64_t k = 0; k < args.latent; ++k) row[k] = source[k * k_stride];
      }
      std::fill(row + args.latent, row + padded, Scalar(0));
    }
  }

  // tile[t][c] = x[n, first_row + t, first_channel + c] (times x_scale[n, first_row + t] when `scaled`, i.e.
  // x̂), zero in the padding channels up to channels_padded.
  static void copy_x(const FVAccumulateArgs& args, bool scaled, int64_t n, int64_t first_row, int64_t rows,
                     int64_t first_channel, int64_t channels, int64_t channels_padded, int64_t tile_stride,
                     Scalar* tile) {
    const Scalar* x = static_cast<const Scalar*>(args.x) + n * args.x_stride[0] + first_row * args.x_stride[1] +
                      first_channel * args.x_stride[2];
    const Scalar* x_scale = scaled ? static_cast<const Scalar*>(args.x_scale) : nullptr;
    const int64_t t_stride = args.x_stride[1], c_stride = args.x_stride[2];
    auto scale = [&](int64_t t) {
      return x_scale == nullptr ? Scalar(1)
                                : x_scale[n * args.x_scale_stride[0] + (first_row + t) * args.x_scale_stride[1]];
    };
    if (c_stride <= t_stride) {  // descriptors stored as rows (N, T, C): walk channels innermost
      for (int64_t t = 0; t < rows; ++t) {
        const Scalar s = scale(t);
        const Scalar* source = x + t * t_stride;
        Scalar* row = tile + t * tile_stride;
        if (c_stride == 1) {
          for (int64_t c = 0; c < channels; ++c) row[c] = source[c] * s;
        } else {
          for (int64_t c = 0; c < channels; ++c) row[c] = source[c * c_stride] * s;
        }
      }
    } else {  // channel-major maps (the (N, T, C) view of NCHW): walk descriptors innermost
      for (int64_t c = 0; c < channels; ++c) {
        const Scalar* source = x + c * c_stride;
        for (int64_t t = 0; t < rows; ++t) tile[t * tile_stride + c] = source[t * t_stride] * scale(t);
      }
    }
    for (int64_t t = 0; t < rows; ++t)
      std::fill(tile + t * tile_stride + channels, tile + t * tile_stride + channels_padded, Scalar(0));
  }

  // packed[panel][k][j] = W[panel · kPanelWidth + j, k], zero past C: B panels of P = Z·Wᵀ.
  static void pack_weight_panel(const FVAccumulateArgs& args, int64_t panel, Scalar* packed) {
    const Scalar* w = static_cast<const Scalar*>(args.dec_weight);
    packed += panel * args.latent * kPanelWidth;
    for (int j = 0; j < kPanelWidth; ++j) {
      const int64_t c = panel * kPanelWidth + j;
      for (int64_t k = 0; k < args.latent; ++k)
        packed[k * kPanelWidth + j] = c < args.channels ? w[c * args.w_stride[0] + k * args.w_stride[1]] : Scalar(0);
    }
  }
};

}  // namespace
}  // namespace fvk
