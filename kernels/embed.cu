// embed.cu: the tied embedding with LoRA, forward, and the deterministic
// grouped row sum of its backward.
//
// ---------------------------------------------------------------------------
// embed_forward   out[t, :] = c * (W[i_t, :] + s * U[i_t, :] . Vh)      (f32 math, one rounding)
//   Ids are the caller's u32 or i64, range-checked as they are loaded
//   (tl_checked_id): rows of ids outside [0, V) are written as NaN and no
//   memory is read for them; with a deferred id-error record the first one is
//   recorded by this launch (tl_id_record_bad by the one thread that loads
//   the id in column block 0, tl_id_record_finish by every thread at the end),
//   so the op is ONE launch with no host round trip.
//
//   Memory-bound: per token it reads one W row (d * sizeof(T)) and one U row
//   (r * 4), and writes one output row. Each thread owns NC contiguous columns
//   for the whole kernel and keeps Vh[0:RC, its columns] in registers
//   (RC * NC floats), so the r FMAs per output element read no memory for Vh.
//   Each warp (threadIdx.y) is one token stream, t = t_first + k * Gy * BY;
//   fast path: a ring of S shared-memory stages per warp receives, by cp.async,
//   the W packs (one 4/8/16-byte pack per lane) and the U row of the next S - 1
//   tokens while the current one is computed (U read back as float4
//   broadcasts); token ids are loaded 32 at a time, a batch ahead. The fast path
//   needs d % NC == 0, W and out aligned to the pack, r <= RC, blockDim.x == 32;
//   anything else (odd d, misaligned views, r > RC) takes a register-light
//   generic path inside the same kernel (correct for any d, r; slower).
//
//   Kernels tl_embed_forward_{f32,f16,bf16}_r{8,16,32,64}: the host picks the
//   smallest RC >= r (r <= 8 -> r8, <= 16 -> r16, <= 32 -> r32, else r64; r > 64
//   runs the generic path of r64). Per kernel (launch bounds 128 threads, MINB
//   resident blocks per SM; W = waves used in the grid formula below):
//        kernel          NC  S   MINB  W     kernel          NC  S   MINB  W
//        f32_r8          4   8   4     4     f16/bf16_r8     8   8   4     4
//        f32_r16         4   8   4     4     f16/bf16_r16    8   8   3     2
//        f32_r32         4   8   3     2     f16/bf16_r32    2   12  4     4
//        f32_r64         2   8   3     2     f16/bf16_r64    2   8   3     2
//   Launch: block (32, 4, 1) (blockDim.y <= TL_EMBED_MAX_WARPS = 4; 128 threads max);
//           grid  (ceil(ceil(d / NC) / 32), Gy, 1),
//           Gy = min(ceil(T / 4), 65535, max(1, ceil(W * num_SMs * B / grid.x))),
//           B = resident blocks per SM (cuOccupancyMaxActiveBlocksPerMultiprocessor,
//           or MINB). Static shared memory only (<= 20.1 KiB), no dynamic.
//   Measured on an H200 (gather-copy ceiling ~3.85 TB/s, D2D copy 4.27 TB/s),
//   V = 256000, d = 2304, T = 32768: f32 r8/r16/r32 94/93/81 % of the gather
//   copy, bf16 r8/r16/r32/r64 84/72/32/18 % (r >= 32 in 16-bit storage is
//   bound by the r f32 FMAs per element on CUDA cores).
//
// ---------------------------------------------------------------------------
// group_rows      out[id, :] += scale * sum_{i: keys[i] == id} x[perm[i], :]
//   Input: the sorted (keys, perm) of sort_ids.cu (keys[i] == vocab marks a
//   skipped token; those sort last and are ignored). No float atomics; the
//   summation order is fixed: the sorted positions are cut into chunks of
//   TL_GROUP_CHUNK = 64; inside a chunk rows are summed in sorted order, and a
//   run of equal ids that crosses chunk boundaries is the sum, in chunk order,
//   of its per-chunk partial sums. Bitwise identical run to run.
//
//   Two kernels, same params, same grid:
//     1. tl_group_rows_partial_{f32,f16,bf16} (x dtype): each (chunk, column)
//        walks its 64 sorted positions. A run entirely inside the chunk is
//        written straight to out (this chunk is its only owner); the run that
//        continues from the previous chunk goes to head[chunk], the run that
//        starts here and continues into the next chunk goes to tail[chunk].
//     2. tl_group_rows_combine: for each chunk whose last run starts in it and
//        continues, out[id] += scale * (tail[chunk] + head[chunk+1] + ... +
//        head[last chunk of the run]) (run end found by a galloping search).
//   Every update is out = fmaf(scale, sum, out), written by exactly one thread.
//   Scratch partial: 2 * nchunks * ncols f32, nchunks = ceil(T / 64)
//   (head = partial[0 : nchunks*ncols], tail = partial[nchunks*ncols : ]); no init.
//   Launch (both): block (32, BY, 1), BY in {1..8} (4 recommended);
//                  grid (ceil(ncols / 32), ceil(nchunks / BY), 1). No shared memory.
//   Kernel 1 must complete before kernel 2 (same stream).
//   Uses: dU (x = gU [T, r] f32 from lora_project, ncols = r, scale 1) and
//         dW (x = dE [T, d] f32 or storage dtype, ncols = d, scale c).
#include "embed_params.h"

