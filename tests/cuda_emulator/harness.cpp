// Runs csrc/cuda/fv_accumulate_cuda.cu on the CPU emulator and checks it against a float64 loop.
#include "cuda_runtime.h"

namespace fvk { namespace { alignas(4096) float4 shared_storage[256 * 1024 / sizeof(float4)]; } }
namespace emu {
float4* shared_base = fvk::shared_storage;
size_t shared_capacity_bytes = sizeof(fvk::shared_storage);
}

#include "cuda/fv_accumulate_cuda.cu"  // the real kernel source, compiled for the emulator

#include <cinttypes>
#include <iostream>

using fvk::DType;
using fvk::FVAccumulateArgs;

struct Case {
  std::string name;
  int64_t N, T, C, d;
  DType dtype = DType::Float32;
  std::vector<int64_t> lengths;  // empty: null
  bool x_nchw = false, z_transposed = false, w_transposed = false;
  bool x_scale = false, fisher = false, signed_sqrt = false, row_sumsq = false;
  int64_t out_pad = 0;
  int sms = 132, optin = 232448;
};

static size_t elem_size(DType t) { return t == DType::Float32 ? 4 : 2; }
static void store_as(DType t, void* base, int64_t i, float v) {
  if (t == DType::Float32) static_cast<float*>(base)[i] = v;
  else if (t == DType::BFloat16) static_cast<__nv_bfloat16*>(base)[i] = __float2bfloat16_rn(v);
  else static_cast<__half*>(base)[i] = __float2half_rn(v);
}
static double load_as(DType t, const void* base, int64_t i) {
  if (t == DType::Float32) return static_cast<const float*>(base)[i];
  if (t == DType::BFloat16) return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
  return __half2float(static_cast<const __half*>(base)[i]);
}

struct Buffer {
  void* p = nullptr;
  size_t bytes = 0;
  Buffer() = default;
  explicit Buffer(size_t b) : bytes(b) { p = b ? emu::guarded_alloc(b) : nullptr; }
  ~Buffer() { if (p) emu::guarded_free(p); }
  Buffer(const Buffer&) = delete;
  Buffer(Buffer&& o) noexcept : p(o.p), bytes(o.bytes) { o.p = nullptr; }
};

struct Result { std::vector<uint8_t> out; std::vector<float> sumsq; };

