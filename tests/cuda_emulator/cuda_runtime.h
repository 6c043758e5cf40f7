// Fake CUDA runtime for running fvkernels' .cu on the CPU: every CUDA thread is a ucontext fiber,
// __syncthreads / warp shuffles are scheduler barriers, memory is host memory with guard pages.
#pragma once
#include <ucontext.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>
#include <algorithm>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct uint3 { unsigned x, y, z; };
struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1, cudaErrorMemoryAllocation = 2,
                   cudaErrorInvalidConfiguration = 9, cudaErrorLaunchFailure = 719 };
inline const char* cudaGetErrorString(cudaError_t e) {
  switch (e) { case cudaSuccess: return "no error"; case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory"; case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unspecified launch failure"; }
}
inline const char* cudaGetErrorName(cudaError_t e) {
  switch (e) { case cudaSuccess: return "cudaSuccess"; case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorMemoryAllocation: return "cudaErrorMemoryAllocation"; case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaErrorLaunchFailure"; }
}
struct CUstream_st;
typedef CUstream_st* cudaStream_t;
struct cudaLaunchConfig_t { dim3 gridDim; dim3 blockDim; size_t dynamicSmemBytes; cudaStream_t stream; void* attrs; unsigned numAttrs; };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16, cudaDevAttrMaxSharedMemoryPerBlockOptin = 97 };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };

