// embed_gpu_bench.cu: GPU parity checks and timings for embed.cu, sort_ids.cu
// and merge.cu (the same sources, included whole; launched with <<<>>> using
// the host plans documented in their headers). Not part of the crate build.
//
//   nvcc -arch=sm_90 -std=c++17 -O3 -Ikernels -o embed_gpu_bench kernels/test/embed_gpu_bench.cu
//   ./embed_gpu_bench parity | sanity | bench
#include "embed.cu"
#include "merge.cu"
#include "sort_ids.cu"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#define CK(x)                                                                              \
  do {                                                                                     \
    cudaError_t e_ = (x);                                                                  \
    if (e_ != cudaSuccess) {                                                               \
      std::printf("CUDA error %s at %s:%d: %s\n", cudaGetErrorString(e_), __FILE__, __LINE__, #x); \
      std::exit(3);                                                                        \
    }                                                                                      \
  } while (0)

static int g_fail = 0;
#define EXPECT(c, ...)                   \
  do {                                   \
    if (!(c)) {                          \
      ++g_fail;                          \
      std::printf("  FAIL: " __VA_ARGS__); \
      std::printf("\n");                 \
    }                                    \
  } while (0)

static int g_sms = 0;

template <class T>
struct H;
template <>
struct H<float> {
  static constexpr const char* name = "f32";
  static constexpr double eps = 1.0 / (1 << 22);
  static constexpr double tiny = 0;
  static float from(double x) { return float(x); }
  static double to(float x) { return x; }
};
template <>
struct H<__half> {
  static constexpr const char* name = "f16";
  static constexpr double eps = 1.0 / (1 << 10);
  static constexpr double tiny = 1.0 / (1 << 24);
  static __half from(double x) { return __float2half_rn(float(x)); }
  static double to(__half x) { return __half2float(x); }
};
template <>
struct H<__nv_bfloat16> {
  static constexpr const char* name = "bf16";
  static constexpr double eps = 1.0 / (1 << 7);
  static constexpr double tiny = 0;
  static __nv_bfloat16 from(double x) { return __float2bfloat16_rn(float(x)); }
  static double to(__nv_bfloat16 x) { return __bfloat162float(x); }
};

template <class T>
struct Dev {
  T* p = nullptr;
  size_t n = 0;
  explicit Dev(size_t n_) : n(n_) { CK(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T))); }
  Dev(const std::vector<T>& h) : Dev(h.size()) { up(h); }
  ~Dev() { cudaFree(p); }
  void up(const std::vector<T>& h) { CK(cudaMemcpy(p, h.data(), h.size() * sizeof(T), cudaMemcpyHostToDevice)); }
  std::vector<T> down() const {
    std::vector<T> h(n);
    CK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
  }
};

template <class T>
static std::vector<T> rnd(std::mt19937_64& g, size_t n, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = H<T>::from(u(g));
  return v;
}

static float time_ms(const std::function<void()>& f, int reps) {
  f();
  f();
  CK(cudaDeviceSynchronize());
  cudaEvent_t a, b;
  CK(cudaEventCreate(&a));
  CK(cudaEventCreate(&b));
  CK(cudaEventRecord(a));
  for (int i = 0; i < reps; ++i) f();
  CK(cudaEventRecord(b));
  CK(cudaEventSynchronize(b));
  float ms = 0;
  CK(cudaEventElapsedTime(&ms, a, b));
  CK(cudaGetLastError());
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return ms / reps;
}

// ------------------------------------------------------------- embed ----
using EmbedFn = void (*)(const EmbedForwardParams);

// Extra variants for the bench only: (RC, NC, S) choices of the same template.
#define BENCH_VAR(T, tn, RC, NC, S, MINB)                                                                       \
  extern "C" __global__ void __launch_bounds__(128, MINB) bench_##tn##_r##RC##_nc##NC##_s##S(const EmbedForwardParams p) { \
    embed_forward<T, RC, NC, S>(p);                                                                        \
  }