namespace {

// ------------------------------------------------------------- helpers ----

// Raw 32-bit words <-> elements of the storage dtype.
template <class T>
TL_DEVICE float tl_bits_to_float(unsigned b);
template <>
TL_DEVICE float tl_bits_to_float<float>(unsigned b) { return __uint_as_float(b); }
template <>
TL_DEVICE float tl_bits_to_float<__half>(unsigned b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b & 0xffffu)));
}
template <>
TL_DEVICE float tl_bits_to_float<__nv_bfloat16>(unsigned b) { return __uint_as_float((b & 0xffffu) << 16); }

template <class T>
TL_DEVICE unsigned tl_float_to_bits(float x);
template <>
TL_DEVICE unsigned tl_float_to_bits<float>(float x) { return __float_as_uint(x); }
template <>
TL_DEVICE unsigned tl_float_to_bits<__half>(float x) { return __half_as_ushort(__float2half_rn(x)); }
template <>
TL_DEVICE unsigned tl_float_to_bits<__nv_bfloat16>(float x) { return __bfloat16_as_ushort(__float2bfloat16_rn(x)); }

TL_DEVICE unsigned tl_elem_bits(float x) { return __float_as_uint(x); }
TL_DEVICE unsigned tl_elem_bits(__half x) { return __half_as_ushort(x); }
TL_DEVICE unsigned tl_elem_bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

template <class T>
TL_DEVICE T tl_elem_from_bits(unsigned b);
template <>
TL_DEVICE float tl_elem_from_bits<float>(unsigned b) { return __uint_as_float(b); }
template <>
TL_DEVICE __half tl_elem_from_bits<__half>(unsigned b) { return __ushort_as_half(static_cast<unsigned short>(b)); }
template <>
TL_DEVICE __nv_bfloat16 tl_elem_from_bits<__nv_bfloat16>(unsigned b) {
  return __ushort_as_bfloat16(static_cast<unsigned short>(b));
}

// NW consecutive 32-bit words (one 4-, 8- or 16-byte access; the address is
// aligned to NW * 4). kNc: read-only (non-coherent) path.
template <int NW, bool kNc>
TL_DEVICE void tl_load_words(const void* ptr, unsigned (&wd)[NW]) {
#if defined(__CUDACC__)
  if constexpr (NW == 4) {
    const uint4 v = kNc ? __ldg(static_cast<const uint4*>(ptr)) : *static_cast<const uint4*>(ptr);
    wd[0] = v.x;
    wd[1] = v.y;
    wd[2] = v.z;
    wd[3] = v.w;
  } else if constexpr (NW == 2) {
    const uint2 v = kNc ? __ldg(static_cast<const uint2*>(ptr)) : *static_cast<const uint2*>(ptr);
    wd[0] = v.x;
    wd[1] = v.y;
  } else {
    static_assert(NW == 1, "1, 2 or 4 words");
    wd[0] = kNc ? __ldg(static_cast<const unsigned*>(ptr)) : *static_cast<const unsigned*>(ptr);
  }
#else
  std::memcpy(wd, ptr, sizeof(wd));
#endif
}

