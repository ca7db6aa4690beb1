// ids.cu: validate token ids / targets once and narrow them to int32, so no
// kernel ever indexes with an unchecked id (DESIGN.md §5: an out-of-range id
// must not read or write out of bounds): the others read these int32 ids or,
// like embed_forward, check each raw id as they load it (tl_checked_id).
//
//   out[t] = id  if 0 <= id < vocab;  -1 if ignored (targets);  -2 if invalid.
//   status[0] += invalid count, status[1] = INT_MAX - (min invalid index),
//   status[2] += valid count; status starts zeroed (a memset, no upload: the
//   min index is kept as a max of INT_MAX - t, t < n <= INT_MAX, so every bad
//   entry beats the initial 0). Integer atomics only: the results are exact.
//   out may be null (ids that are only checked, not narrowed). With a
//   deferred id-error record (`Cuda::with_deferred_id_errors`) the
//   status may be null: the bad ids go into the record in the same launch
//   (tl_id_record_bad / _finish, common.cuh), so the op reads nothing back.
// Launch: grid ceil(n / 256), block 256.
#include "params.h"

namespace {

template <class I>
TL_DEVICE void prepare_ids(const PrepareIdsParams& p) {
  const int t = static_cast<int>(blockIdx.x * blockDim.x + threadIdx.x);
  if (t < p.n) {
    const long long raw = static_cast<long long>(static_cast<const I*>(p.ids)[t]);
    // u32 targets may hold the 32-bit pattern of a negative ignore index (-100 as u32).
    const long long as_i32 = static_cast<long long>(static_cast<int>(static_cast<unsigned>(raw)));
    const bool ignored =
        p.allow_ignore && (raw == p.ignore_index || (sizeof(I) == 4 && as_i32 == p.ignore_index));
    int out;
    if (ignored) {
      out = -1;
    } else if (raw >= 0 && raw < p.vocab) {
      out = static_cast<int>(raw);
      if (p.status) atomicAdd(&p.status[2], 1);
    } else {
      out = -2;
      if (p.status) {
        atomicAdd(&p.status[0], 1);
        atomicMax(&p.status[1], INT_MAX - t);
      }
      if (p.record) tl_id_record_bad(p.record, t);
    }
    if (p.out) p.out[t] = out;
  }
  if (p.record) tl_id_record_finish(p.record, p.ids, static_cast<int>(sizeof(I)), p.vocab, p.arg);
}

}  // namespace

TL_KERNEL_BOUNDED(tl_prepare_ids_u32, PrepareIdsParams, 256) { prepare_ids<unsigned>(p); }
TL_KERNEL_BOUNDED(tl_prepare_ids_i64, PrepareIdsParams, 256) { prepare_ids<long long>(p); }