BENCH_VAR(__nv_bfloat16, bf16, 16, 4, 8, 4)
BENCH_VAR(__nv_bfloat16, bf16, 8, 8, 4, 4)
BENCH_VAR(float, f32, 32, 4, 8, 3)
struct Var {
  EmbedFn fn;
  int nc;
  const char* name;
};
#define V_(tn, RC, NC, S) Var{bench_##tn##_r##RC##_nc##NC##_s##S, NC, #tn "_r" #RC "_nc" #NC "_s" #S}
static std::vector<Var> extra_vars(const char* dt, int r) {
  const std::string t = dt;
  if (t == "bf16" && r <= 8) return {V_(bf16, 8, 8, 4)};
  if (t == "bf16" && r <= 16) return {V_(bf16, 16, 4, 8)};
  if (t == "f32" && r > 16 && r <= 32) return {V_(f32, 32, 4, 8)};
  return {};
}

template <class T>
struct EmbedPick {
  EmbedFn fn;
  int nc;
  const char* name;
};
static EmbedPick<float> pick_f32(int r) {
  if (r <= 8) return {tl_embed_forward_f32_r8, 4, "f32_r8"};
  if (r <= 16) return {tl_embed_forward_f32_r16, 4, "f32_r16"};
  if (r <= 32) return {tl_embed_forward_f32_r32, 4, "f32_r32"};
  return {tl_embed_forward_f32_r64, 2, "f32_r64"};
}
static EmbedPick<__half> pick_f16(int r) {
  if (r <= 8) return {tl_embed_forward_f16_r8, 8, "f16_r8"};
  if (r <= 16) return {tl_embed_forward_f16_r16, 8, "f16_r16"};
  if (r <= 32) return {tl_embed_forward_f16_r32, 2, "f16_r32"};
  return {tl_embed_forward_f16_r64, 2, "f16_r64"};
}
static EmbedPick<__nv_bfloat16> pick_bf16(int r) {
  if (r <= 8) return {tl_embed_forward_bf16_r8, 8, "bf16_r8"};
  if (r <= 16) return {tl_embed_forward_bf16_r16, 8, "bf16_r16"};
  if (r <= 32) return {tl_embed_forward_bf16_r32, 2, "bf16_r32"};
  return {tl_embed_forward_bf16_r64, 2, "bf16_r64"};
}
template <class T>
static EmbedPick<T> pick(int r);
template <>
EmbedPick<float> pick<float>(int r) { return pick_f32(r); }
template <>
EmbedPick<__half> pick<__half>(int r) { return pick_f16(r); }
template <>
EmbedPick<__nv_bfloat16> pick<__nv_bfloat16>(int r) { return pick_bf16(r); }

struct EmbedPlan {
  dim3 grid, block;
  int blocks_per_sm;
};
// The documented host rule; waves <= 0: one token row per thread-row (Gy = ceil(T / BY)).
static EmbedPlan embed_plan(EmbedFn fn, int nc, int T, int d, int by, double waves) {
  int bps = 0;
  CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&bps, fn, 32 * by, 0));
  const unsigned gx = unsigned(((d + nc - 1) / nc + 31) / 32);
  long long gy = (T + by - 1) / by;
  if (waves > 0) gy = std::min<long long>(gy, std::max<long long>(1, (long long)std::ceil(waves * g_sms * bps / gx)));
  gy = std::min<long long>(gy, 65535);
  return {dim3(gx, unsigned(gy)), dim3(32, by), bps};
}

