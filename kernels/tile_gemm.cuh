// tile_gemm.cuh: the one tiled GEMM main loop every head op is built from.
//
//   C[M, N] = A[M, K] · B[K, N]   (f32 accumulation), optionally with RX extra
//   B columns (Cx[M, RX] = A · Bx[K, RX]) computed from the same A tiles.
//
// Operands are "segmented rows": a logical row is the concatenation of a row of
// p0 (len0 values of type S0) and a row of p1 (len1 values of type S1). That is
// how the LoRA term joins the base GEMM in ONE reduction: the head forward's A
// row is [h_t | s·h_t·Vhᵀ] and its B row is [W_v | U_v], so K = d + r.
//
// Block tile BM x BN, K step BK, 256 threads. Staging (GemmShape::STAGES): 1 =
// global -> registers -> shared memory, the next K tile's loads issued before
// the current tile's math; >= 2 = a cp.async ring whose hot loop takes only
// whole steps inside segment 0 from per-thread sources computed once
// (StageStream), the other steps (LoRA columns, partial tiles) after it on the
// general path. Math policy by compute type CT:
//   * __half / __nv_bfloat16: WMMA m16n16k16 (tensor cores), 8 warps as WM x WN;
//     or, with GemmShape's MMA flag, ldmatrix + mma.sync m16n8k16 (mma.cuh)
//     with the same warp tiling, the epilogue reading the registers directly;
//   * float: plain FMA, 16 x 16 threads each owning an 8 x 8 micro-tile
//     (no TF32: f32 results stay within 1e-5 of the f64 reference).
// Operand layouts in shared memory follow the global contiguity: A_COL means
// A's rows are the K index (A = Gᵀ), B_COL means B's rows are the N index
// (B = Wᵀ). The epilogue gets every in-range (m, n, acc) once, plus a pointer
// to the row's extra results (or nullptr).
#pragma once
#include "common.cuh"
#include "mma.cuh"

namespace tl {

constexpr int kGemmThreads = 256;

// A logical matrix of `rows` rows, each row = p0 row (len0, type S0) ++ p1 row (len1, type S1).
template <class S0, class S1>
struct SegRows {
  const S0* p0;
  long long ld0;
  int len0;
  const S1* p1;
  long long ld1;
  int len1;
  int rows;
};

template <class S0>
TL_DEVICE SegRows<S0, float> seg1(const S0* p, long long ld, int len, int rows) {
  return SegRows<S0, float>{p, ld, len, nullptr, 0, 0, rows};
}

template <class CT>
struct Vec16 {
  static constexpr int N = 16 / sizeof(CT);
};

// Loads VEC values of logical row `o`, columns [i, i + VEC) as CT (zeros past the end).
template <class CT, class S0, class S1>
TL_DEVICE void seg_load(const SegRows<S0, S1>& s, int o, int i, CT* out) {
  constexpr int VEC = Vec16<CT>::N;
  if (o >= s.rows) {
#pragma unroll
    for (int e = 0; e < VEC; ++e) out[e] = tl_from_float<CT>(0.0f);
    return;
  }
  const S0* r0 = s.p0 + static_cast<long long>(o) * s.ld0;
  if constexpr (std::is_same<S0, CT>::value) {
    // Fast path: the whole vector inside segment 0 and 16-byte aligned.
    if (i + VEC <= s.len0 && (reinterpret_cast<unsigned long long>(r0 + i) & 15ull) == 0) {
      *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(r0 + i);
      return;
    }
  }
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    const int c = i + e;
    float v = 0.0f;
    if (c < s.len0) {
      v = tl_to_float(r0[c]);
    } else if (c < s.len0 + s.len1) {
      v = tl_to_float(s.p1[static_cast<long long>(o) * s.ld1 + (c - s.len0)]);
    }
    out[e] = tl_from_float<CT>(v);
  }
}

// A shared-memory tile of OUTER x INNER values (row length LD >= INNER), filled
// from a SegRows starting at (o0, i0): chunks of 16 bytes, CH per thread.
template <class CT, int OUTER, int INNER, int LD>
struct Stage {
  static constexpr int VEC = Vec16<CT>::N;
  static constexpr int CHUNKS = OUTER * INNER / VEC;
  static constexpr int CH = (CHUNKS + kGemmThreads - 1) / kGemmThreads;
  static_assert(INNER % VEC == 0, "tile inner size must be a multiple of the vector width");
  static_assert(LD % VEC == 0, "shared row length must keep 16-byte alignment");
  CT reg[CH][VEC];

