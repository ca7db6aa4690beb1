// wg_gemm.cuh: the head GEMM main loop on Hopper warpgroup MMAs (wgmma.cuh).
//
//   C[M, N] = A[M, K] . B[K, N]        (f32 accumulation)
//
// A and B are "segmented rows" (tile_gemm.cuh): the head forward's A row is
// [h_t | s h_t Vh^T] and its B row [W_v | U_v], so the LoRA columns join the
// base reduction (K = d + r) exactly as in tile_gemm. A is always K-major (its
// rows are M). B comes through a policy:
//   WgBKMajor<CT, BN>      B rows are N (the head forward: B = [W | U]);
//   WgBNMajor<CT, BN, RX>  B rows are K (grad_h: B = W [V, d], N = BN columns
//                          of d) plus RX extra columns from X rows (U [V, r]),
//                          in the same MMA: N = BN + RX (dh and G U at once).
//
// Block tile 128 x N, K step 64 (one 128-byte swizzled row per operand row),
// 256 threads = 2 warpgroups; warpgroup g owns rows [64 g, 64 g + 64) and all
// N columns: four m64nNk16 MMAs per K step, accumulators in registers
// (N / 2 per thread).
//
// Pipeline: STAGES shared slots of (A 128 x 64 | B), each 1024-byte
// aligned. Steps whose columns lie inside segment 0 with 16-byte aligned rows
// (the steady state) are staged by cp.async from per-thread sources computed
// once (zero-fill for rows past the end); the other steps (the LoRA columns,
// the last partial K step, unaligned operands) by seg_load + st.shared. Step s
// waits for its own cp.async group, fences the proxies (the tensor cores read
// shared memory through the async proxy), passes one barrier, stages step
// s + STAGES - 2 into the slot that step s - 2 used (every warpgroup retired
// step s - 2's MMAs with wg_wait<1> before that barrier), issues its MMAs and
// leaves them in flight while the next step's copies land.
//
// Epilogue: after every warpgroup's MMAs are retired (and a barrier, so the
// caller may reuse shared memory at once), epi(acc, m_base) with this
// thread's accumulators (mutable: the epilogue may transform them in place):
// element e is C[m_base + WgAcc::row(tid, e), n0 + WgAcc::col(tid, e)], not
// masked (rows past M and columns past N hold 0 . 0 sums). for_each_pair
// walks the in-range elements two columns at a time.
#pragma once
#include "tile_gemm.cuh"
#include "wgmma.cuh"

namespace tl {

// Stores C[m, n] (and C[m, n + 1] when `both`) into row-major storage o = &C[m, n],
// as one 32-bit store for 16-bit pairs at a 4-byte aligned address.
template <class T>
TL_DEVICE void store_pair(T* o, float v0, float v1, bool both) {
  if constexpr (sizeof(T) == 2) {
    if (both && (reinterpret_cast<unsigned long long>(o) & 3ull) == 0) {
      const T pair[2] = {tl_from_float<T>(v0), tl_from_float<T>(v1)};
      unsigned bits;
      memcpy(&bits, pair, 4);
      *reinterpret_cast<unsigned*>(o) = bits;
      return;
    }
  }
  o[0] = tl_from_float<T>(v0);
  if (both) o[1] = tl_from_float<T>(v1);
}

// One operand's staging into a swizzled ROWS x 64 tile: 8 chunks of 16 bytes
// per row, chunk tid + 256 i = (row tid / 8 + 32 i, column chunk tid % 8).
template <class CT, int ROWS>
struct WgStream {
  static_assert(sizeof(CT) == 2 && ROWS % 32 == 0, "16-bit operands, rows in 32s");
  static constexpr int CH = ROWS / 32;
  const CT* p0 = nullptr;
  long long off0 = 0;    // elements from p0 to chunk 0 at k = 0
  long long step32 = 0;  // elements per 32 rows
  unsigned ok = 0;       // chunk i's row is in range
  int k_limit = -1;      // a step [k0, k0 + 64) is fast iff k0 + 64 <= k_limit

