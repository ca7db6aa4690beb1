// xent.cu: the head's cross-entropy forward with no logits in memory.
//
// partial   grid (ceil(T / 128), splits), 256 threads. Each block owns 128
//           tokens and a range of split_cols vocabulary columns. For each
//           128-column tile it runs the head's tile GEMM (K = d + r, the LoRA
//           columns in the same reduction), applies the softcap to the f32
//           accumulators and parks the tile in shared memory; two threads per
//           row then fold it into a running (max, sum of exp) in a fixed order,
//           and the thread that owns column targets[t] keeps the target logit.
//           Shared memory: GemmShape::SMEM_BYTES + 128 * 129 * 4; the _mma
//           variants (3-stage ring, ldmatrix + mma.sync, whose epilogue
//           needs no shared memory) park the tile over the ring instead:
//           max(GemmShape::SMEM_BYTES, 128 * 129 * 4). The _wgmma variants
//           (wg_gemm.cuh, sm_90a) keep the tile in registers: a row's 128
//           columns are spread over the 4 lanes of a quad (WgAcc's layout),
//           so its max and sum are in-thread folds plus two xor shuffles;
//           shared memory WgShapeK<T, 128, 3>::SMEM_BYTES.
// combine   grid 1 block of 256 threads: merges the splits of each row in
//           order (lse), forms the per-row losses, then sums them in a fixed
//           tree order: loss[0] = scale * sum. Bitwise deterministic.
// chunk_partial  (the cuBLAS path, KernelOptions::cublas) grid ceil(T / 8),
//           256 threads, one warp per token row of an f32 logits chunk z
//           [T, cols] the engine computed: lane l folds columns l, l + 32, ...
//           into its (max, sum of exp) of z', then the lanes merge in a fixed
//           xor-shuffle order, then folds that into the running pair of the
//           chunks before it (combine then sees one split).
// lse(z') = M + log(sum_v exp(z'_v - M)); loss_t = lse_t - z'_t[y_t].
#include "params.h"
#include "tile_gemm.cuh"
#include "wg_gemm.cuh"