  template <class S0, class S1>
  TL_DEVICE void load(const SegRows<S0, S1>& src, int o0, int i0, unsigned tid) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int chunk = static_cast<int>(tid) + c * kGemmThreads;
      if (chunk < CHUNKS) {
        const int o = chunk / (INNER / VEC);
        const int i = (chunk % (INNER / VEC)) * VEC;
        seg_load<CT>(src, o0 + o, i0 + i, reg[c]);
      }
    }
  }
  // Fills the tile straight into shared memory: cp.async for whole aligned
  // vectors of segment 0 already in CT, a converted register copy otherwise.
  template <class S0, class S1>
  TL_DEVICE static void issue(const SegRows<S0, S1>& src, int o0, int i0, unsigned tid, CT* smem) {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int chunk = static_cast<int>(tid) + c * kGemmThreads;
      if (chunk < CHUNKS) {
        const int o = chunk / (INNER / VEC);
        const int i = (chunk % (INNER / VEC)) * VEC;
        CT* dst = smem + o * LD + i;
        const int go = o0 + o, gi = i0 + i;
        if constexpr (std::is_same<S0, CT>::value) {
          if (go < src.rows && gi + VEC <= src.len0) {
            const S0* p = src.p0 + static_cast<long long>(go) * src.ld0 + gi;
            if ((reinterpret_cast<unsigned long long>(p) & 15ull) == 0) {
              tl_cp_async16(dst, p);
              continue;
            }
          }
        }
        CT tmp[VEC];
        seg_load<CT>(src, go, gi, tmp);
        *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
      }
    }
  }
  TL_DEVICE void store(CT* smem, unsigned tid) const {
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int chunk = static_cast<int>(tid) + c * kGemmThreads;
      if (chunk < CHUNKS) {
        const int o = chunk / (INNER / VEC);
        const int i = (chunk % (INNER / VEC)) * VEC;
        *reinterpret_cast<uint4*>(smem + o * LD + i) = *reinterpret_cast<const uint4*>(reg[c]);
      }
    }
  }
};

// The steady state of one operand's cp.async staging: per-thread sources
// computed once, so a K step inside segment 0 costs one cp.async (or a zero
// store) per 16-byte chunk plus a pointer offset, with no per-chunk segment,
// bounds or alignment logic. K runs along the tile's OUTER rows (K_OUTER:
// A = Gᵀ, row-major B, the extras) or along its INNER columns (K_OUTER
// false); the other coordinate is fixed for the block. Steps it cannot take
// (`fast` false: K past segment 0 or past the last row) go through
// Stage::issue, which handles every case.
template <class CT, int OUTER, int INNER, int LD, bool K_OUTER>
struct StageStream {
  using St = Stage<CT, OUTER, INNER, LD>;
  static constexpr int VEC = St::VEC, CH = St::CH, CHUNKS = St::CHUNKS;
  // With whole chunks per thread (the usual case), no chunk < CHUNKS test.
  static constexpr bool EVEN = CHUNKS % kGemmThreads == 0;
  const CT* src[CH];   // chunk c at k = 0 (the operand's base if not in range)
  unsigned ok = 0;     // chunk c exists and its fixed coordinate is in range
  long long kstride = 0;  // elements per unit of k
  int k_limit = -1;       // a step [k0, k0 + BK) is fast iff k0 + BK <= k_limit

