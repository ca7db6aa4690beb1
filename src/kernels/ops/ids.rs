//! Token-id and target validation on the device (`kernels/ids.cu`).

use super::*;

/// Argument code of the deferred id-error record (`kernels/params.h`).
pub const DEFERRED_ARG_IDS: i32 = 0;

/// Length in i64 of the deferred id-error record (`TL_ID_RECORD_LEN` in
/// `kernels/common.cuh`): `[bad count, argument code, first bad index, its
/// value, vocab]`, then three words the validating launch uses and clears.
#[cfg_attr(not(any(feature = "cuda", test)), allow(dead_code))]
pub const ID_RECORD_LEN: usize = 8;

/// Where the id validation writes: the int32 ids (`-1` ignored, `-2`
/// invalid), a zeroed 16-byte status (`[bad count, i32::MAX - first bad
/// index, valid count, 0]`), a deferred id-error record; 0 for none.
#[derive(Clone, Copy)]
struct IdOutputs {
    narrowed: u64,
    status: u64,
    record: u64,
}

/// Launches the id validation (`tl_prepare_ids_*`).
///
/// # Safety
/// `ids` holds `n` ids of `kind`; the outputs of `to` are 0 or buffers of the
/// sizes documented on them, valid until the executor's launches finish.
unsafe fn launch_prepare_ids<E: Executor>(
    e: &E,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
    ignore: Option<i64>,
    to: IdOutputs,
) -> Result<()> {
    let params = PrepareIdsParams {
        ids,
        out: to.narrowed,
        status: to.status,
        record: to.record,
        ignore_index: ignore.unwrap_or(0),
        n: i32_of("tokens", n)?,
        vocab: i32_of("vocab", vocab)?,
        allow_ignore: i32::from(ignore.is_some()),
        arg: DEFERRED_ARG_IDS,
    };
    let kernel = match kind {
        IdKind::U32 => "tl_prepare_ids_u32",
        IdKind::I64 => "tl_prepare_ids_i64",
    };
    let plan = LaunchPlan::linear(select::kernel(kernel)?, blocks(n, THREADS), THREADS);
    // SAFETY: `ids` holds n ids of `kind` (checked by the caller); each output
    // is 0 or owned by the caller: `narrowed` n*4 bytes, `status` 16 zeroed
    // bytes, `record` the executor's ID_RECORD_LEN × i64.
    unsafe { e.launch(&plan, &params) }
}

/// Reads a validation's status back: the count of valid entries, or an
/// [`Error::TokenOutOfRange`] quoting the first bad index and its value.
///
/// # Safety
/// `ids` holds the ids the status was computed from (an offending one is read back).
unsafe fn read_id_status<E: Executor>(
    e: &E,
    status: &E::Scratch,
    arg: &'static str,
    ids: u64,
    kind: IdKind,
    vocab: usize,
) -> Result<usize> {
    let mut st = [0i32; 4];
    e.download(status, bytemuck::cast_slice_mut(&mut st))?;
    if st[0] == 0 {
        return Ok(st[2] as usize);
    }
    let index = (i32::MAX - st[1]) as usize;
    let at = ids + (index * kind.size()) as u64;
    let value = match kind {
        IdKind::U32 => {
            let mut b = [0u8; 4];
            e.read_at(at, &mut b)?;
            u32::from_le_bytes(b) as i64
        }
        IdKind::I64 => {
            let mut b = [0u8; 8];
            e.read_at(at, &mut b)?;
            i64::from_le_bytes(b)
        }
    };
    Err(Error::TokenOutOfRange { arg, index, value, vocab })
}

/// Validates ids (or targets, with `ignore`) on the device and narrows them
/// to int32. Returns the int32 buffer and the count of valid entries; an
/// out-of-range id is an [`Error::TokenOutOfRange`] quoting its index and value.
///
/// # Safety
/// `ids` holds `n` ids of `kind`, valid until the executor's launches finish.
pub unsafe fn prepare_ids<E: Executor>(
    e: &E,
    arg: &'static str,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
    ignore: Option<i64>,
) -> Result<(E::Scratch, usize)> {
    let (out, status) = (e.scratch_uninit(n * 4)?, e.scratch(16)?);
    let to = IdOutputs { narrowed: e.addr(&out), status: e.addr(&status), record: 0 };
    launch_prepare_ids(e, ids, kind, n, vocab, ignore, to)?;
    let valid = read_id_status(e, &status, arg, ids, kind, vocab)?;
    Ok((out, valid))
}

/// As [`prepare_ids`] for ids that are only checked, not narrowed (the
/// embedding forward reads the caller's ids): no int32 copy is written.
///
/// # Safety
/// `ids` holds `n` ids of `kind`, valid until the executor's launches finish.
pub(super) unsafe fn check_ids<E: Executor>(
    e: &E,
    arg: &'static str,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
) -> Result<()> {
    let status = e.scratch(16)?;
    let to = IdOutputs { narrowed: 0, status: e.addr(&status), record: 0 };
    launch_prepare_ids(e, ids, kind, n, vocab, None, to)?;
    read_id_status(e, &status, arg, ids, kind, vocab).map(|_| ())
}

/// The embedding backward's ids as int32: checked at once ([`prepare_ids`]),
/// or, when the executor defers id errors, with no host round trip: bad ids
/// become `-2` (their tokens contribute nothing to the backward, no memory
/// is touched for them) and the same launch records the first one for the
/// backend to report later.
///
/// # Safety
/// `ids` holds `n` ids of `kind`, valid until the executor's launches finish.
pub(super) unsafe fn prepare_embed_ids<E: Executor>(
    e: &E,
    ids: u64,
    kind: IdKind,
    n: usize,
    vocab: usize,
) -> Result<E::Scratch> {
    match e.deferred_id_record() {
        None => prepare_ids(e, "ids", ids, kind, n, vocab, None).map(|(out, _)| out),
        Some(record) => {
            let out = e.scratch_uninit(n * 4)?;
            launch_prepare_ids(e, ids, kind, n, vocab, None, IdOutputs { narrowed: e.addr(&out), status: 0, record })?;
            Ok(out)
        }
    }
}