  template <class S0, class S1>
  TL_DEVICE void init(const SegRows<S0, S1>& s, int row0, unsigned tid) {
    if constexpr (std::is_same<S0, CT>::value) {
      if ((reinterpret_cast<unsigned long long>(s.p0) & 15ull) != 0 || s.ld0 % 8 != 0) return;
      p0 = s.p0;
      const int r = row0 + static_cast<int>(tid / 8);
      off0 = static_cast<long long>(r) * s.ld0 + 8 * static_cast<int>(tid % 8);
      step32 = 32 * s.ld0;
      k_limit = s.len0;
#pragma unroll
      for (int i = 0; i < CH; ++i)
        if (r + 32 * i < s.rows) ok |= 1u << i;
    }
  }
  TL_DEVICE bool fast(int k0) const { return k0 + 64 <= k_limit; }
  TL_DEVICE void issue_fast(int k0, unsigned char* tile, unsigned tid) const {
    const int c = static_cast<int>(tid % 8);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int row = static_cast<int>(tid / 8) + 32 * i;
      const bool in = (ok >> i) & 1u;
      // Out of range: zero-filled, the source is only named (nothing is read).
      tl_cp_async16_zfill(tile + swz128_offset(row, c), in ? p0 + off0 + i * step32 + k0 : p0, in);
    }
  }
  template <class S0, class S1>
  TL_DEVICE static void issue_general(const SegRows<S0, S1>& s, int row0, int k0, unsigned char* tile, unsigned tid) {
    const int c = static_cast<int>(tid % 8);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int row = static_cast<int>(tid / 8) + 32 * i;
      CT tmp[8];
      seg_load<CT>(s, row0 + row, k0 + 8 * c, tmp);
      *reinterpret_cast<uint4*>(tile + swz128_offset(row, c)) = *reinterpret_cast<const uint4*>(tmp);
    }
  }
};

// No extra columns (the X operand of a K-major B).
TL_DEVICE SegRows<float, float> no_rows() { return SegRows<float, float>{nullptr, 0, 0, nullptr, 0, 0, 0}; }

// B operand, K-major: B rows are the N index (WgStream's layout).
template <class CT, int BN>
struct WgBKMajor {
  using CT_ = CT;
  static constexpr int N = BN, BYTES = BN * 128;
  WgStream<CT, BN> s;
  template <class SB, class SX>
  TL_DEVICE void init(const SB& b, const SX&, int n0, unsigned tid) {
    s.init(b, n0, tid);
  }
  TL_DEVICE int k_limit() const { return s.k_limit; }
  template <class SB, class SX>
  TL_DEVICE void issue_fast(const SB&, const SX&, int k0, unsigned char* tile, unsigned tid) const {
    s.issue_fast(k0, tile, tid);
  }
  template <class SB, class SX>
  TL_DEVICE static void issue_general(const SB& b, const SX&, int n0, int k0, unsigned char* tile, unsigned tid) {
    WgStream<CT, BN>::issue_general(b, n0, k0, tile, tid);
  }
  template <bool A_MMAJOR>
  TL_DEVICE static void mma(WgAcc<N>& acc, unsigned long long da, unsigned sb, int kk) {
    static_assert(!A_MMAJOR, "paired with a K-major A");
    wgmma_k16<CT, N>(acc, da, wg_desc(sb + 32u * kk));
  }
};

