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
