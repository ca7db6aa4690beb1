// baseline.cu: the elementwise, gather and scatter pieces of the UNFUSED
// baselines in examples/gpu_bench/baselines.rs (the path a PEFT user runs: cuBLAS GEMMs
// with separate passes over [T, V] / [T, d] between them), plus the bench's
// input fill and its on-device relative-norm check. The library never
// launches these; they exist so the fused kernels are timed against an
// honest, reproducible unfused path in the same process.
//
// Each kernel is written the way PyTorch's own elementwise/indexing kernels
// are (16-byte vector accesses where the alignment allows, grid-stride
// loops), so the baseline is not handicapped by a naive kernel.
//
// Launch (all kernels): block (TL_BENCH_THREADS = 256, 1, 1), no dynamic shared
// memory, any grid.x >= 1 (grid-stride loops; the bench uses
// min(ceil(work / 256), 8 * SMs)). Params in baseline_params.h.
#include "baseline_params.h"

namespace {

// splitmix64 of (seed, i) -> uniform in [-1, 1) with 24 random bits.
TL_DEVICE float bl_uniform(unsigned seed, unsigned long long i) {
  unsigned long long z = (static_cast<unsigned long long>(seed) << 40) ^ i;
  z += 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(static_cast<unsigned>(z >> 40)) * (2.0f / 16777216.0f) - 1.0f;
}

// bf16 <-> f32 on raw bits: one 32-bit word holds two bf16 (lo = element 2k).
TL_DEVICE float bl_lo(unsigned w) { return __uint_as_float(w << 16); }
TL_DEVICE float bl_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
TL_DEVICE unsigned bl_bits(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }
TL_DEVICE unsigned bl_axpby_word(unsigned x, unsigned y, float a, float b) {
  const float lo = fmaf(a, bl_lo(x), b * bl_lo(y));
  const float hi = fmaf(a, bl_hi(x), b * bl_hi(y));
  return bl_bits(lo) | (bl_bits(hi) << 16);
}


TL_DEVICE unsigned long long bl_first() {
  return static_cast<unsigned long long>(blockIdx.x) * blockDim.x + threadIdx.x;
}
TL_DEVICE unsigned long long bl_stride() { return static_cast<unsigned long long>(gridDim.x) * blockDim.x; }

template <class T>
TL_DEVICE void fill(const FillParams& p) {
  T* out = static_cast<T*>(p.out);
  for (unsigned long long i = bl_first(); i < p.n; i += bl_stride())
    out[i] = tl_from_float<T>(fmaf(p.scale, bl_uniform(p.seed, i), p.offset));
}

template <class T>
TL_DEVICE void diff_norm(const DiffNormParams& p) {
  __shared__ double sd[TL_BENCH_THREADS];
  __shared__ double sr[TL_BENCH_THREADS];
  const T* a = static_cast<const T*>(p.a);
  const T* b = static_cast<const T*>(p.b);
  double d2 = 0.0;
  double r2 = 0.0;
  for (unsigned long long i = bl_first(); i < p.n; i += bl_stride()) {
    const double bv = tl_to_float(b[i]);
    const double dv = static_cast<double>(tl_to_float(a[i])) - bv;
    d2 += dv * dv;
    r2 += bv * bv;
  }
  const unsigned tid = threadIdx.x;
  sd[tid] = d2;
  sr[tid] = r2;
  __syncthreads();
  for (unsigned s = TL_BENCH_THREADS / 2; s > 0; s >>= 1) {
    if (tid < s) {
      sd[tid] += sd[tid + s];
      sr[tid] += sr[tid + s];
    }
    __syncthreads();
  }
  if (tid == 0) {
    p.partial[2ull * blockIdx.x] = sd[0];
    p.partial[2ull * blockIdx.x + 1] = sr[0];
  }
}

}  // namespace

TL_KERNEL_BOUNDED(tl_bench_fill_f32, FillParams, TL_BENCH_THREADS) { fill<float>(p); }
TL_KERNEL_BOUNDED(tl_bench_fill_bf16, FillParams, TL_BENCH_THREADS) { fill<__nv_bfloat16>(p); }

TL_KERNEL_BOUNDED(tl_bench_cast_f32_bf16, CastParams, TL_BENCH_THREADS) {
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  for (unsigned long long i = bl_first(); i < p.n; i += bl_stride()) out[i] = __float2bfloat16_rn(p.x[i]);
}

TL_KERNEL_BOUNDED(tl_bench_axpby_bf16, AxpbyParams, TL_BENCH_THREADS) {
  const bool has_x = p.x != nullptr;
  const bool vec = (!has_x || tl_aligned(p.x, 16)) && tl_aligned(p.y, 16) && tl_aligned(p.out, 16);
  const unsigned long long packs = vec ? p.n / 8 : 0;
  const float a = p.alpha;
  const float b = p.beta;
  for (unsigned long long i = bl_first(); i < packs; i += bl_stride()) {
    const uint4 yv = reinterpret_cast<const uint4*>(p.y)[i];
    const uint4 xv = has_x ? reinterpret_cast<const uint4*>(p.x)[i] : make_uint4(0u, 0u, 0u, 0u);
    uint4 o;
    o.x = bl_axpby_word(xv.x, yv.x, a, b);
    o.y = bl_axpby_word(xv.y, yv.y, a, b);
    o.z = bl_axpby_word(xv.z, yv.z, a, b);
    o.w = bl_axpby_word(xv.w, yv.w, a, b);
    reinterpret_cast<uint4*>(p.out)[i] = o;
  }
  const __nv_bfloat16* x = static_cast<const __nv_bfloat16*>(p.x);
  const __nv_bfloat16* y = static_cast<const __nv_bfloat16*>(p.y);
  __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out);
  for (unsigned long long i = packs * 8 + bl_first(); i < p.n; i += bl_stride()) {
    const float xv = has_x ? tl_to_float(x[i]) : 0.0f;
    out[i] = __float2bfloat16_rn(fmaf(a, xv, b * tl_to_float(y[i])));
  }
}