// A [64 k][COLS] tile whose source rows are the K index, in N-major atoms
// (wgmma.cuh): COLS / 64 atoms [64 k][64 columns] of 8 KiB. Chunk tid + 256 i
// = (k row tid / (COLS / 8) + (256 / (COLS / 8)) i, column chunk tid % (COLS /
// 8)): one column chunk per thread, so one in-range flag. Used for an
// N-major B (W in grad_h; p or h in grad_param) and an M-major A (Gᵀ).
template <class CT, int COLS>
struct WgKRowStream {
  static_assert(sizeof(CT) == 2 && COLS % 64 == 0, "16-bit operands, whole atoms");
  static constexpr int CPR = COLS / 8, RPP = kGemmThreads / CPR, CH = 64 / RPP, BYTES = COLS / 64 * 8192;
  static_assert(kGemmThreads % CPR == 0 && 64 % RPP == 0, "whole k rows per pass");
  const CT* p0 = nullptr;
  long long off0 = 0, ld = 0;
  bool ok = false;
  int k_lim = -1;

  TL_DEVICE static int offset(int kr, int cn) { return (cn / 8) * 8192 + kr * 128 + (((cn % 8) ^ (kr & 7)) << 4); }

  // `extra_ok`: the caller's own conditions for the fast path.
  template <class S0, class S1>
  TL_DEVICE void init(const SegRows<S0, S1>& b, int c0, unsigned tid, bool extra_ok = true) {
    if constexpr (std::is_same<S0, CT>::value) {
      // Whole 16-byte vectors: aligned base and rows, segment 0 only, its
      // width a multiple of 8 (a chunk is all in or all out).
      if ((reinterpret_cast<unsigned long long>(b.p0) & 15ull) != 0 || b.ld0 % 8 != 0 || b.len0 % 8 != 0 ||
          b.len1 != 0 || !extra_ok)
        return;
      const int col = c0 + 8 * static_cast<int>(tid % CPR);
      p0 = b.p0;
      ld = b.ld0;
      off0 = static_cast<long long>(tid / CPR) * b.ld0 + col;
      ok = col < b.len0;
      k_lim = b.rows;
    }
  }
  TL_DEVICE int k_limit() const { return k_lim; }
  TL_DEVICE void issue_fast(int k0, unsigned char* tile, unsigned tid) const {
    const int cn = static_cast<int>(tid % CPR);
    const long long kofs = static_cast<long long>(k0) * ld;
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int kr = static_cast<int>(tid / CPR) + RPP * i;
      // Columns past the end: zero-filled, the source only named.
      tl_cp_async16_zfill(tile + offset(kr, cn), ok ? p0 + off0 + kofs + static_cast<long long>(RPP * i) * ld : p0, ok);
    }
  }
  template <class S0, class S1>
  TL_DEVICE static void issue_general(const SegRows<S0, S1>& b, int c0, int k0, unsigned char* tile, unsigned tid) {
    const int cn = static_cast<int>(tid % CPR);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
      const int kr = static_cast<int>(tid / CPR) + RPP * i;
      CT tmp[8];
      seg_load<CT>(b, k0 + kr, c0 + 8 * cn, tmp);
      *reinterpret_cast<uint4*>(tile + offset(kr, cn)) = *reinterpret_cast<const uint4*>(tmp);
    }
  }
};

// B operand, N-major (wgmma.cuh): B rows are the K index. The BN columns of
// B fill BN / 64 atoms (WgKRowStream); the RX extra columns (X rows: U packed
// to CT and RX columns, or any SegRows through seg_load) the first RX columns
// of one more atom. Paired with a K-major A.
template <class CT, int BN, int RX>
struct WgBNMajor {
  static_assert(RX % 16 == 0 && RX > 0 && RX <= 64, "RX");
  using CT_ = CT;
  static constexpr int N = BN + RX, ATOMS = BN / 64 + 1, BYTES = ATOMS * 8192;
  WgKRowStream<CT, BN> w;

