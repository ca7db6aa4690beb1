// head.cu: the tied LM head, forward and backward, on the shared tile GEMM.
//
// forward   logits[t, v] = [h_t | p_t] . [W_v | U_v]        K = d + r, one reduction
//           (p = s h Vh^T from lora_project), so the base projection and the LoRA
//           update land in the same accumulator tile and logits are written once.
// grad_h    dh = G W + s (G U) Vh: one reduction over V with B = W plus RX extra
//           columns U, so G U comes out of the same pass; its rows are finished
//           in the block and applied to the tile in the epilogue. Blocks of the
//           first column tile also write gu = G U [T, r] for the dVh pass.
//           `accumulate` mode (the fused cross-entropy backward, per vocabulary
//           chunk): f32 dh += G W, gu += G U, the LoRA term left to the caller.
// `live` (grad_h, grad_param): optional flags of G's 128 x 128 tiles; K steps
// in a tile flagged 0 (all of it filtered to 0) are skipped.
// grad_param  grad[v, :] += scale * G^T B   (B = p for dU, B = h for dW): A is G
//           read transposed; every output element belongs to exactly one block
//           (no split-K, no atomics), so the result is bitwise deterministic.
//
// Launch: 256 threads, dynamic shared memory GemmShape::SMEM_BYTES (mirrored in
// src/kernels/plan.rs). forward grid (ceil(T/128), ceil(V/128));
// grad_h grid (ceil(T/128), ceil(d/128)); grad_param grid (ceil(V/128), ceil(ncols/BN)).
#include "params.h"
#include "tile_gemm.cuh"
#include "wg_gemm.cuh"