template <int NW>
TL_DEVICE void tl_store_words(void* ptr, const unsigned (&wd)[NW]) {
#if defined(__CUDACC__)
  if constexpr (NW == 4) {
    *static_cast<uint4*>(ptr) = make_uint4(wd[0], wd[1], wd[2], wd[3]);
  } else if constexpr (NW == 2) {
    *static_cast<uint2*>(ptr) = make_uint2(wd[0], wd[1]);
  } else {
    static_assert(NW == 1, "1, 2 or 4 words");
    *static_cast<unsigned*>(ptr) = wd[0];
  }
#else
  std::memcpy(ptr, wd, sizeof(wd));
#endif
}

TL_DEVICE float4 tl_ldg_f4(const float* p) {
#if defined(__CUDACC__)
  return __ldg(reinterpret_cast<const float4*>(p));
#else
  float4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

TL_DEVICE void tl_prefetch_l1(const void* p) {
#if defined(__CUDA_ARCH__)
  asm volatile("prefetch.global.L1 [%0];" ::"l"(p));
#else
  (void)p;
#endif
}

TL_DEVICE float4 tl_lds_f4(const float* p) {
#if defined(__CUDACC__)
  return *reinterpret_cast<const float4*>(p);
#else
  float4 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
#endif
}

// Two floats -> one 32-bit word of two 16-bit elements (lo = a), round to nearest even.
template <class T>
TL_DEVICE unsigned tl_pack2(float a, float b);
template <>
TL_DEVICE unsigned tl_pack2<__half>(float a, float b) {
#if defined(__CUDACC__)
  const __half2 h = __floats2half2_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
#else
  return tl_float_to_bits<__half>(a) | (tl_float_to_bits<__half>(b) << 16);
#endif
}
template <>
TL_DEVICE unsigned tl_pack2<__nv_bfloat16>(float a, float b) {
#if defined(__CUDACC__)
  const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
  return *reinterpret_cast<const unsigned*>(&h);
#else
  return tl_float_to_bits<__nv_bfloat16>(a) | (tl_float_to_bits<__nv_bfloat16>(b) << 16);
#endif
}

// out pack = c * (W pack + s * acc), W and out as raw words.
template <class T, int NC, int NW>
TL_DEVICE void tl_embed_epilogue(const unsigned (&wd)[NW], const float (&acc)[NC], float s, float c, unsigned (&o)[NW]) {
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int e = 0; e < NC; ++e) o[e] = __float_as_uint(c * fmaf(s, acc[e], __uint_as_float(wd[e])));
  } else {
#pragma unroll
    for (int k = 0; k < NW; ++k) {
      const float lo = c * fmaf(s, acc[2 * k], tl_bits_to_float<T>(wd[k]));
      const float hi = c * fmaf(s, acc[2 * k + 1], tl_bits_to_float<T>(wd[k] >> 16));
      o[k] = tl_pack2<T>(lo, hi);
    }
  }
}

// ------------------------------------------------------- embed_forward ----

