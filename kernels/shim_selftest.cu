// shim_selftest.cu: small kernels that exercise every feature of the CPU shim
// (kernels/shim/cuda_shim.h). tests/shim_selftest.rs launches them through
// src/kernels/shim.rs and checks the results against values computed in Rust.
// The file also compiles with nvcc (feature `cuda`), spill-free, so the same
// checks can run on a GPU.
#include "common.cuh"

// ---------------------------------------------------------------------------
// 1. Block reduction: grid-stride loads, dynamic smem tree reduction with
//    __syncthreads, warp shuffles, static smem broadcast. 1-, 2- and 3-D blocks
//    and grids (power-of-two thread counts up to 1024).
struct ReduceParams {
  const void* x;  // f32 [n]
  void* out;      // f32 [number of blocks]
  unsigned n;
  unsigned _pad;
};
TL_CHECK_PARAMS(ReduceParams, 24);

TL_KERNEL(tl_selftest_reduce, ReduceParams) {
  const float* x = static_cast<const float*>(p.x);
  float* out = static_cast<float*>(p.out);
  const unsigned nthreads = blockDim.x * blockDim.y * blockDim.z;
  const unsigned t = tl_thread_linear();
  const unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
  const unsigned nblocks = gridDim.x * gridDim.y * gridDim.z;

  float local = 0.0f;
  for (unsigned i = block * nthreads + t; i < p.n; i += nblocks * nthreads) local += x[i];

  TL_DYNAMIC_SMEM(float, partial);
  __shared__ float block_total;
  partial[t] = local;
  __syncthreads();
  for (unsigned stride = nthreads / 2; stride >= 32; stride /= 2) {
    if (t < stride) partial[t] += partial[t + stride];
    __syncthreads();
  }
  if (t < 32) {
    float v = t < nthreads ? partial[t] : 0.0f;
    for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(TL_FULL_MASK, v, off);
    if (t == 0) block_total = v;
  }
  __syncthreads();
  // The last thread reads what thread 0 wrote to static shared memory.
  if (t == nthreads - 1) out[block] = block_total;
}

// ---------------------------------------------------------------------------
// 2. Threads that return early (before any barrier, and between barriers),
//    barriers after they left, __syncthreads_count/and/or.
struct EarlyExitParams {
  void* out;  // u32 [5 * blockDim.x]
  unsigned n_active;
  unsigned _pad;
};
TL_CHECK_PARAMS(EarlyExitParams, 16);

TL_KERNEL(tl_selftest_early_exit, EarlyExitParams) {
  unsigned* out = static_cast<unsigned*>(p.out);
  const unsigned t = threadIdx.x;
  const unsigned n = blockDim.x;
  __shared__ unsigned ring[1024];
  if (t >= p.n_active) return;  // these threads never reach a barrier
  ring[t] = t + 1;
  __syncthreads();
  out[t] = ring[(t + 1) % p.n_active];
  out[n + t] = static_cast<unsigned>(__syncthreads_count(t % 3 == 0));
  out[2 * n + t] = static_cast<unsigned>(__syncthreads_and(t < p.n_active)) |
                   (static_cast<unsigned>(__syncthreads_or(t == 5)) << 1);
  if (t % 5 == 4) return;  // leave between barriers
  ring[t] = 2 * t;
  __syncthreads();
  unsigned s = (t + 1) % p.n_active;
  if (s % 5 == 4) s = (s + 1) % p.n_active;
  out[3 * n + t] = ring[s];
  out[4 * n + t] = static_cast<unsigned>(__syncthreads_count(1));
}

// ---------------------------------------------------------------------------
// 3. Warp shuffles and votes, including a divergent pair of half-warp groups.
struct WarpParams {
  const void* in;  // i32 [blockDim.x]
  void* out;       // i32 [12 * blockDim.x]
};
TL_CHECK_PARAMS(WarpParams, 16);

