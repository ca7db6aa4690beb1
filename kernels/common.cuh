// common.cuh: the kernel ABI shared by the GPU build (nvcc) and the CPU shim
// build (host C++ with kernels/shim/cuda_shim.h). Every kernel file includes it.
//
// ABI: every kernel takes ONE parameter struct by value. The struct is plain
// old data mirrored field for field by a `#[repr(C)]` Rust struct:
//   * pointers are `const void*` / `void*` in C++ and `u64` in Rust (a device
//     address on the GPU, a host address in the shim); cast them to the
//     element type inside the kernel;
//   * scalars are `unsigned`/`int`/`float` (u32/i32/f32), 64-bit ones
//     `unsigned long long`/`double` (u64/f64);
//   * put the 8-byte fields first and pad the end to a multiple of 8 by hand
//     (`unsigned _pad;`), so there is no implicit padding (bytemuck::Pod works)
//     and both compilers agree on the layout; check it on both sides:
//     TL_CHECK_PARAMS(P, bytes) here, `const _: () = assert!(size_of::<P>() ==
//     bytes);` in Rust.
// Example:
//   struct ScaleParams {            // #[repr(C)] struct ScaleParams {
//     const void* x;                //     x: u64,
//     void* y;                      //     y: u64,
//     unsigned n;                   //     n: u32,
//     float scale;                  //     scale: f32,
//   };                              // }
//   TL_CHECK_PARAMS(ScaleParams, 24);
//   TL_KERNEL(tl_scale_f32, ScaleParams) {
//     const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
//     if (i < p.n) static_cast<float*>(p.y)[i] = p.scale * static_cast<const float*>(p.x)[i];
//   }
// On the GPU the launch passes a pointer to the struct as the single kernel
// argument; in the shim build, TL_KERNEL also defines the C entry point
//   extern "C" int tl_scale_f32(unsigned gx, unsigned gy, unsigned gz,
//                               unsigned bx, unsigned by, unsigned bz,
//                               unsigned smem_bytes, const void* params);
// which runs the whole grid on CPU threads and returns a TL_SHIM_* code. Both
// are driven by one Rust `LaunchPlan` (src/kernels/plan.rs).
#pragma once

#if defined(__CUDACC__)
// ----------------------------------------------------------------- nvcc ----
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <stdint.h>

#define TL_KERNEL(name, P) extern "C" __global__ void name(const P p)
// A kernel that is never launched with more than `max_threads` threads per
// block (lets ptxas use more registers; the shim rejects bigger blocks).
#define TL_KERNEL_BOUNDED(name, P, max_threads) \
  extern "C" __global__ void __launch_bounds__(max_threads) name(const P p)
// As TL_KERNEL_BOUNDED, and asks ptxas for `min_blocks` resident blocks per SM
// (a register cap); pick values that ptxas reports without spills.
#define TL_KERNEL_BOUNDED_MIN(name, P, max_threads, min_blocks) \
  extern "C" __global__ void __launch_bounds__(max_threads, min_blocks) name(const P p)
