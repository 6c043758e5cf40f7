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
  Buffer& operator=(Buffer&& o) noexcept {
    if (this != &o) { if (p) emu::guarded_free(p); p = o.p; bytes = o.bytes; o.p = nullptr; }
    return *this;
  }
};

struct Result { std::vector<uint8_t> out; std::vector<float> sumsq; };

static int failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { ++failures; printf("  FAIL %s:%d: ", __FILE__, __LINE__); printf(__VA_ARGS__); printf("\n"); } } while (0)

static double tolerance(DType t) { return t == DType::Float32 ? 1e-5 : (t == DType::BFloat16 ? 1.6e-2 : 2e-3); }

// A case's inputs in the emulator's guarded buffers, and the forward call that reads them.
struct Problem {
  int64_t zs[3], xs[3], ws[2];
  Buffer z, x, w, b, inv, fisher, xscale, lengths, out, sumsq;
  int64_t out_stride = 0, out_elems = 0;
  FVAccumulateArgs a;
  double zv(int64_t n, int64_t i, int64_t j, DType t) const { return load_as(t, z.p, n * zs[0] + i * zs[1] + j * zs[2]); }
  double xv(int64_t n, int64_t i, int64_t c, DType t) const { return load_as(t, x.p, n * xs[0] + i * xs[1] + c * xs[2]); }
  double wv(int64_t c, int64_t j, DType t) const { return load_as(t, w.p, c * ws[0] + j * ws[1]); }
};

static void make_problem(const Case& k, Problem& q) {
  std::mt19937 rng(1234 + k.N * 7 + k.T * 13 + k.C * 17 + k.d);
  std::normal_distribution<float> normal(0.f, 1.f);
  std::uniform_real_distribution<float> uni(0.f, 1.f);
  const DType t = k.dtype;
  const size_t es = elem_size(t);
  const int64_t N = k.N, T = k.T, C = k.C, d = k.d;
  int64_t* zs = q.zs; int64_t* xs = q.xs; int64_t* ws = q.ws;
  if (k.z_transposed) { zs[0] = d * T; zs[1] = 1; zs[2] = T; } else { zs[0] = T * d; zs[1] = d; zs[2] = 1; }
  if (k.x_nchw) { xs[0] = C * T; xs[1] = 1; xs[2] = T; } else { xs[0] = T * C; xs[1] = C; xs[2] = 1; }
  if (k.w_transposed) { ws[0] = 1; ws[1] = C; } else { ws[0] = d; ws[1] = 1; }
  q.z = Buffer(N * T * d * es); q.x = Buffer(N * T * C * es);
  q.w = Buffer(C * d * es); q.b = Buffer(C * es); q.inv = Buffer(C * es);
  q.fisher = Buffer(k.fisher ? C * (d + 1) * es : 0); q.xscale = Buffer(k.x_scale ? N * T * es : 0);
  q.lengths = Buffer(k.lengths.empty() ? 0 : N * 8);
  q.out_stride = C * (d + 1) + k.out_pad;
  q.out_elems = N == 0 ? 0 : (N - 1) * q.out_stride + C * (d + 1);
  q.out = Buffer(q.out_elems * es);
  q.sumsq = Buffer(k.row_sumsq ? N * C * 4 : 0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t i = 0; i < T; ++i) {
      for (int64_t j = 0; j < d; ++j) store_as(t, q.z.p, n * zs[0] + i * zs[1] + j * zs[2], 0.7f * normal(rng));
      for (int64_t c = 0; c < C; ++c) store_as(t, q.x.p, n * xs[0] + i * xs[1] + c * xs[2], uni(rng));
      if (k.x_scale) store_as(t, q.xscale.p, n * T + i, 0.5f + uni(rng));
    }
  for (int64_t c = 0; c < C; ++c) {
    for (int64_t j = 0; j < d; ++j) store_as(t, q.w.p, c * ws[0] + j * ws[1], normal(rng) / std::sqrt(float(d)));
    store_as(t, q.b.p, c, 0.4f * normal(rng));
    store_as(t, q.inv.p, c, 0.5f + 1.5f * uni(rng));
    if (k.fisher) for (int64_t j = 0; j <= d; ++j) store_as(t, q.fisher.p, c * (d + 1) + j, 0.5f + uni(rng));
  }
  if (!k.lengths.empty()) std::memcpy(q.lengths.p, k.lengths.data(), N * 8);
  FVAccumulateArgs& a = q.a;
  a.num_sets = N; a.set_size = T; a.channels = C; a.latent = d; a.dtype = t;
  a.z = q.z.p; std::copy(zs, zs + 3, a.z_stride);
  a.x = q.x.p; std::copy(xs, xs + 3, a.x_stride);
  if (k.x_scale) { a.x_scale = q.xscale.p; a.x_scale_stride[0] = T; a.x_scale_stride[1] = 1; }
  a.dec_weight = q.w.p; std::copy(ws, ws + 2, a.w_stride);
  a.dec_bias = q.b.p; a.inv_sigma2 = q.inv.p;
  a.fisher_rsqrt = k.fisher ? q.fisher.p : nullptr;
  a.lengths = k.lengths.empty() ? nullptr : static_cast<const int64_t*>(q.lengths.p);
  a.out = q.out.p; a.out_stride_n = q.out_stride; a.signed_sqrt = k.signed_sqrt;
  a.row_sumsq = k.row_sumsq ? static_cast<float*>(q.sumsq.p) : nullptr;
}

