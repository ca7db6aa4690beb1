//! The small LoRA products and operand packings (`kernels/lora_small.cu`):
//! p = s·x·Vhᵀ, the deterministic dVh sums, U packed to the storage dtype,
//! rows concatenated for the cuBLAS path.

use super::*;

/// `kRowsPerWarp` of `lora_project` in `kernels/lora_small.cu`.
const LORA_PROJECT_ROWS_PER_WARP: u32 = 4;

/// `out[rows, r] = scale · x[rows, d] · Vhᵀ`, `x` in `xt`, `out` in `ot` (xt or f32).
///
/// # Safety
/// `x` holds [rows, d] in `xt`, `vh` [r, d] f32 and `out` [rows, r] in `ot`,
/// valid until the executor's launches finish; `out` overlaps neither input.
#[allow(clippy::too_many_arguments)]
pub unsafe fn lora_project<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    xt: DType,
    ot: DType,
    x: u64,
    vh: u64,
    out: u64,
    rows: usize,
    scale: f64,
) -> Result<()> {
    let kernel = match (xt, ot) {
        (DType::F32, DType::F32) => "tl_lora_project_f32_f32",
        (DType::F16, DType::F16) => "tl_lora_project_f16_f16",
        (DType::F16, DType::F32) => "tl_lora_project_f16_f32",
        (DType::BF16, DType::BF16) => "tl_lora_project_bf16_bf16",
        (DType::BF16, DType::F32) => "tl_lora_project_bf16_f32",
        _ => return Err(Error::UnsupportedCombination(format!("lora_project from {xt} to {ot}"))),
    };
    let params = LoraProjectParams {
        x,
        vh,
        out,
        rows: i32_of("tokens", rows)?,
        hidden: i32_of("hidden", cfg.hidden())?,
        rank: i32_of("rank", cfg.rank())?,
        scale: scale as f32,
    };
    // One warp per LORA_PROJECT_ROWS_PER_WARP rows (kernels/lora_small.cu).
    let plan =
        LaunchPlan::linear(select::kernel(kernel)?, blocks(rows, THREADS / 32 * LORA_PROJECT_ROWS_PER_WARP), THREADS);
    // SAFETY: x [rows, d] in xt, vh [r, d] f32 and out [rows, r] in ot are
    // checked (caller) or allocated (here) with those sizes.
    unsafe { e.launch(&plan, &params) }
}

/// `grad[r, d] += scale · Σ_t X[row(t)]ᵀ · Y[t]` with a fixed reduction order.
///
/// # Safety
/// `x` holds the [.., r] f32 rows `ids` (i32, or 0 for row t) address, `y`
/// [T, d] in `yt` and `grad` [r, d] f32, valid until the executor's launches
/// finish; `grad` overlaps neither input.
#[allow(clippy::too_many_arguments)]
pub unsafe fn lora_hidden_grad<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    yt: DType,
    x: u64,
    ids: u64,
    y: u64,
    grad: u64,
    tokens: usize,
    scale: f64,
) -> Result<()> {
    let (d, r) = (cfg.hidden(), cfg.rank());
    // At least UP_CHUNK tokens per partial, and at most 4 partials per SM, so
    // the scratch ([chunks, r, d] f32) stays bounded for any T.
    let chunk = UP_CHUNK.max(tokens.div_ceil(4 * e.multiprocessors() as usize));
    let chunks = tokens.div_ceil(chunk);
    let partial = e.scratch_uninit(chunks * r * d * 4)?;
    let params = LoraHiddenGradPartialParams {
        x,
        ids,
        y,
        partial: e.addr(&partial),
        tokens: i32_of("tokens", tokens)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
        chunk: i32_of("token chunk", chunk)?,
    };
    let kernel = select::by_dtype("tl_lora_hidden_grad_partial_", yt, "")?;
    let mut plan = LaunchPlan::linear(kernel, blocks(d, THREADS), THREADS);
    plan.grid.1 = chunks as u32;
    // SAFETY: x rows addressed by ids (validated) or by t < tokens, y [T, d],
    // partial [chunks, r, d] allocated above.
    unsafe { e.launch(&plan, &params)? };
    let reduce = SumPartialsParams {
        partial: e.addr(&partial),
        out: grad,
        chunks: chunks as i32,
        count: i32_of("rank * hidden", r * d)?,
        scale: scale as f32,
        _pad: 0,
    };
    let plan = LaunchPlan::linear(select::kernel("tl_sum_partials")?, blocks(r * d, THREADS), THREADS);
    // SAFETY: partial as above; grad is the caller's [r, d] f32 buffer.
    unsafe { e.launch(&plan, &reduce) }
}

