//! The head backward's GEMM launches (`kernels/head.cu`), shared by
//! `head_backward` and the fused cross-entropy backward: dh and G·U
//! (`grad_h`), dU / dW (`grad_param`), and dh's LoRA term (`grad_finish`).

use super::*;

/// Operands of one grad_h launch over `rows` vocabulary rows: G [T, rows]
/// (dtype `gt`, row length `rows`), W / U starting at the first of those rows.
pub(super) struct GradH {
    pub(super) g: u64,
    pub(super) w: u64,
    pub(super) u: u64,
    pub(super) vh: u64,
    /// `dh` [T, d]: storage dtype, or the f32 accumulator with `accumulate`.
    pub(super) dh: u64,
    pub(super) gu: u64,
    pub(super) rows: usize,
    pub(super) accumulate: bool,
    /// Tile flags of G (`kernels/params.h`) and their row length, if filtered.
    pub(super) live: Option<(u64, usize)>,
}

/// `dh = G W + s (G U) Vh` and `gu = G U` (or, accumulating, f32 `dh += G W`, `gu += G U`).
///
/// # Safety
/// Every address of `op` holds the matrix its field documents (G [T, rows] in
/// `gt`, W / U rows, Vh [r, d], dh [T, d], gu [T, r]), valid until the
/// executor's launches finish; the outputs overlap none of the inputs.
pub(super) unsafe fn grad_h<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    gt: DType,
    op: GradH,
    tokens: usize,
) -> Result<()> {
    let (d, r) = (cfg.hidden(), cfg.rank());
    let params = HeadGradHParams {
        g: op.g,
        w: op.w,
        u: op.u,
        vh: op.vh,
        dh: op.dh,
        gu: op.gu,
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", op.rows)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", r)?,
        scale: cfg.scale() as f32,
        accumulate: i32::from(op.accumulate),
        live: op.live.map_or(0, |l| l.0),
        live_ld: op.live.map_or(0, |l| l.1 as i32),
        _pad: 0,
    };
    let opts = e.options();
    let filtered = op.live.is_some();
    let gemm =
        select::gemm(Site::GradH { u_cols: select::grad_h_u_cols(r, Gemm::Tile, &opts)?, filtered }, t, gt, &opts);
    let u_cols = select::grad_h_u_cols(r, gemm, &opts)?;
    let kernel = select::grad_h_kernel(t, gt, u_cols, gemm)?;
    let es = t.size();
    let shared_bytes = match gemm {
        #[cfg(feature = "experimental-kernels")]
        Gemm::Wgmma { .. } => {
            // W read N-major with U's columns in the same MMAs (head.cu), U
            // packed to [rows, u_cols] in the storage dtype first.
            let packed = pack_u(e, t, op.u, op.rows, r, u_cols)?;
            let params = HeadGradHParams { u: e.addr(&packed), ..params };
            let plan = LaunchPlan {
                kernel,
                grid: (blocks(tokens, GEMM_TILE), blocks(d, GEMM_TILE), 1),
                block: (THREADS, 1, 1),
                shared_bytes: wg_nmajor_shared_bytes(128, 4),
            };
            // SAFETY: as below, with U packed [rows, u_cols] in t.
            return unsafe { e.launch(&plan, &params) };
        }
        #[cfg(feature = "experimental-kernels")]
        Gemm::Mma { .. } => gemm_shared_bytes(es, 128, 128, 32, false, false, u_cols, 3),
        _ => gemm_shared_bytes(es, 128, 128, 32, false, false, u_cols, 1),
    };
    let plan = LaunchPlan {
        kernel,
        grid: (blocks(tokens, GEMM_TILE), blocks(d, GEMM_TILE), 1),
        block: (THREADS, 1, 1),
        shared_bytes,
    };
    // SAFETY: G [T, rows] in gt, W / U rows [rows] from the given starts, Vh
    // [r, d], dh [T, d] (T or f32 when accumulating) and gu [T, r] f32: the
    // callers check or allocate these sizes.
    unsafe { e.launch(&plan, &params) }
}