namespace {

using tl::SegRows;

template <class T, int STAGES, int BN = 128, bool MMA = false>
TL_DEVICE void head_forward(const HeadForwardParams& p) {
  using S = tl::GemmShape<T, 128, BN, 32, false, true, 0, STAGES, MMA>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  const SegRows<T, T> a{static_cast<const T*>(p.h), p.hidden, p.hidden, static_cast<const T*>(p.p), p.rank, p.rank,
                        p.tokens};
  const SegRows<T, float> b{static_cast<const T*>(p.w), p.hidden, p.hidden, p.u, p.rank, p.rank, p.vocab};
  const SegRows<float, float> none{nullptr, 0, 0, nullptr, 0, 0, 0};
  T* out = static_cast<T*>(p.out);
  const long long ldo = p.vocab;
  tl::tile_gemm<T, S, 2, 4>(
      smem, a, b, none, p.tokens, p.vocab, p.hidden + p.rank, static_cast<int>(blockIdx.x) * S::BM,
      static_cast<int>(blockIdx.y) * S::BN,
      [&](int m, int n, float v, const float*) { out[m * ldo + n] = tl_from_float<T>(v); }, [](int, int, float) {});
}

// The forward on Hopper warpgroup MMAs (wg_gemm.cuh): 128 x BN blocks.
template <class T, int BN, int STAGES>
TL_DEVICE void head_forward_wgmma(const HeadForwardParams& p) {
#if TL_HAS_WGMMA
  using S = tl::WgShapeK<T, BN, STAGES>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  const SegRows<T, T> a{static_cast<const T*>(p.h), p.hidden, p.hidden, static_cast<const T*>(p.p), p.rank, p.rank,
                        p.tokens};
  const SegRows<T, float> b{static_cast<const T*>(p.w), p.hidden, p.hidden, p.u, p.rank, p.rank, p.vocab};
  T* out = static_cast<T*>(p.out);
  const long long ldo = p.vocab;
  const int vocab = p.vocab;
  const int n0 = static_cast<int>(blockIdx.y) * S::N;
  tl::wg_gemm<T, S>(smem, a, b, tl::no_rows(), p.hidden + p.rank, static_cast<int>(blockIdx.x) * S::BM, n0,
                    [&](const tl::WgAcc<BN>& acc, int m_base) {
                      tl::for_each_pair(acc, m_base, n0, p.tokens, vocab, [&](int m, int n, float v0, float v1) {
                        tl::store_pair(out + m * ldo + n, v0, v1, n + 1 < vocab);
                      });
                    });
#else
  (void)p;
  __trap();  // not an sm_90a build: the host never selects this kernel here
#endif
}

template <bool FILTERED, class F>
TL_DEVICE auto pick_live(const F& f) {
  if constexpr (FILTERED) {
    return f;
  } else {
    return tl::AllLive{};
  }
}

// FILTERED = false compiles without the tile-skip predicate (p.live must be
// null; a filtered G is still exact: its dropped tiles are written as 0):
// fewer registers, for the two-blocks-per-SM variants.
template <class T, class G, int RX, int STAGES, bool FILTERED = true, bool MMA = false>
TL_DEVICE void head_grad_h(const HeadGradHParams& p) {
  using S = tl::GemmShape<T, 128, 128, 32, false, false, RX, STAGES, MMA>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  const SegRows<G, float> a{static_cast<const G*>(p.g), p.vocab, p.vocab, nullptr, 0, 0, p.tokens};
  const SegRows<T, float> b{static_cast<const T*>(p.w), p.hidden, p.hidden, nullptr, 0, 0, p.vocab};
  const SegRows<float, float> x{p.u, p.rank, p.rank, nullptr, 0, 0, p.vocab};
  const long long d = p.hidden;
  const int r = p.rank;
  const float s = p.scale;
  const bool write_gu = blockIdx.y == 0;
  const bool acc = p.accumulate != 0;
  // K runs over G's columns: skip the 128-column tiles filtered to 0.
  const int* live_row = p.live ? p.live + static_cast<long long>(blockIdx.x) * p.live_ld : nullptr;
  const auto live_fn = [live_row](int k0) { return live_row == nullptr || live_row[k0 / 128] != 0; };
  using Live = typename std::conditional<FILTERED, decltype(live_fn), tl::AllLive>::type;
  const Live live = pick_live<FILTERED>(live_fn);
  tl::tile_gemm<T, S, 2, 4>(
      smem, a, b, x, p.tokens, p.hidden, p.vocab, static_cast<int>(blockIdx.x) * S::BM,
      static_cast<int>(blockIdx.y) * S::BN,
      [&](int m, int n, float v, const float* gu_row) {
        if (acc) {
          static_cast<float*>(p.dh)[m * d + n] += v;
          return;
        }
        float lora = 0.0f;
        for (int j = 0; j < r; ++j) lora = fmaf(gu_row[j], p.vh[j * d + n], lora);
        static_cast<T*>(p.dh)[m * d + n] = tl_from_float<T>(fmaf(s, lora, v));
      },
      [&](int m, int j, float v) {
        if (!write_gu || j >= r) return;
        float* gu = p.gu + static_cast<long long>(m) * r + j;
        *gu = acc ? *gu + v : v;
      },
      live);
}

// grad_h on Hopper warpgroup MMAs (wg_gemm.cuh, sm_90a): B = W read N-major
// (its rows are the K index), U's RX columns joining the same MMAs as columns
// 128 .. 128 + RX of an m64n(128 + RX)k16, so one pass gives G W and G U. G in
// the storage dtype, no tile filter (the host picks another kernel for those).
// Epilogue: G U goes through shared memory (each row's r values are spread
// over a lane quad), then dh = G W + s (G U) Vh from registers. p.u is U
// packed to [V, RX] in the storage dtype (the host runs lora_small.cu's pack).
template <class T, int RX>
TL_DEVICE void head_grad_h_wgmma(const HeadGradHParams& p) {
#if TL_HAS_WGMMA
  using S = tl::WgShape<tl::WgBNMajor<T, 128, RX>, 4>;
  using Acc = tl::WgAcc<S::N>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  const SegRows<T, float> a{static_cast<const T*>(p.g), p.vocab, p.vocab, nullptr, 0, 0, p.tokens};
  const SegRows<T, float> b{static_cast<const T*>(p.w), p.hidden, p.hidden, nullptr, 0, 0, p.vocab};
  // U packed to the storage dtype, RX columns (params.h, lora_small.cu's pack).
  const SegRows<T, float> x{reinterpret_cast<const T*>(p.u), RX, RX, nullptr, 0, 0, p.vocab};
  const long long d = p.hidden;
  const int r = p.rank;
  const float s = p.scale;
  const bool write_gu = blockIdx.y == 0;
  const bool acc_mode = p.accumulate != 0;
  const int m0 = static_cast<int>(blockIdx.x) * S::BM, n0 = static_cast<int>(blockIdx.y) * 128;
  tl::wg_gemm<T, S>(smem, a, b, x, p.vocab, m0, n0, [&](Acc& acc, int m_base) {
    const unsigned tid = tl_thread_linear();
    float* xs = reinterpret_cast<float*>(smem);  // [128][RX]: the ring is free (wg_gemm's barrier)
    // Elements e >= 64 are the columns >= 128 (WgAcc: column 8 (e / 4) + ...).
#pragma unroll
    for (int e = 64; e < Acc::REGS; ++e) xs[(m_base - m0 + Acc::row(tid, e)) * RX + Acc::col(tid, e) - 128] = acc.v[e];
    __syncthreads();
    if (write_gu) {
      for (int e = static_cast<int>(tid); e < S::BM * RX; e += tl::kGemmThreads) {
        const int m = m0 + e / RX, j = e % RX;
        if (m < p.tokens && j < r) {
          float* gu = p.gu + static_cast<long long>(m) * r + j;
          *gu = acc_mode ? *gu + xs[e] : xs[e];
        }
      }
    }
#pragma unroll
    for (int e = 0; e < 64; e += 2) {
      const int m = m_base + Acc::row(tid, e), n = n0 + Acc::col(tid, e);
      if (m >= p.tokens || n >= p.hidden) continue;
      const bool both = n + 1 < p.hidden;
      if (acc_mode) {
        float* o = static_cast<float*>(p.dh) + m * d + n;
        o[0] += acc.v[e];
        if (both) o[1] += acc.v[e + 1];
        continue;
      }
      const float* gu_row = xs + (m - m0) * RX;
      float l0 = 0.0f, l1 = 0.0f;
      for (int j = 0; j < r; ++j) {
        l0 = fmaf(gu_row[j], p.vh[j * d + n], l0);
        if (both) l1 = fmaf(gu_row[j], p.vh[j * d + n + 1], l1);
      }
      tl::store_pair(static_cast<T*>(p.dh) + m * d + n, fmaf(s, l0, acc.v[e]), fmaf(s, l1, acc.v[e + 1]), both);
    }
  });
#else
  (void)p;
  __trap();  // not an sm_90a build: the host never selects this kernel here
#endif
}

// Split-K over tokens (k_split > 0): block z reduces tokens [z k_split, ...)
// and WRITES its partial sums to grad + z * vocab * ncols (summed in order by
// the caller); k_split = 0: one K range, added into grad. G and B rows start
// at token t0.
template <class G, class T>
struct GradParamSplit {
  long long t0;
  int rows;
  bool write;
  float* grad;
  SegRows<G, float> a;
  SegRows<T, float> b;

