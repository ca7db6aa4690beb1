// xent_grad.cu: backward of the fused head + cross-entropy, one vocabulary
// chunk at a time (src/kernels/ops/xent_backward.rs drives it).
//
// logits    grid (ceil(T / 128), ceil(cols / 128)), 256 threads, dynamic shared
//           memory GemmShape::SMEM_BYTES (the _mma variants: ldmatrix +
//           mma.sync on the 3-stage ring; the _wgmma ones: wg_gemm.cuh,
//           WgShapeK<T, 128, 3>::SMEM_BYTES). Recomputes the logit tile
//           z = [h | p] . [W | U]^T of columns [col0, col0 + cols) with the
//           forward's K = d + r tile GEMM and writes, in the epilogue,
//             G'[t, c] = (exp(z'[t, v] - lse[t]) - [v == y_t]) * slope(z[t, v]) * g_unit
//           (v = col0 + c) to g [T, cols] in the storage dtype, and live[i, j]
//           = whether tile (i, j) has an entry >= filter * g_unit (else the
//           tile is written as 0: the optional gradient filter). The head
//           backward's GEMMs (head.cu) then consume the chunk while it is in
//           L2, skipping the tiles flagged 0.
//           G' is the gradient G = d loss / d z without the loss factor
//           (grad_loss / N) and times g_unit (2^15 in f16, else 1): |G'| <=
//           g_unit, so in f16 probabilities down to 2^-29 stay normal numbers
//           (G itself, ~1 / (V N) at a flat softmax, is below f16's smallest
//           subnormal). The consumers' f32 sums get factor / g_unit once, at
//           the end (finish, lora_hidden_grad, the dU / dW GEMMs' scale).
// chunk_grad  (the cuBLAS path, KernelOptions::cublas) grid (tokens,
//           ceil(cols / 256)), 256 threads: g = G' from an f32 logits chunk z
//           [tokens, cols] the engine computed, for one block of tokens.
// finish    grid (T, ceil(d / 256)), 256 threads:
//           dh[t, k] = g_scale * (dh_acc[t, k] + scale * sum_j gu[t, j] Vh[j, k]).
#include "params.h"
#include "tile_gemm.cuh"
#include "wg_gemm.cuh"

namespace {

// G' of one logit (the header: G without the loss factor, times g_unit), from
// the tile GEMM's f32 accumulator.
struct GradOfLogit {
  const int* targets;
  const float* lse;
  float kappa;
  float g_unit;

