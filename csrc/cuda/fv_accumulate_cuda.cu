// Fused FV-VAE accumulation on the GPU; the contract is csrc/fv_accumulate.h.
//
// The flash-attention backward (dK/dV) pattern: a thread block owns the output block
// G[c0 : c0+64, k0 : k0+kLatentTile] of one set and keeps it in registers while it walks the set's
// descriptors 32 at a time. Per tile it recomputes the decoder pre-activation P = Z·Wᵀ + b for its
// channels, turns P into the masked residual R in shared memory and accumulates G += Rᵀ·Z (the bias
// column, G[:, d] = Σ_t R, is summed on the side). Everything is fp32 FFMA, whatever the input dtype.
//
// Long sets that give too few blocks to fill the GPU are split over several blocks along T; each
// split stores its partial G in an fp32 workspace and a second kernel sums the splits in a fixed
// order, so results are bit-identical from run to run (no float atomics).
#include "fv_accumulate_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>

namespace fvk {
namespace {

// ---- tiling --------------------------------------------------------------------------------------

constexpr int kThreads = 256;
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kBlockChannels = 64;    // rows of G per block
constexpr int kTileDescriptors = 32;  // descriptors per step of the walk over a set
constexpr int kMaxLatentTile = 256;   // columns of G per block: 64 accumulators per thread
// Rows of every shared tile are padded by 4 floats: rows stay 16-byte aligned for float4 access, and a
// row stride ≡ 4 (mod 32) puts element (row, col) in bank (4·row + col) mod 32. That makes the decoder's
// reads of 4 different rows and the transposing stores of stage_tile (8 rows × 4 columns) conflict-free.
constexpr int kRowPad = 4;
// A split costs one staging of the weight block and one store of a (64 × (d+1)) partial, about a tile of
// work each; at least four tiles per split keep that overhead small.
constexpr int kMinTilesPerSplit = 4;

// Decoder step (P for a 32 × 64 tile): each thread owns 2 descriptors × 4 consecutive channels. Warp w
// covers rows 8·(w % 4) … +7 and channels 32·(w / 4) … +31; lane l the rows 8·(w % 4) + l / 8 + {0, 4}
// and the channels 32·(w / 4) + 4·(l % 8) + {0, 1, 2, 3}.
constexpr int kDecoderRows = 2;
constexpr int kDecoderRowStride = 4;
constexpr int kDecoderChannels = 4;
// Threads whose decoder rows hold the same channel: each keeps a partial Σ_t R for the bias column.
constexpr int kBiasPartials = kTileDescriptors / kDecoderRows;

// Accumulation step (G += Rᵀ·Z): warp w owns channels 8·w … +7, lane l the columns l + 32·j.
constexpr int kChannelsPerWarp = kBlockChannels / kWarps;

static_assert(kThreads == 256 && kTileDescriptors == 32 && kBlockChannels == 64,
              "the decoder and accumulator thread maps below are written for this shape");
static_assert(kDecoderRows * kDecoderChannels * kThreads == kTileDescriptors * kBlockChannels,
              "the decoder map covers the P tile exactly once");

template <int kLatentTile>
struct SharedLayout {
  static_assert(kLatentTile % kWarpSize == 0 && kLatentTile <= kMaxLatentTile, "latent tile: 32·j, j <= 8");
  static constexpr int kWeightStride = kBlockChannels + kRowPad;    // weights[k][c] = W[c0 + c, k0 + k]
  static constexpr int kLatentStride = kLatentTile + kRowPad;       // latents[t][k] = z[n, t0 + t, k0 + k]
  static constexpr int kResidualStride = kBlockChannels + kRowPad;  // residuals[t][c]: x, then R
  static constexpr int kWeightFloats = kLatentTile * kWeightStride;
  static constexpr int kLatentFloats = kTileDescriptors * kLatentStride;
  static constexpr int kResidualFloats = kTileDescriptors * kResidualStride;
  static constexpr std::size_t kBytes = sizeof(float) * (kWeightFloats + kLatentFloats + kResidualFloats);
  static_assert(kWeightStride % 32 == kRowPad && kLatentStride % 32 == kRowPad && kResidualStride % 32 == kRowPad,
                "row strides ≡ 4 (mod 32), see kRowPad");
  // The epilogue reuses the residual tile for the bias partials and their sums.
  static_assert((kBiasPartials + 1) * kBlockChannels <= kResidualFloats, "bias scratch fits the residual tile");
};

template <typename I>
__host__ __device__ constexpr I ceil_div(I a, I b) {
  return (a + b - 1) / b;
}

template <typename I>
__host__ __device__ constexpr I min_of(I a, I b) {
  return a < b ? a : b;
}

template <typename I>
__host__ __device__ constexpr I clamp_to(I value, I low, I high) {
  return value < low ? low : (value > high ? high : value);
}

// ---- element types -------------------------------------------------------------------------------

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

template <typename T>
__device__ __forceinline__ float load_input(const T* address) {
  return to_float(__ldg(address));
}

__device__ __forceinline__ void load4(const float* shared, float (&values)[4]) {
  const float4 v = *reinterpret_cast<const float4*>(shared);
  values[0] = v.x;
  values[1] = v.y;
  values[2] = v.z;
  values[3] = v.w;
}

__device__ __forceinline__ void store4(float* shared, const float (&values)[4]) {
  *reinterpret_cast<float4*>(shared) = make_float4(values[0], values[1], values[2], values[3]);
}

__device__ __forceinline__ float warp_sum(float value) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

// ---- kernel parameters ---------------------------------------------------------------------------

// The forward's inputs, as the forward and the backward kernels read them.
template <typename T>
struct InputParams {
  int num_sets, set_size, channels, latent;
  const T* z;
  int64_t z_stride[3];
  const T* x;
  int64_t x_stride[3];
  const T* x_scale;  // or null
  int64_t x_scale_stride[2];
  const T* weight;
  int64_t weight_stride[2];
  const T* bias;
  const T* inv_sigma2;
  const T* fisher_rsqrt;   // or null
  const int64_t* lengths;  // or null
};

template <typename T>
InputParams<T> input_params(const FVAccumulateArgs& args) {
  InputParams<T> p{};
  p.num_sets = static_cast<int>(args.num_sets);
  p.set_size = static_cast<int>(args.set_size);
  p.channels = static_cast<int>(args.channels);
  p.latent = static_cast<int>(args.latent);
  p.z = static_cast<const T*>(args.z);
  p.x = static_cast<const T*>(args.x);
  p.x_scale = static_cast<const T*>(args.x_scale);
  p.weight = static_cast<const T*>(args.dec_weight);
  for (int i = 0; i < 3; ++i) {
    p.z_stride[i] = args.z_stride[i];
    p.x_stride[i] = args.x_stride[i];
  }
  for (int i = 0; i < 2; ++i) {
    p.x_scale_stride[i] = args.x_scale_stride[i];
    p.weight_stride[i] = args.w_stride[i];
  }
  p.bias = static_cast<const T*>(args.dec_bias);
  p.inv_sigma2 = static_cast<const T*>(args.inv_sigma2);
  p.fisher_rsqrt = static_cast<const T*>(args.fisher_rsqrt);
  p.lengths = args.lengths;
  return p;
}

template <typename T>
struct KernelParams : InputParams<T> {
  T* out;
  int64_t out_stride_n;
  bool signed_sqrt;
  // Grid: blockIdx.x = ((set · splits + split) · latent_tiles + latent_tile) · channel_blocks + channel_block.
  int channel_blocks, latent_tiles, splits;
  // splits > 1: raw G, (N, splits, C, d+1) fp32, finished by finish_splits_kernel. Otherwise null.
  float* split_partials;
  // splits == 1: Σ_k out² of this block's columns at [(n · latent_tiles + latent_tile) · C + c]: the
  // caller's row_sumsq when latent_tiles == 1, else a workspace summed by sum_latent_tiles_kernel. Or null.
  float* row_sumsq;
};

// Number of valid descriptors of a set (lengths are promised to lie in [0, T]; clamping keeps a broken
// promise from reading out of bounds).
template <typename T>
__device__ __forceinline__ int set_length(const InputParams<T>& p, int set) {
  return p.lengths == nullptr ? p.set_size : static_cast<int>(clamp_to<int64_t>(p.lengths[set], 0, p.set_size));
}

// out[n, c, k] = signed_sqrt?(g · fisher_rsqrt[c, k]); returns the stored value squared.
template <typename T>
__device__ __forceinline__ float store_output(const KernelParams<T>& p, T* out_row, int64_t channel, int k, float g) {
  float v = g;
  if (p.fisher_rsqrt != nullptr) v *= load_input(p.fisher_rsqrt + channel * (p.latent + 1) + k);
  if (p.signed_sqrt) v = copysignf(sqrtf(fabsf(v)), v);
  const T stored = from_float<T>(v);
  out_row[k] = stored;
  const float written = to_float(stored);
  return written * written;
}

// ---- staging -------------------------------------------------------------------------------------

// A window of a strided global matrix: element (row, col) at base[row·row_stride + col·col_stride],
// valid for row < rows and col < cols (the rest stages as zero).
template <typename T>
struct GlobalWindow {
  const T* base;
  int64_t row_stride, col_stride;
  int rows, cols;
};

template <typename T>
__device__ __forceinline__ void stage_element(float* shared, int shared_stride, const GlobalWindow<T>& window, int row,
                                              int col) {
  const bool inside = row < window.rows && col < window.cols;
  shared[row * shared_stride + col] =
      inside ? load_input(window.base + row * window.row_stride + col * window.col_stride) : 0.0f;
}

// Copies a kRows × kCols window into shared memory as fp32 (row stride ≡ 4 mod 32). The choice of
// mapping depends only on the strides, so it is block-uniform; neither contains a barrier.
template <int kRows, int kCols, typename T>
__device__ __forceinline__ void stage_tile(float* shared, int shared_stride, const GlobalWindow<T>& window) {
  static_assert(kRows % 8 == 0 && kCols % kWarpSize == 0 && kThreads % kCols == 0, "tile shape");
  const int thread = static_cast<int>(threadIdx.x);
  if (window.col_stride != 1 && window.row_stride == 1) {
    // Contiguous rows, strided columns (x of an NCHW map; the weight block, stored as [k][c]): a warp
    // copies 8 rows × 4 columns at a time, which reads four whole 32-byte sectors and, with the row
    // stride ≡ 4 (mod 32), stores to 32 distinct banks. The 8 warps side by side cover 32 columns.
    const int first_row = thread % kWarpSize % 8;
    const int first_col = 4 * (thread / kWarpSize) + thread % kWarpSize / 8;
#pragma unroll 8
    for (int row_pass = 0; row_pass < kRows / 8; ++row_pass)
#pragma unroll
      for (int col_pass = 0; col_pass < kCols / kWarpSize; ++col_pass)
        stage_element(shared, shared_stride, window, first_row + 8 * row_pass, first_col + kWarpSize * col_pass);
  } else {
    // Consecutive threads take consecutive columns: coalesced when the columns are contiguous.
    constexpr int kRowsPerPass = kThreads / kCols;
    static_assert(kRows % kRowsPerPass == 0, "whole passes");
    const int first_row = thread / kCols, col = thread % kCols;
#pragma unroll 8
    for (int pass = 0; pass < kRows / kRowsPerPass; ++pass)
      stage_element(shared, shared_stride, window, first_row + kRowsPerPass * pass, col);
  }
}

// ---- the two products of a tile ------------------------------------------------------------------

// pre[s][j] += Σ_{k < depth} latents[row_s][k] · weights[k][channel_j] for the thread's decoder rows
// and channels. depth is a multiple of 4 (columns past d are staged as zero).
template <int kLatentTile>
__device__ __forceinline__ void decoder_step(const float* latents, const float* weights, int first_row,
                                             int first_channel, int depth,
                                             float (&pre)[kDecoderRows][kDecoderChannels]) {
  using Layout = SharedLayout<kLatentTile>;
  const float* latent_rows[kDecoderRows];
#pragma unroll
  for (int s = 0; s < kDecoderRows; ++s)
    latent_rows[s] = latents + (first_row + s * kDecoderRowStride) * Layout::kLatentStride;
  const float* weight_columns = weights + first_channel;
  // Not unrolled further: with 64 accumulators live, a wider body pushes them past 128 registers.
#pragma unroll 1
  for (int k = 0; k < depth; k += 4) {
    float z[kDecoderRows][4];
    float w[4][kDecoderChannels];
#pragma unroll
    for (int s = 0; s < kDecoderRows; ++s) load4(latent_rows[s] + k, z[s]);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) load4(weight_columns + (k + kk) * Layout::kWeightStride, w[kk]);
#pragma unroll
    for (int kk = 0; kk < 4; ++kk)
#pragma unroll
      for (int s = 0; s < kDecoderRows; ++s)
#pragma unroll
        for (int j = 0; j < kDecoderChannels; ++j) pre[s][j] = fmaf(z[s][kk], w[kk][j], pre[s][j]);
  }
}

// acc[i][j] += Σ_{t < rows} residuals[t][first_channel + i] · latents[t][lane + 32·j].
template <int kLatentTile>
__device__ __forceinline__ void accumulate_step(const float* residuals, const float* latents, int rows,
                                                int first_channel, int lane,
                                                float (&acc)[kChannelsPerWarp][kLatentTile / kWarpSize]) {
  using Layout = SharedLayout<kLatentTile>;
  constexpr int kColumnsPerLane = kLatentTile / kWarpSize;
  static_assert(kChannelsPerWarp == 8, "two float4 broadcasts per row");
  // Not unrolled further, for the same register budget as decoder_step.
#pragma unroll 1
  for (int t = 0; t < rows; ++t) {
    float r[2][4];
    load4(residuals + t * Layout::kResidualStride + first_channel, r[0]);
    load4(residuals + t * Layout::kResidualStride + first_channel + 4, r[1]);
    float z[kColumnsPerLane];
#pragma unroll
    for (int j = 0; j < kColumnsPerLane; ++j) z[j] = latents[t * Layout::kLatentStride + lane + j * kWarpSize];
#pragma unroll
    for (int i = 0; i < kChannelsPerWarp; ++i)
#pragma unroll
      for (int j = 0; j < kColumnsPerLane; ++j) acc[i][j] = fmaf(r[i / 4][i % 4], z[j], acc[i][j]);
  }
}

// ---- kernels -------------------------------------------------------------------------------------

// Blocks per multiprocessor the register budget is sized for (128 registers per thread for two). One
// for the widest tile on sm_8x: an A100 holds a single 112 KB block per SM anyway, so the kernel may use
// up to 255 registers there instead of spilling.
template <int kLatentTile>
constexpr int min_blocks_per_multiprocessor() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return kLatentTile == kMaxLatentTile ? 1 : 2;
#else
  return 2;
#endif
}

