// lora_small.cu: the thin LoRA products around the big GEMMs (O(T·d·r) work).
//
// lora_project   out[t, j] = scale · Σ_k x[t, k] · Vh[j, k]        one warp per 4 rows;
//             lanes stride over k, 4 x 16 accumulators per lane, then a fixed
//             butterfly reduction per row; Vh staged in shared memory 256
//             columns at a time (16 KiB static). Grid (ceil(rows / 32)), block 256.
//             Used for p = s·h·Vhᵀ (head) and gU = c·s·dE·Vhᵀ (embedding backward).
// lora_hidden_grad     grad[j, k] += scale · Σ_t X[row(t), j] · Y[t, k]   in two deterministic
//             steps: partial sums over fixed token chunks (grid (ceil(d / 256),
//             chunks), block 256, one thread per column k, X rows staged in
//             shared memory 256 tokens at a time: 17 KiB static), then a
//             reduction over the chunks in order (grid ceil(r·d / 256), block 256).
//             Used for dVh = s·(G U)ᵀ h (head) and c·s·U[ids]ᵀ dE (embedding).
// pack        out[v, j] = U[v, j] rounded to the storage dtype, zero for
//             r <= j < ld_out: U as the wgmma grad_h stages it (16-byte rows,
//             cp.async). With `lo`: the low parts of U's values instead
//             (common.cuh's tl_lo_part; U and p for the head backward's second,
//             low-part products). Grid-stride, block 256.
// concat_rows out[i] = [x_i | y_i] in the storage dtype (y f32 or storage):
//             the K = d + r operands [h | p] and [W | U] of the cuBLAS path's
//             head forward (KernelOptions::cublas). One warp per row
//             (grid-stride over rows, block 256): x in 16-byte vectors when
//             both row lengths and both bases allow, else element-wise.
#include "params.h"