  template <class S0, class S1, class X0, class X1>
  TL_DEVICE void init(const SegRows<S0, S1>& b, const SegRows<X0, X1>& x, int n0, unsigned tid) {
    if constexpr (std::is_same<X0, CT>::value) {
      // X as packed: 16-byte rows, at least RX wide, at least as many rows.
      w.init(b, n0, tid,
             (reinterpret_cast<unsigned long long>(x.p0) & 15ull) == 0 && x.ld0 % 8 == 0 && x.len0 >= RX &&
                 x.len1 == 0 && x.rows >= b.rows);
    }
  }
  TL_DEVICE int k_limit() const { return w.k_limit(); }
  // The X columns of step k0. `fast`: every row k0 .. k0 + 63 exists and X is
  // stored in CT with 16-byte rows (U packed by lora_small.cu's pack, RX wide,
  // zero-padded), so cp.async; otherwise seg_load (conversion, zeros past the
  // ends) and a shared store.
  template <class S0, class S1>
  TL_DEVICE static void issue_x(const SegRows<S0, S1>& x, int k0, unsigned char* tile, unsigned tid, bool fast) {
    constexpr int XC = RX / 8;  // chunks per k row
    for (int j = static_cast<int>(tid); j < 64 * XC; j += kGemmThreads) {
      const int kr = j / XC, c = j % XC;
      unsigned char* dst = tile + (ATOMS - 1) * 8192 + kr * 128 + ((c ^ (kr & 7)) << 4);
      if constexpr (std::is_same<S0, CT>::value) {
        if (fast) {
          tl_cp_async16(dst, x.p0 + static_cast<long long>(k0 + kr) * x.ld0 + 8 * c);
          continue;
        }
      }
      CT tmp[8];
      seg_load<CT>(x, k0 + kr, 8 * c, tmp);
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(tmp);
    }
  }
  template <class SB, class SX>
  TL_DEVICE void issue_fast(const SB&, const SX& x, int k0, unsigned char* tile, unsigned tid) const {
    w.issue_fast(k0, tile, tid);
    issue_x(x, k0, tile, tid, true);
  }
  template <class SB, class SX>
  TL_DEVICE static void issue_general(const SB& b, const SX& x, int n0, int k0, unsigned char* tile, unsigned tid) {
    WgKRowStream<CT, BN>::issue_general(b, n0, k0, tile, tid);
    issue_x(x, k0, tile, tid, false);
  }
  template <bool A_MMAJOR>
  TL_DEVICE static void mma(WgAcc<N>& acc, unsigned long long da, unsigned sb, int kk) {
    static_assert(!A_MMAJOR, "paired with a K-major A");
    wgmma_k16_nb<CT, N>(acc, da, wg_desc_nb(sb + 2048u * kk));
  }
};

// B operand, N-major without extra columns, paired with an M-major A
// (grad_param: B = p or h, whose rows are tokens, the K index).
template <class CT, int BN>
struct WgBNMajorPlain {
  using CT_ = CT;
  static constexpr int N = BN, BYTES = BN / 64 * 8192;
  WgKRowStream<CT, BN> w;
  template <class SB, class SX>
  TL_DEVICE void init(const SB& b, const SX&, int n0, unsigned tid) {
    w.init(b, n0, tid);
  }
  TL_DEVICE int k_limit() const { return w.k_limit(); }
  template <class SB, class SX>
  TL_DEVICE void issue_fast(const SB&, const SX&, int k0, unsigned char* tile, unsigned tid) const {
    w.issue_fast(k0, tile, tid);
  }
  template <class SB, class SX>
  TL_DEVICE static void issue_general(const SB& b, const SX&, int n0, int k0, unsigned char* tile, unsigned tid) {
    WgKRowStream<CT, BN>::issue_general(b, n0, k0, tile, tid);
  }
  template <bool A_MMAJOR>
  TL_DEVICE static void mma(WgAcc<N>& acc, unsigned long long da, unsigned sb, int kk) {
    static_assert(A_MMAJOR, "paired with an M-major A");
    wgmma_k16_ma_nb<CT, N>(acc, da, wg_desc_nb(sb + 2048u * kk));
  }
};