// General path (fallback): any d and alignment, any r. Vh is held for rank
// chunks of RC (kept small: 32 / NC, so the fallback does not raise the
// kernel's register count) and reloaded per token when r > RC. W is
// prefetched one token ahead in registers.
template <class T, int RC, int NC>
TL_DEVICE void embed_forward_generic(const EmbedForwardParams& p) {
  constexpr int EPW = 4 / static_cast<int>(sizeof(T));  // elements per 32-bit word
  constexpr int NW = NC / EPW;                           // words per pack
  static_assert(NW * EPW == NC && (NW == 1 || NW == 2 || NW == 4), "pack of 4, 8 or 16 bytes");
  static_assert(RC % 4 == 0, "rank chunk is a multiple of 4");
  constexpr unsigned kPackBytes = NC * sizeof(T);

  const int d = p.hidden;
  const int r = p.rank;
  const int col0 = (static_cast<int>(blockIdx.x) * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x)) * NC;
  if (col0 >= d) return;  // no warp collectives below: idle column groups may leave

  const T* __restrict__ w = static_cast<const T*>(p.w);
  T* __restrict__ out = static_cast<T*>(p.out);
  const float* __restrict__ u = p.u;
  const float* __restrict__ vh = p.vh;
  const float s = p.scale;
  const float c = p.embed_scale;
  const int ncols = min(NC, d - col0);
  const bool vec = (d % NC == 0) && tl_aligned(w, kPackBytes) && tl_aligned(out, kPackBytes);
  const bool u4 = (r % 4 == 0) && tl_aligned(u, 16);

  // Vh[j0 + j, col0 + e] for j < RC, e < NC (zero outside [0, r) x [0, d)).
  float vreg[RC][NC];
  auto load_vh = [&](int j0) {
#pragma unroll
    for (int j = 0; j < RC; ++j) {
#pragma unroll
      for (int e = 0; e < NC; ++e)
        vreg[j][e] = (j0 + j < r && e < ncols) ? __ldg(vh + static_cast<long long>(j0 + j) * d + col0 + e) : 0.0f;
    }
  };
  const bool resident = r <= RC;
  if (resident) load_vh(0);

  // The W pack of row `id` (zeros for id < 0), as raw words.
  auto load_w = [&](int id, unsigned (&wd)[NW]) {
#pragma unroll
    for (int k = 0; k < NW; ++k) wd[k] = 0u;
    if (id < 0) return;
    const T* src = w + static_cast<long long>(id) * d + col0;
    if (vec) {
      tl_load_words<NW, true>(src, wd);
    } else {
#pragma unroll
      for (int e = 0; e < NC; ++e)
        if (e < ncols) wd[e / EPW] |= tl_elem_bits(src[e]) << (32 / EPW * (e % EPW));
    }
  };

  const long long tokens = p.tokens;
  const long long step = static_cast<long long>(gridDim.y) * blockDim.y;
  const long long t_first = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y;
  // Column block 0's lane 0 of each token stream reports the stream's bad ids.
  const bool reports = p.record != nullptr && blockIdx.x == 0 && threadIdx.x == 0;
  auto id_of = [&](long long t) -> int {
    if (t >= tokens) return -1;
    const int id = tl_checked_id(p.ids, p.id_bytes, t, p.vocab);
    if (id < 0 && reports) tl_id_record_bad(p.record, t);
    return id;
  };

  int id0 = id_of(t_first);
  int id1 = id_of(t_first + step);
  unsigned w0[NW];
  load_w(id0, w0);
  for (long long t = t_first; t < tokens; t += step) {
    // Prefetch: ids two tokens ahead, the next token's W pack and U row.
    const int id2 = id_of(t + 2 * step);
    unsigned w1[NW];
    load_w(id1, w1);
    if (id1 >= 0 && static_cast<int>(threadIdx.x) * 32 < r + 31)
      tl_prefetch_l1(u + static_cast<long long>(id1) * r + min(static_cast<int>(threadIdx.x) * 32, r - 1));

    unsigned o[NW];
    if (id0 >= 0) {
      float acc[NC];
#pragma unroll
      for (int e = 0; e < NC; ++e) acc[e] = 0.0f;
      const float* urow = u + static_cast<long long>(id0) * r;
      for (int j0 = 0; j0 < r; j0 += RC) {
        if (!resident) load_vh(j0);
#pragma unroll
        for (int q = 0; q < RC / 4; ++q) {
          const int j = j0 + 4 * q;
          if (j >= r) break;
          float4 uq;
          if (u4) {
            uq = tl_ldg_f4(urow + j);
          } else {
            uq.x = __ldg(urow + j);
            uq.y = j + 1 < r ? __ldg(urow + j + 1) : 0.0f;
            uq.z = j + 2 < r ? __ldg(urow + j + 2) : 0.0f;
            uq.w = j + 3 < r ? __ldg(urow + j + 3) : 0.0f;
          }
#pragma unroll
          for (int e = 0; e < NC; ++e) {
            float a = acc[e];
            a = fmaf(uq.x, vreg[4 * q + 0][e], a);
            a = fmaf(uq.y, vreg[4 * q + 1][e], a);
            a = fmaf(uq.z, vreg[4 * q + 2][e], a);
            a = fmaf(uq.w, vreg[4 * q + 3][e], a);
            acc[e] = a;
          }
        }
      }
#pragma unroll
      for (int k = 0; k < NW; ++k) o[k] = 0u;
#pragma unroll
      for (int e = 0; e < NC; ++e) {
        const float wv = tl_bits_to_float<T>(w0[e / EPW] >> (32 / EPW * (e % EPW)));
        o[e / EPW] |= tl_float_to_bits<T>(c * fmaf(s, acc[e], wv)) << (32 / EPW * (e % EPW));
      }
    } else {
      const unsigned nan_bits = tl_float_to_bits<T>(__uint_as_float(0x7fc00000u));
#pragma unroll
      for (int k = 0; k < NW; ++k) o[k] = EPW == 1 ? nan_bits : (nan_bits | (nan_bits << 16));
    }
    T* dst = out + t * d + col0;
    if (vec) {
      tl_store_words<NW>(dst, o);
    } else {
#pragma unroll
      for (int e = 0; e < NC; ++e)
        if (e < ncols) dst[e] = tl_elem_from_bits<T>((o[e / EPW] >> (32 / EPW * (e % EPW))) & (EPW == 1 ? 0xffffffffu : 0xffffu));
    }

    id0 = id1;
    id1 = id2;
#pragma unroll
    for (int k = 0; k < NW; ++k) w0[k] = w1[k];
  }
}