TL_KERNEL(tl_selftest_warp, WarpParams) {
  const int* in = static_cast<const int*>(p.in);
  int* out = static_cast<int*>(p.out) + 12 * threadIdx.x;
  const unsigned lane = tl_lane_id();
  const int v = in[threadIdx.x];
  out[0] = __shfl_sync(TL_FULL_MASK, v, 3);
  out[1] = __shfl_xor_sync(TL_FULL_MASK, v, 1);
  out[2] = __shfl_down_sync(TL_FULL_MASK, v, 1);
  out[3] = __shfl_up_sync(TL_FULL_MASK, v, 2);
  out[4] = static_cast<int>(__ballot_sync(TL_FULL_MASK, v & 1));
  out[5] = __any_sync(TL_FULL_MASK, v == 7);
  out[6] = __all_sync(TL_FULL_MASK, v >= 0);
  out[7] = __shfl_sync(TL_FULL_MASK, v, 1, 8);
  __syncwarp();
  if (lane < 16) {
    out[8] = __shfl_xor_sync(0x0000ffffu, v, 2);
    __syncwarp(0x0000ffffu);
  } else {
    out[8] = static_cast<int>(__ballot_sync(0xffff0000u, v % 3 == 0));
  }
  float f = static_cast<float>(v);
  for (int m = 16; m > 0; m /= 2) f += __shfl_xor_sync(TL_FULL_MASK, f, m);
  out[9] = static_cast<int>(f);
  __syncwarp();
  out[10] = static_cast<int>(__activemask());
  out[11] = static_cast<int>(lane);
}

// ---------------------------------------------------------------------------
// 4. Atomics from every thread of the grid.
struct AtomicParams {
  void* f32_sum;      // f32
  void* f64_sum;      // f64
  void* i32_sum;      // i32
  void* u32_count;    // u32
  void* u64_sum;      // u64
  void* i32_max;      // i32
  void* i32_min;      // i32
  void* u32_or;       // u32
  void* cas_counter;  // i32
  void* exch;         // i32
};
TL_CHECK_PARAMS(AtomicParams, 80);

TL_KERNEL_BOUNDED(tl_selftest_atomics, AtomicParams, 256) {
  const unsigned gid = blockIdx.x * blockDim.x + threadIdx.x;
  atomicAdd(static_cast<float*>(p.f32_sum), 1.0f);
  atomicAdd(static_cast<double*>(p.f64_sum), 0.5);
  atomicAdd(static_cast<int*>(p.i32_sum), static_cast<int>(gid % 7) - 3);
  atomicAdd(static_cast<unsigned*>(p.u32_count), 1u);
  atomicAdd(static_cast<unsigned long long*>(p.u64_sum), static_cast<unsigned long long>(gid) << 20);
  const int key = static_cast<int>((gid * 7919u) % 1001u) - 500;
  atomicMax(static_cast<int*>(p.i32_max), key);
  atomicMin(static_cast<int*>(p.i32_min), key);
  atomicOr(static_cast<unsigned*>(p.u32_or), 1u << (gid % 29));
  int* counter = static_cast<int*>(p.cas_counter);
  int old = atomicAdd(counter, 0);
  int assumed;
  do {
    assumed = old;
    old = atomicCAS(counter, assumed, assumed + 2);
  } while (old != assumed);
  atomicExch(static_cast<int*>(p.exch), static_cast<int>(gid));
  __threadfence();
}

// ---------------------------------------------------------------------------
// 5. f16 / bf16 conversions: RNE, subnormals, overflow, NaN.
struct ConvertParams {
  const void* src;   // f32 [n]
  void* f16_bits;    // u16 [n]
  void* bf16_bits;   // u16 [n]
  void* f16_back;    // f32 [n]
  void* bf16_back;   // f32 [n]
  void* pair_bits;   // u32 [2 * n]: __floats2half2_rn / __floats2bfloat162_rn of (x, -x)
  unsigned n;
  unsigned _pad;
};
TL_CHECK_PARAMS(ConvertParams, 56);

