// baseline_params.h: parameter structs of kernels/baseline.cu, the elementwise,
// gather and scatter pieces of the UNFUSED baselines that examples/gpu_bench/
// times against the fused kernels (plus the bench's input fill and its
// on-device relative-norm check). Not used by the library itself.
//
// Same ABI as kernels/params.h: one struct by value, pointers are u64 in the
// Rust mirror (examples/gpu_bench/params.rs), 8-byte fields first,
// explicit padding, sizes checked on both sides.
#pragma once
#include "common.cuh"

// Threads per block of every kernel in baseline.cu (launch with blockDim = (256, 1, 1)).
#define TL_BENCH_THREADS 256

// tl_bench_fill_{f32,bf16}: out[i] = offset + scale * u_i, u_i uniform in [-1, 1)
// from a hash of (seed, i): the same (seed, i) gives the same value in both dtypes
// (bf16 is the f32 value rounded to nearest even).
// Rust mirror:
//   #[repr(C)] struct FillParams { out: u64, n: u64, scale: f32, offset: f32, seed: u32, _pad: u32 }  // 32 bytes
struct FillParams {
  void* out;               // [n] f32 or bf16 (by kernel)
  unsigned long long n;    // elements
  float scale;
  float offset;
  unsigned seed;
  unsigned _pad;
};
TL_CHECK_PARAMS(FillParams, 32);

// tl_bench_cast_f32_bf16: out[i] = bf16_rn(x[i]).
// Rust mirror:
//   #[repr(C)] struct CastParams { x: u64, out: u64, n: u64 }  // 24 bytes
struct CastParams {
  const float* x;          // [n] f32
  void* out;               // [n] bf16
  unsigned long long n;
};
TL_CHECK_PARAMS(CastParams, 24);

// tl_bench_axpby_bf16: out[i] = bf16_rn(alpha * x[i] + beta * y[i])  (f32 math);
//   x == null: out[i] = bf16_rn(beta * y[i]). out may alias x or y (in place).
//   Vectorized (16-byte packs of 8) when x, y and out are 16-byte aligned.
//   Baseline uses: logits += s * lora_out (alpha 1, beta s); Gs = s * G (x null);
//   e = c * (W[ids] + s * U[ids] Vh) (alpha c, beta c * s); dEs = c * s * dE.
// Rust mirror:
//   #[repr(C)] struct AxpbyParams { x: u64, y: u64, out: u64, n: u64, alpha: f32, beta: f32 }  // 40 bytes
struct AxpbyParams {
  const void* x;           // [n] bf16 or null
  const void* y;           // [n] bf16
  void* out;               // [n] bf16
  unsigned long long n;
  float alpha;
  float beta;
};
TL_CHECK_PARAMS(AxpbyParams, 40);

// tl_bench_gather_rows_b16: out[t, :] = src[ids[t], :] for 2-byte elements
//   (bf16 rows of W or U); 16-byte packs when ncols % 8 == 0 and both pointers
//   are 16-byte aligned. ids must be in range (the bench generates them).
// Rust mirror:
//   #[repr(C)] struct GatherParams { ids: u64, src: u64, out: u64, tokens: i32, ncols: i32 }  // 32 bytes
struct GatherParams {
  const unsigned* ids;     // [tokens] u32
  const void* src;         // [*, ncols]
  void* out;               // [tokens, ncols]
  int tokens;
  int ncols;               // elements per row
};
TL_CHECK_PARAMS(GatherParams, 32);

// tl_bench_scatter_add_f32: out[ids[t], j] += scale * src[t, j], float atomicAdd
//   (what torch's index_add_ / embedding backward does; order-dependent rounding).
// Rust mirror:
//   #[repr(C)] struct ScatterAddParams { ids: u64, src: u64, out: u64, tokens: i32, ncols: i32, scale: f32, _pad: u32 }  // 40 bytes
struct ScatterAddParams {
  const unsigned* ids;     // [tokens] u32
  const float* src;        // [tokens, ncols] f32
  float* out;              // [*, ncols] f32, added into
  int tokens;
  int ncols;
  float scale;
  unsigned _pad;
};
TL_CHECK_PARAMS(ScatterAddParams, 40);

// tl_bench_diff_norm_{f32,bf16}: per block b,
//   partial[2b] = sum (a[i] - b[i])^2,  partial[2b + 1] = sum b[i]^2   (f64, grid-stride over i)
//   so that ||a - b|| / ||b|| = sqrt(sum partial[even] / sum partial[odd]) on the host.
//   NaN anywhere makes the result NaN.
// Rust mirror:
//   #[repr(C)] struct DiffNormParams { a: u64, b: u64, partial: u64, n: u64 }  // 32 bytes
struct DiffNormParams {
  const void* a;           // [n]
  const void* b;           // [n] (the reference)
  double* partial;         // [2 * gridDim.x]
  unsigned long long n;
};
TL_CHECK_PARAMS(DiffNormParams, 32);

// tl_bench_xent_rows_bf16: the cross-entropy over STORED logits of the
// materialized baselines, one block per row (grid-stride over rows), three
// passes over the row: max of z' = softcap(z), sum of exp(z' - max), then
//   row_loss[t] = scale * (lse_t - z'_t[y_t])
//   logits[t, v] = bf16((exp(z'_tv - lse_t) - [v == y_t]) * slope(z_tv) * scale)   (G, in place)
// (PyTorch's log_softmax + nll_loss + their backward make about ten passes;
// this is the cheapest materialized cross-entropy.) Targets are in range.
// Rust mirror:
//   #[repr(C)] struct XentRowsParams { logits: u64, targets: u64, row_loss: u64, tokens: i32, vocab: i32, softcap: f32, scale: f32 }  // 40 bytes
struct XentRowsParams {
  void* logits;            // [tokens, vocab] bf16, overwritten by G
  const unsigned* targets; // [tokens] u32
  float* row_loss;         // [tokens] f32
  int tokens;
  int vocab;
  float softcap;           // 0 = none
  float scale;             // 1/N (mean) or 1 (sum)
};
TL_CHECK_PARAMS(XentRowsParams, 40);