// Fast path: d % NC == 0, W / out aligned to the pack, r <= RC. Each warp is one
// token stream; a ring of S shared-memory stages per warp holds the W packs
// (cp.async, one per lane), the U row (zero-padded to RC) and the id of the
// next S-1 tokens in flight, so S-1 row loads per warp overlap the FMAs.
template <int S, int RC, int NW>
struct EmbedSmem {
  unsigned w[TL_EMBED_MAX_WARPS][S][32 * NW];
  float u[TL_EMBED_MAX_WARPS][S][RC];
  int id[TL_EMBED_MAX_WARPS][S];
};

template <class T, int RC, int NC, int S>
TL_DEVICE void embed_forward_fast(const EmbedForwardParams& p) {
  constexpr int EPW = 4 / static_cast<int>(sizeof(T));
  constexpr int NW = NC / EPW;
  static_assert(S >= 2, "at least two stages");
  __shared__ __align__(16) EmbedSmem<S, RC, NW> sm;
  const int d = p.hidden;
  const int r = p.rank;
  const int lane = static_cast<int>(threadIdx.x);
  const int wy = static_cast<int>(threadIdx.y);
  const int col0 = (static_cast<int>(blockIdx.x) * 32 + lane) * NC;
  const bool active = col0 < d;  // lanes past d stay for the warp-wide steps
  const T* __restrict__ w_lane = static_cast<const T*>(p.w) + col0;
  const float* __restrict__ u = p.u;
  const float s = p.scale;
  const float c = p.embed_scale;

  float vreg[RC][NC];
#pragma unroll
  for (int j = 0; j < RC; ++j) {
#pragma unroll
    for (int e = 0; e < NC; ++e)
      vreg[j][e] = (j < r && active) ? __ldg(p.vh + static_cast<long long>(j) * d + col0 + e) : 0.0f;
  }
  // U stages: zero padding [r, RC) written once (the copies only fill [0, r)).
#pragma unroll
  for (int st = 0; st < S; ++st)
    for (int j = r + lane; j < RC; j += 32) sm.u[wy][st][j] = 0.0f;

  // This warp's tokens: t_first + k * step, k < n_mine (all < tokens, so int).
  const int step = static_cast<int>(gridDim.y * blockDim.y);
  const int t_first = static_cast<int>(blockIdx.y * blockDim.y) + wy;
  const int n_mine = t_first < p.tokens ? (p.tokens - 1 - t_first) / step + 1 : 0;
  // Ids come in batches of 32 (one per lane), loaded a whole batch ahead and
  // handed out with shuffles; -1 past the end (no copies are issued).
  // Each id is loaded by one lane; column block 0 reports the bad ones.
  const bool reports = p.record != nullptr && blockIdx.x == 0;
  auto id_at = [&](int k) -> int {
    if (k >= n_mine) return -1;
    const int t = t_first + k * step;
    const int id = tl_checked_id(p.ids, p.id_bytes, t, p.vocab);
    if (id < 0 && reports) tl_id_record_bad(p.record, t);
    return id;
  };
  int ids_cur = id_at(lane);
  int ids_nxt = id_at(32 + lane);
  int k_issue = 0;
  // Issue the copies of token k_issue into stage st; always one commit.
  auto issue = [&](int st) {
    const int id = __shfl_sync(TL_FULL_MASK, ids_cur, k_issue & 31);
    if ((k_issue & 31) == 31) {
      ids_cur = ids_nxt;
      ids_nxt = id_at(k_issue + 33 + lane);
    }
    if (lane == 0) sm.id[wy][st] = id;
    if (id >= 0) {
      if (active) tl_cp_async<NW * 4>(&sm.w[wy][st][lane * NW], w_lane + static_cast<long long>(id) * d);
      const float* urow = u + static_cast<long long>(id) * r + lane;
#pragma unroll
      for (int j0 = 0; j0 < RC; j0 += 32)
        if (j0 + lane < r) tl_cp_async<4>(&sm.u[wy][st][j0 + lane], urow + j0);
    }
    tl_cp_async_commit();
    ++k_issue;
  };

#pragma unroll
  for (int st = 0; st < S - 1; ++st) issue(st);
  T* out_ptr = static_cast<T*>(p.out) + static_cast<long long>(t_first) * d + col0;
  const long long out_step = static_cast<long long>(step) * d;
  int st = 0;
  for (int k = 0; k < n_mine; ++k) {
    issue(st == 0 ? S - 1 : st - 1);  // the stage freed last iteration
    tl_cp_async_wait<S - 1>();
    __syncwarp();
    const int id = sm.id[wy][st];
    if (active) {
      unsigned o[NW];
      if (id >= 0) {
        float acc[NC];
#pragma unroll
        for (int e = 0; e < NC; ++e) acc[e] = 0.0f;
#pragma unroll
        for (int q = 0; q < RC / 4; ++q) {
          const float4 uq = tl_lds_f4(&sm.u[wy][st][4 * q]);
#pragma unroll
          for (int e = 0; e < NC; ++e) {
            float a = acc[e];
            a = fmaf(uq.x, vreg[4 * q + 0][e], a);
            a = fmaf(uq.y, vreg[4 * q + 1][e], a);
            a = fmaf(uq.z, vreg[4 * q + 2][e], a);
            a = fmaf(uq.w, vreg[4 * q + 3][e], a);
            acc[e] = a;
          }
        }
        unsigned wd[NW];
#if defined(__CUDACC__)
        if constexpr (NW == 4) {
          const uint4 v = *reinterpret_cast<const uint4*>(&sm.w[wy][st][lane * NW]);
          wd[0] = v.x, wd[1] = v.y, wd[2] = v.z, wd[3] = v.w;
        } else if constexpr (NW == 2) {
          const uint2 v = *reinterpret_cast<const uint2*>(&sm.w[wy][st][lane * NW]);
          wd[0] = v.x, wd[1] = v.y;
        } else {
          wd[0] = sm.w[wy][st][lane];
        }
#else
        std::memcpy(wd, &sm.w[wy][st][lane * NW], sizeof(wd));
#endif
        tl_embed_epilogue<T, NC, NW>(wd, acc, s, c, o);
      } else {
        const unsigned nan_bits = tl_float_to_bits<T>(__uint_as_float(0x7fc00000u));
#pragma unroll
        for (int q = 0; q < NW; ++q) o[q] = EPW == 1 ? nan_bits : (nan_bits | (nan_bits << 16));
      }
      tl_store_words<NW>(out_ptr, o);
    }
    out_ptr += out_step;
    __syncwarp();  // stage st is read by all lanes before it is refilled
    st = st + 1 == S ? 0 : st + 1;
  }
  tl_cp_async_wait<0>();
}