namespace {

constexpr int kTile = 128;
constexpr int kZld = kTile + 1;  // skew: row-wise reads by thread pairs

// z' = kappa tanh(z / kappa), or z without a softcap (kappa = 0).
[[maybe_unused]] TL_DEVICE float softcapped(float z, float kappa) { return kappa > 0.0f ? kappa * tanhf(z / kappa) : z; }

// Non-finite logits give the reference's logsumexp (src/cpu/xent.rs): NaN if
// any logit is NaN, else +inf if any is +inf, else -inf if all are -inf. So
// the running max propagates NaN (fmaxf would drop it: a row of NaN logits
// came out as lse = -inf), and once the max is not finite it alone is the
// lse: the sums of exp(z - max) are formed and merged only while it is finite
// (exp(inf - inf) would turn a +inf lse into NaN).
TL_DEVICE float max_nan(float a, float b) { return a > b || a != a ? a : b; }
TL_DEVICE bool finite(float x) { return fabsf(x) < INFINITY; }

// Merges (m2, s2) into the online (max, sum of exp(z - max)) pair (m, s); an
// empty pair has m = -inf, s = 0; s is meaningless once m is not finite.
TL_DEVICE void lse_merge(float& m, float& s, float m2, float s2) {
  const float nm = max_nan(m, m2);
  if (finite(nm)) s = s * __expf(m - nm) + s2 * __expf(m2 - nm);
  m = nm;
}

template <class T, int STAGES = 1, bool MMA = false>
TL_DEVICE void xent_partial(const XentPartialParams& p) {
  using S = tl::GemmShape<T, 128, 128, 32, false, true, 0, STAGES, MMA>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  // MmaMath's epilogue reads registers only, and tile_gemm has drained and
  // synchronized its ring before the epilogue: the tile may alias the ring.
  float* z = reinterpret_cast<float*>(MMA ? smem : smem + S::SMEM_BYTES);
  const tl::SegRows<T, T> a{static_cast<const T*>(p.h), p.hidden, p.hidden, static_cast<const T*>(p.p), p.rank,
                            p.rank, p.tokens};
  const tl::SegRows<T, float> b{static_cast<const T*>(p.w), p.hidden, p.hidden, p.u, p.rank, p.rank, p.vocab};
  const tl::SegRows<float, float> none{nullptr, 0, 0, nullptr, 0, 0, 0};
  const int m0 = static_cast<int>(blockIdx.x) * kTile;
  const int split = static_cast<int>(blockIdx.y);
  const int c_begin = split * p.split_cols;
  const int c_end = min(p.vocab, c_begin + p.split_cols);
  const unsigned tid = tl_thread_linear();
  const int row = static_cast<int>(tid) / 2, half = static_cast<int>(tid) % 2;
  const int t = m0 + row;
  const int target = t < p.tokens ? p.targets[t] : -1;
  const float kappa = p.softcap;
  float run_max = -INFINITY, run_sum = 0.0f;
  for (int n0 = c_begin; n0 < c_end; n0 += kTile) {
    tl::tile_gemm<T, S, 2, 4>(
        smem, a, b, none, p.tokens, c_end, p.hidden + p.rank, m0, n0,
        [&](int m, int n, float v, const float*) {
          z[(m - m0) * kZld + (n - n0)] = kappa > 0.0f ? kappa * tanhf(v / kappa) : v;
        },
        [](int, int, float) {});
    __syncthreads();
    // Two threads per row, 64 columns each, then combined with the partner.
    const int cols = min(kTile, c_end - n0);
    const int lo = half * (kTile / 2), hi = min(cols, lo + kTile / 2);
    const float* zr = z + row * kZld;
    float m = -INFINITY;
    for (int c = lo; c < hi; ++c) m = max_nan(m, zr[c]);
    m = max_nan(m, __shfl_xor_sync(TL_FULL_MASK, m, 1));
    float s = 0.0f;
    if (finite(m)) {
      for (int c = lo; c < hi; ++c) s += __expf(zr[c] - m);
    }
    s += __shfl_xor_sync(TL_FULL_MASK, s, 1);
    lse_merge(run_max, run_sum, m, s);
    // The one thread whose columns hold the target writes its logit (target
    // is -1 past the last token and for ignored rows: never in range).
    if (target >= n0 + lo && target < n0 + hi) p.target_logit[t] = zr[target - n0];
    __syncthreads();  // z is rewritten by the next tile's epilogue
  }
  if (t < p.tokens) {
    if (half == 0) {
      p.part_max[static_cast<long long>(split) * p.tokens + t] = run_max;
      p.part_sum[static_cast<long long>(split) * p.tokens + t] = run_sum;
    }
  }
}

template <class T>
TL_DEVICE void xent_partial_wgmma(const XentPartialParams& p) {
#if TL_HAS_WGMMA
  using S = tl::WgShapeK<T, 128, 3>;
  using Acc = tl::WgAcc<128>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  const tl::SegRows<T, T> a{static_cast<const T*>(p.h), p.hidden, p.hidden, static_cast<const T*>(p.p), p.rank,
                            p.rank, p.tokens};
  const tl::SegRows<T, float> b{static_cast<const T*>(p.w), p.hidden, p.hidden, p.u, p.rank, p.rank, p.vocab};
  const int m0 = static_cast<int>(blockIdx.x) * S::BM;
  const int split = static_cast<int>(blockIdx.y);
  const int c_begin = split * p.split_cols;
  const int c_end = min(p.vocab, c_begin + p.split_cols);
  const unsigned tid = tl_thread_linear();
  // This thread's two rows (h = 0, 1: accumulator elements with (e / 2) % 2 == h).
  const int t0 = m0 + 64 * static_cast<int>(tid / tl::kWgThreads) + Acc::row(tid, 0);
  int target[2];
#pragma unroll
  for (int h = 0; h < 2; ++h) target[h] = t0 + 8 * h < p.tokens ? p.targets[t0 + 8 * h] : -1;
  const float kappa = p.softcap;
  float run_max[2] = {-INFINITY, -INFINITY}, run_sum[2] = {0.0f, 0.0f};
  for (int n0 = c_begin; n0 < c_end; n0 += S::N) {
    tl::wg_gemm<T, S>(smem, a, b, tl::no_rows(), p.hidden + p.rank, m0, n0, [&](Acc& acc, int) {
#pragma unroll
      for (int e = 0; e < Acc::REGS; ++e) {
        const float v = acc.v[e];
        acc.v[e] = n0 + Acc::col(tid, e) < c_end ? (kappa > 0.0f ? kappa * tanhf(v / kappa) : v) : -INFINITY;
      }
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float m = -INFINITY;
#pragma unroll
        for (int e = 2 * h; e < Acc::REGS; e += 4) m = max_nan(m, max_nan(acc.v[e], acc.v[e + 1]));
        m = max_nan(m, __shfl_xor_sync(TL_FULL_MASK, m, 1));
        m = max_nan(m, __shfl_xor_sync(TL_FULL_MASK, m, 2));
        float s = 0.0f;
        if (finite(m)) {
#pragma unroll
          for (int e = 2 * h; e < Acc::REGS; e += 4) s += __expf(acc.v[e] - m) + __expf(acc.v[e + 1] - m);
        }
        s += __shfl_xor_sync(TL_FULL_MASK, s, 1);
        s += __shfl_xor_sync(TL_FULL_MASK, s, 2);
        lse_merge(run_max[h], run_sum[h], m, s);
        // The one lane whose columns hold the target writes its logit (target
        // is -1 for ignored rows and rows past T; columns past c_end belong
        // to the next split).
        if (target[h] < c_end) {
#pragma unroll
          for (int e = 2 * h; e < Acc::REGS; e += 2 * 2) {
            const int n = n0 + Acc::col(tid, e);
            if (n == target[h]) p.target_logit[t0 + 8 * h] = acc.v[e];
            if (n + 1 == target[h]) p.target_logit[t0 + 8 * h] = acc.v[e + 1];
          }
        }
      }
    });
  }
  if (tid % 4 == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int t = t0 + 8 * h;
      if (t < p.tokens) {
        p.part_max[static_cast<long long>(split) * p.tokens + t] = run_max[h];
        p.part_sum[static_cast<long long>(split) * p.tokens + t] = run_sum[h];
      }
    }
  }