template <typename T, int kLatentTile>
__global__ void __launch_bounds__(kThreads, min_blocks_per_multiprocessor<kLatentTile>())
    accumulate_kernel(const KernelParams<T> p) {
  using Layout = SharedLayout<kLatentTile>;
  constexpr int kColumnsPerLane = kLatentTile / kWarpSize;
  extern __shared__ float4 shared_storage[];
  float* const weights = reinterpret_cast<float*>(shared_storage);
  float* const latents = weights + Layout::kWeightFloats;
  float* const residuals = latents + Layout::kLatentFloats;

  // Channel blocks vary fastest, so the blocks resident together read the same set's descriptors (L2 hits).
  int block = static_cast<int>(blockIdx.x);
  const int channel_block = block % p.channel_blocks;
  block /= p.channel_blocks;
  const int latent_tile = block % p.latent_tiles;
  block /= p.latent_tiles;
  const int split = block % p.splits;
  const int set = block / p.splits;

  const int c0 = channel_block * kBlockChannels;
  const int block_channels = min_of(kBlockChannels, p.channels - c0);
  const int length = set_length(p, set);
  const int set_tiles = ceil_div(length, kTileDescriptors);
  const int tiles_per_split = ceil_div(set_tiles, p.splits);
  const int first_tile = min_of(set_tiles, split * tiles_per_split);
  const int end_tile = min_of(set_tiles, first_tile + tiles_per_split);

  const int warp = static_cast<int>(threadIdx.x) / kWarpSize;
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int decoder_first_row = 8 * (warp % 4) + lane / 8;
  const int decoder_first_channel = 32 * (warp / 4) + 4 * (lane % 8);
  const int bias_partial_index = 4 * (warp % 4) + lane / 8;
  const int accumulator_first_channel = kChannelsPerWarp * warp;

  float acc[kChannelsPerWarp][kColumnsPerLane] = {};
  float bias_partial[kDecoderChannels] = {};

  const int64_t set_offset_z = static_cast<int64_t>(set) * p.z_stride[0];
  const int64_t set_offset_x = static_cast<int64_t>(set) * p.x_stride[0];
  auto weight_window = [&](int k0) {
    return GlobalWindow<T>{p.weight + c0 * p.weight_stride[0] + k0 * p.weight_stride[1],
                           p.weight_stride[1], p.weight_stride[0],
                           clamp_to(p.latent - k0, 0, kLatentTile), block_channels};
  };
  // With one latent tile the weight block is the same for every descriptor tile: stage it once.
  const bool weights_resident = p.latent_tiles == 1;
  if (weights_resident && first_tile < end_tile)
    stage_tile<kLatentTile, kBlockChannels>(weights, Layout::kWeightStride, weight_window(0));

  for (int tile = first_tile; tile < end_tile; ++tile) {
    const int t0 = tile * kTileDescriptors;
    const int rows = min_of(kTileDescriptors, length - t0);
    float pre[kDecoderRows][kDecoderChannels] = {};
    // P needs all of d; walk the latent chunks ending with this block's own, which stays staged for G.
    for (int step = 1; step <= p.latent_tiles; ++step) {
      const int chunk = (latent_tile + step) % p.latent_tiles;
      const int k0 = chunk * kLatentTile;
      const int depth = clamp_to(p.latent - k0, 0, kLatentTile);
      __syncthreads();  // the previous step is done reading latents, weights and residuals
      stage_tile<kTileDescriptors, kLatentTile>(
          latents, Layout::kLatentStride,
          GlobalWindow<T>{p.z + set_offset_z + t0 * p.z_stride[1] + k0 * p.z_stride[2], p.z_stride[1],
                          p.z_stride[2], rows, depth});
      if (!weights_resident) stage_tile<kLatentTile, kBlockChannels>(weights, Layout::kWeightStride, weight_window(k0));
      if (step == 1)
        stage_tile<kTileDescriptors, kBlockChannels>(
            residuals, Layout::kResidualStride,
            GlobalWindow<T>{p.x + set_offset_x + t0 * p.x_stride[1] + c0 * p.x_stride[2], p.x_stride[1],
                            p.x_stride[2], rows, block_channels});
      __syncthreads();
      decoder_step<kLatentTile>(latents, weights, decoder_first_row, decoder_first_channel, ceil_div(depth, 4) * 4,
                                pre);
    }

    // R = 1(p > 0, t < len) · (p − x̂) · inv_sigma2, written over the x it was computed from (each
    // element is read and written by the same thread).
#pragma unroll
    for (int s = 0; s < kDecoderRows; ++s) {
      const int row = decoder_first_row + s * kDecoderRowStride;
      float* residual_row = residuals + row * Layout::kResidualStride + decoder_first_channel;
      const float x_scale = p.x_scale != nullptr && row < rows
                                ? load_input(p.x_scale + set * p.x_scale_stride[0] + (t0 + row) * p.x_scale_stride[1])
                                : 1.0f;
      float values[kDecoderChannels];
      load4(residual_row, values);
#pragma unroll
      for (int j = 0; j < kDecoderChannels; ++j) {
        // Reloaded per tile (L1 hits) rather than held in registers across the walk.
        const int c = decoder_first_channel + j;
        const bool active_channel = c < block_channels;
        const float pre_activation = pre[s][j] + (active_channel ? load_input(p.bias + c0 + c) : 0.0f);
        const float inv_sigma2 = active_channel ? load_input(p.inv_sigma2 + c0 + c) : 0.0f;
        values[j] = row < rows && pre_activation > 0.0f ? (pre_activation - x_scale * values[j]) * inv_sigma2 : 0.0f;
        bias_partial[j] += values[j];
      }
      store4(residual_row, values);
    }
    __syncthreads();  // R complete
    accumulate_step<kLatentTile>(residuals, latents, rows, accumulator_first_channel, lane, acc);
  }

  // Bias column: sum the kBiasPartials partials of each channel in a fixed order.
  float* const bias_scratch = residuals;  // [kBiasPartials][kBlockChannels]
  float* const bias_sums = residuals + kBiasPartials * kBlockChannels;
  __syncthreads();  // the last accumulate step is done reading residuals
#pragma unroll
  for (int j = 0; j < kDecoderChannels; ++j)
    bias_scratch[bias_partial_index * kBlockChannels + decoder_first_channel + j] = bias_partial[j];
  __syncthreads();
  if (static_cast<int>(threadIdx.x) < kBlockChannels) {
    const int c = static_cast<int>(threadIdx.x);
    float sum = 0.0f;
    for (int i = 0; i < kBiasPartials; ++i) sum += bias_scratch[i * kBlockChannels + c];
    bias_sums[c] = sum;
  }
  __syncthreads();

  const int row_width = p.latent + 1;
  const int k0 = latent_tile * kLatentTile;
#pragma unroll
  for (int i = 0; i < kChannelsPerWarp; ++i) {
    const int c = accumulator_first_channel + i;
    if (c >= block_channels) continue;  // warp-uniform
    const int64_t channel = c0 + c;
    const float bias_sum = bias_sums[c];
    if (p.split_partials != nullptr) {
      float* partial_row =
          p.split_partials + ((static_cast<int64_t>(set) * p.splits + split) * p.channels + channel) * row_width;
#pragma unroll
      for (int j = 0; j < kColumnsPerLane; ++j) {
        const int k = k0 + lane + j * kWarpSize;
        if (k < p.latent) partial_row[k] = acc[i][j];
      }
      if (latent_tile == 0 && lane == 0) partial_row[p.latent] = bias_sum;
    } else {
      T* out_row = p.out + set * p.out_stride_n + channel * row_width;
      float sum_squares = 0.0f;
#pragma unroll
      for (int j = 0; j < kColumnsPerLane; ++j) {
        const int k = k0 + lane + j * kWarpSize;
        if (k < p.latent) sum_squares += store_output(p, out_row, channel, k, acc[i][j]);
      }
      if (latent_tile == 0 && lane == 0) sum_squares += store_output(p, out_row, channel, p.latent, bias_sum);
      if (p.row_sumsq != nullptr) {
        sum_squares = warp_sum(sum_squares);
        if (lane == 0)
          p.row_sumsq[(static_cast<int64_t>(set) * p.latent_tiles + latent_tile) * p.channels + channel] = sum_squares;
      }
    }
  }
}