// A operand, K-major: A rows are the M index (WgStream). Warpgroup g's 64
// rows start 64 g rows (8 KiB) into the tile.
template <class CT>
struct WgAKMajor {
  static constexpr bool M_MAJOR = false;
  WgStream<CT, 128> s;
  template <class SA>
  TL_DEVICE void init(const SA& a, int m0, unsigned tid) {
    s.init(a, m0, tid);
  }
  TL_DEVICE int k_limit() const { return s.k_limit; }
  TL_DEVICE void issue_fast(int k0, unsigned char* tile, unsigned tid) const { s.issue_fast(k0, tile, tid); }
  template <class SA>
  TL_DEVICE static void issue_general(const SA& a, int m0, int k0, unsigned char* tile, unsigned tid) {
    WgStream<CT, 128>::issue_general(a, m0, k0, tile, tid);
  }
  TL_DEVICE static unsigned long long desc(unsigned sa, unsigned wg, int kk) { return wg_desc(sa + wg * 8192u + 32u * kk); }
};

// A operand, M-major: A rows are the K index (grad_param: A = Gᵀ, G's rows
// are tokens), [64 k][128 m] in two N-major-style atoms; warpgroup g's 64 m
// are atom g (8 KiB in).
template <class CT>
struct WgAMMajor {
  static constexpr bool M_MAJOR = true;
  WgKRowStream<CT, 128> s;
  template <class SA>
  TL_DEVICE void init(const SA& a, int m0, unsigned tid) {
    s.init(a, m0, tid);
  }
  TL_DEVICE int k_limit() const { return s.k_limit(); }
  TL_DEVICE void issue_fast(int k0, unsigned char* tile, unsigned tid) const { s.issue_fast(k0, tile, tid); }
  template <class SA>
  TL_DEVICE static void issue_general(const SA& a, int m0, int k0, unsigned char* tile, unsigned tid) {
    WgKRowStream<CT, 128>::issue_general(a, m0, k0, tile, tid);
  }
  TL_DEVICE static unsigned long long desc(unsigned sa, unsigned wg, int kk) {
    return wg_desc_nb(sa + wg * 8192u + 2048u * kk);
  }
};

template <class BPolicy, int STAGES_, class APolicy = WgAKMajor<typename BPolicy::CT_>>
struct WgShape {
  static_assert(STAGES_ >= 3, "the ring keeps STAGES - 2 steps in flight");
  using A = APolicy;
  using B = BPolicy;
  static constexpr int BM = 128, N = B::N, BK = 64, STAGES = STAGES_;
  static constexpr int A_BYTES = BM * 128, B_BYTES = B::BYTES, STAGE_BYTES = A_BYTES + B_BYTES;
  // + 1024: the slots start at the first 1024-byte boundary of the window.
  static constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 1024;
};
// The head forward's shape: K-major B, BN columns.
template <class CT, int BN, int STAGES>
using WgShapeK = WgShape<WgBKMajor<CT, BN>, STAGES>;
// grad_param's shape: M-major A (Gᵀ), N-major B of BN columns.
template <class CT, int BN, int STAGES>
using WgShapeMN = WgShape<WgBNMajorPlain<CT, BN>, STAGES, WgAMMajor<CT>>;