template <class E>
static void parity_embed(int V, int d, int r, int T, bool misalign, uint64_t seed) {
  std::mt19937_64 g(seed);
  auto w = rnd<E>(g, size_t(V) * d, -1, 1);
  auto u = rnd<float>(g, size_t(V) * r, -1, 1);
  auto vh = rnd<float>(g, size_t(r) * d, -1, 1);
  std::vector<int> ids(T);
  std::uniform_int_distribution<int> di(0, V - 1);
  for (int t = 0; t < T; ++t) ids[t] = t % 11 == 4 ? -1 : di(g);
  Dev<E> dw(w);
  Dev<float> du(u), dvh(vh);
  Dev<int> dids(ids);
  Dev<E> dout(size_t(T) * d + 8);
  const float s = 0.37f, c = 1.5f;
  auto pk = pick<E>(r);
  auto plan = embed_plan(pk.fn, pk.nc, T, d, 4, 4.0);
  EmbedForwardParams p{dids.p, dw.p, du.p, dvh.p, dout.p + (misalign ? 1 : 0), nullptr, T, V, d, r, s, c, 4, 0};
  pk.fn<<<plan.grid, plan.block>>>(p);
  CK(cudaGetLastError());
  auto outall = dout.down();
  const E* out = outall.data() + (misalign ? 1 : 0);
  int bad = 0;
  double worst = 0;
  for (int t = 0; t < T; ++t)
    for (int k = 0; k < d; ++k) {
      const double got = H<E>::to(out[size_t(t) * d + k]);
      if (ids[t] < 0) {
        bad += !std::isnan(got);
        continue;
      }
      double acc = 0, mag = 0;
      for (int j = 0; j < r; ++j) {
        const double term = double(u[size_t(ids[t]) * r + j]) * vh[size_t(j) * d + k];
        acc += term;
        mag += std::fabs(term);
      }
      const double wv = H<E>::to(w[size_t(ids[t]) * d + k]);
      const double ref = c * (wv + s * acc);
      mag = c * (std::fabs(wv) + s * mag);
      const double err = std::fabs(got - ref);
      if (!(err <= H<E>::eps * std::fabs(ref) + H<E>::tiny + (r + 2) * std::ldexp(1.0, -23) * mag)) ++bad;
      worst = std::max(worst, err / mag);
    }
  EXPECT(bad == 0, "embed %s V=%d d=%d r=%d T=%d: %d bad", H<E>::name, V, d, r, T, bad);
  std::printf("  parity embed_forward %-8s V=%-6d d=%-5d r=%-3d T=%-5d%s grid (%u,%u) block (32,4): max err/|terms| %.2e %s\n",
              pk.name, V, d, r, T, misalign ? " misaligned" : "", plan.grid.x, plan.grid.y, worst, bad ? "FAIL" : "ok");
}

// ------------------------------------------------------------- sort ----
struct SortBufs {
  int n, V, passes, nblocks;
  Dev<int> keys, perm, tk, tv, hist;
  SortBufs(int n_, int V_)
      : n(n_), V(V_), passes((32 - __builtin_clz(unsigned(V_)) + 7) / 8), nblocks((n_ + TL_SORT_TILE - 1) / TL_SORT_TILE),
        keys(n_), perm(n_), tk(n_), tv(n_), hist(size_t(nblocks) * 256) {}
  void run(const int* ids) {
    const int* kin = ids;
    const int* vin = nullptr;
    for (int pass = 0; pass < passes; ++pass) {
      const bool fin = (passes - 1 - pass) % 2 == 0;
      int* ko = fin ? keys.p : tk.p;
      int* vo = fin ? perm.p : tv.p;
      SortPassParams p{kin, vin, ko, vo, hist.p, n, V, 8 * pass, nblocks};
      tl_sort_ids_hist<<<nblocks, 256>>>(p);
      tl_sort_ids_scan<<<1, 256>>>(p);
      tl_sort_ids_scatter<<<nblocks, 256>>>(p);
      kin = ko;
      vin = vo;
    }
  }
};

static std::vector<int> rand_ids(std::mt19937_64& g, int n, int V, int neg_every) {
  std::vector<int> v(n);
  std::uniform_int_distribution<int> di(0, V - 1);
  for (int i = 0; i < n; ++i) v[i] = (neg_every && i % neg_every == 5) ? -1 : di(g);
  return v;
}