// Sums the splits of each row of G in split order and applies the epilogue. One warp per (set, channel).
template <typename T>
__global__ void __launch_bounds__(kThreads) finish_splits_kernel(const KernelParams<T> p, float* row_sumsq) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / kWarpSize;
  if (row >= static_cast<int64_t>(p.num_sets) * p.channels) return;  // whole warps leave; no barriers here
  const int lane = static_cast<int>(threadIdx.x) % kWarpSize;
  const int64_t set = row / p.channels, channel = row % p.channels;
  const int row_width = p.latent + 1;
  const int64_t split_stride = static_cast<int64_t>(p.channels) * row_width;
  const float* first_split = p.split_partials + (set * p.splits * p.channels + channel) * row_width;
  T* out_row = p.out + set * p.out_stride_n + channel * row_width;
  float sum_squares = 0.0f;
  for (int k = lane; k < row_width; k += kWarpSize) {
    float g = 0.0f;
    for (int s = 0; s < p.splits; ++s) g += first_split[s * split_stride + k];
    sum_squares += store_output(p, out_row, channel, k, g);
  }
  if (row_sumsq != nullptr) {
    sum_squares = warp_sum(sum_squares);
    if (lane == 0) row_sumsq[row] = sum_squares;
  }
}

// row_sumsq[n, c] = Σ over latent tiles of the per-tile sums, in tile order. One thread per (set, channel).
__global__ void __launch_bounds__(kThreads) sum_latent_tiles_kernel(const float* tile_sums, int64_t num_rows,
                                                                    int channels, int latent_tiles,
                                                                    float* row_sumsq) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (row >= num_rows) return;
  const int64_t set = row / channels, channel = row % channels;
  float sum = 0.0f;
  for (int tile = 0; tile < latent_tiles; ++tile) sum += tile_sums[(set * latent_tiles + tile) * channels + channel];
  row_sumsq[row] = sum;
}