  TL_DEVICE explicit GradParamSplit(const HeadGradParamParams& p) {
    const int split = p.k_split > 0 ? static_cast<int>(blockIdx.z) : 0;
    t0 = static_cast<long long>(split) * p.k_split;
    rows = p.k_split > 0 ? min(p.k_split, p.tokens - static_cast<int>(t0)) : p.tokens;
    write = p.k_split > 0;
    grad = p.grad + static_cast<long long>(split) * p.vocab * p.ncols;
    a = SegRows<G, float>{static_cast<const G*>(p.g) + t0 * p.vocab, p.vocab, p.vocab, nullptr, 0, 0, rows};
    b = SegRows<T, float>{static_cast<const T*>(p.b) + t0 * p.ncols, p.ncols, p.ncols, nullptr, 0, 0, rows};
  }
};

template <class T, class G, int BN, int WM, int WN, int STAGES, bool MMA = false>
TL_DEVICE void head_grad_param(const HeadGradParamParams& p) {
  using S = tl::GemmShape<T, 128, BN, 32, true, false, 0, STAGES, MMA>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  const GradParamSplit<G, T> sp(p);
  const SegRows<float, float> none{nullptr, 0, 0, nullptr, 0, 0, 0};
  const long long ld = p.ncols;
  float* grad = sp.grad;
  const bool write = sp.write;
  const int rows = sp.rows;
  // K runs over tokens: skip the 128-token tiles whose G tile in this block's
  // 128 vocabulary columns was filtered to 0 (k_split is a multiple of 128).
  const int* live_col = p.live ? p.live + blockIdx.x + (sp.t0 / 128) * p.live_ld : nullptr;
  const int live_ld = p.live_ld;
  const auto live = [live_col, live_ld](int k0) {
    return live_col == nullptr || live_col[static_cast<long long>(k0 / 128) * live_ld] != 0;
  };
  tl::tile_gemm<T, S, WM, WN>(
      smem, sp.a, sp.b, none, p.vocab, p.ncols, rows, static_cast<int>(blockIdx.x) * S::BM,
      static_cast<int>(blockIdx.y) * S::BN,
      [&](int m, int n, float v, const float*) {
        float* o = grad + m * ld + n;
        *o = write ? p.scale * v : *o + p.scale * v;
      },
      [](int, int, float) {}, live);
}

// grad_param on Hopper warpgroup MMAs (wg_gemm.cuh, sm_90a): A = Gᵀ read
// M-major and B (p for dU, h for dW) read N-major, both straight from their
// token rows; BN = 64 (dU, r <= 64: the columns past r are zero-filled) or
// 128 (dW). Split-K over grid.z exactly as head_grad_param; G in the storage
// dtype, no tile filter (the host picks another kernel for those).
template <class T, int BN>
TL_DEVICE void head_grad_param_wgmma(const HeadGradParamParams& p) {
#if TL_HAS_WGMMA
  using S = tl::WgShapeMN<T, BN, 4>;
  TL_DYNAMIC_SMEM(unsigned char, smem);
  // Both operands' rows are tokens (the K index): A columns are the
  // vocabulary (M), B columns the output columns (N).
  const GradParamSplit<T, T> sp(p);
  const long long ld = p.ncols;
  float* grad = sp.grad;
  const bool write = sp.write;
  const float scale = p.scale;
  const int m0 = static_cast<int>(blockIdx.x) * S::BM, n0 = static_cast<int>(blockIdx.y) * BN;
  tl::wg_gemm<T, S>(smem, sp.a, sp.b, tl::no_rows(), sp.rows, m0, n0, [&](tl::WgAcc<BN>& acc, int m_base) {
    tl::for_each_pair(acc, m_base, n0, p.vocab, p.ncols, [&](int m, int n, float v0, float v1) {
      float* o = grad + m * ld + n;
      o[0] = write ? scale * v0 : o[0] + scale * v0;
      if (n + 1 < p.ncols) o[1] = write ? scale * v1 : o[1] + scale * v1;
    });
  });
#else
  (void)p;
  __trap();  // not an sm_90a build: the host never selects this kernel here
#endif
}

}  // namespace