  TL_DEVICE float operator()(int t, int v, float z) const {
    const int y = targets[t];
    if (y < 0) return 0.0f;  // ignored row: exactly 0 (its lse is not used)
    float slope = 1.0f;
    if (kappa > 0.0f) {
      // tanh and 1 - tanh^2 from e = exp(-2|x|): 1 - tanh^2 = 4e / (1 + e)^2 keeps
      // its relative precision where tanh saturates (1 - th * th would cancel).
      const float x = z / kappa;
      const float e = __expf(-2.0f * fabsf(x));
      const float th = copysignf((1.0f - e) / (1.0f + e), x);
      z = kappa * th;
      slope = 4.0f * e / ((1.0f + e) * (1.0f + e));
    }
    const float prob = __expf(z - lse[t]);
    return (v == y ? prob - 1.0f : prob) * slope * g_unit;
  }
};

template <class T>
TL_DEVICE void filter_tile(const XentGradLogitsParams& p, T* g, int m0, int n0, bool big);

// The logit GEMM's operands: A rows [h_t | p_t], B rows [W_v | U_v] for the
// chunk's vocabulary rows [col0, col0 + cols).
template <class T>
TL_DEVICE tl::SegRows<T, T> logit_rows_a(const XentGradLogitsParams& p) {
  return tl::SegRows<T, T>{static_cast<const T*>(p.h), p.hidden, p.hidden, static_cast<const T*>(p.p),
                           p.rank,                     p.rank,   p.tokens};
}
template <class T>
TL_DEVICE tl::SegRows<T, float> logit_rows_b(const XentGradLogitsParams& p) {
  return tl::SegRows<T, float>{static_cast<const T*>(p.w) + static_cast<long long>(p.col0) * p.hidden,
                               p.hidden,
                               p.hidden,
                               p.u + static_cast<long long>(p.col0) * p.rank,
                               p.rank,
                               p.rank,
                               p.cols};
}

template <class T, int STAGES = 1, bool MMA = false>
TL_DEVICE void xent_grad_logits(const XentGradLogitsParams& p) {
  using S = tl::GemmShape<T, 128, 128, 32, false, true, 0, STAGES, MMA>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  const tl::SegRows<T, T> a = logit_rows_a<T>(p);
  const tl::SegRows<T, float> b = logit_rows_b<T>(p);
  const tl::SegRows<float, float> none{nullptr, 0, 0, nullptr, 0, 0, 0};
  const GradOfLogit gof{p.targets, p.lse, p.softcap, p.g_unit};
  T* g = static_cast<T*>(p.g);
  const long long ldg = p.cols;
  const int m0 = static_cast<int>(blockIdx.x) * S::BM, n0 = static_cast<int>(blockIdx.y) * S::BN;
  const float thresh = p.filter * p.g_unit;
  bool big = false;
  tl::tile_gemm<T, S, 2, 4>(
      smem, a, b, none, p.tokens, p.cols, p.hidden + p.rank, m0, n0,
      [&](int m, int c, float z, const float*) {
        const float gv = gof(m, p.col0 + c, z);
        big = big || !(fabsf(gv) < thresh);  // NaN counts as big: never filtered away
        g[m * ldg + c] = tl_from_float<T>(gv);
      },
      [](int, int, float) {});
  filter_tile(p, g, m0, n0, big);
}

// Gradient filter: a 128 x 128 tile whose entries are all below the threshold
// (`big` false in every thread) is dropped (written as 0, flagged so the
// consumers skip it). With filter 0 every tile is live (|G| < 0 never holds).
template <class T>
TL_DEVICE void filter_tile(const XentGradLogitsParams& p, T* g, int m0, int n0, bool big) {
  const long long ldg = p.cols;
  const bool live = __syncthreads_or(big) != 0;
  if (!live) {
    const int rows = min(128, p.tokens - m0), cols = min(128, p.cols - n0);
    for (int e = static_cast<int>(tl_thread_linear()); e < rows * cols; e += tl::kGemmThreads) {
      g[(m0 + e / cols) * ldg + n0 + e % cols] = tl_from_float<T>(0.0f);
    }
  }
  if (tl_thread_linear() == 0) p.live[static_cast<long long>(blockIdx.x) * gridDim.y + blockIdx.y] = live ? 1 : 0;
}

// The same on Hopper warpgroup MMAs (wg_gemm.cuh, sm_90a): 128 x 128 tiles,
// G written from the accumulators two columns at a time.
template <class T>
TL_DEVICE void xent_grad_logits_wgmma(const XentGradLogitsParams& p) {
#if TL_HAS_WGMMA
  using S = tl::WgShapeK<T, 128, 3>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  const tl::SegRows<T, T> a = logit_rows_a<T>(p);
  const tl::SegRows<T, float> b = logit_rows_b<T>(p);
  const GradOfLogit gof{p.targets, p.lse, p.softcap, p.g_unit};
  T* g = static_cast<T*>(p.g);
  const long long ldg = p.cols;
  const int m0 = static_cast<int>(blockIdx.x) * S::BM, n0 = static_cast<int>(blockIdx.y) * S::N;
  const float thresh = p.filter * p.g_unit;
  bool big = false;
  tl::wg_gemm<T, S>(smem, a, b, tl::no_rows(), p.hidden + p.rank, m0, n0, [&](const tl::WgAcc<128>& acc, int m_base) {
    tl::for_each_pair(acc, m_base, n0, p.tokens, p.cols, [&](int m, int c, float z0, float z1) {
      const bool both = c + 1 < p.cols;
      const float g0 = gof(m, p.col0 + c, z0);
      const float g1 = both ? gof(m, p.col0 + c + 1, z1) : 0.0f;
      big = big || !(fabsf(g0) < thresh) || !(fabsf(g1) < thresh);  // NaN counts as big
      tl::store_pair(g + m * ldg + c, g0, g1, both);
    });
  });
  filter_tile(p, g, m0, n0, big);
#else
  (void)p;
  __trap();  // not an sm_90a build: the host never selects this kernel here
#endif
}

template <class T>
TL_DEVICE void xent_grad_finish(const XentGradFinishParams& p) {
  const long long t = blockIdx.x;
  const int k = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  if (k >= p.hidden) return;
  float lora = 0.0f;
  for (int j = 0; j < p.rank; ++j) lora = fmaf(p.gu[t * p.rank + j], p.vh[static_cast<long long>(j) * p.hidden + k], lora);
  static_cast<T*>(p.dh)[t * p.hidden + k] =
      tl_from_float<T>(p.g_scale * fmaf(p.scale, lora, p.dh_acc[t * p.hidden + k]));
}

template <class T>
TL_DEVICE void xent_chunk_grad(const XentChunkGradParams& p) {
  const long long t = blockIdx.x;
  const int c = static_cast<int>(blockIdx.y * blockDim.x + threadIdx.x);
  if (c >= p.cols) return;
  const GradOfLogit gof{p.targets, p.lse, p.softcap, p.g_unit};
  const long long i = t * p.cols + c;
  static_cast<T*>(p.g)[i] = tl_from_float<T>(gof(static_cast<int>(t), p.col0 + c, p.z[i]));
}

}  // namespace