static void parity_sort(const char* what, const std::vector<int>& ids, int V) {
  const int n = int(ids.size());
  Dev<int> dids(ids);
  SortBufs sb(n, V);
  sb.run(dids.p);
  CK(cudaGetLastError());
  auto k1 = sb.keys.down(), p1 = sb.perm.down();
  sb.run(dids.p);
  auto k2 = sb.keys.down(), p2 = sb.perm.down();
  std::vector<int> ref(n);
  for (int i = 0; i < n; ++i) ref[i] = i;
  auto key = [&](int t) { return ids[t] < 0 ? V : ids[t]; };
  std::stable_sort(ref.begin(), ref.end(), [&](int a, int b) { return key(a) < key(b); });
  bool ok = true;
  for (int i = 0; i < n; ++i) ok &= p1[i] == ref[i] && k1[i] == key(ref[i]);
  const bool det = k1 == k2 && p1 == p2;
  EXPECT(ok && det, "sort %s", what);
  std::printf("  parity sort_ids %-28s T=%-8d V=%-6d passes=%d: %s%s\n", what, n, V, sb.passes, ok ? "stable-exact" : "WRONG",
              det ? ", deterministic" : ", NONDETERMINISTIC");
}

// -------------------------------------------------------- group rows ----
template <class X>
static void group_launch(const GroupRowsParams& p, int by) {
  const long long nchunks = (p.n + TL_GROUP_CHUNK - 1) / TL_GROUP_CHUNK;
  dim3 grid((p.ncols + 31) / 32, unsigned((nchunks + by - 1) / by)), block(32, by);
  if constexpr (std::is_same_v<X, float>) tl_group_rows_partial_f32<<<grid, block>>>(p);
  else if constexpr (std::is_same_v<X, __half>) tl_group_rows_partial_f16<<<grid, block>>>(p);
  else tl_group_rows_partial_bf16<<<grid, block>>>(p);
  tl_group_rows_combine<<<grid, block>>>(p);
}

template <class X>
static void parity_group(const char* what, const std::vector<int>& ids, int V, int ncols, float scale, uint64_t seed) {
  std::mt19937_64 g(seed);
  const int n = int(ids.size());
  auto x = rnd<X>(g, size_t(n) * ncols, -1, 1);
  auto out0 = rnd<float>(g, size_t(V) * ncols, -1, 1);
  Dev<int> dids(ids);
  SortBufs sb(n, V);
  sb.run(dids.p);
  Dev<X> dx(x);
  Dev<float> dout(out0);
  const long long nchunks = (n + TL_GROUP_CHUNK - 1) / TL_GROUP_CHUNK;
  Dev<float> part(size_t(2 * nchunks * ncols));
  GroupRowsParams p{sb.keys.p, sb.perm.p, dx.p, dout.p, part.p, n, V, ncols, scale};
  group_launch<X>(p, 4);
  CK(cudaGetLastError());
  auto o1 = dout.down();
  dout.up(out0);
  group_launch<X>(p, 4);
  auto o2 = dout.down();
  std::vector<double> sum(size_t(V) * ncols, 0.0);
  for (int t = 0; t < n; ++t)
    if (ids[t] >= 0)
      for (int k = 0; k < ncols; ++k) sum[size_t(ids[t]) * ncols + k] += H<X>::to(x[size_t(t) * ncols + k]);
  double num = 0, den = 0;
  for (size_t i = 0; i < sum.size(); ++i) {
    const double ref = out0[i] + double(scale) * sum[i];
    num += (o1[i] - ref) * (o1[i] - ref);
    den += ref * ref;
  }
  const double rel = std::sqrt(num / den);
  const bool bit = std::memcmp(o1.data(), o2.data(), o1.size() * 4) == 0;
  EXPECT(rel <= 1e-6 && bit, "group %s rel %.3e bitwise %d", what, rel, bit);
  std::printf("  parity group_rows %-4s %-26s T=%-7d V=%-6d ncols=%-4d: rel err %.2e%s\n", H<X>::name, what, n, V, ncols, rel,
              bit ? ", bitwise deterministic" : ", NONDETERMINISTIC");
}