// ---- host side -----------------------------------------------------------------------------------

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw std::runtime_error(std::string("fv_accumulate_cuda: ") + what + " failed: " + cudaGetErrorString(status) +
                             " (" + cudaGetErrorName(status) + ")");
}

template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), int64_t blocks, std::size_t shared_bytes, cudaStream_t stream,
                   const char* what, Args&&... args) {
  if (blocks > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string("fv_accumulate_cuda: ") + what + " needs " + std::to_string(blocks) +
                                " thread blocks, more than a grid holds; split the batch");
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(blocks));
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = shared_bytes;
  config.stream = stream;
  check_cuda(cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...), what);
}

struct DeviceLimits {
  int multiprocessors;
  int shared_bytes_per_block;  // with the opt-in
};

DeviceLimits device_limits() {
  int device = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  DeviceLimits limits{};
  check_cuda(cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device),
             "querying the multiprocessor count");
  check_cuda(cudaDeviceGetAttribute(&limits.shared_bytes_per_block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "querying the opt-in shared memory per block");
  return limits;
}

// Splits along T only when the (set, channel block, latent tile) blocks cannot fill the resident slots,
// and never below kMinTilesPerSplit tiles per split. Depends on shapes and the device only, not on data.
int choose_splits(int64_t blocks_without_split, int64_t resident_blocks, int set_size) {
  if (blocks_without_split >= resident_blocks) return 1;
  const int64_t tiles = ceil_div<int64_t>(set_size, kTileDescriptors);
  const int64_t most_by_work = tiles / kMinTilesPerSplit > 1 ? tiles / kMinTilesPerSplit : 1;
  return static_cast<int>(min_of(ceil_div(resident_blocks, blocks_without_split), most_by_work));
}