template <class T, int RC, int NC, int S>
TL_DEVICE void embed_forward(const EmbedForwardParams& p) {
  constexpr unsigned kPackBytes = NC * sizeof(T);
  const bool fast = p.hidden % NC == 0 && p.rank <= RC && tl_aligned(p.w, kPackBytes) && tl_aligned(p.out, kPackBytes) &&
                    blockDim.x == 32 && blockDim.y <= TL_EMBED_MAX_WARPS;
  if (fast) embed_forward_fast<T, RC, NC, S>(p);
  else embed_forward_generic<T, (32 / NC < 4 ? 4 : 32 / NC), NC>(p);
  if (p.record) tl_id_record_finish(p.record, p.ids, p.id_bytes, p.vocab, p.arg);
}

// ---------------------------------------------------------- group_rows ----

// Each warp is one chunk and 32 columns. Lanes hold keys[a + lane],
// keys[a + 32 + lane] (and perm) and hand them out with shuffles. A run that
// ends at sorted position i (keys[i] != keys[i + 1]) is finished there:
//   keys[i] == prev (continues from the previous chunk) -> head[chunk]
//   else keys[i] == next (continues into the next chunk) -> tail[chunk]
//   else                                               -> out[key] += scale * sum
// Per step of 8 positions, the x rows and the out values of the runs that end
// in the step are loaded first (distinct runs are distinct out rows).
template <class X>
TL_DEVICE void group_rows_partial(const GroupRowsParams& p) {
  constexpr int CH = TL_GROUP_CHUNK;
  static_assert(CH == 64, "two lane-held words per chunk");
  const int n = p.n;
  const int V = p.vocab;
  const int ncols = p.ncols;
  const long long chunk = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y;
  const long long a = chunk * CH;
  if (a >= n) return;  // uniform per warp (a warp is one chunk)
  const int lane = static_cast<int>(threadIdx.x);
  const int col = static_cast<int>(blockIdx.x) * 32 + lane;
  const bool col_ok = col < ncols;
  const int len = static_cast<int>(min(static_cast<long long>(CH), n - a));
  const int* keys = p.keys + a;
  const int* perm = p.perm + a;
  const X* x = static_cast<const X*>(p.x);
  const long long nchunks = (static_cast<long long>(n) + CH - 1) / CH;
  float* out = p.out;
  const float scale = p.scale;

  const int key_lo = lane < len ? keys[lane] : V;
  const int key_hi = lane + 32 < len ? keys[lane + 32] : V;
  const int perm_lo = lane < len ? perm[lane] : 0;
  const int perm_hi = lane + 32 < len ? perm[lane + 32] : 0;
  const int prev = a > 0 ? p.keys[a - 1] : -1;
  const int next = a + len < n ? p.keys[a + len] : -1;

  float acc = 0.0f;
  for (int i0 = 0; i0 < CH; i0 += 8) {
    int kk[9];
    int row[8];
#pragma unroll
    for (int k = 0; k < 9; ++k) {
      const int i = i0 + k;  // i == 64 (k == 8 of the last step): the key after the chunk
      const int key = __shfl_sync(TL_FULL_MASK, (i & 32) ? key_hi : key_lo, i & 31);
      kk[k] = i < len ? key : (i == CH ? next : V);
      if (k < 8) row[k] = __shfl_sync(TL_FULL_MASK, (i & 32) ? perm_hi : perm_lo, i & 31);
    }
    float xv[8], ov[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int key = kk[k];
      xv[k] = (key < V && col_ok) ? tl_to_float(x[static_cast<long long>(row[k]) * ncols + col]) : 0.0f;
      const bool direct = key < V && key != kk[k + 1] && key != prev && key != next;
      ov[k] = (direct && col_ok) ? out[static_cast<long long>(key) * ncols + col] : 0.0f;
    }
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int key = kk[k];
      if (key >= V) break;  // skipped tokens sort last
      acc += xv[k];
      if (key != kk[k + 1] || i0 + k == len - 1) {  // the run ends here, or the chunk does
        if (col_ok) {
          if (key == prev) p.partial[chunk * ncols + col] = acc;
          else if (key == next) p.partial[(nchunks + chunk) * ncols + col] = acc;
          else out[static_cast<long long>(key) * ncols + col] = fmaf(scale, acc, ov[k]);
        }
        acc = 0.0f;
      }
    }
  }
}