TL_KERNEL(tl_selftest_convert, ConvertParams) {
  const unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= p.n) return;
  const float x = static_cast<const float*>(p.src)[i];
  const __half h = tl_from_float<__half>(x);
  const __nv_bfloat16 b = tl_from_float<__nv_bfloat16>(x);
  static_cast<unsigned short*>(p.f16_bits)[i] = __half_as_ushort(h);
  static_cast<unsigned short*>(p.bf16_bits)[i] = __bfloat16_as_ushort(b);
  static_cast<float*>(p.f16_back)[i] = tl_to_float(h);
  static_cast<float*>(p.bf16_back)[i] = tl_to_float(b);
  const __half2 h2 = __floats2half2_rn(x, -x);
  const __nv_bfloat162 b2 = __floats2bfloat162_rn(x, -x);
  static_cast<unsigned*>(p.pair_bits)[2 * i] =
      __half_as_ushort(__low2half(h2)) | (static_cast<unsigned>(__half_as_ushort(__high2half(h2))) << 16);
  static_cast<unsigned*>(p.pair_bits)[2 * i + 1] =
      __bfloat16_as_ushort(__low2bfloat16(b2)) | (static_cast<unsigned>(__bfloat16_as_ushort(__high2bfloat16(b2))) << 16);
}

// ---------------------------------------------------------------------------
// 6. One 16x16x16 WMMA tile per warp (two warps): A staged through static
//    shared memory (row-major), B loaded col-major from global, C loaded
//    row-major, D = 2 * (A B + C) stored row-major by warp 0 and col-major by
//    warp 1.
struct WmmaParams {
  const void* a;  // T [16 * 16] row-major (A[m][k] at a[m * 16 + k])
  const void* b;  // T [16 * 16] col-major (B[k][n] at b[n * 16 + k])
  const void* c;  // f32 [16 * 16] row-major
  void* d;        // f32 [2 * 256]: warp 0 row-major, warp 1 col-major
};
TL_CHECK_PARAMS(WmmaParams, 32);

template <class T>
TL_DEVICE void wmma_tile(const WmmaParams& p) {
  using namespace nvcuda;
  __shared__ __align__(32) T a_tile[2][16 * 16];
  const unsigned warp = tl_warp_id();
  const unsigned lane = tl_lane_id();
  const T* a = static_cast<const T*>(p.a);
  for (unsigned i = lane; i < 256; i += 32) a_tile[warp][i] = a[i];
  __syncwarp();
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fd;
  wmma::fill_fragment(fd, 0.0f);
  wmma::load_matrix_sync(fa, a_tile[warp], 16);
  wmma::load_matrix_sync(fb, static_cast<const T*>(p.b), 16);
  wmma::load_matrix_sync(fc, static_cast<const float*>(p.c), 16, wmma::mem_row_major);
  wmma::mma_sync(fd, fa, fb, fc);
  for (int i = 0; i < fd.num_elements; ++i) fd.x[i] *= 2.0f;
  float* d = static_cast<float*>(p.d) + 256 * warp;
  wmma::store_matrix_sync(d, fd, 16, warp == 0 ? wmma::mem_row_major : wmma::mem_col_major);
}

TL_KERNEL(tl_selftest_wmma_f16, WmmaParams) { wmma_tile<__half>(p); }
TL_KERNEL(tl_selftest_wmma_bf16, WmmaParams) { wmma_tile<__nv_bfloat16>(p); }

// ---------------------------------------------------------------------------
// 7. Misuse the shim must diagnose (abort with a message); never launched in
//    a normal run. mode 1: a lane returns while its warp shuffles with a full
//    mask; mode 2: overlapping but different shuffle masks; mode 3: a deadlock
//    between __syncthreads and __syncwarp (found by the timeout).
struct MisuseParams {
  void* out;  // i32 [blockDim.x]
  unsigned mode;
  unsigned _pad;
};
TL_CHECK_PARAMS(MisuseParams, 16);

TL_KERNEL(tl_selftest_misuse, MisuseParams) {
  int* out = static_cast<int*>(p.out);
  const unsigned lane = tl_lane_id();
  int v = static_cast<int>(threadIdx.x);
  if (p.mode == 1) {
    if (lane == 7) return;
    v = __shfl_xor_sync(TL_FULL_MASK, v, 1);
  } else if (p.mode == 2) {
    v = __shfl_xor_sync(lane < 16 ? 0x0000ffffu : 0xffffff00u, v, 1);
  } else if (p.mode == 3) {
    if (threadIdx.x == 0) {
      __syncthreads();
    } else if (threadIdx.x < 32) {
      __syncwarp();
    } else {
      __syncthreads();
    }
  }
  out[threadIdx.x] = v;
}
