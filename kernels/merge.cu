// merge.cu: fold the LoRA delta into (or out of) the tied weight, in place.
//
//   W[v, k] = round_T( W[v, k] + sign * s * sum_j U[v, j] * Vh[j, k] )     sign = +1 merge, -1 unmerge
//
// The sum is f32, j in increasing order (fmaf), then fmaf(sign * s, sum, W)
// in f32 and one rounding to W's dtype: merge followed by unmerge restores W
// up to one rounding of the storage dtype. One-off operation (not on the
// training path): V * d * r FMAs, W read and written once.
//
// Layout: thread = one column k, 8 rows per thread (Vh[j, k] is read once per
// 8 rows, U[v, j] is a warp-uniform broadcast); rows grid-stride in y.
// Kernels tl_merge_{f32,f16,bf16}.
// Launch: block (256, 1, 1); grid (ceil(d / 256), min(ceil(V / 8), 65535), 1).
// No shared memory. Any d, any r >= 1.
#include "embed_params.h"

namespace {

constexpr int kMergeRows = 8;

template <class T>
TL_DEVICE void merge(const MergeParams& p) {
  const int d = p.hidden;
  const int r = p.rank;
  const int k = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (k >= d) return;
  T* w = static_cast<T*>(p.w);
  const float* __restrict__ u = p.u;
  const float* __restrict__ vh = p.vh;
  const float ss = p.subtract ? -p.scale : p.scale;
  const long long rows = p.rows;
  for (long long v0 = static_cast<long long>(blockIdx.y) * kMergeRows; v0 < rows;
       v0 += static_cast<long long>(gridDim.y) * kMergeRows) {
    const int nrows = static_cast<int>(min(static_cast<long long>(kMergeRows), rows - v0));
    float acc[kMergeRows];
#pragma unroll
    for (int i = 0; i < kMergeRows; ++i) acc[i] = 0.0f;
    const float* ub = u + v0 * r;
    for (int j = 0; j < r; ++j) {
      const float vv = __ldg(vh + static_cast<long long>(j) * d + k);
#pragma unroll
      for (int i = 0; i < kMergeRows; ++i)
        if (i < nrows) acc[i] = fmaf(__ldg(ub + static_cast<long long>(i) * r + j), vv, acc[i]);
    }
#pragma unroll
    for (int i = 0; i < kMergeRows; ++i) {
      if (i < nrows) {
        T* e = w + (v0 + i) * d + k;
        *e = tl_from_float<T>(fmaf(ss, acc[i], tl_to_float(*e)));
      }
    }
  }
}

}  // namespace

TL_KERNEL_BOUNDED(tl_merge_f32, MergeParams, 256) { merge<float>(p); }
TL_KERNEL_BOUNDED(tl_merge_f16, MergeParams, 256) { merge<__half>(p); }
TL_KERNEL_BOUNDED(tl_merge_bf16, MergeParams, 256) { merge<__nv_bfloat16>(p); }