template <class CT, class Shape, class SA0, class SA1, class SB0, class SB1, class SX0, class SX1, class Epi>
TL_DEVICE void wg_gemm(unsigned char* smem_raw, const SegRows<SA0, SA1>& a, const SegRows<SB0, SB1>& b,
                       const SegRows<SX0, SX1>& x, int k_total, int m0, int n0, Epi&& epi) {
  constexpr int S = Shape::STAGES, N = Shape::N;
  using BP = typename Shape::B;
  unsigned char* smem = smem_raw + ((1024u - (smem_addr(smem_raw) & 1023u)) & 1023u);
  const unsigned tid = tl_thread_linear();
  const unsigned wg = tid / kWgThreads;

  using AP = typename Shape::A;
  AP fa;
  BP fb;
  fa.init(a, m0, tid);
  fb.init(b, x, n0, tid);
  const int steps = (k_total + Shape::BK - 1) / Shape::BK;
  auto issue = [&](int step, int slot) {
    unsigned char* st = smem + slot * Shape::STAGE_BYTES;
    const int k0 = step * Shape::BK;
    if (k0 + Shape::BK <= fa.k_limit()) fa.issue_fast(k0, st, tid);
    else AP::issue_general(a, m0, k0, st, tid);
    if (k0 + Shape::BK <= fb.k_limit()) fb.issue_fast(b, x, k0, st + Shape::A_BYTES, tid);
    else BP::issue_general(b, x, n0, k0, st + Shape::A_BYTES, tid);
  };

  WgAcc<N> acc;
  acc.zero();
  // Ring slots advance with wrap-around counters (no % in the loop).
  int slot_in = 0, slot_out = 0;
#pragma unroll
  for (int s = 0; s < S - 2; ++s) {
    if (s < steps) issue(s, slot_in);
    slot_in = slot_in + 1 == S ? 0 : slot_in + 1;
    tl_cp_async_commit();  // empty groups keep the count uniform
  }
  // One K step: wait for its copies, stage step + S - 2 with `how`, multiply.
  auto consume = [&](int step, auto&& how) {
    tl_cp_async_wait<S - 3>();  // this thread's copies of `step` landed
    fence_proxy_async();        // ... and are visible to the tensor cores
    __syncthreads();            // ... for every thread; step - 2's MMAs are retired
    if (step + S - 2 < steps) how(step + S - 2, slot_in);
    slot_in = slot_in + 1 == S ? 0 : slot_in + 1;
    tl_cp_async_commit();
    const unsigned sa = smem_addr(smem + slot_out * Shape::STAGE_BYTES);
    const unsigned sb = smem_addr(smem + slot_out * Shape::STAGE_BYTES + Shape::A_BYTES);
    slot_out = slot_out + 1 == S ? 0 : slot_out + 1;
    wg_fence_operands(acc);
    wg_fence();
#pragma unroll
    for (int kk = 0; kk < Shape::BK / 16; ++kk) BP::template mma<AP::M_MAJOR>(acc, AP::desc(sa, wg, kk), sb, kk);
    wg_commit();
    wg_fence_operands(acc);
    wg_wait<1>();  // step - 1's MMAs are done: its slot is free after the next barrier
  };
  // The hot loop stages only steps both operands take on their steady-state
  // path (no general-path code in it); the rest follow.
  const int fast_steps = min(fa.k_limit(), fb.k_limit()) / Shape::BK;  // leading steps inside segment 0 (or <= 0)
  auto issue_fast = [&](int step, int slot) {
    unsigned char* st = smem + slot * Shape::STAGE_BYTES;
    fa.issue_fast(step * Shape::BK, st, tid);
    fb.issue_fast(b, x, step * Shape::BK, st + Shape::A_BYTES, tid);
  };
  int step = 0;
  for (; step < steps && step + S - 2 < fast_steps; ++step) consume(step, issue_fast);
  for (; step < steps; ++step) consume(step, issue);
  wg_wait<0>();
  wg_fence_operands(acc);
  tl_cp_async_wait<0>();  // (only empty groups can remain)
  __syncthreads();        // no warpgroup reads the ring any more
  epi(acc, m0 + 64 * static_cast<int>(wg));
}

// f(m, n, v0, v1) for every in-range (m, n < N) of the accumulators with n
// even: v0 = C[m, n], v1 = C[m, n + 1] (meaningless when n + 1 == N).
template <int BN, class F>
TL_DEVICE void for_each_pair(const WgAcc<BN>& acc, int m_base, int n0, int M, int N, F&& f) {
  const unsigned tid = tl_thread_linear();
#pragma unroll
  for (int e = 0; e < WgAcc<BN>::REGS; e += 2) {
    const int m = m_base + WgAcc<BN>::row(tid, e);
    const int n = n0 + WgAcc<BN>::col(tid, e);
    if (m < M && n < N) f(m, n, acc.v[e], acc.v[e + 1]);
  }
}

}  // namespace tl