namespace emu {

struct Config {
  int multiprocessors = 132;
  int optin_shared = 232448;     // H100
  int blocks_per_sm_cap = 2;
  int order = 0;                 // 0 forward, 1 reverse, 2 random fiber order
  unsigned seed = 1;
  bool guard_before = false;     // guard page before buffers instead of after
  long launches = 0, blocks_run = 0;
  std::vector<std::string> log;
};
inline Config& config() { static Config c; return c; }

[[noreturn]] inline void fail(const std::string& what) {
  fprintf(stderr, "EMULATOR FAILURE: %s\n", what.c_str());
  fflush(stderr);
  abort();
}

// ---- guarded memory: each buffer abuts a PROT_NONE page (after it, or before it) -------------------
struct Mapping { void* base; size_t length; };
inline std::map<void*, Mapping>& mappings() { static std::map<void*, Mapping> m; return m; }
inline void* guarded_alloc(size_t bytes) {
  const size_t page = sysconf(_SC_PAGESIZE);
  const size_t data_pages = (bytes + page - 1) / page + 1;
  const size_t length = (data_pages + 1) * page;
  char* base = static_cast<char*>(mmap(nullptr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
  if (base == MAP_FAILED) fail("mmap");
  char* user;
  if (config().guard_before) {
    mprotect(base, page, PROT_NONE);
    user = base + page;
  } else {
    char* guard = base + data_pages * page;
    mprotect(guard, page, PROT_NONE);
    user = guard - bytes;
  }
  mappings()[user] = Mapping{base, length};
  return user;
}
inline void guarded_free(void* p) {
  auto it = mappings().find(p);
  if (it == mappings().end()) fail("free of unknown pointer");
  munmap(it->second.base, it->second.length);
  mappings().erase(it);
}

// ---- fibers ---------------------------------------------------------------------------------------
enum class State { Ready, AtBlockBarrier, AtWarpBarrier, Done };
struct Fiber {
  ucontext_t context;
  State state = State::Ready;
  long block_barriers = 0, warp_barriers = 0;
  unsigned index = 0;
};
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  Fiber* current = nullptr;
  uint3 block_index{0, 0, 0};
  dim3 block_dim, grid_dim;
  std::function<void()> body;
  std::vector<float> shuffle_slots;  // one per thread
};
inline Block*& active_block() { static Block* b = nullptr; return b; }

inline void trampoline() {
  Block* b = active_block();
  b->body();
  b->current->state = State::Done;
  swapcontext(&b->current->context, &b->scheduler);
}

inline void yield_with(State s) {
  Block* b = active_block();
  Fiber* f = b->current;
  f->state = s;
  swapcontext(&f->context, &b->scheduler);
}

inline void run_block(Block& b, unsigned threads) {
  static std::vector<std::vector<char>> stacks;
  if (stacks.size() < threads) { stacks.resize(threads); for (auto& s : stacks) s.resize(128 * 1024); }
  b.fibers.assign(threads, Fiber{});
  b.shuffle_slots.assign(threads, 0.0f);
  for (unsigned t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.index = t;
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = stacks[t].data();
    f.context.uc_stack.ss_size = stacks[t].size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, trampoline, 0);
  }
  active_block() = &b;
  std::mt19937 rng(config().seed + static_cast<unsigned>(config().blocks_run));
  std::vector<unsigned> order(threads);
  for (;;) {
    for (unsigned t = 0; t < threads; ++t) order[t] = t;
    if (config().order == 1) std::reverse(order.begin(), order.end());
    if (config().order == 2) std::shuffle(order.begin(), order.end(), rng);
    bool ran = false;
    for (unsigned t : order) {
      Fiber& f = b.fibers[t];
      if (f.state != State::Ready) continue;
      b.current = &f;
      swapcontext(&b.scheduler, &f.context);
      ran = true;
    }
    // release complete warp barriers
    bool released = false;
    for (unsigned w = 0; w * 32 < threads; ++w) {
      bool all = true;
      for (unsigned l = 0; l < 32 && w * 32 + l < threads; ++l)
        all &= b.fibers[w * 32 + l].state == State::AtWarpBarrier;
      if (!all) continue;
      const long count = b.fibers[w * 32].warp_barriers;
      for (unsigned l = 0; l < 32 && w * 32 + l < threads; ++l) {
        Fiber& f = b.fibers[w * 32 + l];
        if (f.warp_barriers != count) fail("warp barrier count mismatch (divergent shuffle)");
        f.state = State::Ready;
      }
      released = true;
    }
    if (released) continue;
    unsigned at_block = 0, done = 0;
    for (auto& f : b.fibers) { at_block += f.state == State::AtBlockBarrier; done += f.state == State::Done; }
    if (done == threads) break;
    if (at_block + done == threads) {
      if (done != 0) fail("__syncthreads reached while other threads had exited");
      const long count = b.fibers[0].block_barriers;
      for (auto& f : b.fibers) {
        if (f.block_barriers != count) fail("block barrier count mismatch");
        f.state = State::Ready;
      }
      continue;
    }
    if (!ran) {
      std::string states;
      for (auto& f : b.fibers) states += std::to_string(static_cast<int>(f.state));
      fail("deadlock: threads wait at different barriers (barrier in divergent code); states " + states);
    }
  }
  // all threads must have passed the same number of block barriers
  for (auto& f : b.fibers)
    if (f.block_barriers != b.fibers[0].block_barriers) fail("threads passed different numbers of __syncthreads");
  active_block() = nullptr;
}

// shared memory: defined by the harness before it includes the .cu
extern float4* shared_base;
extern size_t shared_capacity_bytes;

}  // namespace emu

#define threadIdx (uint3{emu::active_block()->current->index, 0u, 0u})
#define blockIdx (emu::active_block()->block_index)

inline void __syncthreads() {
  emu::Fiber* f = emu::active_block()->current;
  ++f->block_barriers;
  emu::yield_with(emu::State::AtBlockBarrier);
}
inline float __shfl_xor_sync(unsigned mask, float value, int lane_mask) {
  if (mask != 0xffffffffu) emu::fail("partial shuffle mask");
  emu::Block* b = emu::active_block();
  emu::Fiber* f = b->current;
  const unsigned me = f->index;
  b->shuffle_slots[me] = value;
  ++f->warp_barriers;
  emu::yield_with(emu::State::AtWarpBarrier);
  const unsigned partner = (me & ~31u) | ((me & 31u) ^ static_cast<unsigned>(lane_mask));
  const float result = b->shuffle_slots[partner];
  ++f->warp_barriers;
  emu::yield_with(emu::State::AtWarpBarrier);
  return result;
}
template <typename T> inline T __ldg(const T* p) { return *p; }

