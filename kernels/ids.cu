// ids.cu: validate token ids / targets once and narrow them to int32, so no
// other kernel ever indexes with an unchecked id (DESIGN.md: an out-of-range
// id must not read or write out of bounds).
//
//   out[t] = id  if 0 <= id < vocab;  -1 if ignored (targets);  -2 if invalid.
//   status[0] += invalid count, status[1] = INT_MAX - (min invalid index),
//   status[2] += valid count; status starts zeroed (a memset, no upload: the
//   min index is kept as a max of INT_MAX - t, t < n <= INT_MAX, so every bad
//   entry beats the initial 0). Integer atomics only: the results are exact.
// Launch: grid ceil(n / 256), block 256.
//
// defer: one thread, after prepare_ids on the same stream (the backend's
// deferred id errors, `Cuda::with_deferred_id_errors`): copies a bad call's
// count, first bad index and value into the backend's record, so the op
// returns without a host round trip and the error is read later. Stream
// order makes the recorded error the first one enqueued.
#include "params.h"

namespace {

template <class I>
TL_DEVICE void prepare_ids(const PrepareIdsParams& p) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (t >= p.n) return;
  const long long raw = static_cast<long long>(static_cast<const I*>(p.ids)[t]);
  // u32 targets may hold the 32-bit pattern of a negative ignore index (-100 as u32).
  const long long as_i32 = static_cast<long long>(static_cast<int>(static_cast<unsigned>(raw)));
  const bool ignored = p.allow_ignore && (raw == p.ignore_index || (sizeof(I) == 4 && as_i32 == p.ignore_index));
  int out;
  if (ignored) {
    out = -1;
  } else if (raw >= 0 && raw < p.vocab) {
    out = static_cast<int>(raw);
    atomicAdd(&p.status[2], 1);
  } else {
    out = -2;
    atomicAdd(&p.status[0], 1);
    atomicMax(&p.status[1], INT_MAX - t);
  }
  p.out[t] = out;
}

}  // namespace

TL_KERNEL_BOUNDED(tl_prepare_ids_u32, PrepareIdsParams, 256) { prepare_ids<unsigned>(p); }
TL_KERNEL_BOUNDED(tl_prepare_ids_i64, PrepareIdsParams, 256) { prepare_ids<long long>(p); }

TL_KERNEL_BOUNDED(tl_ids_defer, DeferIdsParams, 32) {
  if (threadIdx.x != 0) return;
  const int bad = p.status[0];
  if (bad == 0) return;
  if (p.record[0] != 0) {
    p.record[0] += bad;
    return;
  }
  const int index = INT_MAX - p.status[1];
  const long long value = p.id_bytes == 8 ? static_cast<const long long*>(p.ids)[index]
                                          : static_cast<long long>(static_cast<const unsigned*>(p.ids)[index]);
  p.record[0] = bad;
  p.record[1] = p.arg;
  p.record[2] = index;
  p.record[3] = value;
  p.record[4] = p.vocab;
}
