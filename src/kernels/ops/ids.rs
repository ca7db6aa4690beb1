//! Token-id and target validation on the device (`kernels/ids.cu`).

use super::*;

/// Argument code of the deferred id-error record (`kernels/params.h`).
pub const DEFERRED_ARG_IDS: i32 = 0;

/// Launches the id validation: returns the int32 ids (`-1` ignored, `-2`
/// invalid) and the status buffer `[bad count, i32::MAX - first bad index,
/// valid count, 0]` (zeroed scratch: no upload before the kernel).
fn launch_prepare_ids<E: Executor>(
    e: &E,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
    ignore: Option<i64>,
) -> Result<(E::Scratch, E::Scratch)> {
    let out = e.scratch_uninit(n * 4)?;
    let status = e.scratch(16)?;
    let params = PrepareIdsParams {
        ids,
        out: e.addr(&out),
        status: e.addr(&status),
        ignore_index: ignore.unwrap_or(0),
        n: i32_of("tokens", n)?,
        vocab: i32_of("vocab", vocab)?,
        allow_ignore: i32::from(ignore.is_some()),
        _pad: 0,
    };
    let kernel = match kind {
        IdKind::U32 => "tl_prepare_ids_u32",
        IdKind::I64 => "tl_prepare_ids_i64",
    };
    let plan = LaunchPlan::linear(kernel, blocks(n, THREADS), THREADS);
    // SAFETY: `ids` holds n ids of `kind` (checked by the caller); `out` and
    // `status` are scratch buffers of n*4 and 16 bytes owned here.
    unsafe { e.launch(&plan, &params)? };
    Ok((out, status))
}

/// Validates ids (or targets, with `ignore`) on the device and narrows them
/// to int32. Returns the int32 buffer and the count of valid entries; an
/// out-of-range id is an [`Error::TokenOutOfRange`] quoting its index and value.
pub fn prepare_ids<E: Executor>(
    e: &E,
    arg: &'static str,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
    ignore: Option<i64>,
) -> Result<(E::Scratch, usize)> {
    let (out, status) = launch_prepare_ids(e, ids, kind, n, vocab, ignore)?;
    let mut st = [0i32; 4];
    e.download(&status, bytemuck::cast_slice_mut(&mut st))?;
    if st[0] > 0 {
        let index = (i32::MAX - st[1]) as usize;
        let value = match kind {
            IdKind::U32 => {
                let mut b = [0u8; 4];
                e.read_at(ids + (index * kind.size()) as u64, &mut b)?;
                u32::from_le_bytes(b) as i64
            }
            IdKind::I64 => {
                let mut b = [0u8; 8];
                e.read_at(ids + (index * kind.size()) as u64, &mut b)?;
                i64::from_le_bytes(b)
            }
        };
        return Err(Error::TokenOutOfRange { arg, index, value, vocab });
    }
    Ok((out, st[2] as usize))
}

/// The embedding ops' ids as int32: checked at once ([`prepare_ids`]), or,
/// when the executor defers id errors, with no host round trip: bad ids
/// become `-2` (their rows are NaN in the forward and contribute nothing to
/// the backward, no memory is touched for them) and `tl_ids_defer` records
/// the first one for the backend to report later.
pub(super) fn prepare_embed_ids<E: Executor>(
    e: &E,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
) -> Result<E::Scratch> {
    let Some(record) = e.deferred_id_record() else {
        return prepare_ids(e, "ids", ids, kind, n, vocab, None).map(|(out, _)| out);
    };
    let (out, status) = launch_prepare_ids(e, ids, kind, n, vocab, None)?;
    let params = DeferIdsParams {
        status: e.addr(&status),
        ids,
        record,
        vocab: vocab as i64,
        id_bytes: kind.size() as i32,
        arg: DEFERRED_ARG_IDS,
    };
    let plan = LaunchPlan::linear("tl_ids_defer", 1, 32);
    // SAFETY: status is the 16-byte buffer the launch above fills; ids holds n
    // ids of `kind` (the kernel reads only the index status names, < n); the
    // record is the executor's own 5 × i64 buffer.
    unsafe { e.launch(&plan, &params)? };
    Ok(out)
}