// Dynamic shared memory (the launch's shared_bytes), 16-byte aligned. All
// TL_DYNAMIC_SMEM declarations in a kernel alias the same bytes.
#define TL_DYNAMIC_SMEM(T, name)                                  \
  extern __shared__ __align__(16) unsigned char tl_dyn_smem_##name[]; \
  T* name = reinterpret_cast<T*>(tl_dyn_smem_##name)

#else
// ------------------------------------------------------------ CPU shim ----
#include "shim/cuda_shim.h"

#define TL_KERNEL_IMPL(name, P, max_threads)                                                        \
  static_assert(std::is_trivially_copyable_v<P> && std::is_standard_layout_v<P>,                    \
                "kernel parameter structs must be plain old data");                                 \
  static void name##_tl_body(const P p);                                                            \
  static void name##_tl_run(const void* params) {                                                   \
    P local;                                                                                        \
    std::memcpy(&local, params, sizeof(P));                                                         \
    name##_tl_body(local);                                                                          \
  }                                                                                                 \
  extern "C" int name(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, \
                      unsigned smem_bytes, const void* params) {                                    \
    return ::tl_shim::launch(#name, gx, gy, gz, bx, by, bz, smem_bytes, params, sizeof(P),          \
                             alignof(P), (max_threads), &name##_tl_run);                            \
  }                                                                                                 \
  static void name##_tl_body(const P p)

#define TL_KERNEL(name, P) TL_KERNEL_IMPL(name, P, 0u)
#define TL_KERNEL_BOUNDED(name, P, max_threads) TL_KERNEL_IMPL(name, P, max_threads)
#define TL_KERNEL_BOUNDED_MIN(name, P, max_threads, min_blocks) TL_KERNEL_IMPL(name, P, max_threads)
#define TL_DYNAMIC_SMEM(T, name) T* name = reinterpret_cast<T*>(::tl_shim::dynamic_smem())
#endif

// ----------------------------------------------------------- both ----------
#define TL_CHECK_PARAMS(P, bytes)                                                   \
  static_assert(sizeof(P) == (bytes), #P ": size differs from the Rust mirror");  \
  static_assert(alignof(P) <= 8, #P ": alignment above 8")

#define TL_DEVICE __device__ __forceinline__
#define TL_FULL_MASK 0xffffffffu

// Linear thread index within the block, its lane and warp.
TL_DEVICE unsigned tl_thread_linear() {
  return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
}
TL_DEVICE unsigned tl_lane_id() {
#if defined(__CUDA_ARCH__)
  unsigned lane;
  asm volatile("mov.u32 %0, %%laneid;" : "=r"(lane));
  return lane;
#else
  return tl_thread_linear() & 31u;
#endif
}
TL_DEVICE unsigned tl_warp_id() { return tl_thread_linear() >> 5; }

// Whether `p` is aligned to `bytes` (a power of two): the vector-load paths'
// test (uniform across a launch when `p` is a kernel argument).
TL_DEVICE bool tl_aligned(const void* p, unsigned bytes) {
  return (reinterpret_cast<uintptr_t>(p) & static_cast<uintptr_t>(bytes - 1)) == 0;
}

// dtype helpers: f32 math on every storage type, round to nearest even.
TL_DEVICE float tl_to_float(float x) { return x; }
TL_DEVICE float tl_to_float(__half x) { return __half2float(x); }
TL_DEVICE float tl_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <class T>
TL_DEVICE T tl_from_float(float x);
template <>
TL_DEVICE float tl_from_float<float>(float x) { return x; }
template <>
TL_DEVICE __half tl_from_float<__half>(float x) { return __float2half_rn(x); }
template <>
TL_DEVICE __nv_bfloat16 tl_from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// An f32 value as two storage-dtype values for a tensor-core product that must
// keep f32 precision (U, p in the head backward): x = hi + lo * 2^-shift with
// hi = x rounded, lo = (x - hi) * 2^shift rounded, so x is carried to about
// the square of T's unit roundoff (2^-22 in f16, 2^-16 in bf16) instead of to
// it. The shift (T's significand bits) keeps lo about as large as x: a normal
// f16 number wherever hi is one, and never above |x| (no overflow).
template <class T>
TL_DEVICE constexpr float tl_lo_scale();
template <>
TL_DEVICE constexpr float tl_lo_scale<float>() { return 1.0f; }
template <>
TL_DEVICE constexpr float tl_lo_scale<__half>() { return 2048.0f; }
template <>
TL_DEVICE constexpr float tl_lo_scale<__nv_bfloat16>() { return 256.0f; }
template <class T>
TL_DEVICE T tl_lo_part(float x) {
  return tl_from_float<T>((x - tl_to_float(tl_from_float<T>(x))) * tl_lo_scale<T>());
}

// ------------------------------------------------ deferred id errors ----
// The backend's record (`Cuda::with_deferred_id_errors`), TL_ID_RECORD_LEN
// i64 owned by the backend, zeroed at creation and when read:
//   [0] bad ids since the record was last read, [1] argument code,
//   [2] first bad index, [3] its value, [4] vocab   (filled by the first
//       launch that meets a bad id; later ones only add to [0]);
//   [5] this launch's bad count, [6] LLONG_MAX - its smallest bad index,
//   [7] its finished blocks   (zero between launches).
// A kernel that validates ids calls tl_id_record_bad once per bad id it
// meets and, with every thread of every block, tl_id_record_finish at its
// end: the last block to finish folds [5..7] into [0..4] and clears them,
// so the op needs no second launch and no host round trip. Launches on one
// stream run in order, so "first" is the first bad id enqueued.
#define TL_ID_RECORD_LEN 8

TL_DEVICE void tl_id_record_bad(long long* rec, long long index) {
  atomicAdd(reinterpret_cast<unsigned long long*>(rec + 5), 1ull);
  atomicMax(rec + 6, LLONG_MAX - index);
}

// `ids` holds u32 (id_bytes 4) or i64 (id_bytes 8) ids, to read the value.
// Every thread of the block must call it (it has a __syncthreads).
TL_DEVICE void tl_id_record_finish(long long* rec, const void* ids, int id_bytes, long long vocab, int arg) {
  __threadfence();  // this thread's tl_id_record_bad before the block's ticket
  __syncthreads();
  if (threadIdx.x != 0 || threadIdx.y != 0 || threadIdx.z != 0) return;
  auto* urec = reinterpret_cast<unsigned long long*>(rec);
  const unsigned long long blocks =
      static_cast<unsigned long long>(gridDim.x) * gridDim.y * gridDim.z;
  if (atomicAdd(urec + 7, 1ull) != blocks - 1) return;
  __threadfence();  // every block's counts are visible to the last one
  const long long bad = static_cast<long long>(atomicAdd(urec + 5, 0ull));
  if (bad > 0) {
    if (rec[0] == 0) {
      const long long index = LLONG_MAX - static_cast<long long>(atomicAdd(urec + 6, 0ull));
      rec[1] = arg;
      rec[2] = index;
      rec[3] = id_bytes == 8 ? static_cast<const long long*>(ids)[index]
                             : static_cast<long long>(static_cast<const unsigned*>(ids)[index]);
      rec[4] = vocab;
    }
    rec[0] += bad;
  }
  atomicExch(urec + 5, 0ull);
  atomicExch(urec + 6, 0ull);
  atomicExch(urec + 7, 0ull);
}

// A raw u32 (id_bytes 4) or i64 (id_bytes 8) token id as an int row index:
// the id when 0 <= id < vocab, else -2 (the caller skips the row). Any bit
// pattern is safe: the value never indexes memory before this test.
TL_DEVICE int tl_checked_id(const void* ids, int id_bytes, long long t, int vocab) {
  if (id_bytes == 8) {
    const long long raw = __ldg(static_cast<const long long*>(ids) + t);
    return raw >= 0 && raw < vocab ? static_cast<int>(raw) : -2;
  }
  const unsigned raw = __ldg(static_cast<const unsigned*>(ids) + t);
  return raw < static_cast<unsigned>(vocab) ? static_cast<int>(raw) : -2;
}

// ------------------------------------------------------------- cp.async ---
// Asynchronous global -> shared copies (sm_80+ cp.async; the shim copies
// synchronously). Completion: tl_cp_async_commit() closes a group,
// tl_cp_async_wait<N>() waits until at most N groups are pending (for this
// thread's own copies; a barrier then publishes them to the block). The
// "memory" clobbers keep the compiler from moving shared-memory accesses
// across them.

// A copy of 4, 8 (.ca) or 16 (.cg: L2 only) bytes.
template <int BYTES>
TL_DEVICE void tl_cp_async(void* smem, const void* gmem) {
#if defined(__CUDA_ARCH__)
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  if constexpr (BYTES == 16) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(gmem) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(dst), "l"(gmem), "n"(BYTES) : "memory");
  }
#elif !defined(__CUDACC__)
  // 16-byte copies as one vector access: the shim's alignment check traps a
  // misaligned one, as cp.async faults on a GPU.
  if constexpr (BYTES == 16) {
    *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
  } else {
    std::memcpy(smem, gmem, BYTES);
  }
#else
  (void)smem, (void)gmem;  // nvcc host pass: never runs
#endif
}
TL_DEVICE void tl_cp_async16(void* smem, const void* gmem) { tl_cp_async<16>(smem, gmem); }
// As tl_cp_async16, but writes 16 zero bytes (and reads nothing) when !full:
// the src-size operand of cp.async, so there is no branch around the copy.
TL_DEVICE void tl_cp_async16_zfill(void* smem, const void* gmem, bool full) {
#if defined(__CUDA_ARCH__)
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(full ? 16 : 0) : "memory");
#elif !defined(__CUDACC__)
  if (full) {
    *reinterpret_cast<uint4*>(smem) = *reinterpret_cast<const uint4*>(gmem);
  } else {
    *reinterpret_cast<uint4*>(smem) = make_uint4(0u, 0u, 0u, 0u);
  }
#else
  (void)smem, (void)gmem, (void)full;  // nvcc host pass: never runs
#endif
}
TL_DEVICE void tl_cp_async_commit() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
TL_DEVICE void tl_cp_async_wait() {
#if defined(__CUDA_ARCH__)
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
