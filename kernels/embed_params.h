// embed_params.h: parameter structs of the embedding kernels (embed.cu), the
// id sort (sort_ids.cu) and the LoRA merge (merge.cu). Mirrored field for
// field by `#[repr(C)]` Rust structs (pointers are u64, 8-byte fields first,
// explicit padding, no implicit holes); the Rust mirror is given next to
// each struct. Launch shapes and host sequences are in the .cu headers.
#pragma once
#include "common.cuh"

// Compile-time constants the host mirrors (src/kernels/params.rs).
#define TL_EMBED_BLOCK_X 32       // embed_forward: blockDim.x (one warp of column groups)
#define TL_EMBED_MAX_WARPS 4      // embed_forward: blockDim.y <= 4 (128 threads; per-warp shared-memory rings)
#define TL_SORT_THREADS 512       // sort_ids: blockDim.x of hist / scan / scatter
#define TL_SORT_TILE 4096         // sort_ids: keys per hist/scatter block (8 per thread)
#define TL_SORT_RADIX_BITS 9      // sort_ids: digit width (512 buckets, one per thread)
#define TL_GROUP_CHUNK 64         // group_rows: sorted positions per chunk

// embed.cu: out[t, :] = embed_scale * (W[ids[t], :] + scale * U[ids[t], :] . Vh)
//   (T = storage dtype by kernel). The kernel reads the caller's u32 or i64
//   ids and tests each against vocab before it indexes anything: rows of
//   out-of-range ids are written as NaN, and with a record (deferred id
//   errors) the first one is recorded in the same launch (common.cuh).
// Rust mirror:
//   #[repr(C)] struct EmbedForwardParams {
//       ids: u64, w: u64, u: u64, vh: u64, out: u64, record: u64,
//       tokens: i32, vocab: i32, hidden: i32, rank: i32, scale: f32, embed_scale: f32,
//       id_bytes: i32, arg: i32,
//   }  // 80 bytes
struct EmbedForwardParams {
  const void* ids;   // [T] u32 (id_bytes 4) or i64 (id_bytes 8)
  const void* w;     // [V, d] storage dtype
  const float* u;    // [V, r] lora_vocab
  const float* vh;   // [r, d] lora_hidden
  void* out;         // [T, d] storage dtype
  long long* record; // [TL_ID_RECORD_LEN] deferred id-error record, or null
  int tokens;        // T
  int vocab;         // V
  int hidden;        // d
  int rank;          // r >= 1
  float scale;       // s
  float embed_scale; // c (1 when the model has none)
  int id_bytes;      // 4 or 8
  int arg;           // argument code for the record (0 = "ids")
};
TL_CHECK_PARAMS(EmbedForwardParams, 80);

// merge.cu: W[v, k] = W[v, k] (+|-) scale * sum_j U[v, j] Vh[j, k], in place, f32 math, one rounding.
// Rust mirror:
//   #[repr(C)] struct MergeParams {
//       w: u64, u: u64, vh: u64,
//       rows: i32, hidden: i32, rank: i32, scale: f32, subtract: i32, _pad: u32,
//   }  // 48 bytes
struct MergeParams {
  void* w;          // [V, d] storage dtype, updated in place
  const float* u;   // [V, r]
  const float* vh;  // [r, d]
  int rows;         // V
  int hidden;       // d
  int rank;         // r >= 1
  float scale;      // s (>= 0 or not: it is used as given)
  int subtract;     // 0: W += s U Vh (merge); 1: W -= s U Vh (unmerge)
  unsigned _pad;
};
TL_CHECK_PARAMS(MergeParams, 48);

// sort_ids.cu: one LSD radix pass (hist, scan and scatter kernels share it).
//   key(x) = x < 0 ? vocab : x;  digit = (key >> shift) & 255.
// Rust mirror:
//   #[repr(C)] struct SortPassParams {
//       keys_in: u64, vals_in: u64, keys_out: u64, vals_out: u64, hist: u64,
//       n: i32, vocab: i32, shift: i32, nblocks: i32,
//   }  // 56 bytes
struct SortPassParams {
  const int* keys_in;  // [n]: pass 0 the validated ids (negatives allowed), later the previous keys_out
  const int* vals_in;  // [n] or null (pass 0): value = position t
  int* keys_out;       // [n] mapped keys (vocab for skipped tokens), stably sorted by this digit
  int* vals_out;       // [n] token positions, permuted along
  int* hist;           // [nblocks * 256]: counts (hist), then exclusive offsets (scan), read by scatter
  int n;               // T
  int vocab;           // V (key of a skipped token)
  int shift;           // 8 * pass
  int nblocks;         // ceil(n / TL_SORT_TILE)
};
TL_CHECK_PARAMS(SortPassParams, 56);

// embed.cu: grouped row sum over the sorted ids (deterministic, no float atomics):
//   out[id, :] += scale * sum_{i : keys[i] == id} x[perm[i], :]      (keys[i] == vocab: skipped)
// Rust mirror:
//   #[repr(C)] struct GroupRowsParams {
//       keys: u64, perm: u64, x: u64, out: u64, partial: u64,
//       n: i32, vocab: i32, ncols: i32, scale: f32,
//   }  // 56 bytes
struct GroupRowsParams {
  const int* keys;  // [n] sorted keys (sort_ids' final keys_out)
  const int* perm;  // [n] token positions (sort_ids' final vals_out)
  const void* x;    // [T, ncols] rows (f32 or storage dtype, by kernel), row t at x + t * ncols
  float* out;       // [vocab, ncols] f32, added into
  float* partial;   // scratch [2 * ceil(n / TL_GROUP_CHUNK) * ncols] f32 (no init needed)
  int n;            // T
  int vocab;        // V
  int ncols;        // r (dU) or d (dW)
  float scale;      // 1 (dU) or c (dW)
};
TL_CHECK_PARAMS(GroupRowsParams, 56);