  template <class S0, class S1>
  TL_DEVICE void init(const SegRows<S0, S1>& s, int fixed0, unsigned tid) {
    if constexpr (std::is_same<S0, CT>::value) {
      // Whole 16-byte vectors only: an aligned base and row length, and (when
      // the fixed coordinate is a column) no vector straddling segment 0's end.
      const bool aligned = (reinterpret_cast<unsigned long long>(s.p0) & 15ull) == 0 && s.ld0 % VEC == 0;
      const bool whole = !K_OUTER || (s.len0 % VEC == 0 && s.len1 == 0);
      if (!aligned || !whole) return;
      kstride = K_OUTER ? s.ld0 : 1;
      k_limit = K_OUTER ? s.rows : s.len0;
#pragma unroll
      for (int c = 0; c < CH; ++c) {
        const int chunk = static_cast<int>(tid) + c * kGemmThreads;
        const int o = chunk / (INNER / VEC);
        const int i = (chunk % (INNER / VEC)) * VEC;
        const bool in = chunk < CHUNKS && (K_OUTER ? fixed0 + i < s.len0 : fixed0 + o < s.rows);
        src[c] = s.p0;
        if (in) {
          ok |= 1u << c;
          src[c] = K_OUTER ? s.p0 + static_cast<long long>(o) * s.ld0 + fixed0 + i
                           : s.p0 + static_cast<long long>(fixed0 + o) * s.ld0 + i;
        }
      }
    }
  }
  TL_DEVICE bool fast(int k0, int bk) const { return k0 + bk <= k_limit; }
  TL_DEVICE void issue(int k0, CT* smem, unsigned tid) const {
    const long long kofs = static_cast<long long>(k0) * kstride;
#pragma unroll
    for (int c = 0; c < CH; ++c) {
      const int chunk = static_cast<int>(tid) + c * kGemmThreads;
      if (EVEN || chunk < CHUNKS) {
        const int o = chunk / (INNER / VEC);
        const int i = (chunk % (INNER / VEC)) * VEC;
        const bool in = (ok >> c) & 1u;
        // Out of range: zero-filled from the operand's base (read nothing).
        tl_cp_async16_zfill(smem + o * LD + i, in ? src[c] + kofs : src[c], in);
      }
    }
  }
};

// Tile shape and shared-memory layout of one GEMM configuration.
// STAGES_ = 1: global -> registers -> shared, two barriers per K step.
// STAGES_ >= 2: a STAGES_-deep cp.async ring, one barrier per K step.
// MMA_: tensor-core math by ldmatrix + mma.sync (MmaMath) instead of WMMA.
// The padded rows (PAD) also keep ldmatrix free of bank conflicts: 8 rows of
// 16 bytes at a stride of (BK or BN) + 8 values land in 8 distinct bank groups.
template <class CT, int BM_, int BN_, int BK_, bool A_COL_, bool B_COL_, int RX_, int STAGES_ = 1, bool MMA_ = false>
struct GemmShape {
  static constexpr int BM = BM_, BN = BN_, BK = BK_, RX = RX_, STAGES = STAGES_;
  static constexpr bool A_COL = A_COL_, B_COL = B_COL_, MMA = MMA_;
  static constexpr int PAD = Vec16<CT>::N;  // skew rows to spread shared-memory banks
  // A tile: [BM][BK] (row) or [BK][BM] (col); B tile: [BK][BN] (row) or [BN][BK] (col).
  static constexpr int A_OUT = A_COL ? BK : BM, A_IN = A_COL ? BM : BK, LDA = A_IN + PAD;
  static constexpr int B_OUT = B_COL ? BN : BK, B_IN = B_COL ? BK : BN, LDB = B_IN + PAD;
  static constexpr int LDX = RX + PAD;  // extra columns: [BK][RX] row-major
  static constexpr int A_ELEMS = A_OUT * LDA, B_ELEMS = B_OUT * LDB, X_ELEMS = RX > 0 ? BK * LDX : 0;
  static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS + X_ELEMS;
  static constexpr int TILE_BYTES = STAGE_ELEMS * static_cast<int>(sizeof(CT)) * STAGES;
  // Epilogue: extras as f32 [BM][RX], then 8 per-warp 16x16 f32 scratch tiles.
  static constexpr int EPI_BYTES = (BM * RX + 8 * 256) * 4;
  static constexpr int SMEM_BYTES = TILE_BYTES > EPI_BYTES ? TILE_BYTES : EPI_BYTES;
};

// ------------------------------------------------------------------ WMMA ---
template <class CT, class Shape, int WM, int WN>
struct WmmaMath {
  static_assert(WM * WN == 8, "8 warps");
  static constexpr int WTM = Shape::BM / WM, WTN = Shape::BN / WN;
  static constexpr int FM = WTM / 16, FN = WTN / 16;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be whole 16x16 fragments");
  static constexpr int XF_TOTAL = (Shape::BM / 16) * (Shape::RX / 16);
  static constexpr int XF = (XF_TOTAL + 7) / 8;  // extra fragments per warp
  using A_L = typename std::conditional<Shape::A_COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
  using B_L = typename std::conditional<Shape::B_COL, nvcuda::wmma::col_major, nvcuda::wmma::row_major>::type;
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> xacc[XF > 0 ? XF : 1];

  // WMMA math is driven per warp.
  TL_DEVICE static unsigned pick(unsigned warp, unsigned) { return warp; }