// -------------------------------------------------------------- merge ----
template <class T>
static void parity_merge(int V, int d, int r, uint64_t seed) {
  std::mt19937_64 g(seed);
  auto w0 = rnd<T>(g, size_t(V) * d, -2, 2);
  auto u = rnd<float>(g, size_t(V) * r, -1, 1);
  auto vh = rnd<float>(g, size_t(r) * d, -1, 1);
  Dev<T> dw(w0);
  Dev<float> du(u), dvh(vh);
  const float s = 0.25f;
  MergeParams p{dw.p, du.p, dvh.p, V, d, r, s, 0, 0};
  dim3 grid((d + 255) / 256, std::min((V + 7) / 8, 65535));
  auto launch = [&] {
    if constexpr (std::is_same_v<T, float>) tl_merge_f32<<<grid, 256>>>(p);
    else if constexpr (std::is_same_v<T, __half>) tl_merge_f16<<<grid, 256>>>(p);
    else tl_merge_bf16<<<grid, 256>>>(p);
  };
  launch();
  CK(cudaGetLastError());
  auto w1 = dw.down();
  p.subtract = 1;
  launch();
  auto w2 = dw.down();
  int bad = 0, badr = 0;
  for (int v = 0; v < V; ++v)
    for (int k = 0; k < d; ++k) {
      const size_t i = size_t(v) * d + k;
      double acc = 0;
      for (int j = 0; j < r; ++j) acc += double(u[size_t(v) * r + j]) * vh[size_t(j) * d + k];
      const double ref = H<T>::to(w0[i]) + s * acc, got = H<T>::to(w1[i]);
      bad += !(std::fabs(got - ref) <= H<T>::eps * std::fabs(ref) + 1e-5);
      const double a = H<T>::to(w0[i]), b = H<T>::to(w2[i]);
      badr += !(std::fabs(b - a) <= H<T>::eps * std::max(std::fabs(got), std::fabs(a)) + 1e-5);
    }
  EXPECT(bad == 0 && badr == 0, "merge %s", H<T>::name);
  std::printf("  parity merge %-4s V=%d d=%d r=%d: %s\n", H<T>::name, V, d, r, bad || badr ? "FAIL" : "ok");
}

// ------------------------------------------------------------- bench ----
// Gather-copy baseline: out[t] = W[ids[t]] with 16-byte vectors, grid-stride.
__global__ void gather_copy(const int* ids, const uint4* w, uint4* out, int T, int dv) {
  for (long long t = blockIdx.y; t < T; t += gridDim.y) {
    const int id = ids[t];
    for (int k = blockIdx.x * blockDim.x + threadIdx.x; k < dv; k += gridDim.x * blockDim.x)
      out[t * dv + k] = __ldg(w + (long long)id * dv + k);
  }
}

template <class E>
static void bench_embed(int V, int d, int r, int T, double copy_gbs) {
  std::mt19937_64 g(99);
  Dev<E> w(size_t(V) * d);
  CK(cudaMemset(w.p, 0x3c, w.n * sizeof(E)));
  auto u = rnd<float>(g, size_t(V) * r, -1, 1);
  auto vh = rnd<float>(g, size_t(r) * d, -1, 1);
  Dev<float> du(u), dvh(vh);
  Dev<int> dids(rand_ids(g, T, V, 0));
  Dev<E> out(size_t(T) * d);
  const double bytes = 2.0 * T * d * sizeof(E) + 4.0 * T * r + 4.0 * T;
  // Gather-copy of the same rows.
  const int dv = int(d * sizeof(E) / 16);
  const float gms = time_ms([&] { gather_copy<<<dim3((dv + 255) / 256, 8192), 256>>>(dids.p, (const uint4*)w.p, (uint4*)out.p, T, dv); }, 20);
  const double gather_gbs = 2.0 * T * d * sizeof(E) / gms / 1e6;
  std::printf("  %s V=%d d=%d r=%d T=%d: gather-copy %.1f us = %.0f GB/s\n", H<E>::name, V, d, r, T, gms * 1e3, gather_gbs);
  auto pk = pick<E>(r);
  std::vector<Var> vars{{pk.fn, pk.nc, pk.name}};
  for (const Var& v : extra_vars(H<E>::name, r)) vars.push_back(v);
  for (const Var& v : vars) {
    for (int by : {4}) {
      for (double waves : {2.0, 4.0, 8.0}) {
        auto plan = embed_plan(v.fn, v.nc, T, d, by, waves);
        EmbedForwardParams p{dids.p, w.p, du.p, dvh.p, out.p, nullptr, T, V, d, r, 0.5f, 1.0f, 4, 0};
        const float ms = time_ms([&] { v.fn<<<plan.grid, plan.block>>>(p); }, 20);
        const double gbs = bytes / ms / 1e6;
        std::printf("    %-13s BY=%d waves=%-3g grid (%u,%u) %d blk/SM: %8.1f us %6.0f GB/s = %3.0f%% of gather, %3.0f%% of D2D copy\n",
                    v.name, by, waves, plan.grid.x, plan.grid.y, plan.blocks_per_sm, ms * 1e3, gbs, 100 * gbs / gather_gbs,
                    100 * gbs / copy_gbs);
      }
    }
  }
}

