// wgmma.cuh: Hopper warpgroup MMA (wgmma.mma_async, sm_90a) on K-major
// f16/bf16 tiles in 128-byte-swizzled shared memory, f32 accumulators.
//
// A warpgroup is 4 consecutive warps (128 threads) that issue one
// wgmma.mma_async together: D[64 x N] += A[64 x 16] . B[16 x N], with A and B
// read by the tensor cores straight from shared memory through 64-bit matrix
// descriptors (PTX ISA, "Matrix Descriptor Format"):
//   bits  0-13  start address >> 4      bits 16-29  leading byte offset >> 4
//   bits 32-45  stride byte offset >> 4 bits 62-63  swizzle (1 = 128 bytes)
// Layouts used here. "K-major, 128B swizzle" (A always; B of the head
// forward, whose B rows are the N index): row i of an operand
// (a row of A, or a column n of B) holds 64 K values in 128 bytes at i * 128;
// 8 rows form a 1024-byte atom (stride byte offset 1024); inside an atom the
// 16-byte chunk c of row i is stored at chunk c ^ (i % 8). The swizzle is a
// function of the shared address bits (bits 4-6 ^= bits 7-9), so tiles start
// at 1024-byte boundaries, and the k-th 16-wide slice of a row is addressed by
// adding 32 k bytes to the descriptor's start address.
// "N-major, 128B swizzle" (B of grad_h, whose B rows are the K index; the
// instruction's imm-trans-b = 1): an atom is 64 N values (128 bytes, one k)
// x 8 k, the same 1024-byte swizzled block with k in the role of the row;
// the leading byte offset steps between atoms along N, the stride byte
// offset between groups of 8 k (PTX ISA, "Leading / Stride Dimension Byte
// Offset", MN-major swizzled). Here a B tile is [N / 64 atoms][64 k] with
// SBO = 1024 and LBO = 8192, and the k-th 16-deep slice starts 2048 k
// bytes in.
//
//   swz128_offset(i, c)   byte offset of chunk c of row i in such a tile;
//   wg_desc(saddr)        the descriptor of a tile slice at shared address saddr;
//   WgAcc<N>              one thread's N / 2 accumulators of a 64 x N tile:
//                         element e at row 16 (warp % 4) + lane / 4 + 8 ((e / 2) % 2),
//                         column 8 (e / 4) + 2 (lane % 4) + e % 2;
//   wg_desc_nb(saddr)     the N-major descriptor (LBO 8192, SBO 1024);
//   wgmma_k16<CT>(acc, da, db)  issue acc += A . B (asynchronous);
//   wgmma_k16_nb<CT>(...)  the same with an N-major B;
//   wgmma_k16_ma_nb<CT>(...)  with an M-major A (same layout as an N-major B,
//                         M in the role of N) and an N-major B;
//   wg_fence / wg_commit / wg_wait<N>   wgmma.fence, commit_group, wait_group N;
//   fence_proxy_async()   orders this thread's shared-memory writes (st.shared,
//                         cp.async) before later reads by the async proxy.
//
// CPU shim: the same descriptors, decoded and read exactly as specified above
// (the swizzle applied to the offset from the block's shared-memory base). An
// issued MMA is evaluated twice: at issue and again when wg_wait retires its
// group; the two must agree bit for bit, so a tile overwritten while an MMA may
// still read it, or read before every thread's writes landed, fails the test
// that runs it. Each thread evaluates only the elements it owns, so the shim
// needs no cross-thread exchange.
#pragma once
#include "common.cuh"

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TL_WGMMA_PTX 1
#elif defined(TL_SHIM) && !defined(__CUDA_ARCH__)
#define TL_WGMMA_SHIM 1
#endif
// Kernels built on wgmma have a body only where it can run: the sm_90a cubin
// and the CPU shim. Elsewhere (sm_80 cubin, compute_80 PTX) they trap; the host
// selects them only on compute capability 9.0 (src/cuda/mod.rs).
#if defined(TL_WGMMA_PTX) || defined(TL_WGMMA_SHIM)
#define TL_HAS_WGMMA 1
#else
#define TL_HAS_WGMMA 0
#endif