static int failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { ++failures; printf("  FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static double tolerance(DType t) { return t == DType::Float32 ? 1e-5 : (t == DType::BFloat16 ? 1.6e-2 : 2e-3); }

static void run_case(const Case& k) {
  std::mt19937 rng(1234 + k.N * 7 + k.T * 13 + k.C * 17 + k.d);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  const DType t = k.dtype;
  const size_t es = elem_size(t);
  const int64_t N = k.N, T = k.T, C = k.C, d = k.d;

  // z (N, T, d)
  int64_t zs[3];
  if (k.z_transposed) { zs[0] = d * T; zs[1] = 1; zs[2] = T; } else { zs[0] = T * d; zs[1] = d; zs[2] = 1; }
  Buffer z(N * T * d * es);
  int64_t xs[3];
  if (k.x_nchw) { xs[0] = C * T; xs[1] = 1; xs[2] = T; } else { xs[0] = T * C; xs[1] = C; xs[2] = 1; }
  Buffer x(N * T * C * es);
  int64_t ws[2];
  if (k.w_transposed) { ws[0] = 1; ws[1] = C; } else { ws[0] = d; ws[1] = 1; }
  Buffer w(C * d * es), b(C * es), inv(C * es), fisher(k.fisher ? C * (d + 1) * es : 0);
  Buffer xscale(k.x_scale ? N * T * es : 0);
  Buffer lengths(k.lengths.empty() ? 0 : N * 8);
  const int64_t out_stride = C * (d + 1) + k.out_pad;
  const int64_t out_elems = N == 0 ? 0 : (N - 1) * out_stride + C * (d + 1);
  Buffer out(out_elems * es);
  Buffer sumsq(k.row_sumsq ? N * C * 4 : 0);

  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t j = 0; j < d; ++j) store_as(t, z.p, n * zs[0] + i * zs[1] + j * zs[2], 0.7f * normal(rng));
      for (int64_t c = 0; c < C; ++c) store_as(t, x.p, n * xs[0] + i * xs[1] + c * xs[2], uni(rng));
      if (k.x_scale) store_as(t, xscale.p, n * T + i, 0.5f + uni(rng));
    }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < d; ++j) store_as(t, w.p, c * ws[0] + j * ws[1], normal(rng) / std::sqrt(float(d)));
    store_as(t, b.p, c, 0.4f * normal(rng));
    store_as(t, inv.p, c, 0.5f + 1.5f * uni(rng));
    if (k.fisher) for (int64_t j = 0; j <= d; ++j) store_as(t, fisher.p, c * (d + 1) + j, 0.5f + uni(rng));
  }
  if (!k.lengths.empty()) std::memcpy(lengths.p, k.lengths.data(), N * 8);
  if (out_elems) std::memset(out.p, 0xfe, out_elems * es);  // canary
  if (k.row_sumsq) std::memset(sumsq.p, 0xfe, N * C * 4);

  FVAccumulateArgs a;
  a.num_sets = N; a.set_size = T; a.channels = C; a.latent = d; a.dtype = t;
  a.z = z.p; std::copy(zs, zs + 3, a.z_stride);
  a.x = x.p; std::copy(xs, xs + 3, a.x_stride);
  if (k.x_scale) { a.x_scale = xscale.p; a.x_scale_stride[0] = T; a.x_scale_stride[1] = 1; }
  a.dec_weight = w.p; std::copy(ws, ws + 2, a.w_stride);
  a.dec_bias = b.p; a.inv_sigma2 = inv.p;
  a.fisher_rsqrt = k.fisher ? fisher.p : nullptr;
  a.lengths = k.lengths.empty() ? nullptr : static_cast<const int64_t*>(lengths.p);
  a.out = out.p; a.out_stride_n = out_stride; a.signed_sqrt = k.signed_sqrt;
  a.row_sumsq = k.row_sumsq ? static_cast<float*>(sumsq.p) : nullptr;

  emu::config().multiprocessors = k.sms;
  emu::config().optin_shared = k.optin;
  // The caller's scratch, as the Python launcher allocates it: exactly the size asked for, between guard pages.
  const int64_t workspace_floats = fvk::fv_accumulate_cuda_workspace_floats(a);
  Buffer workspace(workspace_floats * sizeof(float));
  if (workspace_floats > 0) {
    a.workspace_floats = workspace_floats - 1;
    bool refused = false;
    try { fvk::fv_accumulate_cuda(a, nullptr); } catch (const std::invalid_argument&) { refused = true; }
    CHECK(refused, "a workspace one float short must be refused");
  }
  a.workspace = static_cast<float*>(workspace.p);
  a.workspace_floats = workspace_floats;
  std::vector<Result> results;
  for (int order = 0; order < 3; ++order) {
    emu::config().order = order;
    emu::config().log.clear();
    if (out_elems) std::memset(out.p, 0xfe, out_elems * es);
    if (k.row_sumsq) std::memset(sumsq.p, 0xfe, N * C * 4);
    if (workspace_floats) std::memset(workspace.p, 0xff, workspace_floats * sizeof(float));  // NaN: unwritten reads show
    fvk::fv_accumulate_cuda(a, nullptr);
    Result r;
    r.out.assign(static_cast<uint8_t*>(out.p), static_cast<uint8_t*>(out.p) + out_elems * es);
    if (k.row_sumsq) r.sumsq.assign(static_cast<float*>(sumsq.p), static_cast<float*>(sumsq.p) + N * C);
    results.push_back(r);
  }
  std::string log = "workspace " + std::to_string(workspace_floats) + " floats; ";
  for (auto& l : emu::config().log) log += l + "; ";
  CHECK(results[0].out == results[1].out && results[0].out == results[2].out, "result depends on thread order (race)");
  CHECK(results[0].sumsq == results[1].sumsq && results[0].sumsq == results[2].sumsq, "row_sumsq depends on thread order");

  // reference
  double max_err = 0, max_ref = 0, max_sumsq_err = 0;
  bool canary_ok = true, unwritten = false;
  for (int64_t n = 0; n < N; ++n) {
    const int64_t len = k.lengths.empty() ? T : k.lengths[n];
    std::vector<double> G(C * (d + 1), 0.0);
    for (int64_t i = 0; i < len; ++i)
      for (int64_t c = 0; c < C; ++c) {
        double p = load_as(t, b.p, c);
        for (int64_t j = 0; j < d; ++j) p += load_as(t, z.p, n * zs[0] + i * zs[1] + j * zs[2]) * load_as(t, w.p, c * ws[0] + j * ws[1]);
        double xh = load_as(t, x.p, n * xs[0] + i * xs[1] + c * xs[2]);
        if (k.x_scale) xh *= load_as(t, xscale.p, n * T + i);
        const double r = p > 0 ? (p - xh) * load_as(t, inv.p, c) : 0.0;
        for (int64_t j = 0; j < d; ++j) G[c * (d + 1) + j] += r * load_as(t, z.p, n * zs[0] + i * zs[1] + j * zs[2]);
        G[c * (d + 1) + d] += r;
      }
    for (int64_t c = 0; c < C; ++c) {
      double row_sq = 0;
      for (int64_t j = 0; j <= d; ++j) {
        double v = G[c * (d + 1) + j];
        if (k.fisher) v *= load_as(t, fisher.p, c * (d + 1) + j);
        const int64_t o = n * out_stride + c * (d + 1) + j;
        const double got = load_as(t, out.p, o);
        if (std::isnan(got)) unwritten = true;
        // signed sqrt magnifies the error of values near 0 without bound: compare before it (and
        // check the sqrt itself separately)
        const double got_linear = k.signed_sqrt ? std::copysign(got * got, got) : got;
        max_err = std::max(max_err, std::fabs(got_linear - v));
        max_ref = std::max(max_ref, std::fabs(v));

        row_sq += got * got;
      }
      if (k.row_sumsq) {
        const double s = static_cast<float*>(sumsq.p)[n * C + c];
        max_sumsq_err = std::max(max_sumsq_err, std::fabs(s - row_sq) / std::max(row_sq, 1e-30));
        if (std::isnan(s)) unwritten = true;
      }
    }
    if (n + 1 < N)
      for (int64_t o = n * out_stride + C * (d + 1); o < (n + 1) * out_stride; ++o)
        for (size_t byte = 0; byte < es; ++byte) canary_ok &= static_cast<uint8_t*>(out.p)[o * es + byte] == 0xfe;
  }
  if (getenv("VERBOSE")) for (int64_t c = 0; c < C; ++c) printf("  b[%ld]=%g\n", (long)c, load_as(t, b.p, c));
  bool any_valid = N * T * C >= 4;
  if (!k.lengths.empty()) any_valid = any_valid && *std::max_element(k.lengths.begin(), k.lengths.end()) > 0;
  CHECK(!any_valid || max_ref > 0, "vacuous case: the reference is all zero");
  const double rel = max_ref > 0 ? max_err / max_ref : max_err;
  CHECK(!unwritten, "some outputs were never written (canary NaN)");
  CHECK(canary_ok, "padding between sets was overwritten");
  CHECK(rel <= tolerance(t), "max|err|/max|ref| = %.3g > %.3g", rel, tolerance(t));
  CHECK(max_sumsq_err <= (t == DType::Float32 ? 1e-5 : 1e-3), "row_sumsq rel err %.3g", max_sumsq_err);
  printf("%-40s rel err %.2e (max|ref| %.3g) sumsq %.1e | %s\n", k.name.c_str(), rel, max_ref, max_sumsq_err, log.c_str());
  fflush(stdout);
}