namespace {

constexpr int kRankChunk = 16;
// lora_project: rows per warp. Each Vh value a lane loads serves this many rows
// (Vh is read once per warp, so per kRowsPerWarp rows, not per row); every
// row's sums are formed in the same order as with one row per warp.
constexpr int kRowsPerWarp = 4;

// lora_project: Vh columns staged in shared memory per step (kDownCols x kRankChunk f32).
constexpr int kDownCols = 256;

// Each block stages Vh[j0 .. j0 + 16, kc .. kc + kDownCols) once for its
// 8 warps x kRowsPerWarp rows (Vh is read from L2 once per 32 rows); lane l
// still sums k = l, l + 32, ... in increasing order, then the butterfly.
template <class X, class O>
TL_DEVICE void lora_project(const LoraProjectParams& p) {
  __shared__ float vs[kRankChunk * kDownCols];
  const int warps = static_cast<int>(blockDim.x) / 32;
  const int row0 = (static_cast<int>(blockIdx.x) * warps + static_cast<int>(tl_warp_id())) * kRowsPerWarp;
  const int lane = static_cast<int>(tl_lane_id());
  const int tid = static_cast<int>(threadIdx.x);
  // No early return: every warp stages Vh and meets the barriers.
  const int nrows = max(0, min(kRowsPerWarp, p.rows - row0));  // warp-uniform
  const X* x = static_cast<const X*>(p.x) + static_cast<long long>(min(row0, p.rows)) * p.hidden;
  O* out = static_cast<O*>(p.out) + static_cast<long long>(min(row0, p.rows)) * p.rank;
  for (int j0 = 0; j0 < p.rank; j0 += kRankChunk) {
    float acc[kRowsPerWarp][kRankChunk];
#pragma unroll
    for (int rr = 0; rr < kRowsPerWarp; ++rr)
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj) acc[rr][jj] = 0.0f;
    for (int kc = 0; kc < p.hidden; kc += kDownCols) {
      __syncthreads();  // the previous step's Vh is consumed
      for (int e = tid; e < kRankChunk * kDownCols; e += static_cast<int>(blockDim.x)) {
        const int jj = e / kDownCols, c = e % kDownCols;
        vs[e] = j0 + jj < p.rank && kc + c < p.hidden ? p.vh[static_cast<long long>(j0 + jj) * p.hidden + kc + c] : 0.0f;
      }
      __syncthreads();
      if (nrows == 0) continue;
      const int kend = min(kDownCols, p.hidden - kc);
      for (int c = lane; c < kend; c += 32) {
        float xv[kRowsPerWarp];
#pragma unroll
        for (int rr = 0; rr < kRowsPerWarp; ++rr)
          xv[rr] = rr < nrows ? tl_to_float(x[static_cast<long long>(rr) * p.hidden + kc + c]) : 0.0f;
#pragma unroll
        for (int jj = 0; jj < kRankChunk; ++jj) {
          if (j0 + jj < p.rank) {
            const float v = vs[jj * kDownCols + c];  // one load, kRowsPerWarp rows
#pragma unroll
            for (int rr = 0; rr < kRowsPerWarp; ++rr) acc[rr][jj] = fmaf(xv[rr], v, acc[rr][jj]);
          }
        }
      }
    }
    if (nrows == 0) continue;
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

// lora_hidden_grad_partial: tokens staged per step, and y loads in flight per batch.
constexpr int kUpStage = 256;
constexpr int kUpBatch = 8;

// One thread per column k, tokens of the chunk in order. The X rows of a
// stage of kUpStage tokens (gathered through ids) and their skip flags are
// staged in shared memory by the whole block, so the token loop has no
// dependent global loads (ids -> X row) and reads X as broadcasts; y is
// loaded kUpBatch tokens ahead. Every accumulator still sums its terms in
// token order (the same result as one token at a time).
template <class Y>
TL_DEVICE void lora_hidden_grad_partial(const LoraHiddenGradPartialParams& p) {
  __shared__ float xs[kUpStage * kRankChunk];
  __shared__ int use[kUpStage];
  const int tid = static_cast<int>(threadIdx.x);
  const int k = static_cast<int>(blockIdx.x * blockDim.x) + tid;
  const bool col_ok = k < p.hidden;  // no early return: every thread stages and meets the barriers
  const int chunk = static_cast<int>(blockIdx.y);
  const Y* y = static_cast<const Y*>(p.y);
  const int t_begin = chunk * p.chunk;
  const int t_end = min(p.tokens, t_begin + p.chunk);
  float* out = p.partial + static_cast<long long>(chunk) * p.rank * p.hidden;
  for (int j0 = 0; j0 < p.rank; j0 += kRankChunk) {
    float acc[kRankChunk];
#pragma unroll
    for (int jj = 0; jj < kRankChunk; ++jj) acc[jj] = 0.0f;
    for (int s0 = t_begin; s0 < t_end; s0 += kUpStage) {
      const int n = min(kUpStage, t_end - s0);
      __syncthreads();  // the previous stage is consumed
      for (int e = tid; e < n * kRankChunk; e += static_cast<int>(blockDim.x)) {
        const int tt = e / kRankChunk, jj = e % kRankChunk;
        const int row = p.ids ? p.ids[s0 + tt] : s0 + tt;
        // Ignored or invalid id (< 0): the token contributes nothing.
        xs[e] = row >= 0 && j0 + jj < p.rank ? p.x[static_cast<long long>(row) * p.rank + j0 + jj] : 0.0f;
        if (jj == 0) use[tt] = row >= 0;
      }
      __syncthreads();
      if (!col_ok) continue;
      for (int b = 0; b < n; b += kUpBatch) {
        float yv[kUpBatch];
#pragma unroll
        for (int u = 0; u < kUpBatch; ++u)
          yv[u] = b + u < n ? tl_to_float(y[static_cast<long long>(s0 + b + u) * p.hidden + k]) : 0.0f;
#pragma unroll
        for (int u = 0; u < kUpBatch; ++u) {
          if (b + u >= n || !use[b + u]) continue;  // block-uniform
          const float* xr = xs + (b + u) * kRankChunk;
#pragma unroll
          for (int jj = 0; jj < kRankChunk; ++jj) acc[jj] = fmaf(xr[jj], yv[u], acc[jj]);
        }
      }
    }
    if (col_ok) {
#pragma unroll
      for (int jj = 0; jj < kRankChunk; ++jj)
        if (j0 + jj < p.rank) out[static_cast<long long>(j0 + jj) * p.hidden + k] = acc[jj];
    }
  }
}

}  // namespace

#define TL_LORA_DOWN(name, X, O) \
  TL_KERNEL_BOUNDED(tl_lora_project_##name, LoraProjectParams, 256) { lora_project<X, O>(p); }
TL_LORA_DOWN(f32_f32, float, float)
TL_LORA_DOWN(f16_f16, __half, __half)
TL_LORA_DOWN(f16_f32, __half, float)
TL_LORA_DOWN(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
TL_LORA_DOWN(bf16_f32, __nv_bfloat16, float)

#define TL_LORA_UP_PARTIAL(name, Y) \
  TL_KERNEL_BOUNDED(tl_lora_hidden_grad_partial_##name, LoraHiddenGradPartialParams, 256) { lora_hidden_grad_partial<Y>(p); }
TL_LORA_UP_PARTIAL(f32, float)
TL_LORA_UP_PARTIAL(f16, __half)
TL_LORA_UP_PARTIAL(bf16, __nv_bfloat16)

TL_KERNEL_BOUNDED(tl_sum_partials, SumPartialsParams, 256) {
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
    const float x = j < p.cols ? p.u[v * p.cols + j] : 0.0f;
    static_cast<T*>(p.out)[e] = p.lo ? tl_lo_part<T>(x) : tl_from_float<T>(x);
  }
}
template <class T>
TL_DEVICE void concat_rows(const ConcatRowsParams& p) {
  constexpr int kVec = 16 / sizeof(T);
  const int k = p.d + p.r;
  const int lane = static_cast<int>(tl_lane_id());
  const int warps = static_cast<int>(blockDim.x) / 32;
  // Row copies as 16-byte vectors: W is [V, d] with d a multiple of 8 in
  // every model this serves; the per-element path is the general fallback.
  const bool vec = p.d % kVec == 0 && k % kVec == 0 && tl_aligned(p.x, 16) && tl_aligned(p.out, 16);
  for (int row = static_cast<int>(blockIdx.x) * warps + static_cast<int>(tl_warp_id()); row < p.rows;
       row += static_cast<int>(gridDim.x) * warps) {
    const T* x = static_cast<const T*>(p.x) + static_cast<long long>(row) * p.d;
    T* out = static_cast<T*>(p.out) + static_cast<long long>(row) * k;
    if (vec) {
      const uint4* xv = reinterpret_cast<const uint4*>(x);
      uint4* ov = reinterpret_cast<uint4*>(out);
      for (int j = lane; j < p.d / kVec; j += 32) ov[j] = xv[j];
    } else {
      // Not unrolled: unrolling this fallback made ptxas spill the f32 variant.
#pragma unroll 1
      for (int j = lane; j < p.d; j += 32) out[j] = x[j];
    }
    if (p.y_f32) {
      const float* y = static_cast<const float*>(p.y) + static_cast<long long>(row) * p.r;
      for (int j = lane; j < p.r; j += 32) out[p.d + j] = tl_from_float<T>(y[j]);
    } else {
      const T* y = static_cast<const T*>(p.y) + static_cast<long long>(row) * p.r;
      for (int j = lane; j < p.r; j += 32) out[p.d + j] = y[j];
    }
  }
}
// U or p in the storage dtype, or their low parts: the default head
// backward's second products (f16 / bf16), and the wgmma / cuBLAS operands.
TL_KERNEL_BOUNDED(tl_lora_pack_f16, LoraPackParams, 256) { lora_pack<__half>(p); }
TL_KERNEL_BOUNDED(tl_lora_pack_bf16, LoraPackParams, 256) { lora_pack<__nv_bfloat16>(p); }
#if TL_EXPERIMENTAL
// Operand concatenation for the cuBLAS path (`KernelOptions::cublas`).
TL_KERNEL_BOUNDED(tl_concat_rows_f32, ConcatRowsParams, 256) { concat_rows<float>(p); }
TL_KERNEL_BOUNDED(tl_concat_rows_f16, ConcatRowsParams, 256) { concat_rows<__half>(p); }
TL_KERNEL_BOUNDED(tl_concat_rows_bf16, ConcatRowsParams, 256) { concat_rows<__nv_bfloat16>(p); }
#endif  // TL_EXPERIMENTAL