  TL_DEVICE void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) nvcuda::wmma::fill_fragment(acc[i][j], 0.0f);
#pragma unroll
    for (int x = 0; x < (XF > 0 ? XF : 1); ++x) nvcuda::wmma::fill_fragment(xacc[x], 0.0f);
  }

  TL_DEVICE const CT* a_ptr(const CT* As, int row, int kk) const {
    return Shape::A_COL ? As + kk * Shape::LDA + row : As + row * Shape::LDA + kk;
  }

  TL_DEVICE void step(const CT* As, const CT* Bs, const CT* Xs, unsigned warp) {
    const int wm = static_cast<int>(warp) / WN, wn = static_cast<int>(warp) % WN;
#pragma unroll
    for (int kk = 0; kk < Shape::BK; kk += 16) {
      nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, CT, A_L> a[FM];
#pragma unroll
      for (int i = 0; i < FM; ++i) nvcuda::wmma::load_matrix_sync(a[i], a_ptr(As, wm * WTM + i * 16, kk), Shape::LDA);
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, CT, B_L> b;
        const int col = wn * WTN + j * 16;
        const CT* bp = Shape::B_COL ? Bs + col * Shape::LDB + kk : Bs + kk * Shape::LDB + col;
        nvcuda::wmma::load_matrix_sync(b, bp, Shape::LDB);
#pragma unroll
        for (int i = 0; i < FM; ++i) nvcuda::wmma::mma_sync(acc[i][j], a[i], b, acc[i][j]);
      }
      if constexpr (Shape::RX > 0) {
#pragma unroll
        for (int x = 0; x < XF; ++x) {
          const int f = static_cast<int>(warp) + x * 8;
          if (f < XF_TOTAL) {
            const int fm = f / (Shape::RX / 16), fx = f % (Shape::RX / 16);
            nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, CT, A_L> ax;
            nvcuda::wmma::load_matrix_sync(ax, a_ptr(As, fm * 16, kk), Shape::LDA);
            nvcuda::wmma::fragment<nvcuda::wmma::matrix_b, 16, 16, 16, CT, nvcuda::wmma::row_major> bx;
            nvcuda::wmma::load_matrix_sync(bx, Xs + kk * Shape::LDX + fx * 16, Shape::LDX);
            nvcuda::wmma::mma_sync(xacc[x], ax, bx, xacc[x]);
          }
        }
      }
    }
  }

  // Extras -> f32 shared [BM][RX].
  TL_DEVICE void store_extras(float* xs, unsigned warp) const {
    if constexpr (Shape::RX > 0) {
#pragma unroll
      for (int x = 0; x < XF; ++x) {
        const int f = static_cast<int>(warp) + x * 8;
        if (f < XF_TOTAL) {
          const int fm = f / (Shape::RX / 16), fx = f % (Shape::RX / 16);
          nvcuda::wmma::store_matrix_sync(xs + fm * 16 * Shape::RX + fx * 16, xacc[x], Shape::RX,
                                          nvcuda::wmma::mem_row_major);
        }
      }
    }
  }

  // Calls epi(local_m, local_n, value) for every element this warp owns.
  template <class Epi>
  TL_DEVICE void for_each(float* scratch, unsigned warp, unsigned lane, Epi&& epi) const {
    const int wm = static_cast<int>(warp) / WN, wn = static_cast<int>(warp) % WN;
    float* mine = scratch + warp * 256;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) {
        nvcuda::wmma::store_matrix_sync(mine, acc[i][j], 16, nvcuda::wmma::mem_row_major);
        __syncwarp();
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int idx = static_cast<int>(lane) + 32 * e;
          epi(wm * WTM + i * 16 + idx / 16, wn * WTN + j * 16 + idx % 16, mine[idx]);
        }
        __syncwarp();
      }
  }
};

// ------------------------------------------------------------------- FMA ---
template <class Shape>
struct FmaMath {
  // 16 x 16 threads; thread (ty, tx) owns rows ty + 16 i and columns tx + 16 j.
  static constexpr int TM = Shape::BM / 16, TN = Shape::BN / 16, XC = Shape::RX / 16;
  static_assert(Shape::BM % 16 == 0 && Shape::BN % 16 == 0, "FMA policy: tiles of whole 16s");
  float acc[TM][TN];
  float xacc[TM][XC > 0 ? XC : 1];

  // FMA math is driven per thread.
  TL_DEVICE static unsigned pick(unsigned, unsigned tid) { return tid; }