TL_KERNEL_BOUNDED(tl_bench_gather_rows_b16, GatherParams, TL_BENCH_THREADS) {
  const bool vec = (p.ncols % 8 == 0) && tl_aligned(p.src, 16) && tl_aligned(p.out, 16);
  const long long units = vec ? p.ncols / 8 : p.ncols;  // 16-byte packs or 2-byte elements per row
  const unsigned long long total = static_cast<unsigned long long>(p.tokens) * static_cast<unsigned long long>(units);
  for (unsigned long long idx = bl_first(); idx < total; idx += bl_stride()) {
    const long long t = static_cast<long long>(idx / static_cast<unsigned long long>(units));
    const long long c = static_cast<long long>(idx) - t * units;
    const long long row = static_cast<long long>(__ldg(p.ids + t));
    if (vec) {
      reinterpret_cast<uint4*>(p.out)[t * units + c] = reinterpret_cast<const uint4*>(p.src)[row * units + c];
    } else {
      static_cast<unsigned short*>(p.out)[t * units + c] = static_cast<const unsigned short*>(p.src)[row * units + c];
    }
  }
}

TL_KERNEL_BOUNDED(tl_bench_scatter_add_f32, ScatterAddParams, TL_BENCH_THREADS) {
  const long long ncols = p.ncols;
  const unsigned long long total = static_cast<unsigned long long>(p.tokens) * static_cast<unsigned long long>(ncols);
  for (unsigned long long idx = bl_first(); idx < total; idx += bl_stride()) {
    const long long t = static_cast<long long>(idx / static_cast<unsigned long long>(ncols));
    const long long j = static_cast<long long>(idx) - t * ncols;
    const long long row = static_cast<long long>(__ldg(p.ids + t));
    atomicAdd(p.out + row * ncols + j, p.scale * p.src[idx]);
  }
}

TL_KERNEL_BOUNDED(tl_bench_diff_norm_f32, DiffNormParams, TL_BENCH_THREADS) { diff_norm<float>(p); }
TL_KERNEL_BOUNDED(tl_bench_diff_norm_bf16, DiffNormParams, TL_BENCH_THREADS) { diff_norm<__nv_bfloat16>(p); }

namespace {

// Block-wide reduction of one value per thread (256 threads), result in every thread.
template <class Op>
TL_DEVICE float bl_block_reduce(float v, float* red, Op op) {
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(TL_FULL_MASK, v, o));
  const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  __syncthreads();  // red is reused by consecutive reductions
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = red[0];
  for (unsigned w = 1; w < TL_BENCH_THREADS / 32; ++w) r = op(r, red[w]);
  return r;
}

TL_DEVICE float bl_capped(float z, float kappa) { return kappa > 0.0f ? kappa * tanhf(z / kappa) : z; }

}  // namespace

TL_KERNEL_BOUNDED(tl_bench_xent_rows_bf16, XentRowsParams, TL_BENCH_THREADS) {
  __shared__ float red[TL_BENCH_THREADS / 32];
  __nv_bfloat16* all = static_cast<__nv_bfloat16*>(p.logits);
  const float kappa = p.softcap;
  for (long long t = blockIdx.x; t < p.tokens; t += gridDim.x) {
    __nv_bfloat16* z = all + t * p.vocab;
    float m = -INFINITY;
    for (int v = threadIdx.x; v < p.vocab; v += TL_BENCH_THREADS) m = fmaxf(m, bl_capped(tl_to_float(z[v]), kappa));
    m = bl_block_reduce(m, red, [](float a, float b) { return fmaxf(a, b); });
    float s = 0.0f;
    for (int v = threadIdx.x; v < p.vocab; v += TL_BENCH_THREADS) s += __expf(bl_capped(tl_to_float(z[v]), kappa) - m);
    s = bl_block_reduce(s, red, [](float a, float b) { return a + b; });
    const float lse = m + logf(s);
    const int y = static_cast<int>(p.targets[t]);
    if (threadIdx.x == 0) p.row_loss[t] = p.scale * (lse - bl_capped(tl_to_float(z[y]), kappa));
    __syncthreads();  // z[y] is read above before it is overwritten below
    for (int v = threadIdx.x; v < p.vocab; v += TL_BENCH_THREADS) {
      const float x = tl_to_float(z[v]);
      float slope = 1.0f;
      if (kappa > 0.0f) {
        const float th = tanhf(x / kappa);
        slope = 1.0f - th * th;
      }
      const float g = (__expf(bl_capped(x, kappa) - lse) - (v == y ? 1.0f : 0.0f)) * slope * p.scale;
      z[v] = __float2bfloat16_rn(g);
    }
  }
}