TL_KERNEL_BOUNDED(tl_xent_grad_logits_f32, XentGradLogitsParams, 256) { xent_grad_logits<float>(p); }
TL_KERNEL_BOUNDED(tl_xent_grad_logits_f16, XentGradLogitsParams, 256) { xent_grad_logits<__half>(p); }
TL_KERNEL_BOUNDED(tl_xent_grad_logits_bf16, XentGradLogitsParams, 256) { xent_grad_logits<__nv_bfloat16>(p); }
#if TL_EXPERIMENTAL
// ldmatrix + mma.sync on the 3-stage ring (`KernelOptions::mma`).
TL_KERNEL_BOUNDED(tl_xent_grad_logits_f16_mma, XentGradLogitsParams, 256) { xent_grad_logits<__half, 3, true>(p); }
TL_KERNEL_BOUNDED(tl_xent_grad_logits_bf16_mma, XentGradLogitsParams, 256) {
  xent_grad_logits<__nv_bfloat16, 3, true>(p);
}
// Hopper warpgroup MMAs (`KernelOptions::wgmma`, sm_90a cubin only), two blocks per SM.
TL_KERNEL_BOUNDED_MIN(tl_xent_grad_logits_f16_wgmma, XentGradLogitsParams, 256, 2) {
  xent_grad_logits_wgmma<__half>(p);
}
TL_KERNEL_BOUNDED_MIN(tl_xent_grad_logits_bf16_wgmma, XentGradLogitsParams, 256, 2) {
  xent_grad_logits_wgmma<__nv_bfloat16>(p);
}
#endif  // TL_EXPERIMENTAL
TL_KERNEL_BOUNDED(tl_xent_grad_finish_f32, XentGradFinishParams, 256) { xent_grad_finish<float>(p); }
TL_KERNEL_BOUNDED(tl_xent_grad_finish_f16, XentGradFinishParams, 256) { xent_grad_finish<__half>(p); }
TL_KERNEL_BOUNDED(tl_xent_grad_finish_bf16, XentGradFinishParams, 256) { xent_grad_finish<__nv_bfloat16>(p); }
#if TL_EXPERIMENTAL
// The cuBLAS path's chunk epilogue (`KernelOptions::cublas`).
TL_KERNEL_BOUNDED(tl_xent_chunk_grad_f32, XentChunkGradParams, 256) { xent_chunk_grad<float>(p); }
TL_KERNEL_BOUNDED(tl_xent_chunk_grad_f16, XentChunkGradParams, 256) { xent_chunk_grad<__half>(p); }
TL_KERNEL_BOUNDED(tl_xent_chunk_grad_bf16, XentChunkGradParams, 256) { xent_chunk_grad<__nv_bfloat16>(p); }
#endif  // TL_EXPERIMENTAL