static void bench_sort_group(int T, int V, bool all_equal) {
  std::mt19937_64 g(5);
  auto ids = all_equal ? std::vector<int>(T, 1234) : rand_ids(g, T, V, 0);
  Dev<int> dids(ids);
  SortBufs sb(T, V);
  const float sms = time_ms([&] { sb.run(dids.p); }, 10);
  // dU: ncols 16 f32; dW: ncols 2304 bf16 (T <= 65536 only).
  const long long nchunks = (T + 63) / 64;
  Dev<float> x16(size_t(T) * 16), out16(size_t(V) * 16), part16(size_t(2 * nchunks * 16));
  CK(cudaMemset(x16.p, 0, x16.n * 4));
  CK(cudaMemset(out16.p, 0, out16.n * 4));
  GroupRowsParams p{sb.keys.p, sb.perm.p, x16.p, out16.p, part16.p, T, V, 16, 1.0f};
  const float g4 = time_ms([&] { group_launch<float>(p, 4); }, 10);
  const float g8 = time_ms([&] { group_launch<float>(p, 8); }, 10);
  std::printf("  T=%-8d V=%d%s: sort %.1f us (%d passes); group_rows dU r=16: %.1f us (BY=4), %.1f us (BY=8)\n", T, V,
              all_equal ? " all-equal" : "", sms * 1e3, sb.passes, g4 * 1e3, g8 * 1e3);
  if (T <= 65536) {
    const int d = 2304;
    Dev<__nv_bfloat16> xw(size_t(T) * d);
    Dev<float> outw(size_t(V) * d), partw(size_t(2 * nchunks * d));
    CK(cudaMemset(xw.p, 0, xw.n * 2));
    CK(cudaMemset(outw.p, 0, outw.n * 4));
    GroupRowsParams q{sb.keys.p, sb.perm.p, xw.p, outw.p, partw.p, T, V, d, 1.0f};
    const float gw = time_ms([&] { group_launch<__nv_bfloat16>(q, 4); }, 10);
    const double bytes = 2.0 * T * d + 8.0 * T * d;  // x read + out RMW per token (upper bound)
    std::printf("           group_rows dW bf16 d=2304: %.1f us (%.0f GB/s counting x + out RMW per token)\n", gw * 1e3,
                bytes / gw / 1e6);
  }
}

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "parity";
  cudaDeviceProp prop;
  CK(cudaGetDeviceProperties(&prop, 0));
  g_sms = prop.multiProcessorCount;
  std::printf("device %s, %d SMs, mode %s\n", prop.name, g_sms, mode.c_str());
  std::mt19937_64 g(1);
  if (mode == "parity" || mode == "sanity") {
    const bool big = mode == "parity";
    parity_embed<float>(37, 29, 1, 13, false, 1);
    parity_embed<__half>(301, 72, 16, 50, true, 2);
    parity_embed<__nv_bfloat16>(301, 72, 64, 40, false, 3);
    parity_embed<__nv_bfloat16>(50, 33, 100, 11, false, 4);
    if (big) {
      for (int r : {1, 8, 16, 32, 64}) {
        parity_embed<float>(1000, 2304, r, 300, false, 10 + r);
        parity_embed<__half>(1000, 2304, r, 300, false, 20 + r);
        parity_embed<__nv_bfloat16>(1000, 2304, r, 300, false, 30 + r);
      }
      parity_embed<__nv_bfloat16>(500, 2050, 12, 200, false, 40);
    }
    parity_sort("random", rand_ids(g, big ? 1000000 : 9000, 256000, 0), 256000);
    parity_sort("random + negatives", rand_ids(g, big ? 300000 : 5000, 32000, 9), 32000);
    parity_sort("all equal", std::vector<int>(big ? 1000000 : 5000, 7), 256000);
    parity_sort("V=37", rand_ids(g, 5000, 37, 0), 37);
    parity_group<float>("dU random", rand_ids(g, big ? 200000 : 5000, 256000, 13), 256000, 16, 1.0f, 5);
    parity_group<float>("dU all equal", std::vector<int>(big ? 100000 : 3000, 3), 10, 16, 1.0f, 6);
    parity_group<__nv_bfloat16>("dW bf16", rand_ids(g, big ? 8192 : 1000, 3000, 0), 3000, big ? 2304 : 40, 1.5f, 7);
    parity_group<__half>("dW f16 heavy", std::vector<int>(3000, 2), 5, 72, 1.5f, 8);
    parity_merge<float>(301, 2304, 16, 9);
    parity_merge<__half>(37, 29, 3, 10);
    parity_merge<__nv_bfloat16>(301, 2304, 64, 11);
  }
  if (mode == "bench") {
    // Device-to-device copy baseline.
    const size_t nb = size_t(1) << 30;
    Dev<char> a(nb), b(nb);
    const float ms = time_ms([&] { CK(cudaMemcpyAsync(b.p, a.p, nb, cudaMemcpyDeviceToDevice)); }, 10);
    const double copy_gbs = 2.0 * nb / ms / 1e6;
    std::printf("D2D copy 1 GiB: %.0f GB/s (read + write)\n", copy_gbs);
    std::printf("embed_forward (bytes = 2 T d sizeof(T) + 4 T r + 4 T)\n");
    bench_embed<__nv_bfloat16>(256000, 2304, 8, 32768, copy_gbs);
    bench_embed<__nv_bfloat16>(256000, 2304, 16, 32768, copy_gbs);
    bench_embed<__nv_bfloat16>(256000, 2304, 32, 32768, copy_gbs);
    bench_embed<__nv_bfloat16>(256000, 2304, 64, 32768, copy_gbs);
    bench_embed<__nv_bfloat16>(128256, 4096, 16, 16384, copy_gbs);
    bench_embed<__half>(256000, 2304, 16, 32768, copy_gbs);
    bench_embed<float>(256000, 2304, 16, 32768, copy_gbs);
    bench_embed<float>(256000, 2304, 32, 32768, copy_gbs);
    bench_embed<float>(256000, 2304, 64, 32768, copy_gbs);
    bench_embed<float>(256000, 2304, 8, 32768, copy_gbs);
    bench_embed<__nv_bfloat16>(256000, 2304, 16, 8192, copy_gbs);
    std::printf("sort_ids + group_rows\n");
    bench_sort_group(8192, 256000, false);
    bench_sort_group(65536, 256000, false);
    bench_sort_group(1 << 20, 256000, false);
    bench_sort_group(8192, 256000, true);
    bench_sort_group(1 << 20, 256000, true);
    {
      Dev<__nv_bfloat16> w(size_t(256000) * 2304);
      Dev<float> u(size_t(256000) * 16), vh(16 * 2304);
      CK(cudaMemset(w.p, 0, w.n * 2));
      CK(cudaMemset(u.p, 0, u.n * 4));
      CK(cudaMemset(vh.p, 0, vh.n * 4));
      MergeParams p{w.p, u.p, vh.p, 256000, 2304, 16, 1.0f, 0, 0};
      const float mms = time_ms([&] { tl_merge_bf16<<<dim3(9, 32000), 256>>>(p); }, 3);
      std::printf("merge bf16 V=256000 d=2304 r=16: %.1f us (%.0f GB/s W read+write)\n", mms * 1e3,
                  2.0 * 256000 * 2304 * 2 / mms / 1e6);
    }
  }
  CK(cudaDeviceSynchronize());
  std::printf("%s: %d failures\n", mode.c_str(), g_fail);
  return g_fail ? 1 : 0;
}