static void run_case(const Case& k) {
  const DType t = k.dtype;
  const size_t es = elem_size(t);
  const int64_t N = k.N, T = k.T, C = k.C, d = k.d;
  Problem problem;
  make_problem(k, problem);
  FVAccumulateArgs& a = problem.a;
  const int64_t* zs = problem.zs; const int64_t* xs = problem.xs; const int64_t* ws = problem.ws;
  Buffer& z = problem.z; Buffer& x = problem.x; Buffer& w = problem.w; Buffer& b = problem.b;
  Buffer& inv = problem.inv; Buffer& fisher = problem.fisher; Buffer& xscale = problem.xscale;
  Buffer& out = problem.out; Buffer& sumsq = problem.sumsq;
  const int64_t out_stride = problem.out_stride, out_elems = problem.out_elems;
  if (out_elems) std::memset(out.p, 0xfe, out_elems * es);  // canary
  if (k.row_sumsq) std::memset(sumsq.p, 0xfe, N * C * 4);

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


// The backward (FVAccumulateBackwardArgs) against a float64 loop over the same (rounded) inputs: every gradient,
// every buffer poisoned first, three thread orders bit-identical.
static void run_backward_case(const Case& k) {
  const DType t = k.dtype;
  const size_t es = elem_size(t);
  const int64_t N = k.N, T = k.T, C = k.C, d = k.d;
  Problem q;
  make_problem(k, q);
  std::mt19937 rng(77 + k.N + k.T + k.C + k.d);
  std::normal_distribution<float> normal(0.f, 1.f);
  Buffer grad_out(N * C * (d + 1) * es);
  for (int64_t i = 0; i < N * C * (d + 1); ++i) store_as(t, grad_out.p, i, normal(rng));
  Buffer gz(N * T * d * es), gx(N * T * C * es), gs(k.x_scale ? N * T * es : 0), gw(C * d * es), gb(C * es),
      gi(C * es);
  fvk::FVAccumulateBackwardArgs a;
  a.forward = q.a;
  a.grad_out = grad_out.p; a.grad_out_stride_n = C * (d + 1);
  a.grad_z = gz.p; a.grad_x = gx.p; a.grad_x_scale = k.x_scale ? gs.p : nullptr;
  a.grad_weight = gw.p; a.grad_bias = gb.p; a.grad_inv_sigma2 = gi.p;
  Buffer* outputs[] = {&gz, &gx, &gs, &gw, &gb, &gi};
  emu::config().multiprocessors = k.sms;
  emu::config().optin_shared = k.optin;
  std::vector<std::vector<uint8_t>> runs;
  for (int order = 0; order < 3; ++order) {
    emu::config().order = order;
    for (Buffer* o : outputs) if (o->bytes) std::memset(o->p, 0xff, o->bytes);  // NaN: unwritten elements show
    fvk::fv_accumulate_backward_cuda(a, nullptr);
    std::vector<uint8_t> bytes;
    for (Buffer* o : outputs) bytes.insert(bytes.end(), static_cast<uint8_t*>(o->p), static_cast<uint8_t*>(o->p) + o->bytes);
    runs.push_back(bytes);
  }
  CHECK(runs[0] == runs[1] && runs[0] == runs[2], "backward result depends on thread order (race)");
  std::vector<double> rz(N * T * d, 0), rx(N * T * C, 0), rs(N * T, 0), rw(C * d, 0), rb(C, 0), ri(C, 0);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t len = k.lengths.empty() ? T : k.lengths[n];
    for (int64_t i = 0; i < len; ++i)
      for (int64_t c = 0; c < C; ++c) {
        auto h = [&](int64_t j) {
          double v = load_as(t, grad_out.p, (n * C + c) * (d + 1) + j);
          return k.fisher ? v * load_as(t, q.fisher.p, c * (d + 1) + j) : v;
        };
        double p = load_as(t, q.b.p, c), da = h(d);
        for (int64_t j = 0; j < d; ++j) { p += q.zv(n, i, j, t) * q.wv(c, j, t); da += q.zv(n, i, j, t) * h(j); }
        const double scale = k.x_scale ? load_as(t, q.xscale.p, n * T + i) : 1.0, xv = q.xv(n, i, c, t);
        const double s = load_as(t, q.inv.p, c), diff = p - xv * scale;
        const bool active = p > 0;
        const double r = active ? diff * s : 0, qq = active ? da * s : 0;
        for (int64_t j = 0; j < d; ++j) {
          rz[(n * T + i) * d + j] += r * h(j) + qq * q.wv(c, j, t);
          rw[c * d + j] += qq * q.zv(n, i, j, t);
        }
        rx[(n * T + i) * C + c] = -qq * scale;
        rs[n * T + i] -= qq * xv;
        rb[c] += qq;
        ri[c] += active ? da * diff : 0;
      }
  }
  const std::vector<double>* refs[] = {&rz, &rx, &rs, &rw, &rb, &ri};
  const char* names[] = {"grad_z", "grad_x", "grad_x_scale", "grad_weight", "grad_bias", "grad_inv_sigma2"};
  std::string report;
  for (int g = 0; g < 6; ++g) {
    if (!outputs[g]->bytes) continue;
    double err = 0, ref = 0;
    bool nan = false;
    for (size_t i = 0; i < refs[g]->size(); ++i) {
      const double got = load_as(t, outputs[g]->p, i);
      nan |= std::isnan(got);
      err = std::max(err, std::fabs(got - (*refs[g])[i]));
      ref = std::max(ref, std::fabs((*refs[g])[i]));
    }
    const double rel = ref > 0 ? err / ref : err;
    CHECK(!nan, "%s has unwritten elements", names[g]);
    CHECK(rel <= tolerance(t), "%s: max|err|/max|ref| = %.3g > %.3g", names[g], rel, tolerance(t));
    char line[96];
    snprintf(line, sizeof line, "%s %.1e ", names[g], rel);
    report += line;
  }
  printf("backward %-31s %s\n", k.name.c_str(), report.c_str());
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
  // The backward takes d ≤ 256 where its shared memory fits the device: not d = 256 on a 48 KB device
  {
    FVAccumulateArgs a; a.num_sets = 1; a.set_size = 4; a.channels = 8;
    emu::config().optin_shared = 49152;
    a.latent = 64; CHECK(fvk::fv_accumulate_backward_cuda_supported(a), "d = 64 fits 48 KB");
    a.latent = 256; CHECK(!fvk::fv_accumulate_backward_cuda_supported(a), "d = 256 needs more than 48 KB");
    emu::config().optin_shared = 232448;
    CHECK(fvk::fv_accumulate_backward_cuda_supported(a), "d = 256 fits 227 KB");
    a.latent = 257; CHECK(!fvk::fv_accumulate_backward_cuda_supported(a), "d = 257 is past the widest tile");
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
  // the backward, on every case whose d it takes
  for (auto& c : cases)
    if (c.d <= 256 && c.N * c.T * c.C * std::max<int64_t>(c.d, 1) < 400000 && (!only || c.name.find(only) != std::string::npos))
      run_backward_case(c);
  printf("%s: %d failure(s)\n", failures ? "FAILED" : "PASSED", failures);
  return failures ? 1 : 0;
}