/// U's rows [rows, r] (f32) in the half-precision storage dtype `t`, each
/// row padded with zeros to `ld` columns: the operand the tensor-core GEMMs
/// that take U as a B matrix read.
///
/// # Safety
/// `u` holds U's `rows` × `r` f32 values until the executor's launches finish.
pub(super) unsafe fn pack_u<E: Executor>(
    e: &E,
    t: DType,
    u: u64,
    rows: usize,
    r: usize,
    ld: usize,
) -> Result<E::Scratch> {
    pack(e, t, u, rows, r, ld, false)
}

/// f32 values `x` [rows, cols] rounded to the half-precision storage dtype
/// `t` (`hi`), or their low parts (`tl_lo_part` in `kernels/common.cuh`):
/// `x` ≈ hi + [`lo_unit`]`(t)` · lo, to about the square of `t`'s unit
/// roundoff.
///
/// # Safety
/// `x` holds `rows` × `cols` f32 values until the executor's launches finish.
pub(super) unsafe fn pack_parts<E: Executor>(
    e: &E,
    t: DType,
    x: u64,
    rows: usize,
    cols: usize,
) -> Result<(E::Scratch, E::Scratch)> {
    Ok((pack(e, t, x, rows, cols, cols, false)?, pack(e, t, x, rows, cols, cols, true)?))
}

/// The weight of the low parts of [`pack_parts`]: 2⁻¹¹ for f16, 2⁻⁸ for
/// bf16 (`tl_lo_scale` in `kernels/common.cuh` is its inverse).
pub(super) fn lo_unit(t: DType) -> f64 {
    match t {
        DType::F16 => 2f64.powi(-11),
        DType::BF16 => 2f64.powi(-8),
        DType::F32 => 1.0,
    }
}

/// `x` [rows, r] f32 in `t`, rows padded with zeros to `ld` columns; their
/// low parts with `lo`.
///
/// # Safety
/// As [`pack_parts`].
unsafe fn pack<E: Executor>(e: &E, t: DType, x: u64, rows: usize, r: usize, ld: usize, lo: bool) -> Result<E::Scratch> {
    let packed = e.scratch_uninit(rows * ld * t.size())?;
    let pack = LoraPackParams {
        u: x,
        out: e.addr(&packed),
        rows: i32_of("vocab", rows)?,
        cols: i32_of("rank", r)?,
        ld_out: i32_of("packed rank", ld)?,
        lo: i32::from(lo),
    };
    let grid = blocks(rows * ld, THREADS).min(e.multiprocessors() * 8);
    let plan = LaunchPlan::linear(select::by_dtype("tl_lora_pack_", t, "")?, grid.max(1), THREADS);
    // SAFETY: x rows [rows, r] f32 (caller), packed [rows, ld] allocated above.
    unsafe { e.launch(&plan, &pack)? };
    Ok(packed)
}

#[cfg(feature = "experimental-kernels")]
/// `out[i] = [x_i | y_i]` for `rows` rows, d + r elements each in the storage
/// dtype `t`; y is f32 when `y_f32` (U), else in `t` (p).
///
/// # Safety
/// `x` [rows, d] and `y` [rows, r] (f32 with `y_f32`, else `t`) and `out`
/// [rows, d + r] in `t`, valid until the executor's launches finish.
pub(super) unsafe fn concat_rows<E: Executor>(
    e: &E,
    t: DType,
    (x, y, y_f32): (u64, u64, bool),
    out: u64,
    rows: usize,
    d: usize,
    r: usize,
) -> Result<()> {
    let params = ConcatRowsParams {
        x,
        y,
        out,
        rows: i32_of("rows", rows)?,
        d: i32_of("hidden", d)?,
        r: i32_of("rank", r)?,
        y_f32: i32::from(y_f32),
    };
    // One warp per row, rows grid-strided (lora_small.cu).
    let grid = blocks(rows, THREADS / 32).min(e.multiprocessors() * 16);
    let plan = LaunchPlan::linear(select::by_dtype("tl_concat_rows_", t, "")?, grid.max(1), THREADS);
    // SAFETY: x [rows, d] and y [rows, r] (callers), out [rows, d + r] (the op's scratch).
    unsafe { e.launch(&plan, &params) }
}