TL_DEVICE void group_rows_combine(const GroupRowsParams& p) {
  constexpr int CH = TL_GROUP_CHUNK;
  const long long n = p.n;
  const int V = p.vocab;
  const int ncols = p.ncols;
  const long long chunk = static_cast<long long>(blockIdx.y) * blockDim.y + threadIdx.y;
  const long long a = chunk * CH;
  const long long b = min(a + CH, n);
  if (b >= n) return;  // also a >= n; the last chunk has no open run
  const int col = static_cast<int>(blockIdx.x) * 32 + static_cast<int>(threadIdx.x);
  if (col >= ncols) return;
  const int* keys = p.keys;
  const int kl = keys[b - 1];
  if (kl >= V || keys[b] != kl) return;           // the last run ends in this chunk
  if (a > 0 && keys[a] == kl && keys[a - 1] == kl) return;  // whole chunk continues an earlier run
  // Galloping search for the run end: keys[lo] == kl, hi == n or keys[hi] != kl.
  long long lo = b;
  long long stride = CH;
  while (lo + stride < n && keys[lo + stride] == kl) {
    lo += stride;
    stride *= 2;
  }
  long long hi = min(lo + stride, n);
  while (hi - lo > 1) {
    const long long mid = lo + (hi - lo) / 2;
    if (keys[mid] == kl) lo = mid;
    else hi = mid;
  }
  const long long last_chunk = (hi - 1) / CH;
  const long long nchunks = (n + CH - 1) / CH;
  float total = p.partial[(nchunks + chunk) * ncols + col];
  long long c2 = chunk + 1;
  for (; c2 + 8 <= last_chunk + 1; c2 += 8) {  // 8 loads in flight, added in order
    float v[8];
#pragma unroll
    for (int k = 0; k < 8; ++k) v[k] = p.partial[(c2 + k) * ncols + col];
#pragma unroll
    for (int k = 0; k < 8; ++k) total += v[k];
  }
  for (; c2 <= last_chunk; ++c2) total += p.partial[c2 * ncols + col];
  float* o = p.out + static_cast<long long>(kl) * ncols + col;
  *o = fmaf(p.scale, total, *o);
}

}  // namespace