#if defined(TL_WGMMA_SHIM)
#include <vector>
#endif

namespace tl {

constexpr int kWgThreads = 128;

TL_DEVICE int swz128_offset(int row, int chunk) { return row * 128 + ((chunk ^ (row & 7)) << 4); }

// Shared-window address of a pointer into dynamic shared memory (in the
// shim: its offset from the block's dynamic shared memory).
TL_DEVICE unsigned smem_addr(const void* p) {
#if defined(__CUDA_ARCH__)
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
#elif defined(TL_SHIM)
  return static_cast<unsigned>(static_cast<const unsigned char*>(p) - tl_shim::dynamic_smem());
#else
  (void)p;
  return 0;
#endif
}

TL_DEVICE unsigned long long wg_desc(unsigned saddr) {
  return static_cast<unsigned long long>((saddr & 0x3FFFFu) >> 4) | (1ull << 16)  // LBO: unused by this layout
         | (static_cast<unsigned long long>(1024 >> 4) << 32)                      // SBO: 8-row atoms
         | (1ull << 62);                                                           // 128-byte swizzle
}

TL_DEVICE unsigned long long wg_desc_nb(unsigned saddr) {
  return static_cast<unsigned long long>((saddr & 0x3FFFFu) >> 4) | (static_cast<unsigned long long>(8192 >> 4) << 16)  // LBO: N atoms
         | (static_cast<unsigned long long>(1024 >> 4) << 32)                                                           // SBO: 8 k
         | (1ull << 62);                                                                                                // 128-byte swizzle
}

template <int N>
struct WgAcc {
  static_assert(N % 16 == 0 && N >= 16 && N <= 256, "wgmma N");
  static constexpr int REGS = N / 2;
  float v[REGS];
  TL_DEVICE static int row(unsigned tid, int e) {
    return 16 * static_cast<int>((tid / 32) % 4) + static_cast<int>(tid % 32) / 4 + 8 * ((e / 2) % 2);
  }
  TL_DEVICE static int col(unsigned tid, int e) { return 8 * (e / 4) + 2 * static_cast<int>(tid % 4) + e % 2; }
  TL_DEVICE void zero() {
#pragma unroll
    for (int e = 0; e < REGS; ++e) v[e] = 0.0f;
  }
};

#if defined(TL_WGMMA_SHIM)
namespace wgmma_shim {
// One issued MMA of this thread: what it adds, as computed at issue.
struct Pending {
  float* acc;
  int regs;
  bool bf16;
  unsigned long long da, db;
  bool a_mmajor;  // A in the M-major layout (imm-trans-a = 1)
  bool b_nmajor;  // B in the N-major layout (imm-trans-b = 1)
  int group;      // commit group, -1 until committed
  std::vector<float> add;
};
inline thread_local std::vector<Pending> pending;
inline thread_local int groups_committed = 0;

// The 16-bit value at (row, k) of the tile slice `desc` describes: row is M
// for A, N for B; K-major, or N-major (`nmajor`, B only).
inline unsigned short at(unsigned long long desc, int row, int k, bool nmajor = false) {
  if ((desc >> 62) != 1 || ((desc >> 49) & 7) != 0) tl_shim::fatal("wgmma: only 128B-swizzled descriptors with base offset 0 are emulated");
  const unsigned start = static_cast<unsigned>(desc & 0x3FFF) << 4;
  const unsigned lbo = static_cast<unsigned>((desc >> 16) & 0x3FFF) << 4;
  const unsigned sbo = static_cast<unsigned>((desc >> 32) & 0x3FFF) << 4;
  // K-major: 8-row groups at SBO, a row's 64 k in 128 bytes. N-major: 64-wide
  // N atoms at LBO, 8-k groups at SBO, one k's 64 N values in 128 bytes.
  const unsigned a = nmajor ? start + static_cast<unsigned>(row / 64) * lbo + static_cast<unsigned>(k / 8) * sbo +
                                  static_cast<unsigned>(k % 8) * 128u + 2u * static_cast<unsigned>(row % 64)
                            : start + static_cast<unsigned>(row / 8) * sbo + static_cast<unsigned>(row % 8) * 128u + 2u * k;
  const unsigned phys = a ^ (((a >> 7) & 7u) << 4);
  if (phys + 2 > tl_shim::t_ctx.launch->dyn_smem_bytes) tl_shim::fatal("wgmma: descriptor reads shared byte %u, past the %u dynamic bytes", phys, tl_shim::t_ctx.launch->dyn_smem_bytes);
  unsigned short bits;
  std::memcpy(&bits, tl_shim::dynamic_smem() + phys, 2);
  return bits;
}
inline float to_f(bool bf16, unsigned short b) {
  return bf16 ? tl_shim::bf16_bits_to_f32(b) : tl_shim::f16_bits_to_f32(b);
}
// This thread's elements of A(da) . B(db), products and sums in f32, k in order.
inline void evaluate(const Pending& p, float* out) {
  const unsigned tid = tl_thread_linear();
  for (int e = 0; e < p.regs; ++e) {
    // The layout does not depend on N (WgAcc<16> is any WgAcc).
    const int m = WgAcc<16>::row(tid, e), n = WgAcc<16>::col(tid, e);
    float s = 0.0f;
    for (int k = 0; k < 16; ++k) s = std::fma(to_f(p.bf16, at(p.da, m, k, p.a_mmajor)), to_f(p.bf16, at(p.db, n, k, p.b_nmajor)), s);
    out[e] = s;
  }
}
inline void issue(float* acc, int regs, bool bf16, unsigned long long da, unsigned long long db, bool a_mmajor,
                  bool b_nmajor) {
  Pending p{acc, regs, bf16, da, db, a_mmajor, b_nmajor, -1, std::vector<float>(static_cast<std::size_t>(regs))};
  evaluate(p, p.add.data());
  pending.push_back(std::move(p));
}
inline void commit() {
  for (auto& p : pending)
    if (p.group < 0) p.group = groups_committed;
  ++groups_committed;
}
// Retires every MMA of the groups older than the newest `keep`.
inline void wait(int keep) {
  const int limit = groups_committed - keep;
  std::vector<Pending> still;
  std::vector<float> again;
  for (auto& p : pending) {
    if (p.group >= 0 && p.group < limit) {
      again.assign(static_cast<std::size_t>(p.regs), 0.0f);
      evaluate(p, again.data());
      if (std::memcmp(again.data(), p.add.data(), again.size() * sizeof(float)) != 0) {
        tl_shim::fatal("wgmma: its shared-memory operands changed between issue and wait_group (a tile was overwritten too early, or read before it was written)");
      }
      for (int e = 0; e < p.regs; ++e) p.acc[e] += p.add[static_cast<std::size_t>(e)];
    } else {
      still.push_back(std::move(p));
    }
  }
  pending = std::move(still);
}
}  // namespace wgmma_shim
#endif

#if defined(TL_WGMMA_PTX)
}  // namespace tl
#include "wgmma_asm.cuh"
namespace tl {
#endif

// Keeps the compiler from moving accumulator registers across the
// asynchronous MMAs (which would serialize them).
template <int N>
TL_DEVICE void wg_fence_operands(WgAcc<N>& acc) {
#if defined(TL_WGMMA_PTX)
#pragma unroll
  for (int e = 0; e < WgAcc<N>::REGS; ++e) asm volatile("" : "+f"(acc.v[e])::"memory");
#else
  (void)acc;
#endif
}

TL_DEVICE void wg_fence() {
#if defined(TL_WGMMA_PTX)
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
TL_DEVICE void wg_commit() {
#if defined(TL_WGMMA_PTX)
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#elif defined(TL_WGMMA_SHIM)
  wgmma_shim::commit();
#endif
}
template <int N>
TL_DEVICE void wg_wait() {
#if defined(TL_WGMMA_PTX)
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#elif defined(TL_WGMMA_SHIM)
  wgmma_shim::wait(N);
#endif
}
TL_DEVICE void fence_proxy_async() {
#if defined(TL_WGMMA_PTX)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

template <class CT, int N>
TL_DEVICE void wgmma_k16(WgAcc<N>& acc, unsigned long long da, unsigned long long db) {
  static_assert(std::is_same<CT, __half>::value || std::is_same<CT, __nv_bfloat16>::value, "f16 or bf16 operands");
#if defined(TL_WGMMA_PTX)
  if constexpr (N == 128 && std::is_same<CT, __half>::value) wgmma_ptx::m64n128k16_f16(acc.v, da, db);
  if constexpr (N == 128 && std::is_same<CT, __nv_bfloat16>::value) wgmma_ptx::m64n128k16_bf16(acc.v, da, db);
  if constexpr (N == 256 && std::is_same<CT, __half>::value) wgmma_ptx::m64n256k16_f16(acc.v, da, db);
  if constexpr (N == 256 && std::is_same<CT, __nv_bfloat16>::value) wgmma_ptx::m64n256k16_bf16(acc.v, da, db);
  static_assert(N == 128 || N == 256, "wgmma_asm.cuh has N = 128 and 256");
#elif defined(TL_WGMMA_SHIM)
  wgmma_shim::issue(acc.v, WgAcc<N>::REGS, std::is_same<CT, __nv_bfloat16>::value, da, db, false, false);
#else
  (void)acc;
  (void)da;
  (void)db;
#endif
}

// acc += A . B with B N-major (descriptor from wg_desc_nb), N = 144, 160, 192.
template <class CT, int N>
TL_DEVICE void wgmma_k16_nb(WgAcc<N>& acc, unsigned long long da, unsigned long long db) {
  static_assert(std::is_same<CT, __half>::value || std::is_same<CT, __nv_bfloat16>::value, "f16 or bf16 operands");
#if defined(TL_WGMMA_PTX)
  constexpr bool H = std::is_same<CT, __half>::value;
  if constexpr (N == 144 && H) wgmma_ptx::m64n144k16_f16_nb(acc.v, da, db);
  if constexpr (N == 144 && !H) wgmma_ptx::m64n144k16_bf16_nb(acc.v, da, db);
  if constexpr (N == 160 && H) wgmma_ptx::m64n160k16_f16_nb(acc.v, da, db);
  if constexpr (N == 160 && !H) wgmma_ptx::m64n160k16_bf16_nb(acc.v, da, db);
  if constexpr (N == 192 && H) wgmma_ptx::m64n192k16_f16_nb(acc.v, da, db);
  if constexpr (N == 192 && !H) wgmma_ptx::m64n192k16_bf16_nb(acc.v, da, db);
  static_assert(N == 144 || N == 160 || N == 192, "wgmma_asm.cuh has N-major B for N = 144, 160, 192");
#elif defined(TL_WGMMA_SHIM)
  wgmma_shim::issue(acc.v, WgAcc<N>::REGS, std::is_same<CT, __nv_bfloat16>::value, da, db, false, true);
#else
  (void)acc;
  (void)da;
  (void)db;
#endif
}

// acc += A . B with A M-major and B N-major (both from wg_desc_nb: rows of
// either operand are the K index), N = 64 or 128.
template <class CT, int N>
TL_DEVICE void wgmma_k16_ma_nb(WgAcc<N>& acc, unsigned long long da, unsigned long long db) {
  static_assert(std::is_same<CT, __half>::value || std::is_same<CT, __nv_bfloat16>::value, "f16 or bf16 operands");
#if defined(TL_WGMMA_PTX)
  constexpr bool H = std::is_same<CT, __half>::value;
  if constexpr (N == 64 && H) wgmma_ptx::m64n64k16_f16_ma_nb(acc.v, da, db);
  if constexpr (N == 64 && !H) wgmma_ptx::m64n64k16_bf16_ma_nb(acc.v, da, db);
  if constexpr (N == 128 && H) wgmma_ptx::m64n128k16_f16_ma_nb(acc.v, da, db);
  if constexpr (N == 128 && !H) wgmma_ptx::m64n128k16_bf16_ma_nb(acc.v, da, db);
  static_assert(N == 64 || N == 128, "wgmma_asm.cuh has M-major A with N = 64, 128");
#elif defined(TL_WGMMA_SHIM)
  wgmma_shim::issue(acc.v, WgAcc<N>::REGS, std::is_same<CT, __nv_bfloat16>::value, da, db, true, true);
#else
  (void)acc;
  (void)da;
  (void)db;
#endif
}

}  // namespace tl