  TL_DEVICE void zero() {
#pragma unroll
    for (int i = 0; i < TM; ++i) {
#pragma unroll
      for (int j = 0; j < TN; ++j) acc[i][j] = 0.0f;
#pragma unroll
      for (int x = 0; x < (XC > 0 ? XC : 1); ++x) xacc[i][x] = 0.0f;
    }
  }
  TL_DEVICE static float a_at(const float* As, int m, int k) {
    return Shape::A_COL ? As[k * Shape::LDA + m] : As[m * Shape::LDA + k];
  }
  TL_DEVICE static float b_at(const float* Bs, int k, int n) {
    return Shape::B_COL ? Bs[n * Shape::LDB + k] : Bs[k * Shape::LDB + n];
  }
  TL_DEVICE void step(const float* As, const float* Bs, const float* Xs, unsigned tid) {
    const int ty = static_cast<int>(tid) / 16, tx = static_cast<int>(tid) % 16;
    for (int k = 0; k < Shape::BK; ++k) {
      float a[TM], b[TN];
#pragma unroll
      for (int i = 0; i < TM; ++i) a[i] = a_at(As, ty + 16 * i, k);
#pragma unroll
      for (int j = 0; j < TN; ++j) b[j] = b_at(Bs, k, tx + 16 * j);
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int j = 0; j < TN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
      if constexpr (XC > 0) {
#pragma unroll
        for (int x = 0; x < XC; ++x) {
          const float bx = Xs[k * Shape::LDX + tx + 16 * x];
#pragma unroll
          for (int i = 0; i < TM; ++i) xacc[i][x] = fmaf(a[i], bx, xacc[i][x]);
        }
      }
    }
  }
  TL_DEVICE void store_extras(float* xs, unsigned tid) const {
    if constexpr (XC > 0) {
      const int ty = static_cast<int>(tid) / 16, tx = static_cast<int>(tid) % 16;
#pragma unroll
      for (int i = 0; i < TM; ++i)
#pragma unroll
        for (int x = 0; x < XC; ++x) xs[(ty + 16 * i) * Shape::RX + tx + 16 * x] = xacc[i][x];
    }
  }
  template <class Epi>
  TL_DEVICE void for_each(float*, unsigned tid, unsigned, Epi&& epi) const {
    const int ty = static_cast<int>(tid) / 16, tx = static_cast<int>(tid) % 16;
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) epi(ty + 16 * i, tx + 16 * j, acc[i][j]);
  }
};

// -------------------------------------------------------------- mma.sync ---
// The WMMA policy's warp tiling on ldmatrix + mma.sync m16n8k16 (mma.cuh):
// the accumulators are 16 x 8 blocks whose lane layout is known, so the
// epilogue reads them from registers (no shared-memory scratch round trip).
template <class CT, class Shape, int WM, int WN>
struct MmaMath {
  static_assert(WM * WN == 8, "8 warps");
  static constexpr int WTM = Shape::BM / WM, WTN = Shape::BN / WN;
  static constexpr int FM = WTM / 16, FN = WTN / 8;
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be whole 16x16 blocks");
  static_assert(Shape::RX % 16 == 0, "extra columns in whole 16s");
  static constexpr int XF_TOTAL = (Shape::BM / 16) * (Shape::RX / 16);  // 16 x 16 extra blocks
  static constexpr int XF = (XF_TOTAL + 7) / 8;                         // per warp
  MmaAcc acc[FM][FN];
  MmaAcc xacc[XF > 0 ? XF : 1][2];

  // Driven per thread (it needs both the warp and the lane).
  TL_DEVICE static unsigned pick(unsigned, unsigned tid) { return tid; }

