// params.h: the parameter struct of every kernel, mirrored field for field by
// src/kernels/params.rs (`#[repr(C)]`). Pointers are 8 bytes (u64 in Rust),
// 8-byte fields first, explicit padding, no implicit holes.
#pragma once
#include "common.cuh"

// ids.cu: validate and narrow token ids / targets to int32.
//   out[t] = id            if 0 <= id < vocab
//          = -1            if allow_ignore and id == ignore_index (u32: also its 32-bit pattern)
//          = -2            otherwise (invalid)
//   status (when not null): [0] invalid count, [1] INT_MAX - min invalid index,
//   [2] count of ids neither ignored nor invalid. record (when not null): the
//   backend's deferred id-error record (common.cuh), filled in the same launch.
struct PrepareIdsParams {
  const void* ids;  // [n] u32 or i64 (by kernel)
  int* out;         // [n], or null (only checked)
  int* status;      // [4] zeroed, or null
  long long* record;  // [TL_ID_RECORD_LEN], or null
  long long ignore_index;
  int n;
  int vocab;
  int allow_ignore;
  int arg;          // argument code written into the record (0 = "ids")
};
TL_CHECK_PARAMS(PrepareIdsParams, 56);

// lora_small.cu: out[t, j] = scale * sum_k x[t, k] * vh[j, k]   (x: [rows, d], vh: [r, d] f32)
struct LoraProjectParams {
  const void* x;
  const float* vh;
  void* out;  // [rows, r], dtype by kernel
  int rows;
  int hidden;
  int rank;
  float scale;
};
TL_CHECK_PARAMS(LoraProjectParams, 40);

// lora_small.cu: partial[s, j, k] = sum_{t in chunk s} X[row(t), j] * Y[t, k]
//   row(t) = ids ? ids[t] : t  (tokens with ids[t] < 0 are skipped); X f32 [*, r], Y [T, d].
struct LoraHiddenGradPartialParams {
  const float* x;
  const int* ids;  // may be null
  const void* y;
  float* partial;  // [chunks, r, d]
  int tokens;
  int hidden;
  int rank;
  int chunk;  // tokens per chunk
};
TL_CHECK_PARAMS(LoraHiddenGradPartialParams, 48);

// lora_small.cu: out[j, k] += scale * sum_s partial[s, j, k], s in order.
struct SumPartialsParams {
  const float* partial;
  float* out;  // [r, d]
  int chunks;
  int count;  // r * d
  float scale;
  unsigned _pad;
};
TL_CHECK_PARAMS(SumPartialsParams, 32);

// lora_small.cu: out[v, j] = u[v, j] for j < cols, 0 for cols <= j < ld_out (storage dtype).
struct LoraPackParams {
  const float* u;  // [rows, cols]
  void* out;       // [rows, ld_out]
  int rows;
  int cols;
  int ld_out;
  int lo;          // 0: u rounded; 1: the low parts (common.cuh's tl_lo_part)
};
TL_CHECK_PARAMS(LoraPackParams, 32);

// lora_small.cu: out[i] = [x_i | y_i], rows of d + r elements in the storage
// dtype (the cuBLAS path's K = d + r operands [h | p] and [W | U]).
struct ConcatRowsParams {
  const void* x;   // [rows, d] storage dtype
  const void* y;   // [rows, r] f32 (y_f32) or storage dtype
  void* out;       // [rows, d + r] storage dtype
  int rows;
  int d;
  int r;
  int y_f32;
};
TL_CHECK_PARAMS(ConcatRowsParams, 40);

// head.cu: logits[t, v] = [h_t | p_t] . [W_v | U_v]   (p = s * h Vh^T, from lora_project)
struct HeadForwardParams {
  const void* h;   // [T, d]
  const void* p;   // [T, r], storage dtype
  const void* w;   // [V, d]
  const float* u;  // [V, r]
  void* out;       // [T, V]
  int tokens;
  int vocab;
  int hidden;
  int rank;
};
TL_CHECK_PARAMS(HeadForwardParams, 56);

// head.cu: dh = G W + s (G U) Vh, and gu = G U (f32 [T, r]) for the dVh pass.
// With `accumulate`, dh is an f32 accumulator: dh += G W and gu += G U (no
// LoRA term; the fused cross-entropy backward runs this per vocabulary chunk).
struct HeadGradHParams {
  const void* g;    // [T, V], dtype G
  const void* w;    // [V, d]
  const float* u;   // [V, r]; the _wgmma kernels: [V, RX] in the storage dtype (lora_small.cu's pack)
  const float* vh;  // [r, d]
  void* dh;         // [T, d] storage dtype, or f32 with accumulate
  float* gu;        // [T, r]
  const int* live;  // null, or [ceil(T/128), live_ld]: 0 = the 128 x 128 tile of G is all 0 (skipped)
  int tokens;
  int vocab;
  int hidden;
  int rank;
  float scale;
  int accumulate;   // 0: write dh (with the LoRA term) and gu; 1: add G W into f32 dh, G U into gu
  int live_ld;
  unsigned _pad;
};
TL_CHECK_PARAMS(HeadGradHParams, 88);

// head.cu: grad[v, n] += scale * sum_t g[t, v] * b[t, n]   (b: [T, ncols] storage dtype)
//   used for dU (b = p = s h Vh^T, ncols = r, scale 1) and dW (b = h, ncols = d, scale 1).
struct HeadGradParamParams {
  const void* g;     // [T, V], dtype G
  const void* b;     // [T, ncols]
  float* grad;       // [V, ncols] f32, added into; with k_split: [splits, V, ncols] partials, written
  const int* live;   // null, or [ceil(T/128), live_ld] tile flags as in HeadGradHParams
  int tokens;
  int vocab;
  int ncols;
  float scale;
  int live_ld;
  int k_split;       // 0, or tokens per split (a multiple of 128; grid.z = splits)
};
TL_CHECK_PARAMS(HeadGradParamParams, 56);