// How one problem runs: the grid and the fp32 scratch it needs. Depends on shapes and the device only.
struct LaunchPlan {
  int channel_blocks = 0, latent_tiles = 0, splits = 1;
  int64_t blocks_without_split = 0;
  int64_t workspace_floats = 0;  // split partials, or per-latent-tile row sums, or none
};

template <typename T, int kLatentTile>
LaunchPlan plan_with_tile(const FVAccumulateArgs& args, const DeviceLimits& limits) {
  const std::size_t shared_bytes = SharedLayout<kLatentTile>::kBytes;
  const auto kernel = accumulate_kernel<T, kLatentTile>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)),
             "raising the kernel's dynamic shared memory limit");
  int blocks_per_multiprocessor = 0;
  check_cuda(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks_per_multiprocessor, kernel, kThreads, shared_bytes),
             "querying the kernel's occupancy");
  if (blocks_per_multiprocessor < 1)
    throw std::runtime_error("fv_accumulate_cuda: the kernel (" + std::to_string(shared_bytes) +
                             " bytes of shared memory, " + std::to_string(kThreads) +
                             " threads) cannot run on this device");
  LaunchPlan plan;
  const int latent = static_cast<int>(args.latent);
  plan.channel_blocks = ceil_div(static_cast<int>(args.channels), kBlockChannels);
  plan.latent_tiles = latent > kLatentTile ? ceil_div(latent, kLatentTile) : 1;
  plan.blocks_without_split = static_cast<int64_t>(plan.channel_blocks) * plan.latent_tiles * args.num_sets;
  const int64_t resident_blocks = static_cast<int64_t>(limits.multiprocessors) * blocks_per_multiprocessor;
  plan.splits = choose_splits(plan.blocks_without_split, resident_blocks, static_cast<int>(args.set_size));
  const int64_t rows = args.num_sets * args.channels;
  if (plan.splits > 1)
    plan.workspace_floats = rows * plan.splits * (args.latent + 1);
  else if (args.row_sumsq != nullptr && plan.latent_tiles > 1)
    plan.workspace_floats = rows * plan.latent_tiles;
  return plan;
}

// Calls run(std::integral_constant<int, kLatentTile>) with the widest latent tile that covers d (fewest
// recomputations of P), if the device's shared memory holds it.
template <typename Run>
auto with_latent_tile(int64_t latent, const DeviceLimits& limits, Run&& run) {
  const bool widest_fits =
      SharedLayout<kMaxLatentTile>::kBytes <= static_cast<std::size_t>(limits.shared_bytes_per_block);
  if (latent <= 32) return run(std::integral_constant<int, 32>{});
  if (latent <= 64) return run(std::integral_constant<int, 64>{});
  if (latent <= 128 || !widest_fits) return run(std::integral_constant<int, 128>{});
  return run(std::integral_constant<int, 256>{});
}

template <typename T, int kLatentTile>
void launch_with_tile(KernelParams<T> p, const FVAccumulateArgs& args, const DeviceLimits& limits,
                      cudaStream_t stream) {
  const LaunchPlan plan = plan_with_tile<T, kLatentTile>(args, limits);
  if (args.workspace_floats < plan.workspace_floats)
    throw std::invalid_argument("fv_accumulate_cuda: this problem needs a float32 workspace of " +
                                std::to_string(plan.workspace_floats) + " elements (fv_accumulate_cuda_workspace_floats), got " +
                                std::to_string(args.workspace_floats));
  const std::size_t shared_bytes = SharedLayout<kLatentTile>::kBytes;
  const auto kernel = accumulate_kernel<T, kLatentTile>;
  p.channel_blocks = plan.channel_blocks;
  p.latent_tiles = plan.latent_tiles;
  p.splits = plan.splits;
  const int64_t rows = static_cast<int64_t>(p.num_sets) * p.channels;

  if (p.splits > 1) {
    p.split_partials = args.workspace;
    p.row_sumsq = nullptr;
    launch_kernel(kernel, plan.blocks_without_split * p.splits, shared_bytes, stream, "launching accumulate_kernel", p);
    launch_kernel(finish_splits_kernel<T>, ceil_div<int64_t>(rows, kWarps), 0, stream,
                  "launching finish_splits_kernel", p, args.row_sumsq);
  } else if (args.row_sumsq != nullptr && p.latent_tiles > 1) {
    p.row_sumsq = args.workspace;
    launch_kernel(kernel, plan.blocks_without_split, shared_bytes, stream, "launching accumulate_kernel", p);
    launch_kernel(sum_latent_tiles_kernel, ceil_div<int64_t>(rows, kThreads), 0, stream,
                  "launching sum_latent_tiles_kernel", static_cast<const float*>(args.workspace), rows,
                  p.channels, p.latent_tiles, args.row_sumsq);
  } else {
    p.row_sumsq = args.row_sumsq;
    launch_kernel(kernel, plan.blocks_without_split, shared_bytes, stream, "launching accumulate_kernel", p);
  }
}