int main(int argc, char** argv) {
  emu::config().guard_before = argc > 1 && std::string(argv[1]) == "before";
  // Float64 is refused with a message naming the torch backend
  {
    FVAccumulateArgs a; a.num_sets = 1; a.dtype = DType::Float64;
    bool threw = false;
    try { fvk::fv_accumulate_cuda(a, nullptr); } catch (const std::invalid_argument& e) {
      threw = std::string(e.what()).find("\"torch\"") != std::string::npos; printf("float64: %s\n", e.what()); }
    CHECK(threw, "float64 must throw invalid_argument naming the torch backend");
  }
  std::vector<Case> cases;
  auto add = [&](Case c) { cases.push_back(c); };
  const DType f32 = DType::Float32, bf16 = DType::BFloat16, f16 = DType::Float16;
  add({"empty N=0", 0, 5, 7, 3});
  add({"empty C=0", 2, 5, 0, 3});
  add({"T=0 (all zero out, sumsq)", 2, 0, 5, 4, f32, {}, false, false, false, false, true, true, true});
  add({"d=1 C=1 T=1", 1, 1, 1, 1});
  add({"d=1 C=3 T=2", 1, 2, 3, 1});
  add({"d=0 (bias column only)", 2, 9, 13, 0, f32, {}, false, false, false, false, false, false, true});
  add({"odd 3x37x70x33 lengths", 3, 37, 70, 33, f32, {37, 0, 13}});
  add({"odd fisher+sqrt+sumsq pad", 3, 37, 70, 33, f32, {5, 37, 32}, false, false, false, true, true, true, true, 3});
  add({"NCHW x, z^T, W^T, x_scale", 2, 45, 66, 40, f32, {45, 33}, true, true, true, true, true, false, true});
  add({"tile 128: d=100", 2, 40, 129, 100, f32, {}, false, false, false, false, true, true, true});
  add({"tile 256: d=255", 1, 70, 64, 255, f32, {}, false, false, false, false, true, true, true, 1});
  add({"tile 256: d=256 NCHW", 1, 33, 65, 256, f32, {33}, true, false, false, true, false, false, true});
  add({"2 latent tiles d=300 (tile sums)", 2, 40, 70, 300, f32, {40, 17}, false, false, false, false, true, true, true});
  add({"2 latent tiles d=300 no sumsq", 1, 40, 30, 300, f32});
  add({"small optin: d=200 -> tile 128 x2", 1, 50, 64, 200, f32, {}, false, false, false, false, true, false, true, 0, 132, 101376});
  add({"split T=600", 1, 600, 64, 16, f32, {}, false, false, false, false, true, true, true});
  add({"split T=600 lengths", 2, 600, 40, 20, f32, {600, 201}, true, false, false, true, false, false, true});
  add({"split + 2 latent tiles d=260", 1, 300, 20, 260, f32, {290}, false, false, false, false, true, true, true});
  add({"split len 0 set", 2, 500, 10, 8, f32, {0, 500}, false, false, false, false, false, false, true});
  add({"bf16 odd", 3, 37, 70, 33, bf16, {37, 0, 13}, false, false, false, true, true, true, true, 2});
  add({"f16 odd NCHW", 2, 45, 66, 40, f16, {45, 33}, true, true, true, true, true, false, true});
  add({"bf16 split", 1, 400, 64, 64, bf16, {}, false, false, false, false, true, true, true});
  add({"f16 tile 256", 1, 40, 64, 200, f16, {}, false, false, false, false, true, true, true});
  add({"realistic-ish d=255 fisher sqrt", 2, 196, 130, 255, f32, {196, 150}, false, false, false, false, true, true, true});
  add({"d=255 z^T W^T NCHW x_scale", 2, 50, 70, 255, f32, {50, 31}, true, true, true, true, true, false, true});
  add({"bf16 d=300 z^T split", 1, 300, 70, 300, bf16, {}, false, true, false, false, true, true, true});
  add({"occupancy 1/SM, 8 SMs", 3, 200, 64, 64, f32, {200, 64, 129}, false, false, false, false, false, false, true, 0, 8});
  // random shapes, layouts and options
  std::mt19937 fuzz(99);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(fuzz); };
  for (int i = 0; i < 40; ++i) {
    Case c;
    c.N = pick(1, 3); c.T = pick(0, 1) ? pick(1, 70) : pick(100, 400); c.C = pick(1, 140);
    const int dk = pick(0, 3);
    c.d = dk == 0 ? pick(0, 40) : dk == 1 ? pick(41, 130) : dk == 2 ? pick(131, 256) : pick(257, 330);
    c.dtype = static_cast<DType>(std::vector<int>{0, 2, 3}[pick(0, 2)]);
    if (pick(0, 1)) for (int64_t n = 0; n < c.N; ++n) c.lengths.push_back(pick(0, 3) ? pick(0, (int)c.T) : c.T);
    c.x_nchw = pick(0, 1); c.z_transposed = pick(0, 1); c.w_transposed = pick(0, 1);
    c.x_scale = pick(0, 1); c.fisher = pick(0, 1); c.signed_sqrt = pick(0, 1); c.row_sumsq = pick(0, 1);
    c.out_pad = pick(0, 2); c.sms = pick(0, 1) ? 132 : pick(1, 16); c.optin = pick(0, 3) ? 232448 : 101376;
    c.name = "fuzz " + std::to_string(i) + " N" + std::to_string(c.N) + " T" + std::to_string(c.T) + " C" +
             std::to_string(c.C) + " d" + std::to_string(c.d) + " dt" + std::to_string((int)c.dtype);
    if (c.N * c.T * c.C * std::max<int64_t>(c.d, 1) < 3000000) add(c);
  }
  const char* only = argc > 2 ? argv[2] : nullptr;
  for (auto& c : cases) if (!only || c.name.find(only) != std::string::npos) run_case(c);
  printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
