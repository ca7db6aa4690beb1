// lora_small.cu: the thin LoRA products around the big GEMMs (O(T·d·r) work).
//
// lora_down   out[t, j] = scale · Σ_k x[t, k] · Vh[j, k]        one warp per 4 rows;
//             lanes stride over k, 4 x 16 accumulators per lane, then a fixed
//             butterfly reduction per row. Grid (ceil(rows / 32)), block 256.
//             Used for p = s·h·Vhᵀ (head) and gU = c·s·dE·Vhᵀ (embedding backward).
// lora_up     grad[j, k] += scale · Σ_t X[row(t), j] · Y[t, k]   in two deterministic
//             steps: partial sums over fixed token chunks (grid (ceil(d / 256),
//             chunks), block 256, one thread per column k), then a reduction
//             over the chunks in order (grid ceil(r·d / 256), block 256).
//             Used for dVh = s·(G U)ᵀ h (head) and c·s·U[ids]ᵀ dE (embedding).
// pack        out[v, j] = U[v, j] rounded to the storage dtype, zero for
//             r <= j < ld_out: U as the wgmma grad_h stages it (16-byte rows,
//             cp.async). Grid-stride, block 256.
#include "params.h"

namespace {

constexpr int kRankChunk = 16;
// lora_down: rows per warp. Each Vh value a lane loads serves this many rows
// (Vh is read once per warp, so per kRowsPerWarp rows, not per row); every
// row's sums are formed in the same order as with one row per warp.
constexpr int kRowsPerWarp = 4;

template <class X, class O>
TL_DEVICE void lora_down(const LoraDownParams& p) {
  const int warps = static_cast<int>(blockDim.x) / 32;
  const int row0 = (static_cast<int>(blockIdx.x) * warps + static_cast<int>(tl_warp_id())) * kRowsPerWarp;
  const int lane = static_cast<int>(tl_lane_id());
  if (row0 >= p.rows) return;
  const int nrows = min(kRowsPerWarp, p.rows - row0);  // warp-uniform
  const X* x = static_cast<const X*>(p.x) + static_cast<long long>(row0) * p.hidden;
  O* out = static_cast<O*>(p.out) + static_cast<long long>(row0) * p.rank;
  for (int j0 = 0; j0 < p.rank; j0 += kRankChunk) {
    float acc[kRowsPerWarp][kRankChunk];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr)
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj) acc[rr][jj] = 0.0f;
    for (int k = lane; k < p.hidden; k += 32) {
      float xv[kRowsPerWarp];
#pragma unroll
      for (int rr = 0; rr < kRowsPerWarp; ++rr)
        xv[rr] = rr < nrows ? tl_to_float(x[static_cast<long long>(rr) * p.hidden + k]) : 0.0f;
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj) {
        if (j0 + jj < p.rank) {
          const float v = p.vh[static_cast<long long>(j0 + jj) * p.hidden + k];  // one load, kRowsPerWarp rows
#pragma unroll
          for (int rr = 0; rr < kRowsPerWarp; ++rr) acc[rr][jj] = fmaf(xv[rr], v, acc[rr][jj]);
        }
      }
    }
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr) {
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj) {
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) acc[rr][jj] += __shfl_xor_sync(TL_FULL_MASK, acc[rr][jj], off);
      }
      if (rr < nrows && lane < kRankChunk && j0 + lane < p.rank) {
        float v = 0.0f;
#pragma unroll
        for (int jj = 0; jj < kRankChunk; ++jj)
          if (jj == lane) v = acc[rr][jj];
        out[static_cast<long long>(rr) * p.rank + j0 + lane] = tl_from_float<O>(p.scale * v);
      }
    }
  }
}

template <class Y>
TL_DEVICE void lora_up_partial(const LoraUpPartialParams& p) {
  const int k = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  const int chunk = static_cast<int>(blockIdx.y);
  if (k >= p.hidden) return;
  const Y* y = static_cast<const Y*>(p.y);
  const int t_begin = chunk * p.chunk;
  const int t_end = min(p.tokens, t_begin + p.chunk);
  float* out = p.partial + static_cast<long long>(chunk) * p.rank * p.hidden;
  for (int j0 = 0; j0 < p.rank; j0 += kRankChunk) {
    float acc[kRankChunk];
#pragma unroll
    for (int jj = 0; jj < kRankChunk; ++jj) acc[jj] = 0.0f;
    for (int t = t_begin; t < t_end; ++t) {
      const int row = p.ids ? p.ids[t] : t;
      if (row < 0) continue;  // ignored or invalid id: contributes nothing
      const float yv = tl_to_float(y[static_cast<long long>(t) * p.hidden + k]);
      const float* xr = p.x + static_cast<long long>(row) * p.rank;
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj)
        if (j0 + jj < p.rank) acc[jj] = fmaf(xr[j0 + jj], yv, acc[jj]);
    }
#pragma unroll
    for (int jj = 0; jj < kRankChunk; ++jj)
      if (j0 + jj < p.rank) out[static_cast<long long>(j0 + jj) * p.hidden + k] = acc[jj];
  }
}

}  // namespace

#define TL_LORA_DOWN(name, X, O) \
  TL_KERNEL_BOUNDED(tl_lora_down_##name, LoraDownParams, 256) { lora_down<X, O>(p); }
TL_LORA_DOWN(f32_f32, float, float)
TL_LORA_DOWN(f16_f16, __half, __half)
TL_LORA_DOWN(f16_f32, __half, float)
TL_LORA_DOWN(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
TL_LORA_DOWN(bf16_f32, __nv_bfloat16, float)

#define TL_LORA_UP_PARTIAL(name, Y) \
  TL_KERNEL_BOUNDED(tl_lora_up_partial_##name, LoraUpPartialParams, 256) { lora_up_partial<Y>(p); }
TL_LORA_UP_PARTIAL(f32, float)
TL_LORA_UP_PARTIAL(f16, __half)
TL_LORA_UP_PARTIAL(bf16, __nv_bfloat16)

TL_KERNEL_BOUNDED(tl_lora_up_reduce, LoraUpReduceParams, 256) {
  const int e = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (e >= p.count) return;
  float acc = 0.0f;
  for (int s = 0; s < p.chunks; ++s) acc += p.partial[static_cast<long long>(s) * p.count + e];
  p.out[e] += p.scale * acc;
}

template <class T>
TL_DEVICE void lora_pack(const LoraPackParams& p) {
  const long long n = static_cast<long long>(p.rows) * p.ld_out;
  for (long long e = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; e < n;
       e += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long v = e / p.ld_out;
    const int j = static_cast<int>(e % p.ld_out);
    static_cast<T*>(p.out)[e] = tl_from_float<T>(j < p.cols ? p.u[v * p.cols + j] : 0.0f);
  }
}
TL_KERNEL_BOUNDED(tl_lora_pack_f16, LoraPackParams, 256) { lora_pack<__half>(p); }
TL_KERNEL_BOUNDED(tl_lora_pack_bf16, LoraPackParams, 256) { lora_pack<__nv_bfloat16>(p); }