  TL_DEVICE void zero() {
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j) acc[i][j].zero();
#pragma unroll
    for (int x = 0; x < (XF > 0 ? XF : 1); ++x) {
      xacc[x][0].zero();
      xacc[x][1].zero();
    }
  }

  // A block rows [m, m + 16) x k [kk, kk + 16), as mma_16816's 4 matrices.
  TL_DEVICE static void load_a(Mat8 (&a)[4], const CT* As, int m, int kk, unsigned lane) {
    const int i = static_cast<int>(lane) / 8, j = static_cast<int>(lane) % 8;
    if constexpr (Shape::A_COL) {
      // As[k][m]: matrix i is (m block i % 2, k block i / 2), stored k-major.
      ldsm_x4_trans(a, As + (kk + 8 * (i / 2) + j) * Shape::LDA + m + 8 * (i % 2));
    } else {
      // As[m][k]: lanes 0-15 give rows m.. at k = kk, lanes 16-31 at kk + 8.
      ldsm_x4(a, As + (m + static_cast<int>(lane) % 16) * Shape::LDA + kk + 8 * (static_cast<int>(lane) / 16));
    }
  }
  // B columns [n, n + 16) x k [kk, kk + 16): b[0], b[1] are the n8 block at n,
  // b[2], b[3] the one at n + 8 (each as mma_16816's b0, b1).
  template <bool COL>
  TL_DEVICE static void load_b(Mat8 (&b)[4], const CT* Bs, int ld, int n, int kk, unsigned lane) {
    const int i = static_cast<int>(lane) / 8, j = static_cast<int>(lane) % 8;
    if constexpr (COL) {
      ldsm_x4(b, Bs + (n + 8 * (i / 2) + j) * ld + kk + 8 * (i % 2));  // Bs[n][k]
    } else {
      ldsm_x4_trans(b, Bs + (kk + 8 * (i % 2) + j) * ld + n + 8 * (i / 2));  // Bs[k][n]
    }
  }

  TL_DEVICE void step(const CT* As, const CT* Bs, const CT* Xs, unsigned tid) {
    const unsigned warp = tid / 32, lane = tid % 32;
    const int wm = static_cast<int>(warp) / WN, wn = static_cast<int>(warp) % WN;
#pragma unroll
    for (int kk = 0; kk < Shape::BK; kk += 16) {
      Mat8 a[FM][4];
#pragma unroll
      for (int i = 0; i < FM; ++i) load_a(a[i], As, wm * WTM + i * 16, kk, lane);
#pragma unroll
      for (int jj = 0; jj < FN / 2; ++jj) {
        Mat8 b[4];
        load_b<Shape::B_COL>(b, Bs, Shape::LDB, wn * WTN + jj * 16, kk, lane);
#pragma unroll
        for (int i = 0; i < FM; ++i) {
          mma_16816<CT>(acc[i][2 * jj], a[i], b[0], b[1]);
          mma_16816<CT>(acc[i][2 * jj + 1], a[i], b[2], b[3]);
        }
      }
      if constexpr (Shape::RX > 0) {
#pragma unroll
        for (int x = 0; x < XF; ++x) {
          const int f = static_cast<int>(warp) + x * 8;
          if (f < XF_TOTAL) {  // warp-uniform
            const int fm = f / (Shape::RX / 16), fx = f % (Shape::RX / 16);
            Mat8 ax[4], bx[4];
            load_a(ax, As, fm * 16, kk, lane);
            load_b<false>(bx, Xs, Shape::LDX, fx * 16, kk, lane);
            mma_16816<CT>(xacc[x][0], ax, bx[0], bx[1]);
            mma_16816<CT>(xacc[x][1], ax, bx[2], bx[3]);
          }
        }
      }
    }
  }

  // Extras -> f32 shared [BM][RX].
  TL_DEVICE void store_extras(float* xs, unsigned tid) const {
    if constexpr (Shape::RX > 0) {
      const unsigned warp = tid / 32, lane = tid % 32;
#pragma unroll
      for (int x = 0; x < XF; ++x) {
        const int f = static_cast<int>(warp) + x * 8;
        if (f < XF_TOTAL) {
          const int fm = f / (Shape::RX / 16), fx = f % (Shape::RX / 16);
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int e = 0; e < 4; ++e)
              xs[(fm * 16 + MmaAcc::row(lane, e)) * Shape::RX + fx * 16 + 8 * h + MmaAcc::col(lane, e)] =
                  xacc[x][h].get(lane, e);
        }
      }
    }
  }

  // Calls epi(local_m, local_n, value) for every element this lane owns.
  template <class Epi>
  TL_DEVICE void for_each(float*, unsigned tid, unsigned, Epi&& epi) const {
    const unsigned warp = tid / 32, lane = tid % 32;
    const int wm = static_cast<int>(warp) / WN, wn = static_cast<int>(warp) % WN;
#pragma unroll
    for (int i = 0; i < FM; ++i)
#pragma unroll
      for (int j = 0; j < FN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e)
          epi(wm * WTM + i * 16 + MmaAcc::row(lane, e), wn * WTN + j * 8 + MmaAcc::col(lane, e),
              acc[i][j].get(lane, e));
  }
};