/// `out += scale · G·B` in f32 [T, ncols]: a grad_h launch with no U
/// columns (rank 0, accumulating), B [rows, ncols] in the storage dtype `t`
/// as its W operand. The same kernels as [`grad_h`] (no new code), for
/// products that cannot ride in W's tiles: U's low parts (`head_backward`'s
/// f16 / bf16 split),
/// and G·W and G·U apart at ranks above [`select::MAX_HEAD_RANK`]
/// ([`grad_h_wide_rank`]). `scale` ≠ 1 goes through a zeroed f32 buffer and
/// `tl_sum_partials`.
///
/// # Safety
/// G [T, rows] in `gt`, B [rows, ncols] in `t`, `out` [T, ncols] f32 and the
/// tile flags `live` (as in [`GradH`]) valid until the executor's launches
/// finish; `out` overlaps neither input.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn grad_plain<E: Executor>(
    e: &E,
    (t, gt): (DType, DType),
    (g, b, out): (u64, u64, u64),
    (rows, ncols): (usize, usize),
    tokens: usize,
    live: Option<(u64, usize)>,
    scale: f32,
) -> Result<()> {
    let tmp = if scale != 1.0 { Some(e.scratch(tokens * ncols * 4)?) } else { None };
    let params = HeadGradHParams {
        g,
        w: b,
        u: 0,
        vh: 0,
        dh: tmp.as_ref().map_or(out, |x| e.addr(x)),
        gu: 0,
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", rows)?,
        hidden: i32_of("columns", ncols)?,
        rank: 0,
        scale: 0.0,
        accumulate: 1,
        live: live.map_or(0, |l| l.0),
        live_ld: live.map_or(0, |l| l.1 as i32),
        _pad: 0,
    };
    let gemm = select::gemm(Site::GuLowPart, t, gt, &e.options());
    let stages = if gemm == Gemm::Tile { 1 } else { 3 };
    let plan = LaunchPlan {
        kernel: select::grad_h_kernel(t, gt, 16, gemm)?,
        grid: (blocks(tokens, GEMM_TILE), blocks(ncols, GEMM_TILE), 1),
        block: (THREADS, 1, 1),
        shared_bytes: gemm_shared_bytes(t.size(), 128, 128, 32, false, false, 16, stages),
    };
    // SAFETY: G [T, rows] in gt, B [rows, ncols] in t, out (or tmp) [T,
    // ncols] f32 (caller / above); rank 0 and accumulate: the U, Vh and gu
    // addresses are never read or written.
    unsafe { e.launch(&plan, &params)? };
    let Some(tmp) = tmp else { return Ok(()) };
    let add = SumPartialsParams {
        partial: e.addr(&tmp),
        out,
        chunks: 1,
        count: i32_of("tokens * columns", tokens * ncols)?,
        scale,
        _pad: 0,
    };
    let plan = LaunchPlan::linear(select::kernel("tl_sum_partials")?, blocks(tokens * ncols, THREADS), THREADS);
    // SAFETY: tmp [T, ncols] written above, out [T, ncols] f32 (caller).
    unsafe { e.launch(&plan, &add) }
}

/// The accumulating [`grad_h`] (`dh += G W`, `gu += G U`, both f32) at ranks
/// above [`select::MAX_HEAD_RANK`], whose U columns do not fit beside W's in a
/// tile: two [`grad_plain`]s, G·W into `dh` and G·U into `gu`, with U given
/// in the storage dtype (`op.u` [rows, r] in `t`: U itself in f32, packed
/// once by the caller in f16 / bf16).
///
/// # Safety
/// As [`grad_h`] with `accumulate`, and `op.u` in `t`.
pub(super) unsafe fn grad_h_wide_rank<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    (t, gt): (DType, DType),
    op: GradH,
    tokens: usize,
) -> Result<()> {
    debug_assert!(op.accumulate);
    let (d, r) = (cfg.hidden(), cfg.rank());
    // SAFETY: the caller's G, W rows, dh [T, d] f32; U rows in t and gu [T, r] f32.
    unsafe {
        grad_plain(e, (t, gt), (op.g, op.w, op.dh), (op.rows, d), tokens, op.live, 1.0)?;
        grad_plain(e, (t, gt), (op.g, op.u, op.gu), (op.rows, r), tokens, op.live, 1.0)
    }
}