#else
  (void)p;
  __trap();  // not an sm_90a build: the host never selects this kernel here
#endif
}

#if TL_EXPERIMENTAL
TL_DEVICE void xent_chunk_partial(const XentChunkPartialParams& p) {
  const unsigned lane = threadIdx.x % 32;
  const long long t = static_cast<long long>(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (t >= p.tokens) return;  // whole warps leave together
  const float* zr = p.z + t * p.cols;
  const float kappa = p.softcap;
  float m = -INFINITY, s = 0.0f;
  for (int c = static_cast<int>(lane); c < p.cols; c += 32) {
    lse_merge(m, s, softcapped(zr[c], kappa), 1.0f);
  }
  for (int off = 16; off > 0; off >>= 1) {
    const float m2 = __shfl_xor_sync(TL_FULL_MASK, m, off);
    const float s2 = __shfl_xor_sync(TL_FULL_MASK, s, off);
    lse_merge(m, s, m2, s2);
  }
  if (lane == 0) {
    // Chunks run in order on one stream: fold this one into the running pair
    // (O(T) memory for any number of chunks, one fixed order).
    if (p.chunk > 0) {
      float m0 = p.part_max[t], s0 = p.part_sum[t];
      lse_merge(m0, s0, m, s);
      m = m0;
      s = s0;
    }
    p.part_max[t] = m;
    p.part_sum[t] = s;
    const int y = p.targets[t] - p.col0;
    if (y >= 0 && y < p.cols) p.target_logit[t] = softcapped(zr[y], kappa);
  }
}
#endif  // TL_EXPERIMENTAL

}  // namespace

