// sort_ids.cu: deterministic stable sort of token positions by id (LSD radix).
//
// Input: validated int32 ids[T] (tl_prepare_ids_*): in [0, V) or negative (skip).
// Output: keys[T] = the ids in ascending order, skipped tokens mapped to the
// key V and sorted last; perm[T] = the token positions in the same order, ties
// by increasing t (stable). A segment (all tokens of one id) is a maximal run
// of equal keys < V; group_rows (embed.cu) consumes (keys, perm) directly.
// Bitwise deterministic: only integer counts use atomics, every element's
// destination is computed from its position (no order dependence).
//
// One LSD pass per 9-bit digit of the key, key(x) = x < 0 ? V : x,
// digit = (key >> shift) & 511 (9 bits: two passes up to V < 2^18, Gemma's
// 256000 included, where 8-bit digits took three):
//   passes P = ceil(bits(V) / 9), bits(V) = 32 - clz(V)   (V=37: 1, V=32000: 2, V=256000: 2)
//   pass p = 0 .. P-1, shift = 9 p, nblocks = ceil(T / 4096):
//     1. tl_sort_ids_hist     grid (nblocks), block 512   hist[b * 512 + digit] = count in tile b
//     2. tl_sort_ids_scan     grid (1),       block 512   hist[b * 512 + g] := sum of all counts of
//                                                        digits < g + counts of digit g in tiles < b
//                                                        (exclusive scan, digit-major; in place)
//     3. tl_sort_ids_scatter  grid (nblocks), block 512   stable scatter of (key, value)
//   All three take the same SortPassParams. Pass 0 reads keys_in = ids,
//   vals_in = null (value = position t); pass p > 0 reads the previous pass's
//   (keys_out, vals_out). To finish in the caller's (keys, perm) buffers,
//   pass p writes (keys, perm) when (P - 1 - p) is even, else the scratch
//   (tmp_keys, tmp_vals); a pass never reads the buffer it writes.
//   Scratch: tmp_keys [T] i32, tmp_vals [T] i32 (only when P >= 2),
//            hist [nblocks * 512] i32 (reused by every pass; no init needed).
//   No dynamic shared memory; static shared: hist 2 KiB, scan 64 B, scatter 34 KiB.
//   T = 0: launch nothing. Grid limit: nblocks <= 2^31 - 1 (any int T).
#include "embed_params.h"

namespace {

constexpr int kThreads = TL_SORT_THREADS;
constexpr int kTile = TL_SORT_TILE;
constexpr int kItems = kTile / kThreads;
constexpr int kRadix = 1 << TL_SORT_RADIX_BITS;
constexpr int kWarps = kThreads / 32;
static_assert(kRadix == kThreads, "one digit per thread");

TL_DEVICE int sort_key(int raw, int vocab) { return raw < 0 ? vocab : raw; }

TL_DEVICE unsigned lanemask_lt(int lane) { return (1u << lane) - 1u; }

}  // namespace

TL_KERNEL_BOUNDED(tl_sort_ids_hist, SortPassParams, TL_SORT_THREADS) {
  __shared__ int cnt[kRadix];
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  cnt[tid] = 0;
  __syncthreads();
  const long long base = static_cast<long long>(blockIdx.x) * kTile;
  int dgs[kItems];  // all loads first (in flight together)
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const long long i = base + k * kThreads + tid;
    dgs[k] = i < p.n ? (sort_key(p.keys_in[i], p.vocab) >> p.shift) & (kRadix - 1) : kRadix;
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (base + k * kThreads >= p.n) break;  // uniform over the block
    const unsigned peers = __match_any_sync(TL_FULL_MASK, dgs[k]);
    if (dgs[k] < kRadix && lane == __ffs(static_cast<int>(peers)) - 1) atomicAdd(&cnt[dgs[k]], __popc(peers));
  }
  __syncthreads();
  p.hist[static_cast<long long>(blockIdx.x) * kRadix + tid] = cnt[tid];
}

// Exclusive scan over (digit, block), digit-major: thread = digit. Integer
// sums, so the order of the additions does not matter.
TL_KERNEL_BOUNDED(tl_sort_ids_scan, SortPassParams, TL_SORT_THREADS) {
  __shared__ int warp_total[kWarps];
  const int d = static_cast<int>(threadIdx.x);
  const int lane = d & 31;
  const int warp = d >> 5;
  int* hist = p.hist;
  const int nb = p.nblocks;
  int total = 0;
#pragma unroll 8
  for (int b = 0; b < nb; ++b) total += hist[static_cast<long long>(b) * kRadix + d];
  // Block-wide exclusive scan of the digit totals.
  int incl = total;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const int y = __shfl_up_sync(TL_FULL_MASK, incl, off);
    if (lane >= off) incl += y;
  }
  if (lane == 31) warp_total[warp] = incl;
  __syncthreads();
  int run = incl - total;
  for (int w = 0; w < warp; ++w) run += warp_total[w];
#pragma unroll 8
  for (int b = 0; b < nb; ++b) {
    const long long idx = static_cast<long long>(b) * kRadix + d;
    const int v = hist[idx];
    hist[idx] = run;
    run += v;
  }
}

// Stable scatter. The tile is processed in 8 sub-tiles of 512 consecutive
// keys (one per thread, in order); an element's rank among equal digits of the
// tile = equal digits in earlier sub-tiles (running) + in lower warps of this
// sub-tile (per-warp counts) + in lower lanes of its warp (match mask).
TL_KERNEL_BOUNDED(tl_sort_ids_scatter, SortPassParams, TL_SORT_THREADS) {
  __shared__ int offset[kRadix];           // global offset of each digit for this tile
  __shared__ int wcount[kWarps][kRadix];   // per-warp digit counts of the current sub-tile
  const int tid = static_cast<int>(threadIdx.x);
  const int lane = tid & 31;
  const int warp = tid >> 5;
  offset[tid] = p.hist[static_cast<long long>(blockIdx.x) * kRadix + tid];
#pragma unroll
  for (int w = 0; w < kWarps; ++w) wcount[w][tid] = 0;
  __syncthreads();
  const long long base = static_cast<long long>(blockIdx.x) * kTile;
  int keys[kItems], vals[kItems];  // all loads first (in flight together)
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    const long long i = base + k * kThreads + tid;
    keys[k] = i < p.n ? sort_key(p.keys_in[i], p.vocab) : 0;
    vals[k] = i < p.n ? (p.vals_in ? p.vals_in[i] : static_cast<int>(i)) : 0;
  }
#pragma unroll
  for (int k = 0; k < kItems; ++k) {
    if (base + k * kThreads >= p.n) break;  // uniform over the block
    const bool valid = base + k * kThreads + tid < p.n;
    const int key = keys[k];
    const int val = vals[k];
    const int dg = valid ? (key >> p.shift) & (kRadix - 1) : kRadix;
    const unsigned peers = __match_any_sync(TL_FULL_MASK, dg);
    if (valid && lane == __ffs(static_cast<int>(peers)) - 1) wcount[warp][dg] = __popc(peers);
    __syncthreads();
    if (valid) {
      int rank = offset[dg] + __popc(peers & lanemask_lt(lane));
      for (int w = 0; w < warp; ++w) rank += wcount[w][dg];
      p.keys_out[rank] = key;
      p.vals_out[rank] = val;
    }
    __syncthreads();
    // Thread tid owns digit tid: advance its offset past this sub-tile, clear the counts.
    int sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {
      sum += wcount[w][tid];
      wcount[w][tid] = 0;
    }
    offset[tid] += sum;
    __syncthreads();
  }
}