// The default kernels (the WMMA tile GEMM with the register-staged main loop,
// measured on an H200 on 2026-11-28) are always built. The variants below
// `#if TL_EXPERIMENTAL` (feature `experimental-kernels`) wait for a GPU run
// to measure them; the host selects them in src/kernels/select.rs.
#define TL_HEAD_FORWARD(name, T) \
  TL_KERNEL_BOUNDED(tl_head_forward_##name, HeadForwardParams, 256) { head_forward<T, 1>(p); }
TL_HEAD_FORWARD(f32, float)
TL_HEAD_FORWARD(f16, __half)
TL_HEAD_FORWARD(bf16, __nv_bfloat16)

#define TL_HEAD_GRAD_H(name, T, G, RX)                                     \
  TL_KERNEL_BOUNDED(tl_head_grad_h_##name##_u##RX, HeadGradHParams, 256) { \
    head_grad_h<T, G, RX, 1>(p);                                           \
  }
#define TL_HEAD_GRAD_H_ALL(name, T, G) \
  TL_HEAD_GRAD_H(name, T, G, 16)       \
  TL_HEAD_GRAD_H(name, T, G, 32)       \
  TL_HEAD_GRAD_H(name, T, G, 64)
TL_HEAD_GRAD_H_ALL(f32_f32, float, float)
TL_HEAD_GRAD_H_ALL(f16_f16, __half, __half)
TL_HEAD_GRAD_H_ALL(f16_f32, __half, float)
TL_HEAD_GRAD_H_ALL(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
TL_HEAD_GRAD_H_ALL(bf16_f32, __nv_bfloat16, float)

// n64: dU (r columns, 8 warps stacked along V); n128: dW (d columns).
#define TL_HEAD_GRAD_PARAM(name, T, G)                                           \
  TL_KERNEL_BOUNDED(tl_head_grad_param_##name##_n64, HeadGradParamParams, 256) { \
    head_grad_param<T, G, 64, 8, 1, 1>(p);                                       \
  }                                                                              \
  TL_KERNEL_BOUNDED(tl_head_grad_param_##name##_n128, HeadGradParamParams, 256) {\
    head_grad_param<T, G, 128, 2, 4, 1>(p);                                      \
  }
TL_HEAD_GRAD_PARAM(f32_f32, float, float)
TL_HEAD_GRAD_PARAM(f16_f16, __half, __half)
TL_HEAD_GRAD_PARAM(f16_f32, __half, float)
TL_HEAD_GRAD_PARAM(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
TL_HEAD_GRAD_PARAM(bf16_f32, __nv_bfloat16, float)

#if TL_EXPERIMENTAL
// Wide tiles (an experiment to measure, `Cuda::with_wide_tiles`): 128 x 256
// blocks, 64 x 64 warp tiles (twice the MMAs per shared-memory fragment load
// of the 64 x 32 default), 3-stage cp.async ring, 90 KiB of shared memory.
TL_KERNEL_BOUNDED(tl_head_forward_f16_w256, HeadForwardParams, 256) { head_forward<__half, 3, 256>(p); }
TL_KERNEL_BOUNDED(tl_head_forward_bf16_w256, HeadForwardParams, 256) { head_forward<__nv_bfloat16, 3, 256>(p); }
// ldmatrix + mma.sync instead of WMMA (an experiment to measure, `Cuda::with_mma`),
// both on the 3-stage ring: 128 x 128 blocks (two per SM on sm_90+: ptxas
// fits 128 registers without spills) and the wide 128 x 256 ones.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TL_FORWARD_MMA_MIN_BLOCKS 2
#else
#define TL_FORWARD_MMA_MIN_BLOCKS 1
#endif
TL_KERNEL_BOUNDED_MIN(tl_head_forward_f16_mma, HeadForwardParams, 256, TL_FORWARD_MMA_MIN_BLOCKS) {
  head_forward<__half, 3, 128, true>(p);
}
TL_KERNEL_BOUNDED_MIN(tl_head_forward_bf16_mma, HeadForwardParams, 256, TL_FORWARD_MMA_MIN_BLOCKS) {
  head_forward<__nv_bfloat16, 3, 128, true>(p);
}
TL_KERNEL_BOUNDED(tl_head_forward_f16_w256_mma, HeadForwardParams, 256) { head_forward<__half, 3, 256, true>(p); }
TL_KERNEL_BOUNDED(tl_head_forward_bf16_w256_mma, HeadForwardParams, 256) {
  head_forward<__nv_bfloat16, 3, 256, true>(p);
}

// Hopper warpgroup MMAs (`KernelOptions::wgmma`, sm_90a cubin only):
// 128 x 128 blocks on a 3-slot ring (97 KiB of shared memory, two blocks per
// SM) and 128 x 256 blocks on a 4-slot ring (193 KiB, one block per SM).
TL_KERNEL_BOUNDED_MIN(tl_head_forward_f16_wgmma, HeadForwardParams, 256, 2) { head_forward_wgmma<__half, 128, 3>(p); }
TL_KERNEL_BOUNDED_MIN(tl_head_forward_bf16_wgmma, HeadForwardParams, 256, 2) {
  head_forward_wgmma<__nv_bfloat16, 128, 3>(p);
}
TL_KERNEL_BOUNDED(tl_head_forward_f16_w256_wgmma, HeadForwardParams, 256) { head_forward_wgmma<__half, 256, 4>(p); }
TL_KERNEL_BOUNDED(tl_head_forward_bf16_w256_wgmma, HeadForwardParams, 256) {
  head_forward_wgmma<__nv_bfloat16, 256, 4>(p);
}

// Two resident blocks per SM for the rx16 half-precision grad_h on sm_90+:
// ptxas fits them in 128 registers there without spilling (it does not on
// sm_80, which keeps one block). Selected by `KernelOptions::grad_h_two_blocks`;
// the plain kernels above stay for comparison (BENCHMARKS.md).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define TL_GRAD_H_RX16_MIN_BLOCKS 2
#else
#define TL_GRAD_H_RX16_MIN_BLOCKS 1
#endif
#define TL_HEAD_GRAD_H_2BLOCKS(name, T, G)                                                                      \
  TL_KERNEL_BOUNDED_MIN(tl_head_grad_h_##name##_u16_2blocks, HeadGradHParams, 256, TL_GRAD_H_RX16_MIN_BLOCKS) { \
    head_grad_h<T, G, 16, 1, false>(p);                                                                    \
  }
TL_HEAD_GRAD_H_2BLOCKS(f16_f16, __half, __half)
TL_HEAD_GRAD_H_2BLOCKS(f16_f32, __half, float)
TL_HEAD_GRAD_H_2BLOCKS(bf16_bf16, __nv_bfloat16, __nv_bfloat16)
TL_HEAD_GRAD_H_2BLOCKS(bf16_f32, __nv_bfloat16, float)

// ldmatrix + mma.sync on the 3-stage ring (`KernelOptions::mma`), G in the storage dtype.
#define TL_HEAD_GRAD_H_MMA(name, T, RX)                                                \
  TL_KERNEL_BOUNDED(tl_head_grad_h_##name##_u##RX##_mma, HeadGradHParams, 256) {      \
    head_grad_h<T, T, RX, 3, true, true>(p);                                           \
  }
TL_HEAD_GRAD_H_MMA(f16_f16, __half, 16)
TL_HEAD_GRAD_H_MMA(f16_f16, __half, 32)
TL_HEAD_GRAD_H_MMA(f16_f16, __half, 64)
TL_HEAD_GRAD_H_MMA(bf16_bf16, __nv_bfloat16, 16)
TL_HEAD_GRAD_H_MMA(bf16_bf16, __nv_bfloat16, 32)
TL_HEAD_GRAD_H_MMA(bf16_bf16, __nv_bfloat16, 64)

// Hopper warpgroup MMAs (`KernelOptions::wgmma`, sm_90a cubin only): 128 x
// (128 + RX) tiles on a 4-slot ring (161 KiB of shared memory).
#define TL_HEAD_GRAD_H_WGMMA(name, T, RX)                                         \
  TL_KERNEL_BOUNDED(tl_head_grad_h_##name##_u##RX##_wgmma, HeadGradHParams, 256) { \
    head_grad_h_wgmma<T, RX>(p);                                                  \
  }
TL_HEAD_GRAD_H_WGMMA(f16_f16, __half, 16)
TL_HEAD_GRAD_H_WGMMA(f16_f16, __half, 32)
TL_HEAD_GRAD_H_WGMMA(f16_f16, __half, 64)
TL_HEAD_GRAD_H_WGMMA(bf16_bf16, __nv_bfloat16, 16)
TL_HEAD_GRAD_H_WGMMA(bf16_bf16, __nv_bfloat16, 32)
TL_HEAD_GRAD_H_WGMMA(bf16_bf16, __nv_bfloat16, 64)

// ldmatrix + mma.sync on the 3-stage ring (`KernelOptions::mma`), G in the storage dtype.
#define TL_HEAD_GRAD_PARAM_MMA(name, T)                                                  \
  TL_KERNEL_BOUNDED(tl_head_grad_param_##name##_n64_mma, HeadGradParamParams, 256) {     \
    head_grad_param<T, T, 64, 8, 1, 3, true>(p);                                         \
  }                                                                                      \
  TL_KERNEL_BOUNDED(tl_head_grad_param_##name##_n128_mma, HeadGradParamParams, 256) {    \
    head_grad_param<T, T, 128, 2, 4, 3, true>(p);                                        \
  }
TL_HEAD_GRAD_PARAM_MMA(f16_f16, __half)
TL_HEAD_GRAD_PARAM_MMA(bf16_bf16, __nv_bfloat16)
// Hopper warpgroup MMAs (`KernelOptions::wgmma`, sm_90a cubin only), 4-slot
// ring: n64 (dU) 97 KiB, two blocks per SM; n128 (dW) 129 KiB.
#define TL_HEAD_GRAD_PARAM_WGMMA(name, T)                                                    \
  TL_KERNEL_BOUNDED_MIN(tl_head_grad_param_##name##_n64_wgmma, HeadGradParamParams, 256, 2) { \
    head_grad_param_wgmma<T, 64>(p);                                                         \
  }                                                                                          \
  TL_KERNEL_BOUNDED(tl_head_grad_param_##name##_n128_wgmma, HeadGradParamParams, 256) {      \
    head_grad_param_wgmma<T, 128>(p);                                                        \
  }
TL_HEAD_GRAD_PARAM_WGMMA(f16_f16, __half)
TL_HEAD_GRAD_PARAM_WGMMA(bf16_bf16, __nv_bfloat16)
#endif  // TL_EXPERIMENTAL