template <typename T>
void launch(const FVAccumulateArgs& args, cudaStream_t stream) {
  KernelParams<T> p{};
  static_cast<InputParams<T>&>(p) = input_params<T>(args);
  p.out = static_cast<T*>(args.out);
  p.out_stride_n = args.out_stride_n;
  p.signed_sqrt = args.signed_sqrt;

  const DeviceLimits limits = device_limits();
  with_latent_tile(args.latent, limits, [&](auto tile) { launch_with_tile<T, decltype(tile)::value>(p, args, limits, stream); });
}

void check_size(const char* name, int64_t value) {
  if (value < 0 || value > std::numeric_limits<int>::max())
    throw std::invalid_argument(std::string("fv_accumulate_cuda: ") + name + " = " + std::to_string(value) +
                                " is outside [0, 2^31 - 1]");
}

// Validates args; false when the output is empty and nothing runs.
bool check_args(const FVAccumulateArgs& args) {
  if (args.dtype == DType::Float64)
    throw std::invalid_argument(
        "fv_accumulate_cuda: float64 is not supported by the CUDA kernel; use the \"torch\" backend for float64");
  if (args.dtype != DType::Float32 && args.dtype != DType::BFloat16 && args.dtype != DType::Float16)
    throw std::invalid_argument("fv_accumulate_cuda: unknown dtype code " +
                                std::to_string(static_cast<int32_t>(args.dtype)));
  check_size("num_sets (N)", args.num_sets);
  check_size("set_size (T)", args.set_size);
  check_size("channels (C)", args.channels);
  check_size("latent (d)", args.latent);
  if (args.latent == std::numeric_limits<int>::max())
    throw std::invalid_argument("fv_accumulate_cuda: latent (d) leaves no room for the bias column");
  return args.num_sets > 0 && args.channels > 0;
}

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename Run>
auto with_element_type(DType dtype, Run&& run) {
  if (dtype == DType::Float32) return run(TypeTag<float>{});
  if (dtype == DType::BFloat16) return run(TypeTag<__nv_bfloat16>{});
  return run(TypeTag<__half>{});
}


// ---- the backward --------------------------------------------------------------------------------
//
// The gradients of g (FVAccumulateBackwardArgs in csrc/fv_accumulate.h) in two kernels that recompute
// the decoder tile as the forward does, with h = grad_out · fisher_rsqrt; everything fp32 FFMA:
// - backward_rows_kernel: a block owns 16 descriptors of one set and walks the channels 16 at a time:
//   P = Z·Wᵀ + b and A = Z·H_wᵀ + h_b per (descriptor, channel) thread, Q = ∂L/∂p and R = r into
//   shared memory, grad_x and grad_x_scale from them, and grad_z += R·H_w + Q·W kept in registers;
// - backward_params_kernel: a block owns 16 channels and walks every set's descriptors 16 at a time
//   with the same P, A and Q: grad_W += Qᵀ·Z in registers, grad_b and grad_σx⁻² summed per thread and
//   reduced in a fixed order. One block per 16 channels: no atomics, deterministic, but a grid of C/16
//   blocks (a split over sets with a fixed-order sum is the next step for small C).
// d is at most kMaxBackwardLatent (the Python launcher takes the reference's torch code past it).

constexpr int kBackwardRows = 16;
constexpr int kBackwardChannels = 16;
constexpr int kMaxBackwardLatent = 256;
constexpr int kBackwardColumns = kMaxBackwardLatent / 16;  // columns of d per thread (16 lanes per row)
static_assert(kBackwardRows * kBackwardChannels == kThreads, "one (descriptor, channel) pair per thread");

template <typename T>
struct BackwardParams : InputParams<T> {
  const T* grad_out;
  int64_t grad_out_stride_n;
  T *grad_z, *grad_x, *grad_x_scale, *grad_weight, *grad_bias, *grad_inv_sigma2;  // each null if not needed
};

// Shared tiles of the backward (floats): three [16][d + 1] tiles (z rows; W rows; H rows), four [16][17]
// tiles (P, A, then R and Q in the rows kernel), 16 h_b values and a 256-float reduction buffer.
struct BackwardLayout {
  int pitch;  // d + 1: rows of a [16][d + 1] tile fall into different banks
  __host__ __device__ explicit BackwardLayout(int latent) : pitch(latent + 1) {}
  __host__ __device__ int tile_floats() const { return kBackwardRows * pitch; }
  __host__ __device__ static constexpr int small_floats() { return kBackwardRows * (kBackwardChannels + 1); }
  __host__ __device__ std::size_t bytes() const {
    return sizeof(float) * (3 * tile_floats() + 4 * small_floats() + kBackwardChannels + kThreads);
  }
};

// rows[r][k] = z[n, t0 + r, k] (zero past T or d).
template <typename T>
__device__ void stage_z_rows(const BackwardParams<T>& p, int n, int t0, float* rows, int pitch) {
  for (int i = threadIdx.x; i < kBackwardRows * p.latent; i += kThreads) {
    const int r = i / p.latent, k = i % p.latent;
    rows[r * pitch + k] = t0 + r < p.set_size
        ? load_input(p.z + n * p.z_stride[0] + static_cast<int64_t>(t0 + r) * p.z_stride[1] + k * p.z_stride[2])
        : 0.0f;
  }
}

// weights[c][k] = W[c0 + c, k]; h[c][k] = grad_out[n, c0 + c, k] · fisher_rsqrt[c0 + c, k] and h_bias[c] for
// k = d (zero past C). n < 0 stages only the weights.
template <typename T>
__device__ void stage_channel_rows(const BackwardParams<T>& p, int n, int c0, float* weights, float* h, float* h_bias,
                                   int pitch) {
  const int row_length = p.latent + 1;
  for (int i = threadIdx.x; i < kBackwardChannels * row_length; i += kThreads) {
    const int c = i / row_length, k = i % row_length;
    const bool inside = c0 + c < p.channels;
    const int64_t channel = c0 + c;
    if (k < p.latent && weights != nullptr)
      weights[c * pitch + k] = inside ? load_input(p.weight + channel * p.weight_stride[0] + k * p.weight_stride[1]) : 0.0f;
    if (n < 0) continue;
    float value = inside ? load_input(p.grad_out + n * p.grad_out_stride_n + channel * row_length + k) : 0.0f;
    if (inside && p.fisher_rsqrt != nullptr) value *= load_input(p.fisher_rsqrt + channel * row_length + k);
    if (k < p.latent)
      h[c * pitch + k] = value;
    else
      h_bias[c] = value;
  }
}

struct DecoderGradient {
  bool active;
  float q, residual, a, difference, x, scale;
};