template <class CT, class Shape, int WM, int WN>
struct MathFor {
  using type = typename std::conditional<Shape::MMA, MmaMath<CT, Shape, WM, WN>, WmmaMath<CT, Shape, WM, WN>>::type;
};
template <class Shape, int WM, int WN>
struct MathFor<float, Shape, WM, WN> {
  using type = FmaMath<Shape>;
};

// The block's whole GEMM: C tile at (m0, n0) over K = [0, k_total).
//   a: rows = M index (or K index if A_COL), b: rows = K index (or N index if B_COL),
//   x: rows = K index, RX extra columns.
// epi(m, n, value, extras_row) is called for every m < M, n < N of the tile;
// extras_row points at the row's RX extra results (f32, shared) or is nullptr.
// xepi(m, j, value) is called for every m < M and extra column j < RX.
// live(k0) says whether the K step [k0, k0 + BK) can contribute; steps it
// rejects are neither loaded nor multiplied (the cross-entropy backward's
// gradient filter). It must give the same answer in every thread of the block.
struct AllLive {
  TL_DEVICE bool operator()(int) const { return true; }
};

template <class CT, class Shape, int WM, int WN, class SA0, class SA1, class SB0, class SB1, class SX0, class SX1,
          class Epi, class XEpi, class Live = AllLive>
