// mma.cuh: warp-level tensor-core MMA, m16n8k16 (f16/bf16 in, f32 accumulate),
// with operands loaded from shared memory by ldmatrix.
//
// The unit of data is an 8 x 8 matrix of 16-bit values, `Mat8`. On the GPU a
// lane holds one 32-bit register of it: lane l owns row l / 4, columns
// 2 (l % 4) and 2 (l % 4) + 1 (PTX ISA, ldmatrix / mma fragment layouts). In
// the CPU shim every lane holds the whole matrix (like the shim's WMMA
// fragments), so the shim needs no cross-lane exchange to multiply; what the
// shim does check is the part that is easy to get wrong: which lane supplies
// which row address to ldmatrix (the shim assembles the matrices from the 32
// addresses exactly as the hardware does) and which (row, column) every
// accumulator element is (MmaAcc::row / col are shared by both builds, so the
// epilogue's ownership is the one the shim runs).
//
//   ldsm_x4(m, addr)        lanes 8i..8i+7 give the row addresses (16 bytes
//                           each, 16-byte aligned) of matrix i, rows 0..7;
//   ldsm_x4_trans(m, addr)  the same, each matrix transposed on the way in;
//   mma_16816(acc, a, b0, b1)
//       acc[16 x 8] += A[16 x 16] . B[16 x 8], A given as 4 Mat8 in the order
//       (rows 0-7, k 0-7), (rows 8-15, k 0-7), (rows 0-7, k 8-15),
//       (rows 8-15, k 8-15); B as 2 Mat8 stored n-major: b0 = (n 0-7, k 0-7),
//       b1 = (n 0-7, k 8-15), i.e. element [n][k].
//   MmaAcc: lane l owns elements e = 0..3 at row l/4 + 8 (e/2), col 2 (l%4) + e%2.
// Inline PTX only under __CUDA_ARCH__ (sm_80+).
#pragma once
#include "common.cuh"

namespace tl {

struct Mat8 {
#if defined(__CUDA_ARCH__)
  unsigned r;
#elif defined(TL_SHIM)
  unsigned short e[8][8];  // e[row][col], bits of the 16-bit values
#else
  unsigned r;  // nvcc's host pass: never executed
#endif
};

struct MmaAcc {
#if defined(TL_SHIM) && !defined(__CUDA_ARCH__)
  float whole[16][8];
#else
  float v[4];
#endif
  TL_DEVICE static int row(unsigned lane, int e) { return static_cast<int>(lane / 4) + 8 * (e / 2); }
  TL_DEVICE static int col(unsigned lane, int e) { return 2 * static_cast<int>(lane % 4) + (e % 2); }
  TL_DEVICE void zero() {
#if defined(TL_SHIM) && !defined(__CUDA_ARCH__)
    for (auto& r : whole)
      for (float& x : r) x = 0.0f;
#else
#pragma unroll
    for (int e = 0; e < 4; ++e) v[e] = 0.0f;
#endif
  }
  // Element e (0..3) of this lane.
  TL_DEVICE float get(unsigned lane, int e) const {
#if defined(TL_SHIM) && !defined(__CUDA_ARCH__)
    return whole[row(lane, e)][col(lane, e)];
#else
    (void)lane;
    return v[e];
#endif
  }
};

#if defined(TL_SHIM) && !defined(__CUDA_ARCH__)
namespace mma_shim {
// The warp's 32 row addresses, then every lane reads the 4 matrices from them.
inline void ldsm_x4(Mat8 (&m)[4], const void* addr, bool trans) {
  if ((reinterpret_cast<unsigned long long>(addr) & 15ull) != 0) {
    tl_shim::fatal("ldmatrix: lane %u row address %p is not 16-byte aligned", tl_shim::t_ctx.lane, addr);
  }
  unsigned long long all[32];
  tl_shim::warp().exchange(0xffffffffu, tl_shim::kOpLdmatrix, reinterpret_cast<unsigned long long>(addr), all);
  for (int i = 0; i < 4; ++i)
    for (int r = 0; r < 8; ++r)
      for (int c = 0; c < 8; ++c) {
        // Stored row j of matrix i comes from lane 8 i + j; transposed, the
        // lane's element [r][c] is the stored element [c][r].
        const unsigned short* src = reinterpret_cast<const unsigned short*>(all[8 * i + (trans ? c : r)]);
        m[i].e[r][c] = src[trans ? r : c];
      }
}
template <class CT>
inline float to_f(unsigned short bits) {
  if constexpr (std::is_same<CT, __half>::value) {
    return tl_shim::f16_bits_to_f32(bits);
  } else {
    return tl_shim::bf16_bits_to_f32(bits);
  }
}
}  // namespace mma_shim
#endif

TL_DEVICE void ldsm_x4(Mat8 (&m)[4], const void* addr) {
#if defined(__CUDA_ARCH__)
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(m[0].r), "=r"(m[1].r), "=r"(m[2].r), "=r"(m[3].r)
               : "r"(s));
#elif defined(TL_SHIM)
  mma_shim::ldsm_x4(m, addr, false);
#else
  (void)m;
  (void)addr;
#endif
}

TL_DEVICE void ldsm_x4_trans(Mat8 (&m)[4], const void* addr) {
#if defined(__CUDA_ARCH__)
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(addr));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(m[0].r), "=r"(m[1].r), "=r"(m[2].r), "=r"(m[3].r)
               : "r"(s));
#elif defined(TL_SHIM)
  mma_shim::ldsm_x4(m, addr, true);
#else
  (void)m;
  (void)addr;
#endif
}

// acc += A . B (see the header comment for the operand order).
template <class CT>
TL_DEVICE void mma_16816(MmaAcc& acc, const Mat8 (&a)[4], const Mat8& b0, const Mat8& b1) {
  static_assert(std::is_same<CT, __half>::value || std::is_same<CT, __nv_bfloat16>::value, "f16 or bf16 operands");
#if defined(__CUDA_ARCH__)
  if constexpr (std::is_same<CT, __half>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc.v[0]), "+f"(acc.v[1]), "+f"(acc.v[2]), "+f"(acc.v[3])
        : "r"(a[0].r), "r"(a[1].r), "r"(a[2].r), "r"(a[3].r), "r"(b0.r), "r"(b1.r));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(acc.v[0]), "+f"(acc.v[1]), "+f"(acc.v[2]), "+f"(acc.v[3])
        : "r"(a[0].r), "r"(a[1].r), "r"(a[2].r), "r"(a[3].r), "r"(b0.r), "r"(b1.r));
  }
#elif defined(TL_SHIM)
  // Products and sums in f32, k in order (the tensor cores differ only in
  // summation order and in flushing f32 subnormals).
  const Mat8* bm[2] = {&b0, &b1};
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 8; ++n) {
      float s = acc.whole[i][n];
      for (int k = 0; k < 16; ++k) {
        const float x = mma_shim::to_f<CT>(a[(i / 8) + 2 * (k / 8)].e[i % 8][k % 8]);
        const float y = mma_shim::to_f<CT>(bm[k / 8]->e[n][k % 8]);
        s = std::fma(x, y, s);
      }
      acc.whole[i][n] = s;
    }
#else
  (void)acc;
  (void)a;
  (void)b0;
  (void)b1;
#endif
}

}  // namespace tl