// For descriptor t0 + r and channel c0 + c (thread r·16 + c): P, A and the masked Q and R.
template <typename T>
__device__ DecoderGradient decoder_gradient(const BackwardParams<T>& p, int n, int t0, int c0, int length,
                                            const float* rows, const float* weights, const float* h,
                                            const float* h_bias, int pitch) {
  const int r = threadIdx.x / kBackwardChannels, c = threadIdx.x % kBackwardChannels;
  const int t = t0 + r;
  const int64_t channel = c0 + c;
  float pre = 0.0f, a = 0.0f;
  for (int k = 0; k < p.latent; ++k) {
    const float z = rows[r * pitch + k];
    pre = fmaf(z, weights[c * pitch + k], pre);
    a = fmaf(z, h[c * pitch + k], a);
  }
  DecoderGradient g{};
  const bool valid = t < length && channel < p.channels;
  if (!valid) return g;
  pre += load_input(p.bias + channel);
  a += h_bias[c];
  const float inv_sigma2 = load_input(p.inv_sigma2 + channel);
  g.x = load_input(p.x + n * p.x_stride[0] + static_cast<int64_t>(t) * p.x_stride[1] + channel * p.x_stride[2]);
  g.scale = p.x_scale == nullptr ? 1.0f : load_input(p.x_scale + n * p.x_scale_stride[0] +
                                                     static_cast<int64_t>(t) * p.x_scale_stride[1]);
  g.active = pre > 0.0f;
  g.difference = pre - g.x * g.scale;
  g.a = a;
  g.residual = g.active ? g.difference * inv_sigma2 : 0.0f;
  g.q = g.active ? a * inv_sigma2 : 0.0f;
  return g;
}

// Sum over the 16 lanes of a half warp that share a row.
__device__ __forceinline__ float half_warp_sum(float value) {
  for (int offset = kBackwardChannels / 2; offset > 0; offset /= 2) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_rows_kernel(const BackwardParams<T> p) {
  extern __shared__ float4 shared_storage[];
  const BackwardLayout layout(p.latent);
  float* rows = reinterpret_cast<float*>(shared_storage);
  float* weights = rows + layout.tile_floats();
  float* h = weights + layout.tile_floats();
  float* residuals = h + layout.tile_floats();
  float* qs = residuals + BackwardLayout::small_floats();
  float* h_bias = qs + 3 * BackwardLayout::small_floats();
  const int row_blocks = ceil_div(p.set_size, kBackwardRows);
  const int n = blockIdx.x / row_blocks, t0 = (blockIdx.x % row_blocks) * kBackwardRows;
  const int length = set_length(p, n);
  const int r = threadIdx.x / kBackwardChannels, lane = threadIdx.x % kBackwardChannels;
  const int small_pitch = kBackwardChannels + 1;
  stage_z_rows(p, n, t0, rows, layout.pitch);
  float grad_z[kBackwardColumns] = {};
  float grad_scale = 0.0f;
  for (int c0 = 0; c0 < p.channels; c0 += kBackwardChannels) {
    __syncthreads();  // the previous channel block's tiles are consumed
    stage_channel_rows(p, n, c0, weights, h, h_bias, layout.pitch);
    __syncthreads();
    const DecoderGradient g = decoder_gradient(p, n, t0, c0, length, rows, weights, h, h_bias, layout.pitch);
    residuals[r * small_pitch + lane] = g.residual;
    qs[r * small_pitch + lane] = g.q;
    const int t = t0 + r;
    const int64_t channel = c0 + lane;
    if (p.grad_x != nullptr && t < p.set_size && channel < p.channels)
      p.grad_x[(static_cast<int64_t>(n) * p.set_size + t) * p.channels + channel] = from_float<T>(-g.q * g.scale);
    grad_scale -= g.q * g.x;
    __syncthreads();
    if (p.grad_z == nullptr) continue;
#pragma unroll
    for (int j = 0; j < kBackwardColumns; ++j) {
      const int k = lane + kBackwardChannels * j;
      if (k >= p.latent) break;
      float sum = grad_z[j];
      for (int c = 0; c < kBackwardChannels; ++c)
        sum = fmaf(residuals[r * small_pitch + c], h[c * layout.pitch + k],
                   fmaf(qs[r * small_pitch + c], weights[c * layout.pitch + k], sum));
      grad_z[j] = sum;
    }
  }
  const int t = t0 + r;
  grad_scale = half_warp_sum(grad_scale);
  if (t >= p.set_size) return;
  if (p.grad_x_scale != nullptr && lane == 0)
    p.grad_x_scale[static_cast<int64_t>(n) * p.set_size + t] = from_float<T>(grad_scale);
  if (p.grad_z == nullptr) return;
#pragma unroll
  for (int j = 0; j < kBackwardColumns; ++j) {
    const int k = lane + kBackwardChannels * j;
    if (k < p.latent) p.grad_z[(static_cast<int64_t>(n) * p.set_size + t) * p.latent + k] = from_float<T>(grad_z[j]);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) backward_params_kernel(const BackwardParams<T> p) {
  extern __shared__ float4 shared_storage[];
  const BackwardLayout layout(p.latent);
  float* rows = reinterpret_cast<float*>(shared_storage);
  float* weights = rows + layout.tile_floats();
  float* h = weights + layout.tile_floats();
  float* qs = h + layout.tile_floats();
  float* h_bias = qs + 4 * BackwardLayout::small_floats();
  float* reduction = h_bias + kBackwardChannels;
  const int c0 = blockIdx.x * kBackwardChannels;
  const int r = threadIdx.x / kBackwardChannels, lane = threadIdx.x % kBackwardChannels;
  const int small_pitch = kBackwardChannels + 1;
  stage_channel_rows(p, -1, c0, weights, nullptr, nullptr, layout.pitch);
  float grad_weight[kBackwardColumns] = {};  // channel r of the block, columns lane + 16·j
  float grad_bias = 0.0f, grad_inv_sigma2 = 0.0f;  // this thread's (descriptor, channel) pairs, channel lane
  for (int n = 0; n < p.num_sets; ++n) {
    const int length = set_length(p, n);
    __syncthreads();
    stage_channel_rows(p, n, c0, nullptr, h, h_bias, layout.pitch);
    for (int t0 = 0; t0 < length; t0 += kBackwardRows) {
      __syncthreads();  // h staged; the previous rows and Q consumed
      stage_z_rows(p, n, t0, rows, layout.pitch);
      __syncthreads();
      const DecoderGradient g = decoder_gradient(p, n, t0, c0, length, rows, weights, h, h_bias, layout.pitch);
      qs[r * small_pitch + lane] = g.q;
      grad_bias += g.q;
      grad_inv_sigma2 += g.active ? g.a * g.difference : 0.0f;
      __syncthreads();
      if (p.grad_weight == nullptr) continue;
#pragma unroll
      for (int j = 0; j < kBackwardColumns; ++j) {  // thread (channel r, columns lane + 16·j)
        const int k = lane + kBackwardChannels * j;
        if (k >= p.latent) break;
        float sum = grad_weight[j];
        for (int t = 0; t < kBackwardRows; ++t) sum = fmaf(qs[t * small_pitch + r], rows[t * layout.pitch + k], sum);
        grad_weight[j] = sum;
      }
    }
  }
  const int64_t channel = c0 + r;
  if (p.grad_weight != nullptr && channel < p.channels) {
#pragma unroll
    for (int j = 0; j < kBackwardColumns; ++j) {
      const int k = lane + kBackwardChannels * j;
      if (k < p.latent) p.grad_weight[channel * p.latent + k] = from_float<T>(grad_weight[j]);
    }
  }
  // grad_bias and grad_inv_sigma2 of channel `lane`, summed over the 16 descriptor rows in a fixed order.
  for (int pass = 0; pass < 2; ++pass) {
    __syncthreads();
    reduction[threadIdx.x] = pass == 0 ? grad_bias : grad_inv_sigma2;
    __syncthreads();
    if (threadIdx.x < kBackwardChannels && c0 + static_cast<int>(threadIdx.x) < p.channels) {
      float sum = 0.0f;
      for (int row = 0; row < kBackwardRows; ++row) sum += reduction[row * kBackwardChannels + threadIdx.x];
      T* target = pass == 0 ? p.grad_bias : p.grad_inv_sigma2;
      if (target != nullptr) target[c0 + threadIdx.x] = from_float<T>(sum);
    }
  }
}

template <typename T>
void launch_backward(const FVAccumulateBackwardArgs& args, cudaStream_t stream) {
  BackwardParams<T> p{};
  static_cast<InputParams<T>&>(p) = input_params<T>(args.forward);
  p.grad_out = static_cast<const T*>(args.grad_out);
  p.grad_out_stride_n = args.grad_out_stride_n;
  p.grad_z = static_cast<T*>(args.grad_z);
  p.grad_x = static_cast<T*>(args.grad_x);
  p.grad_x_scale = static_cast<T*>(args.grad_x_scale);
  p.grad_weight = static_cast<T*>(args.grad_weight);
  p.grad_bias = static_cast<T*>(args.grad_bias);
  p.grad_inv_sigma2 = static_cast<T*>(args.grad_inv_sigma2);
  const std::size_t shared_bytes = BackwardLayout(p.latent).bytes();
  for (const auto kernel : {backward_rows_kernel<T>, backward_params_kernel<T>})
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes)),
               "raising the backward kernels' dynamic shared memory limit");
  if (p.set_size > 0 && (p.grad_z != nullptr || p.grad_x != nullptr || p.grad_x_scale != nullptr))
    launch_kernel(backward_rows_kernel<T>, static_cast<int64_t>(p.num_sets) * ceil_div(p.set_size, kBackwardRows),
                  shared_bytes, stream, "launching backward_rows_kernel", p);
  if (p.grad_weight != nullptr || p.grad_bias != nullptr || p.grad_inv_sigma2 != nullptr)
    launch_kernel(backward_params_kernel<T>, ceil_div(p.channels, kBackwardChannels), shared_bytes, stream,
                  "launching backward_params_kernel", p);
}

}  // namespace