TL_DEVICE void tile_gemm(unsigned char* smem_raw, const SegRows<SA0, SA1>& a, const SegRows<SB0, SB1>& b,
                         const SegRows<SX0, SX1>& x, int M, int N, int k_total, int m0, int n0, Epi&& epi,
                         XEpi&& xepi, Live live = Live{}) {
  using Math = typename MathFor<CT, Shape, WM, WN>::type;
  CT* As = reinterpret_cast<CT*>(smem_raw);
  CT* Bs = As + Shape::A_ELEMS;
  CT* Xs = Bs + Shape::B_ELEMS;
  const unsigned tid = tl_thread_linear();
  const unsigned warp = tid / 32, lane = tid % 32;

  Stage<CT, Shape::A_OUT, Shape::A_IN, Shape::LDA> sa;
  Stage<CT, Shape::B_OUT, Shape::B_IN, Shape::LDB> sb;
  Stage<CT, Shape::BK, (Shape::RX > 0 ? Shape::RX : Vec16<CT>::N), Shape::LDX> sx;
  auto load = [&](int k0) {
    if (Shape::A_COL) sa.load(a, k0, m0, tid); else sa.load(a, m0, k0, tid);
    if (Shape::B_COL) sb.load(b, n0, k0, tid); else sb.load(b, k0, n0, tid);
    if constexpr (Shape::RX > 0) sx.load(x, k0, 0, tid);
  };
  auto store = [&]() {
    sa.store(As, tid);
    sb.store(Bs, tid);
    if constexpr (Shape::RX > 0) sx.store(Xs, tid);
  };

  Math math;
  math.zero();
  // First live K step at or after k (k_total if none).
  auto next_live = [&](int k) {
    while (k < k_total && !live(k)) k += Shape::BK;
    return k;
  };
  if constexpr (Shape::STAGES == 1) {
    int k0 = next_live(0);
    if (k0 < k_total) load(k0);
    while (k0 < k_total) {
      store();
      __syncthreads();
      const int kn = next_live(k0 + Shape::BK);
      if (kn < k_total) load(kn);  // in flight during the math below
      math.step(As, Bs, Xs, Math::pick(warp, tid));
      __syncthreads();
      k0 = kn;
    }
  } else {
    constexpr int S = Shape::STAGES;
    using SA = Stage<CT, Shape::A_OUT, Shape::A_IN, Shape::LDA>;
    using SB = Stage<CT, Shape::B_OUT, Shape::B_IN, Shape::LDB>;
    using SXs = Stage<CT, Shape::BK, (Shape::RX > 0 ? Shape::RX : Vec16<CT>::N), Shape::LDX>;
    // Steady-state sources (StageStream); A's fixed coordinate is m0, B's n0.
    StageStream<CT, Shape::A_OUT, Shape::A_IN, Shape::LDA, Shape::A_COL> fa;
    StageStream<CT, Shape::B_OUT, Shape::B_IN, Shape::LDB, !Shape::B_COL> fb;
    StageStream<CT, Shape::BK, (Shape::RX > 0 ? Shape::RX : Vec16<CT>::N), Shape::LDX, true> fx;
    fa.init(a, m0, tid);
    fb.init(b, n0, tid);
    if constexpr (Shape::RX > 0) fx.init(x, 0, tid);
    // Stages one K step into ring slot `slot`, any step (the general path).
    auto issue = [&](int slot, int k0) {
      CT* base = As + slot * Shape::STAGE_ELEMS;
      if (fa.fast(k0, Shape::BK)) fa.issue(k0, base, tid);
      else if (Shape::A_COL) SA::issue(a, k0, m0, tid, base);
      else SA::issue(a, m0, k0, tid, base);
      if (fb.fast(k0, Shape::BK)) fb.issue(k0, base + Shape::A_ELEMS, tid);
      else if (Shape::B_COL) SB::issue(b, n0, k0, tid, base + Shape::A_ELEMS);
      else SB::issue(b, k0, n0, tid, base + Shape::A_ELEMS);
      if constexpr (Shape::RX > 0) {
        CT* xb = base + Shape::A_ELEMS + Shape::B_ELEMS;
        if (fx.fast(k0, Shape::BK)) fx.issue(k0, xb, tid);
        else SXs::issue(x, k0, 0, tid, xb);
      }
    };
    // ... a step every operand can take on its steady-state path.
    auto issue_fast = [&](int slot, int k0) {
      CT* base = As + slot * Shape::STAGE_ELEMS;
      fa.issue(k0, base, tid);
      fb.issue(k0, base + Shape::A_ELEMS, tid);
      if constexpr (Shape::RX > 0) fx.issue(k0, base + Shape::A_ELEMS + Shape::B_ELEMS, tid);
    };
    // Steps [k0, k0 + BK) with k0 + BK <= k_fast are fast for every operand.
    int k_fast = min(min(fa.k_limit, fb.k_limit), k_total);
    if constexpr (Shape::RX > 0) k_fast = min(k_fast, fx.k_limit);
    // Ring slots advance with wrap-around counters (no % in the loop).
    int pending = 0, slot_in = 0, slot_out = 0;
    int k_next = next_live(0);
    auto issue_next = [&](auto&& how) {
      if (k_next >= k_total) return;
      how(slot_in, k_next);
      slot_in = slot_in + 1 == S ? 0 : slot_in + 1;
      ++pending;
      k_next = next_live(k_next + Shape::BK);
    };
    // One step: wait for the oldest staged K step, stage the next, multiply.
    auto consume = [&](auto&& how) {
      tl_cp_async_wait<S - 2>();  // the oldest pending step has landed (for this thread)
      __syncthreads();            // ... for every thread; the previous step is no longer read
      --pending;
      issue_next(how);
      tl_cp_async_commit();
      CT* base = As + slot_out * Shape::STAGE_ELEMS;
      slot_out = slot_out + 1 == S ? 0 : slot_out + 1;
      math.step(base, base + Shape::A_ELEMS, base + Shape::A_ELEMS + Shape::B_ELEMS, Math::pick(warp, tid));
    };
#pragma unroll
    for (int s = 0; s < S - 1; ++s) {
      issue_next(issue);
      tl_cp_async_commit();
    }
    // The hot loop has no general-path code in it; the tail steps (K past
    // segment 0: the LoRA columns, the last partial tile) follow.
    while (pending > 0 && k_next + Shape::BK <= k_fast) consume(issue_fast);
    while (pending > 0) consume(issue);
    tl_cp_async_wait<0>();
    __syncthreads();
  }

  // Epilogue: shared memory is free again.
  float* xs = reinterpret_cast<float*>(smem_raw);
  float* scratch = xs + Shape::BM * Shape::RX;
  if constexpr (Shape::RX > 0) {
    math.store_extras(xs, Math::pick(warp, tid));
    __syncthreads();
    // xepi(m, j, value) once for every in-range row and extra column.
    for (int e = static_cast<int>(tid); e < Shape::BM * Shape::RX; e += kGemmThreads) {
      const int lm = e / Shape::RX, j = e % Shape::RX;
      if (m0 + lm < M) xepi(m0 + lm, j, xs[e]);
    }
  }
  math.for_each(scratch, Math::pick(warp, tid), lane, [&](int lm, int ln, float v) {
    const int m = m0 + lm, n = n0 + ln;
    if (m < M && n < N) epi(m, n, v, Shape::RX > 0 ? xs + lm * Shape::RX : static_cast<const float*>(nullptr));
  });
}

}  // namespace tl