// xent.cu: per (token tile, vocabulary split) online logsumexp of the softcapped
// logits [h | p] . [W | U]^T, never stored: part_max/part_sum [splits, T], and
// target_logit[t] from the one block whose columns hold targets[t].
struct XentPartialParams {
  const void* h;         // [T, d]
  const void* p;         // [T, r] storage dtype (s * h Vh^T)
  const void* w;         // [V, d]
  const float* u;        // [V, r]
  const int* targets;    // [T] validated: in [0, V) or -1 (ignored)
  float* part_max;       // [splits, T]
  float* part_sum;       // [splits, T]
  float* target_logit;   // [T]
  int tokens;
  int vocab;
  int hidden;
  int rank;
  int split_cols;        // vocabulary columns per split (a multiple of 128)
  float softcap;         // kappa, 0 = none
};
TL_CHECK_PARAMS(XentPartialParams, 88);

// xent.cu: lse[t] = merge of the splits in order; row_loss[t] = lse - target
// logit (0 for ignored rows); then loss[0] = scale * sum_t row_loss[t] in a
// fixed order (one block).
struct XentCombineParams {
  const float* part_max;
  const float* part_sum;
  const float* target_logit;
  const int* targets;
  float* lse;        // [T]
  float* row_loss;   // [T] scratch
  float* loss;       // [1]
  int tokens;
  int splits;
  float scale;       // 1/N (mean), 1 (sum), 0 (no valid target)
  unsigned _pad;
};
TL_CHECK_PARAMS(XentCombineParams, 72);

// xent_grad.cu: G = d loss / d logits for the vocabulary columns [col0, col0 + cols),
// from recomputed logits z = [h | p] . [W | U]^T, for valid targets y_t:
//   G[t, c] = (exp(z'[t, v] - lse[t]) - [v == y_t]) * slope(z[t, v]) * factor,  v = col0 + c
// (z' = kappa tanh(z / kappa), slope = 1 - tanh^2, or z' = z, slope = 1; rows
// with an ignored target are 0). g is [T, cols] in the storage dtype and holds
// G * g_unit / factor: the consumers multiply by factor / g_unit at the end.
struct XentGradLogitsParams {
  const void* h;        // [T, d]
  const void* p;        // [T, r] storage dtype (s h Vh^T)
  const void* w;        // [V, d]
  const float* u;       // [V, r]
  const int* targets;   // [T] validated: in [0, V) or -1 (ignored)
  const float* lse;     // [T] from the forward
  void* g;              // [T, cols] storage dtype (written)
  int* live;            // [ceil(T/128), ceil(cols/128)] (written): 0 = tile filtered to 0
  int tokens;
  int vocab;
  int hidden;
  int rank;
  int col0;
  int cols;
  float softcap;        // kappa, 0 = none
  float g_unit;         // g holds G * g_unit / factor = (softmax - onehot) * slope * g_unit (see xent_grad.cu)
  float filter;         // a tile whose |G| are all < filter * |factor| is written as 0; 0 = exact
  unsigned _pad;
};
TL_CHECK_PARAMS(XentGradLogitsParams, 104);

// xent_grad.cu: dh[t, k] = g_scale * (dh_acc[t, k] + scale * sum_j gu[t, j] Vh[j, k]).
struct XentGradFinishParams {
  const float* dh_acc;  // [T, d] f32
  const float* gu;      // [T, r] f32
  const float* vh;      // [r, d]
  void* dh;             // [T, d] storage dtype (written)
  int tokens;
  int hidden;
  int rank;
  float scale;
  float g_scale;        // factor / g_unit: dh_acc and gu were summed from the stored (scaled) G
  unsigned _pad;
};
TL_CHECK_PARAMS(XentGradFinishParams, 56);

// The cuBLAS paths (KernelOptions::cublas): a chunk z [rows, cols] of f32
// logits, row length cols, computed by the engine as h W_c^T + p U_c^T for the
// vocabulary columns [col0, col0 + cols); these kernels consume it.

// xent.cu: per row t, the online (max, sum exp) of z' (softcapped) over the
// chunk in a fixed order, folded into the running pair part_max / part_sum[t]
// of the chunks before (chunk 0 writes it), and target_logit[t] =
// z'[t, y_t - col0] when y_t falls in the chunk.
struct XentChunkPartialParams {
  const float* z;        // [T, cols]
  const int* targets;    // [T] validated: in [0, V) or -1 (ignored)
  float* part_max;       // [T] running
  float* part_sum;       // [T] running
  float* target_logit;   // [T]
  int tokens;
  int cols;
  int col0;
  int chunk;             // this chunk's index (0: start the running pair)
  float softcap;         // kappa, 0 = none
  unsigned _pad;
};
TL_CHECK_PARAMS(XentChunkPartialParams, 64);

// xent_grad.cu: g = G' of XentGradLogitsParams (G * g_unit / factor) for one
// block of tokens: targets and lse point at the block's first row.
struct XentChunkGradParams {
  const float* z;        // [tokens, cols]
  const int* targets;    // [tokens]
  const float* lse;      // [tokens]
  void* g;               // [tokens, cols] storage dtype (written)
  int tokens;
  int cols;
  int col0;
  float softcap;
  float g_unit;
  unsigned _pad;
};
TL_CHECK_PARAMS(XentChunkGradParams, 56);