TL_KERNEL_BOUNDED(tl_xent_partial_f32, XentPartialParams, 256) { xent_partial<float>(p); }
TL_KERNEL_BOUNDED(tl_xent_partial_f16, XentPartialParams, 256) { xent_partial<__half>(p); }
TL_KERNEL_BOUNDED(tl_xent_partial_bf16, XentPartialParams, 256) { xent_partial<__nv_bfloat16>(p); }
#if TL_EXPERIMENTAL
// ldmatrix + mma.sync on the 3-stage ring (`KernelOptions::mma`); two resident
// blocks per SM on sm_90+ (128 registers without spills there; sm_80 would
// spill, so it keeps one).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TL_XENT_MMA_MIN_BLOCKS 2
#else
#define TL_XENT_MMA_MIN_BLOCKS 1
#endif
TL_KERNEL_BOUNDED_MIN(tl_xent_partial_f16_mma, XentPartialParams, 256, TL_XENT_MMA_MIN_BLOCKS) {
  xent_partial<__half, 3, true>(p);
}
TL_KERNEL_BOUNDED_MIN(tl_xent_partial_bf16_mma, XentPartialParams, 256, TL_XENT_MMA_MIN_BLOCKS) {
  xent_partial<__nv_bfloat16, 3, true>(p);
}

// Hopper warpgroup MMAs (`KernelOptions::wgmma`, sm_90a cubin only): 128 x 128
// tiles on a 3-slot ring, two blocks per SM.
TL_KERNEL_BOUNDED_MIN(tl_xent_partial_f16_wgmma, XentPartialParams, 256, 2) { xent_partial_wgmma<__half>(p); }
TL_KERNEL_BOUNDED_MIN(tl_xent_partial_bf16_wgmma, XentPartialParams, 256, 2) {
  xent_partial_wgmma<__nv_bfloat16>(p);
}
#endif  // TL_EXPERIMENTAL

TL_KERNEL_BOUNDED(tl_xent_combine, XentCombineParams, 256) {
  __shared__ float red[256];
  const int tid = static_cast<int>(threadIdx.x);
  float acc = 0.0f;
  for (int t = tid; t < p.tokens; t += 256) {
    float m = -INFINITY;
    for (int s = 0; s < p.splits; ++s) m = max_nan(m, p.part_max[static_cast<long long>(s) * p.tokens + t]);
    float lse = m;  // NaN, +inf, or -inf (every logit -inf): decided by the max
    if (finite(m)) {
      float sum = 0.0f;
      for (int s = 0; s < p.splits; ++s) {
        const long long i = static_cast<long long>(s) * p.tokens + t;
        const float pm = p.part_max[i];
        if (pm != -INFINITY) sum += p.part_sum[i] * __expf(pm - m);
      }
      lse = m + logf(sum);
    }
    p.lse[t] = lse;
    const float l = p.targets[t] >= 0 ? lse - p.target_logit[t] : 0.0f;
    p.row_loss[t] = l;
    acc += l;
  }
  red[tid] = acc;
  __syncthreads();
  for (int stride = 128; stride > 0; stride >>= 1) {
    if (tid < stride) red[tid] += red[tid + stride];
    __syncthreads();
  }
  if (tid == 0) p.loss[0] = p.scale * red[0];
}
#if TL_EXPERIMENTAL
// The cuBLAS path's chunk epilogue (`KernelOptions::cublas`).
TL_KERNEL_BOUNDED(tl_xent_chunk_partial, XentChunkPartialParams, 256) { xent_chunk_partial(p); }
#endif  // TL_EXPERIMENTAL