/// Operands of one grad_param launch, `grad[v, :] += scale · Gᵀ[v, :] · b`
/// over `rows` vocabulary rows: G [T, rows] (dtype `gt`), `b` [T, ncols]
/// (storage dtype), `grad` [rows, ncols] f32.
pub(super) struct GradParam {
    pub(super) g: u64,
    pub(super) b: u64,
    pub(super) grad: u64,
    pub(super) rows: usize,
    pub(super) ncols: usize,
    /// Tile flags of G as in [`GradH`], if filtered.
    pub(super) live: Option<(u64, usize)>,
    /// 0, or tokens per split (a multiple of 128): the token range is split
    /// over grid.z and each split WRITES its partial sums to
    /// `grad + z·rows·ncols` (the caller sums them in order).
    pub(super) k_split: usize,
    pub(super) scale: f32,
}

/// One grad_param launch (`dU += Gᵀ p`, `dW += Gᵀ h`), see [`GradParam`].
///
/// # Safety
/// Every address of `op` holds the matrix its field documents, valid until the
/// executor's launches finish; `grad` overlaps none of the inputs.
pub(super) unsafe fn grad_param<E: Executor>(e: &E, t: DType, gt: DType, op: GradParam, tokens: usize) -> Result<()> {
    let GradParam { g, b, grad, rows, ncols, live, k_split, scale } = op;
    let splits = if k_split > 0 { tokens.div_ceil(k_split) } else { 1 };
    let params = HeadGradParamParams {
        g,
        b,
        grad,
        live: live.map_or(0, |l| l.0),
        tokens: i32_of("tokens", tokens)?,
        vocab: i32_of("vocab", rows)?,
        ncols: i32_of("columns", ncols)?,
        scale,
        live_ld: live.map_or(0, |l| l.1 as i32),
        k_split: i32_of("token split", k_split)?,
    };
    // n64 for the rank columns of dU (8 warps along V), n128 for dW's d columns.
    let bn = if ncols <= 64 { 64 } else { 128 };
    let gemm = select::gemm(Site::GradParam { filtered: live.is_some() }, t, gt, &e.options());
    let shared_bytes = match gemm {
        // Gᵀ read M-major, b N-major (head.cu).
        #[cfg(feature = "experimental-kernels")]
        Gemm::Wgmma { .. } => wg_mn_shared_bytes(bn, 4),
        #[cfg(feature = "experimental-kernels")]
        Gemm::Mma { .. } => gemm_shared_bytes(t.size(), 128, bn, 32, true, false, 0, 3),
        _ => gemm_shared_bytes(t.size(), 128, bn, 32, true, false, 0, 1),
    };
    let plan = LaunchPlan {
        kernel: select::grad_param_kernel(t, gt, bn, gemm)?,
        grid: (blocks(rows, GEMM_TILE), blocks(ncols, bn as u32), splits as u32),
        block: (THREADS, 1, 1),
        shared_bytes,
    };
    // SAFETY: G [T, rows], b [T, ncols], grad [splits, rows, ncols] f32 (callers).
    unsafe { e.launch(&plan, &params) }
}

/// `dh = g_scale · (dh_acc + s · gu · Vh)` in the storage dtype.
///
/// # Safety
/// `dh_acc` [T, d] and `gu` [T, r] f32, Vh [r, d] f32 and `dh` [T, d] in `t`,
/// valid until the executor's launches finish.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn grad_finish<E: Executor>(
    e: &E,
    cfg: &LoraConfig,
    t: DType,
    dh_acc: u64,
    gu: u64,
    vh: u64,
    dh: u64,
    tokens: usize,
    g_scale: f32,
) -> Result<()> {
    let d = cfg.hidden();
    let finish = XentGradFinishParams {
        dh_acc,
        gu,
        vh,
        dh,
        tokens: i32_of("tokens", tokens)?,
        hidden: i32_of("hidden", d)?,
        rank: i32_of("rank", cfg.rank())?,
        scale: cfg.scale() as f32,
        g_scale,
        _pad: 0,
    };
    let plan = row_plan(select::by_dtype("tl_xent_grad_finish_", t, "")?, tokens, d);
    // SAFETY: dh_acc [T, d] and gu [T, r] f32, Vh [r, d] and dh [T, d] (callers).
    unsafe { e.launch(&plan, &finish) }
}