// Blocks of at most 128 threads (32 x BY, BY <= 4) and a minimum number of
// resident blocks per SM (MINB), i.e. a register budget of 65536 / (128 MINB).
#if defined(__CUDACC__)
#define TL_EMBED_KERNEL(name, MINB) \
  extern "C" __global__ void __launch_bounds__(128, MINB) name(const EmbedForwardParams p)
#else
#define TL_EMBED_KERNEL(name, MINB) TL_KERNEL_IMPL(name, EmbedForwardParams, 128)
#endif
#define TL_EMBED_FORWARD(name, T, RC, NC, S, MINB) \
  TL_EMBED_KERNEL(tl_embed_forward_##name##_r##RC, MINB) { embed_forward<T, RC, NC, S>(p); }
//               dtype  T               RC  NC  S  MINB
TL_EMBED_FORWARD(f32,  float,          8,  4,  8, 4)
TL_EMBED_FORWARD(f32,  float,          16, 4,  8, 4)
TL_EMBED_FORWARD(f32,  float,          32, 4,  8, 3)
TL_EMBED_FORWARD(f32,  float,          64, 2,  8, 3)
TL_EMBED_FORWARD(f16,  __half,         8,  8,  8, 4)
TL_EMBED_FORWARD(f16,  __half,         16, 8,  8, 3)
TL_EMBED_FORWARD(f16,  __half,         32, 2,  12, 4)
TL_EMBED_FORWARD(f16,  __half,         64, 2,  8, 3)
TL_EMBED_FORWARD(bf16, __nv_bfloat16,  8,  8,  8, 4)
TL_EMBED_FORWARD(bf16, __nv_bfloat16,  16, 8,  8, 3)
TL_EMBED_FORWARD(bf16, __nv_bfloat16,  32, 2,  12, 4)
TL_EMBED_FORWARD(bf16, __nv_bfloat16,  64, 2,  8, 3)

#define TL_GROUP_ROWS_PARTIAL(name, X) \
  TL_KERNEL_BOUNDED(tl_group_rows_partial_##name, GroupRowsParams, 256) { group_rows_partial<X>(p); }
TL_GROUP_ROWS_PARTIAL(f32, float)
TL_GROUP_ROWS_PARTIAL(f16, __half)
TL_GROUP_ROWS_PARTIAL(bf16, __nv_bfloat16)

TL_KERNEL_BOUNDED(tl_group_rows_combine, GroupRowsParams, 256) { group_rows_combine(p); }