int64_t fv_accumulate_cuda_workspace_floats(const FVAccumulateArgs& args) {
  if (!check_args(args)) return 0;
  const DeviceLimits limits = device_limits();
  return with_element_type(args.dtype, [&](auto type) {
    using T = typename decltype(type)::type;
    return with_latent_tile(args.latent, limits, [&](auto tile) {
      return plan_with_tile<T, decltype(tile)::value>(args, limits).workspace_floats;
    });
  });
}

void fv_accumulate_cuda(const FVAccumulateArgs& args, void* stream) {
  if (!check_args(args)) return;  // the output is empty
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  with_element_type(args.dtype, [&](auto type) { launch<typename decltype(type)::type>(args, cuda_stream); });
}

bool fv_accumulate_backward_cuda_supported(const FVAccumulateArgs& args) {
  if (args.latent > kMaxBackwardLatent) return false;
  const std::size_t shared_bytes = BackwardLayout(static_cast<int>(args.latent)).bytes();
  return shared_bytes <= static_cast<std::size_t>(device_limits().shared_bytes_per_block);
}

void fv_accumulate_backward_cuda(const FVAccumulateBackwardArgs& args, void* stream) {
  const FVAccumulateArgs& f = args.forward;
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  if (!check_args(f)) {  // no sets or no channels: the gradients that have elements are zero
    const std::size_t element = f.dtype == DType::Float32 ? 4 : 2;
    const std::pair<void*, int64_t> gradients[] = {
        {args.grad_z, f.num_sets * f.set_size * f.latent}, {args.grad_x_scale, f.num_sets * f.set_size},
        {args.grad_weight, f.channels * f.latent}, {args.grad_bias, f.channels}, {args.grad_inv_sigma2, f.channels}};
    for (const auto& [pointer, count] : gradients)
      if (pointer != nullptr && count > 0)
        check_cuda(cudaMemsetAsync(pointer, 0, element * static_cast<std::size_t>(count), cuda_stream),
                   "zeroing a gradient");
    return;
  }
  if (f.latent > kMaxBackwardLatent)
    throw std::invalid_argument("fv_accumulate_backward_cuda: latent (d) = " + std::to_string(f.latent) +
                                " is above " + std::to_string(kMaxBackwardLatent) +
                                "; fvkernels.ops.cuda takes the reference's torch code there");
  if (f.num_sets > 1 && args.grad_out_stride_n < f.channels * (f.latent + 1))
    throw std::invalid_argument("fv_accumulate_backward_cuda: grad_out_stride_n must be >= channels * (latent + 1)");
  with_element_type(f.dtype, [&](auto type) { launch_backward<typename decltype(type)::type>(args, cuda_stream); });
}

}  // namespace fvk