inline std::map<const void*, int>& function_smem_limits() { static std::map<const void*, int> m; return m; }

inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
// Device memory is host memory here.
inline cudaError_t cudaMemsetAsync(void* pointer, int value, size_t bytes, cudaStream_t) {
  std::memset(pointer, value, bytes);
  return cudaSuccess;
}
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) *value = emu::config().multiprocessors;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = emu::config().optin_shared;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaFuncSetAttribute(F* func, cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value < 0 || value > emu::config().optin_shared) return cudaErrorInvalidValue;
  function_smem_limits()[reinterpret_cast<const void*>(func)] = value;
  return cudaSuccess;
}
template <typename F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F*, int threads, size_t smem) {
  if (threads <= 0 || threads > 1024) return cudaErrorInvalidValue;
  const long by_smem = 233472 / static_cast<long>(smem + 1024);
  *blocks = static_cast<int>(std::min<long>(by_smem, emu::config().blocks_per_sm_cap));
  return cudaSuccess;
}
template <typename... Exp, typename... Act>
cudaError_t cudaLaunchKernelEx(const cudaLaunchConfig_t* config, void (*kernel)(Exp...), Act&&... args) {
  const dim3 grid = config->gridDim, block = config->blockDim;
  if (grid.x < 1 || grid.y < 1 || grid.z < 1 || grid.y > 65535 || grid.z > 65535) return cudaErrorInvalidConfiguration;
  if (block.x * block.y * block.z > 1024 || block.x < 1) return cudaErrorInvalidConfiguration;
  int limit = 48 * 1024;
  auto it = function_smem_limits().find(reinterpret_cast<const void*>(kernel));
  if (it != function_smem_limits().end()) limit = std::max(limit, it->second);
  if (config->dynamicSmemBytes > static_cast<size_t>(limit)) return cudaErrorInvalidValue;
  if (config->dynamicSmemBytes > emu::shared_capacity_bytes) emu::fail("harness shared buffer too small");
  ++emu::config().launches;
  emu::config().log.push_back("launch grid " + std::to_string(grid.x) + " smem " + std::to_string(config->dynamicSmemBytes));
  // Coerce once, like the real launcher (argument values copied at launch)
  auto launch = [&](Exp... coerced) {
    const unsigned threads = block.x * block.y * block.z;
    unsigned char* smem = reinterpret_cast<unsigned char*>(emu::shared_base);
    for (unsigned bz = 0; bz < grid.z; ++bz)
      for (unsigned by = 0; by < grid.y; ++by)
        for (unsigned bx = 0; bx < grid.x; ++bx) {
          // NaN-poison all of shared memory; bytes past the request must stay untouched
          std::memset(smem, 0xa5, emu::shared_capacity_bytes);
          for (size_t i = 0; i < emu::shared_capacity_bytes / 4; ++i) reinterpret_cast<uint32_t*>(smem)[i] = 0x7fa5a5a5u;
          emu::Block b;
          b.block_index = uint3{bx, by, bz};
          b.block_dim = block;
          b.grid_dim = grid;
          b.body = [&]() { kernel(coerced...); };
          emu::run_block(b, threads);
          ++emu::config().blocks_run;
          for (size_t i = config->dynamicSmemBytes / 4; i < emu::shared_capacity_bytes / 4; ++i)
            if (reinterpret_cast<uint32_t*>(smem)[i] != 0x7fa5a5a5u) emu::fail("write past the requested dynamic shared memory");
        }
  };
  launch(std::forward<Act>(args)...);
  return cudaSuccess;
}
