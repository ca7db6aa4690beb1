// embed_cpu_test.cpp: runs the embedding kernels (embed.cu, sort_ids.cu,
// merge.cu) on the CPU shim and checks them against double-precision loops.
// Build and run: bash kernels/test/run.sh
//
// The launches below replay the host launch sequences documented in the .cu
// headers (grids, blocks, pass order, scratch sizes), so they double as the
// reference for the Rust host side.
#include <cinttypes>
#include <functional>
#include <random>
#include <string>

#include "embed_params.h"

#define TL_DECL(name) \
  extern "C" int name(unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, const void*);
#define TL_DECL_EMBED(dt) \
  TL_DECL(tl_embed_forward_##dt##_r8) TL_DECL(tl_embed_forward_##dt##_r16) TL_DECL(tl_embed_forward_##dt##_r32) TL_DECL(tl_embed_forward_##dt##_r64)
TL_DECL_EMBED(f32)
TL_DECL_EMBED(f16)
TL_DECL_EMBED(bf16)
TL_DECL(tl_group_rows_partial_f32)
TL_DECL(tl_group_rows_partial_f16)
TL_DECL(tl_group_rows_partial_bf16)
TL_DECL(tl_group_rows_combine)
TL_DECL(tl_sort_ids_hist)
TL_DECL(tl_sort_ids_scan)
TL_DECL(tl_sort_ids_scatter)
TL_DECL(tl_merge_f32)
TL_DECL(tl_merge_f16)
TL_DECL(tl_merge_bf16)

using Kernel = int (*)(unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, const void*);

static int g_failures = 0;
static int g_checks = 0;

#define CHECK(cond, ...)                                       \
  do {                                                         \
    ++g_checks;                                                \
    if (!(cond)) {                                             \
      ++g_failures;                                            \
      std::printf("  FAIL %s:%d: ", __FILE__, __LINE__);       \
      std::printf(__VA_ARGS__);                                \
      std::printf("\n");                                       \
    }                                                          \
  } while (0)

static void launch(Kernel k, const char* name, unsigned gx, unsigned gy, unsigned bx, unsigned by, const void* p) {
  const int rc = k(gx, gy, 1, bx, by, 1, 0, p);
  if (rc != TL_SHIM_OK) {
    std::printf("launch %s (%u,%u)x(%u,%u) failed: %d\n", name, gx, gy, bx, by, rc);
    std::exit(2);
  }
}
#define LAUNCH(k, gx, gy, bx, by, p) launch(k, #k, gx, gy, bx, by, &(p))

// ------------------------------------------------------------- dtypes ----
template <class T>
struct Dt;
template <>
struct Dt<float> {
  static constexpr const char* name = "f32";
  static constexpr double eps = 1.0 / (1 << 22);  // 2 ulp of f32 (relative)
  static constexpr double tiny = 0;
  static float from(double x) { return static_cast<float>(x); }
  static double to(float x) { return x; }
  static constexpr Kernel embed[4] = {tl_embed_forward_f32_r8, tl_embed_forward_f32_r16, tl_embed_forward_f32_r32,
                                      tl_embed_forward_f32_r64};
  static constexpr int nc[4] = {4, 4, 4, 2};
  static constexpr Kernel group = tl_group_rows_partial_f32;
  static constexpr Kernel merge = tl_merge_f32;
};
template <>
struct Dt<__half> {
  static constexpr const char* name = "f16";
  static constexpr double eps = 1.0 / (1 << 10);  // 1 ulp of f16 (relative, normal range)
  static constexpr double tiny = 1.0 / (1 << 24);  // f16 subnormal spacing
  static __half from(double x) { return __float2half_rn(static_cast<float>(x)); }
  static double to(__half x) { return __half2float(x); }
  static constexpr Kernel embed[4] = {tl_embed_forward_f16_r8, tl_embed_forward_f16_r16, tl_embed_forward_f16_r32,
                                      tl_embed_forward_f16_r64};
  static constexpr int nc[4] = {8, 8, 2, 2};
  static constexpr Kernel group = tl_group_rows_partial_f16;
  static constexpr Kernel merge = tl_merge_f16;
};
template <>
struct Dt<__nv_bfloat16> {
  static constexpr const char* name = "bf16";
  static constexpr double eps = 1.0 / (1 << 7);  // 1 ulp of bf16 (relative)
  static constexpr double tiny = 0;
  static __nv_bfloat16 from(double x) { return __float2bfloat16_rn(static_cast<float>(x)); }
  static double to(__nv_bfloat16 x) { return __bfloat162float(x); }
  static constexpr Kernel embed[4] = {tl_embed_forward_bf16_r8, tl_embed_forward_bf16_r16, tl_embed_forward_bf16_r32,
                                      tl_embed_forward_bf16_r64};
  static constexpr int nc[4] = {8, 8, 2, 2};
  static constexpr Kernel group = tl_group_rows_partial_bf16;
  static constexpr Kernel merge = tl_merge_bf16;
};

template <class T>
static std::vector<T> rand_vec(std::mt19937_64& g, size_t n, double lo, double hi) {
  std::uniform_real_distribution<double> u(lo, hi);
  std::vector<T> v(n);
  for (auto& x : v) x = Dt<T>::from(u(g));
  return v;
}

static std::vector<float> rand_f32(std::mt19937_64& g, size_t n, double lo, double hi) { return rand_vec<float>(g, n, lo, hi); }

// ------------------------------------------------------- embed_forward ----
// Host plan (embed.cu header): variant = smallest RC >= r (r64 beyond 64),
// block (32, BY), grid (ceil(ceil(d / NC) / 32), Gy).
template <class T>
static void run_embed(const std::vector<int>& ids, const T* w, const float* u, const float* vh, T* out, int V, int d,
                      int r, float s, float c, unsigned by, unsigned gy_cap) {
  const int vi = r <= 8 ? 0 : r <= 16 ? 1 : r <= 32 ? 2 : 3;
  const int nc = Dt<T>::nc[vi];
  const int T_ = static_cast<int>(ids.size());
  EmbedForwardParams p{ids.data(), w, u, vh, out, nullptr, T_, V, d, r, s, c, 4, 0};  // negative ids read as u32 are >= V: NaN rows
  const unsigned gx = static_cast<unsigned>(((d + nc - 1) / nc + 31) / 32);
  const unsigned gy = std::max(1u, std::min<unsigned>((T_ + by - 1) / by, gy_cap));
  launch(Dt<T>::embed[vi], "tl_embed_forward", gx, gy, 32, by, &p);
}

template <class T>
static void test_embed(int V, int d, int r, int T_, unsigned by, unsigned gy_cap, int misalign, bool negatives,
                       uint64_t seed) {
  std::mt19937_64 g(seed);
  auto w = rand_vec<T>(g, static_cast<size_t>(V) * d, -1, 1);
  auto u = rand_f32(g, static_cast<size_t>(V) * r, -1, 1);
  auto vh = rand_f32(g, static_cast<size_t>(r) * d, -1, 1);
  std::vector<int> ids(T_);
  std::uniform_int_distribution<int> di(0, V - 1);
  for (int t = 0; t < T_; ++t) ids[t] = (negatives && t % 7 == 3) ? -1 - (t % 2) : di(g);
  if (T_ > 2) ids[T_ - 1] = V - 1;
  const float s = 0.37f, c = 1.5f;
  // Output buffer with an optional element offset (misaligned packs -> scalar path).
  std::vector<T> obuf(static_cast<size_t>(T_) * d + 8, Dt<T>::from(123.0));
  T* out = obuf.data() + misalign;
  run_embed<T>(ids, w.data(), u.data(), vh.data(), out, V, d, r, s, c, by, gy_cap);
  double max_err = 0;
  int bad = 0;
  for (int t = 0; t < T_; ++t) {
    for (int k = 0; k < d; ++k) {
      const double got = Dt<T>::to(out[static_cast<size_t>(t) * d + k]);
      if (ids[t] < 0) {
        if (!std::isnan(got)) ++bad;
        continue;
      }
      double acc = 0, mag = 0;
      for (int j = 0; j < r; ++j) {
        const double term = static_cast<double>(u[static_cast<size_t>(ids[t]) * r + j]) * vh[static_cast<size_t>(j) * d + k];
        acc += term;
        mag += std::fabs(term);
      }
      const double wv = Dt<T>::to(w[static_cast<size_t>(ids[t]) * d + k]);
      const double ref = c * (wv + s * acc);
      mag = c * (std::fabs(wv) + s * mag);  // scale of the f32 rounding errors
      const double err = std::fabs(got - ref);
      // f32 accumulation (r + 2 roundings) plus one rounding to T.
      const double tol = Dt<T>::eps * std::fabs(ref) + Dt<T>::tiny + (r + 2) * std::ldexp(1.0, -23) * mag;
      if (!(err <= tol)) ++bad;
      max_err = std::max(max_err, err / mag);
    }
  }
  // Guard elements around the output are untouched.
  bool guards = true;
  for (int i = 0; i < misalign; ++i) guards &= Dt<T>::to(obuf[i]) == 123.0;
  for (size_t i = static_cast<size_t>(T_) * d + misalign; i < obuf.size(); ++i) guards &= Dt<T>::to(obuf[i]) == 123.0;
  CHECK(bad == 0 && guards, "embed %s V=%d d=%d r=%d T=%d by=%u misalign=%d: %d bad elements, guards %d", Dt<T>::name,
        V, d, r, T_, by, misalign, bad, guards);
  std::printf("  embed_forward %-4s V=%-6d d=%-4d r=%-3d T=%-5d BY=%u Gy<=%u%s%s: max err/|terms| %.2e %s\n",
              Dt<T>::name, V, d, r, T_, by, gy_cap, misalign ? " misaligned" : "", negatives ? " neg-ids" : "",
              max_err, bad == 0 && guards ? "ok" : "FAIL");
}

// ------------------------------------------------------------- sort ----
// Host sequence (sort_ids.cu header). Returns (keys, perm).
static void run_sort(const std::vector<int>& ids, int V, std::vector<int>& keys, std::vector<int>& perm) {
  const int n = static_cast<int>(ids.size());
  keys.assign(n, -7);
  perm.assign(n, -7);
  if (n == 0) return;
  const int bits = 32 - std::countl_zero(static_cast<unsigned>(V));
  const int passes = (bits + TL_SORT_RADIX_BITS - 1) / TL_SORT_RADIX_BITS;
  const int nblocks = (n + TL_SORT_TILE - 1) / TL_SORT_TILE;
  std::vector<int> tk(n, -9), tv(n, -9), hist(static_cast<size_t>(nblocks) << TL_SORT_RADIX_BITS, -9);
  const int* kin = ids.data();
  const int* vin = nullptr;
  for (int pass = 0; pass < passes; ++pass) {
    const bool to_final = (passes - 1 - pass) % 2 == 0;
    int* kout = to_final ? keys.data() : tk.data();
    int* vout = to_final ? perm.data() : tv.data();
    SortPassParams p{kin, vin, kout, vout, hist.data(), n, V, TL_SORT_RADIX_BITS * pass, nblocks};
    LAUNCH(tl_sort_ids_hist, nblocks, 1, TL_SORT_THREADS, 1, p);
    LAUNCH(tl_sort_ids_scan, 1, 1, TL_SORT_THREADS, 1, p);
    LAUNCH(tl_sort_ids_scatter, nblocks, 1, TL_SORT_THREADS, 1, p);
    kin = kout;
    vin = vout;
  }
}

static void test_sort(const char* what, const std::vector<int>& ids, int V) {
  const int n = static_cast<int>(ids.size());
  std::vector<int> keys, perm, keys2, perm2;
  run_sort(ids, V, keys, perm);
  run_sort(ids, V, keys2, perm2);
  // Reference: std::stable_sort of positions by mapped key.
  std::vector<int> ref(n);
  for (int i = 0; i < n; ++i) ref[i] = i;
  auto key = [&](int t) { return ids[t] < 0 ? V : ids[t]; };
  std::stable_sort(ref.begin(), ref.end(), [&](int a, int b) { return key(a) < key(b); });
  bool ok = true;
  for (int i = 0; i < n; ++i) ok &= perm[i] == ref[i] && keys[i] == key(ref[i]);
  const bool det = keys == keys2 && perm == perm2;
  int nseg = 0;
  for (int i = 0; i < n; ++i) nseg += keys[i] < V && (i == 0 || keys[i] != keys[i - 1]);
  CHECK(ok, "sort %s: differs from std::stable_sort", what);
  CHECK(det, "sort %s: two runs differ", what);
  std::printf("  sort_ids %-34s T=%-6d V=%-6d segments=%-5d %s%s\n", what, n, V, nseg, ok ? "stable-exact" : "WRONG",
              det ? ", deterministic" : ", NONDETERMINISTIC");
}

// -------------------------------------------------------- group rows ----
template <class X>
static std::vector<float> run_group(const std::vector<int>& keys, const std::vector<int>& perm, const X* x, int V,
                                    int ncols, float scale, const std::vector<float>& out0, unsigned by) {
  const int n = static_cast<int>(keys.size());
  std::vector<float> out = out0;
  const long long nchunks = (n + TL_GROUP_CHUNK - 1) / TL_GROUP_CHUNK;
  std::vector<float> partial(static_cast<size_t>(2 * nchunks * ncols), std::nanf(""));
  GroupRowsParams p{keys.data(), perm.data(), x, out.data(), partial.data(), n, V, ncols, scale};
  const unsigned gx = static_cast<unsigned>((ncols + 31) / 32);
  const unsigned gy = static_cast<unsigned>((nchunks + by - 1) / by);
  launch(Dt<X>::group, "tl_group_rows_partial", gx, gy, 32, by, &p);
  LAUNCH(tl_group_rows_combine, gx, gy, 32, by, p);
  return out;
}

template <class X>
static void test_group(const char* what, const std::vector<int>& ids, int V, int ncols, float scale, unsigned by,
                       uint64_t seed) {
  std::mt19937_64 g(seed);
  const int n = static_cast<int>(ids.size());
  auto x = rand_vec<X>(g, static_cast<size_t>(n) * ncols, -1, 1);
  auto out0 = rand_f32(g, static_cast<size_t>(V) * ncols, -1, 1);
  std::vector<int> keys, perm;
  run_sort(ids, V, keys, perm);
  auto out = run_group<X>(keys, perm, x.data(), V, ncols, scale, out0, by);
  auto out2 = run_group<X>(keys, perm, x.data(), V, ncols, scale, out0, by);
  std::vector<double> ref(out0.begin(), out0.end());
  std::vector<double> sum(static_cast<size_t>(V) * ncols, 0.0);
  for (int t = 0; t < n; ++t)
    if (ids[t] >= 0)
      for (int k = 0; k < ncols; ++k) sum[static_cast<size_t>(ids[t]) * ncols + k] += Dt<X>::to(x[static_cast<size_t>(t) * ncols + k]);
  double num = 0, den = 0;
  bool finite = true;
  for (size_t i = 0; i < ref.size(); ++i) {
    ref[i] += static_cast<double>(scale) * sum[i];
    num += (out[i] - ref[i]) * (out[i] - ref[i]);
    den += ref[i] * ref[i];
    finite &= std::isfinite(out[i]);
  }
  const double rel = std::sqrt(num / den);
  const bool bitwise = std::memcmp(out.data(), out2.data(), out.size() * sizeof(float)) == 0;
  CHECK(finite && rel <= 1e-6, "group %s: rel err %.3e", what, rel);
  CHECK(bitwise, "group %s: two runs differ", what);
  std::printf("  group_rows %-4s %-30s T=%-6d V=%-6d ncols=%-3d BY=%u: rel err %.2e%s\n", Dt<X>::name, what, n, V,
              ncols, by, rel, bitwise ? ", bitwise deterministic" : ", NONDETERMINISTIC");
}

// -------------------------------------------------------------- merge ----
template <class T>
static void test_merge(int V, int d, int r, uint64_t seed) {
  std::mt19937_64 g(seed);
  auto w0 = rand_vec<T>(g, static_cast<size_t>(V) * d, -2, 2);
  auto u = rand_f32(g, static_cast<size_t>(V) * r, -1, 1);
  auto vh = rand_f32(g, static_cast<size_t>(r) * d, -1, 1);
  const float s = 0.25f;
  auto w = w0;
  const unsigned gx = static_cast<unsigned>((d + 255) / 256);
  const unsigned gy = static_cast<unsigned>(std::min((V + 7) / 8, 3));  // small: exercises the grid-stride loop
  MergeParams p{w.data(), u.data(), vh.data(), V, d, r, s, 0, 0};
  launch(Dt<T>::merge, "tl_merge", gx, gy, 256, 1, &p);
  auto w1 = w;
  p.subtract = 1;
  launch(Dt<T>::merge, "tl_merge", gx, gy, 256, 1, &p);
  int bad_merge = 0, bad_restore = 0;
  for (int v = 0; v < V; ++v)
    for (int k = 0; k < d; ++k) {
      const size_t i = static_cast<size_t>(v) * d + k;
      double acc = 0;
      for (int j = 0; j < r; ++j) acc += static_cast<double>(u[static_cast<size_t>(v) * r + j]) * vh[static_cast<size_t>(j) * d + k];
      const double ref = Dt<T>::to(w0[i]) + s * acc;
      const double got = Dt<T>::to(w1[i]);
      if (!(std::fabs(got - ref) <= Dt<T>::eps * std::fabs(ref) + 1e-5)) ++bad_merge;
      // One rounding of the merged value: |w2 - w0| <= ulp(w1) (+ f32 slack).
      const double back = Dt<T>::to(w[i]);
      const double w0v = Dt<T>::to(w0[i]);
      if (!(std::fabs(back - w0v) <= Dt<T>::eps * std::max(std::fabs(got), std::fabs(w0v)) + 1e-5)) ++bad_restore;
    }
  CHECK(bad_merge == 0 && bad_restore == 0, "merge %s V=%d d=%d r=%d: %d bad merged, %d bad restored", Dt<T>::name, V, d,
        r, bad_merge, bad_restore);
  std::printf("  merge %-4s V=%-4d d=%-4d r=%-3d: merged %s, unmerged restores W within one rounding %s\n", Dt<T>::name,
              V, d, r, bad_merge ? "FAIL" : "ok", bad_restore ? "FAIL" : "ok");
}

// ---------------------------------------------------------------- main ----
template <class T>
static void embed_suite(uint64_t seed) {
  test_embed<T>(37, 29, 1, 13, 4, 1, 0, true, seed + 1);    // odd d, r = 1, scalar path
  test_embed<T>(301, 72, 16, 50, 4, 2, 0, true, seed + 2);  // packed path, grid-stride tokens
  test_embed<T>(301, 72, 16, 50, 4, 3, 1, false, seed + 3); // misaligned out -> scalar path
  test_embed<T>(301, 72, 64, 40, 4, 2, 0, true, seed + 4);  // r = 64
  test_embed<T>(64, 40, 5, 9, 4, 1, 0, false, seed + 5);    // r8 variant, r % 4 != 0
  test_embed<T>(64, 48, 24, 17, 2, 2, 0, true, seed + 6);   // r32 variant
  test_embed<T>(50, 33, 100, 11, 4, 1, 0, true, seed + 7);  // r > 64: rank chunks
  test_embed<T>(301, 264, 12, 1, 4, 1, 0, false, seed + 8); // T = 1, several column blocks
  test_embed<T>(301, 72, 16, 700, 2, 1, 0, true, seed + 9); // 350 tokens per warp (id batches of 32)
  test_embed<T>(301, 136, 64, 200, 1, 2, 0, true, seed + 10); // 100 tokens per warp, r64 variant
}

int main() {
  std::printf("embed_forward\n");
  embed_suite<float>(100);
  embed_suite<__half>(200);
  embed_suite<__nv_bfloat16>(300);

  std::printf("sort_ids\n");
  std::mt19937_64 g(7);
  auto rand_ids = [&](int n, int V, int neg_every) {
    std::vector<int> v(n);
    std::uniform_int_distribution<int> di(0, V - 1);
    for (int i = 0; i < n; ++i) v[i] = (neg_every && i % neg_every == 5) ? -1 - (i % 3) : di(g);
    return v;
  };
  test_sort("random", rand_ids(5000, 1000, 0), 1000);
  test_sort("random, negatives", rand_ids(9000, 300, 11), 300);
  test_sort("all equal x3000", std::vector<int>(3000, 17), 1000);
  test_sort("all equal x9000 (3 tiles)", std::vector<int>(9000, 255999), 256000);
  test_sort("V=256000 random + negatives", rand_ids(20000, 256000, 13), 256000);
  test_sort("V=37", rand_ids(777, 37, 0), 37);
  test_sort("all negative", std::vector<int>(300, -1), 50);
  test_sort("T=1", std::vector<int>(1, 3), 10);
  {
    auto v = rand_ids(4096 * 2 + 17, 256, 0);  // exactly 9 key bits -> 2 passes
    test_sort("V=256 (2 passes), 3 tiles", v, 256);
  }

  std::printf("group_rows\n");
  test_group<float>("dU random", rand_ids(5000, 400, 9), 400, 16, 1.0f, 4, 11);
  test_group<float>("dU all equal x3000", std::vector<int>(3000, 5), 40, 16, 1.0f, 4, 12);
  {
    auto v = rand_ids(4000, 1000, 0);
    for (int i = 500; i < 3700; ++i) v[i] = 999;  // one heavy id among others
    test_group<float>("dU heavy id x3200 + random", v, 1000, 40, 1.0f, 8, 13);
  }
  test_group<float>("dU V=256000 + negatives", rand_ids(6000, 256000, 7), 256000, 8, 1.0f, 4, 14);
  test_group<__half>("dW f16 random", rand_ids(3000, 200, 0), 200, 72, 1.5f, 4, 15);
  test_group<__nv_bfloat16>("dW bf16 all equal x3000", std::vector<int>(3000, 0), 3, 29, 1.5f, 2, 16);
  test_group<__nv_bfloat16>("dW bf16 random + negatives", rand_ids(2000, 50, 4), 50, 33, 0.5f, 8, 17);
  {
    std::vector<int> v;  // runs of random length 1..300 in random id order: many cross chunk boundaries
    std::uniform_int_distribution<int> len(1, 300), id(0, 499);
    while (v.size() < 12000) {
      const int k = id(g), l = len(g);
      for (int i = 0; i < l; ++i) v.push_back(k);
    }
    std::shuffle(v.begin(), v.begin() + 100, g);
    test_group<float>("runs of length 1..300", v, 500, 16, 1.0f, 4, 27);
    test_group<__nv_bfloat16>("runs of length 1..300 (dW)", v, 500, 40, 0.75f, 8, 28);
  }
  test_group<float>("T=128 one id (two chunks)", std::vector<int>(128, 1), 5, 3, 1.0f, 1, 29);
  test_group<float>("T=1", std::vector<int>(1, 2), 5, 3, 1.0f, 1, 18);
  test_group<float>("T=64 one chunk, one id", std::vector<int>(64, 2), 5, 3, 1.0f, 1, 19);
  test_group<float>("T=65 run across boundary", std::vector<int>(65, 2), 5, 3, 1.0f, 1, 20);

  std::printf("merge\n");
  test_merge<float>(37, 29, 3, 21);
  test_merge<float>(101, 300, 16, 22);
  test_merge<__half>(37, 29, 1, 23);
  test_merge<__half>(101, 72, 70, 24);
  test_merge<__nv_bfloat16>(37, 29, 5, 25);
  test_merge<__nv_bfloat16>(101, 264, 16, 26);

  std::printf("%d checks, %d failures\n", g_checks, g_failures);
  return g_failures == 0 ? 0 : 1;
}
